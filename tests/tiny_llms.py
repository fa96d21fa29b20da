"""Tiny checkpoint folders of today's LLMs for the tests: a byte-level BPE tokenizer.json built here with the
`tokenizers` library (Llama-3's and Qwen2's pre-tokenizer split, their special tokens, bos/eos and the family's real
Jinja chat template in tokenizer_config.json), and a random model saved by transformers' own class."""
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from conftest import TOKENIZER_TEXTS

# Meta-Llama-3-8B-Instruct's tokenizer_config.json (Llama-3.1/3.2's adds tool use and a dated system header)
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                   "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5-7B-Instruct's, its branch for tool calls left out
QWEN25_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Mistral-7B-Instruct-v0.1/v0.2's template as updated in their tokenizer_config.json
MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""
# the pre-tokenizer split of Llama-3 (Qwen2's differs only in splitting numbers into single digits)
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
FAMILIES = {
    "llama-3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                              "<|eot_id|>"], bos="<|begin_of_text|>", eos="<|eot_id|>", template=LLAMA3_TEMPLATE),
    "chatml": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                   template=QWEN25_TEMPLATE),
}
MODEL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-6, tie_word_embeddings=True)


def save_tokenizer(folder, layout, vocab_size=600):
    """A byte-level BPE tokenizer.json + tokenizer_config.json for the layout "llama-3" or "chatml"; returns it."""
    family = FAMILIES[layout]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TOKENIZER_TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                                 special_tokens=family["specials"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=family["bos"], eos_token=family["eos"])
    fast.chat_template = family["template"]
    fast.save_pretrained(folder)
    return fast


def save_llm(folder, layout, seed=0):
    """tokenizer + a random Llama-3.1-style (llama3 RoPE scaling, theta 5e5) or Qwen2-style (q/k/v biases) model,
    both with grouped KV heads and tied embeddings."""
    fast = save_tokenizer(folder, layout)
    torch.manual_seed(seed)
    if layout == "llama-3":
        config = LlamaConfig(vocab_size=len(fast), rope_theta=5e5, max_position_embeddings=4096,
                             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               original_max_position_embeddings=64), **MODEL)
        model = LlamaForCausalLM(config)
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(fast), **MODEL))
    model.eval().save_pretrained(folder, safe_serialization=True)
