"""The LLM families our Llama runs: Llama-3.x (llama3 RoPE scaling, rope_theta 5e5, grouped KV heads, tied embeddings),
Qwen2/2.5 (q/k/v biases, tied embeddings) and Mistral (sliding window), each against transformers' own class saved
by save_pretrained; and the config keys it refuses by name."""
import json

import pytest
import torch
from transformers import (GenerationConfig, LlamaConfig as HFLlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)
from transformers.utils import logging as hf_logging

from backbones import Llama

hf_logging.set_verbosity_error()

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
# head_dim 16 at theta 5e5: wavelengths 6, 32, 164, ... tokens; an original context of 64 puts one below the
# high-frequency bound (16, kept), one between the bounds (smoothed) and the rest above 64 (stretched by 8)
LLAMA3 = (LlamaForCausalLM, HFLlamaConfig, dict(TINY, rope_theta=5e5, tie_word_embeddings=True, max_position_embeddings=256,
          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=64)))
QWEN2 = (Qwen2ForCausalLM, Qwen2Config, dict(TINY, tie_word_embeddings=True, rope_theta=1e6))
MISTRAL = (MistralForCausalLM, MistralConfig, dict(TINY, sliding_window=48))
FAMILIES = {"llama-3.1": LLAMA3, "qwen2": QWEN2, "mistral": MISTRAL}


def save(folder, family, seed=0, **overrides):
    model_class, config_class, settings = FAMILIES[family]
    torch.manual_seed(seed)
    reference = model_class(config_class(**dict(settings, **overrides))).eval()
    with torch.no_grad():  # random biases: transformers initializes them to zero, which would hide a dropped one
        for name, p in reference.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    reference.save_pretrained(folder, safe_serialization=True)
    return reference


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, save(folder, request.param)


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def test_logits_match_transformers(family_folder):
    family, folder, reference = family_folder
    llama = Llama.from_hf(folder).eval()
    input_ids = torch.randint(3, 128, (2, 48), generator=torch.Generator().manual_seed(0))  # positions past 16 and 64
    with torch.no_grad():
        assert max_diff(llama(input_ids=input_ids), reference(input_ids=input_ids).logits) <= 1e-5
    if family != "mistral":  # tied: one table in the file, read into both ends
        assert torch.equal(llama.lm_head.weight, llama.embed_tokens.weight)


def test_greedy_generation_of_a_left_padded_batch_matches_transformers(family_folder):
    _, folder, reference = family_folder
    llama = Llama.from_hf(folder).eval()
    input_ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    config = GenerationConfig(do_sample=False, max_new_tokens=8, eos_token_id=None, pad_token_id=0, bos_token_id=1)
    with torch.no_grad():
        ours = llama.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8)
        expected = reference.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    assert torch.equal(ours, expected[:, 7:])


def test_mistral_refuses_a_sequence_beyond_its_sliding_window(tmp_path):
    save(tmp_path, "mistral")
    llama = Llama.from_hf(tmp_path).eval()
    with torch.no_grad():
        llama(input_ids=torch.ones(1, 48, dtype=torch.long))  # up to the window: full attention, as transformers
        with pytest.raises(ValueError, match="49 tokens exceeds the LLM's sliding_window=48"):
            llama(input_ids=torch.ones(1, 49, dtype=torch.long))
        with pytest.raises(ValueError, match="sliding_window=48"):
            llama.generate(input_ids=torch.ones(1, 45, dtype=torch.long), max_new_tokens=8)


def test_a_qwen2_sliding_window_applies_only_when_switched_on(tmp_path):
    save(tmp_path / "off", "qwen2", sliding_window=8, use_sliding_window=False)
    assert Llama.from_hf(tmp_path / "off").cfg.sliding_window is None
    save(tmp_path / "on", "qwen2", sliding_window=8, use_sliding_window=True, max_window_layers=1)
    assert Llama.from_hf(tmp_path / "on").cfg.sliding_window == 8


@pytest.mark.parametrize("key, value", [("model_type", "gemma"), ("hidden_act", "gelu"), ("attention_bias", True),
                                        ("mlp_bias", True), ("head_dim", 8),
                                        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})])
def test_a_config_key_we_cannot_run_exactly_is_refused_by_name(tmp_path, key, value):
    save(tmp_path, "llama-3.1")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **{key: value})))
    with pytest.raises(ValueError, match=f"{key}=.* is not supported"):
        Llama.from_hf(tmp_path)


def test_a_transformers4_config_reads_rope_theta_and_rope_scaling(tmp_path):
    # Llama-3.1's own config.json (transformers 4.x): top-level rope_theta, rope_scaling with rope_type llama3
    reference = save(tmp_path, "llama-3.1")
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, rope_scaling=rope)))
    input_ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_diff(Llama.from_hf(tmp_path).eval()(input_ids=input_ids), reference(input_ids=input_ids).logits) <= 1e-5


def test_a_tensor_the_config_leaves_unused_is_refused(tmp_path):
    # a Qwen2 folder whose model_type was edited to llama: our Llama would silently drop the q/k/v biases
    save(tmp_path, "qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
    with pytest.raises(KeyError, match="checkpoint tensors that the config leaves unused.*q_proj.bias"):
        Llama.from_hf(tmp_path)
