"""
The LLM's side of the token space: its tokenizer and the chat layouts a conversation is written in.

Tokenizer: a checkpoint folder's SentencePiece tokenizer.model when it has one (Llama-2, Vicuna, Mistral: exactly
the ids the authors' models saw), else its tokenizer.json through transformers' fast tokenizer (Llama-3.x, Qwen2/2.5).
bos and eos are the folder's own (tokenizer.model's ids; tokenizer_config.json's bos_token and eos_token).

Every piece below is encoded on its own. Template pieces may hold the vocabulary's control tokens ("<|eot_id|>",
Mistral v0.3's "[INST]"); texts of the conversation (system prompt, questions, answers) never become control tokens,
also where they spell one out. S marks the n_l or n_s slots, <eot> the end-of-turn id (labelled after each answer):

  llama-2  turn 1 <s> "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n" S "{Q}" "[/INST]" "{A} " </s>   (fusion.py tells more)
           turn t <s> "[INST]" S "{Q}" "[/INST]" "{A} " </s>
  vicuna   turn 1 <s> "{system}" "USER:" S "{Q}" "ASSISTANT:" "{A}" </s>,  turn t "USER:" S "{Q}" "ASSISTANT:" "{A}" </s>
  mistral  turn 1 <s> "[INST]" "{system}\\n\\n" S "{Q}" "[/INST]" "{A}" </s>,  turn t "[INST]" S "{Q}" "[/INST]" "{A}" </s>
  llama-3  turn 1 <|begin_of_text|> "<|start_header_id|>system<|end_header_id|>\\n\\n" "{system}"
                  "<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n" S "{Q}"
                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" "{A}" <|eot_id|>
           turn t "<|start_header_id|>user<|end_header_id|>\\n\\n" S "{Q}" "<|eot_id|><|start_header_id|>assistant..." ...
  chatml   turn 1 "<|im_start|>system\\n" "{system}" "<|im_end|>\\n<|im_start|>user\\n" S "{Q}"
                  "<|im_end|>\\n<|im_start|>assistant\\n" "{A}" <|im_end|> "\\n"
           turn t "<|im_start|>user\\n" S "{Q}" "<|im_end|>\\n<|im_start|>assistant\\n" "{A}" <|im_end|> "\\n"

An empty system prompt drops its pieces (Llama-2: turn 1 then starts like turn t). A generation prompt ends after the
question's closing piece. With the slots removed, llama-3, chatml and mistral give the ids of the checkpoint's own Jinja
template (tests/test_chat_layouts.py), but for three differences on purpose: texts are used as written (Llama-3's
template trims them); chatml writes no system turn when the system prompt is empty (Qwen2.5's template then inserts
its own; set system_prompt to it to get it); and mistral's first question after a system prompt is its own piece, so
it starts a word ("\\n\\n" + "▁What", where the template glues "\\n\\nWhat"), as every question after the slots does.
"""
import os
from dataclasses import dataclass

import sentencepiece

from configurator import InputError

CHAT_TEMPLATES = ("llama-2", "vicuna", "mistral", "llama-3", "chatml")


class LLMTokenizer:
    """encode(text) for the conversation's texts, encode_template(piece) for the template's pieces, decode(ids) of
    a generated answer without its special tokens; bos (None where the tokenizer has none, as Qwen's) and eos."""

    def __init__(self, folder):
        model, fast = os.path.join(folder, "tokenizer.model"), os.path.join(folder, "tokenizer.json")
        if os.path.isfile(model):
            self.sp, self.fast = sentencepiece.SentencePieceProcessor(model_file=model), None
            self.bos, self.eos = self.sp.bos_id(), self.sp.eos_id()  # 1, 2 for Llama-2
        elif os.path.isfile(fast):
            from transformers import PreTrainedTokenizerFast  # only the tokenizer.json folders need it
            self.sp, self.fast = None, PreTrainedTokenizerFast.from_pretrained(folder)
            self.bos, self.eos = self.fast.bos_token_id, self.fast.eos_token_id
        else:
            raise InputError(f"{folder}: llama_path lacks tokenizer.model and tokenizer.json (point llama_path at the "
                             f"LLM's checkpoint folder)")
        if self.eos is None:
            raise InputError(f"{folder}: the tokenizer names no eos token (the LLM's folder must define one)")

    def __len__(self):
        return self.sp.get_piece_size() if self.sp else len(self.fast)

    def encode(self, text):
        if self.sp:
            return self.sp.encode(text)
        return self.fast.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_template(self, piece):
        if self.sp:  # a piece that is one control symbol of the model (Mistral v0.3's [INST]) is that symbol
            token = self.sp.piece_to_id(piece)
            return [token] if token != self.sp.unk_id() and self.sp.is_control(token) else self.sp.encode(piece)
        return self.fast.encode(piece, add_special_tokens=False)

    def token(self, piece):
        """The one id of a control token such as "<|eot_id|>"."""
        ids = self.encode_template(piece)
        if len(ids) != 1:
            raise InputError(f"the LLM's tokenizer has no {piece!r} token (it encodes to {ids}): the chat_template "
                             f"does not fit this LLM")
        return ids[0]

    def decode(self, ids):
        ids = [int(t) for t in ids]
        if self.sp:
            return self.sp.decode([t for t in ids if t not in (self.sp.unk_id(), self.bos, self.eos)])
        return self.fast.decode(ids, skip_special_tokens=True)


@dataclass
class ChatLayout:
    """Ids of the template's pieces around one turn: head + slots + question + close_question + answer + end."""
    first_head: list       # before the first question's n_l slots: bos and the system prompt included
    later_head: list       # before a later question's n_s slots
    close_question: list   # after the question; a generation prompt ends here
    answer_end: str        # text the answer piece ends with (Llama-2-chat's space before </s>)
    end_of_turn: int       # labelled after each answer; generation stops at it
    after_turn: list       # unlabelled ids after it (ChatML's newline)


def chat_layout(name, tok, system):
    """The ChatLayout `name` for the tokenizer tok and the system prompt (may be empty)."""
    if name not in CHAT_TEMPLATES:
        raise InputError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got {name!r}")
    T, C = tok.encode, tok.encode_template
    bos = [] if tok.bos is None else [tok.bos]
    if name == "llama-2":  # the system prompt inside its piece, as the authors encoded it
        first = C(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n") if system else C("[INST]")
        return ChatLayout(bos + first, bos + C("[INST]"), C("[/INST]"), " ", tok.eos, [])
    if name == "vicuna":
        return ChatLayout(bos + T(system) + C("USER:"), C("USER:"), C("ASSISTANT:"), "", tok.eos, [])
    if name == "mistral":
        return ChatLayout(bos + C("[INST]") + (T(system + "\n\n") if system else []), C("[INST]"), C("[/INST]"),
                          "", tok.eos, [])
    if name == "llama-3":
        user, eot = C("<|start_header_id|>user<|end_header_id|>\n\n"), tok.token("<|eot_id|>")
        system_turn = C("<|start_header_id|>system<|end_header_id|>\n\n") + T(system) + [eot] if system else []
        return ChatLayout(bos + system_turn + user, user, [eot] + C("<|start_header_id|>assistant<|end_header_id|>\n\n"),
                          "", eot, [])
    # chatml
    user, end = C("<|im_start|>user\n"), tok.token("<|im_end|>")
    system_turn = C("<|im_start|>system\n") + T(system) + [end] + C("\n") if system else []
    return ChatLayout(bos + system_turn + user, user, [end] + C("\n<|im_start|>assistant\n"), "", end, C("\n"))
