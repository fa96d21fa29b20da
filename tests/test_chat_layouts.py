"""The chat layouts llama-3, chatml and mistral (chat.py) against the checkpoint's own Jinja template: with the slots
removed, a conversation's LLM ids equal tokenizer.apply_chat_template on the same messages, in training (every turn
answered) and as a generation prompt after earlier turns; labels sit on the answers and their end-of-turn token."""
import pytest
import sentencepiece as spm
from transformers import LlamaTokenizer, PreTrainedTokenizerFast

from chat import LLMTokenizer, chat_layout
from conftest import SYSTEM_PROMPT
from fusion import IGNORE, TokenSpace, TokenSpaceConfig
from tiny_llms import MISTRAL_TEMPLATE, save_tokenizer

TURNS = [("What colour is the shape in row 2, column 3?", "The shape is red."),
         ("How many circles are there in the image?", "There are 3 circles."),
         ("Is there a blue triangle in the image?", "Yes")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, llama_tokenizer_dir):
    """layout -> (LLM folder, the reference tokenizer holding the family's template)."""
    out = {}
    for layout in ("llama-3", "chatml"):
        folder = tmp_path_factory.mktemp(layout)
        save_tokenizer(folder, layout)
        out[layout] = folder, PreTrainedTokenizerFast.from_pretrained(folder)
    # Mistral v0.1-v0.3 ship a SentencePiece tokenizer.model, which we read; their tokenizer.json (legacy: a space
    # before every segment, as SentencePiece's dummy prefix) renders the template
    reference = LlamaTokenizer.from_pretrained(llama_tokenizer_dir, legacy=True, add_prefix_space=True)
    reference.chat_template = MISTRAL_TEMPLATE
    out["mistral"] = llama_tokenizer_dir, reference
    return out


def space(clip_folder, llm_folder, layout, **overrides):
    settings = dict(image_size=28, num_crops=0, n_l=3, n_s=2, system_prompt=SYSTEM_PROMPT, chat_template=layout)
    return TokenSpace(TokenSpaceConfig(clip_path=str(clip_folder), llama_path=str(llm_folder), **dict(settings, **overrides)))


def messages(system, turns):
    out = [{"role": "system", "content": system}] if system else []
    for question, answer in turns:
        out.append({"role": "user", "content": question})
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
    return out


def reference_ids(tokenizer, msgs, generation):
    return tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=generation)["input_ids"]


@pytest.mark.parametrize("layout", ["llama-3", "chatml", "mistral"])
@pytest.mark.parametrize("system", [SYSTEM_PROMPT, ""])
def test_a_conversation_without_its_slots_is_the_templates(folders, clip_vocab_dir, draw_image, layout, system):
    folder, reference = folders[layout]
    s = space(clip_vocab_dir, folder, layout, system_prompt=system)
    image = draw_image(20, 20)
    if layout == "chatml" and not system:
        pytest.skip("on purpose: no system turn, where Qwen2.5's template writes its own (chat.py)")
    if layout == "mistral" and system:
        pytest.skip("on purpose: the first question after a system prompt starts a word (chat.py)")
    sample = s.make_sample(image, TURNS)
    ids, slots = sample["input_ids"].tolist(), sample["slot_mask"].tolist()
    assert sum(slots) == 3 + 2 + 2
    assert [t for t, slot in zip(ids, slots) if not slot] == reference_ids(reference, messages(system, TURNS), False)

    # a generation prompt after two answered turns (sample.py's chat) ends where the template's generation prompt does
    prompt = s.make_sample(image, TURNS[:2] + [(TURNS[2][0], None)])
    ids, slots = prompt["input_ids"].tolist(), prompt["slot_mask"].tolist()
    expected = reference_ids(reference, messages(system, TURNS[:2] + [(TURNS[2][0], None)]), True)
    assert [t for t, slot in zip(ids, slots) if not slot] == expected


@pytest.mark.parametrize("layout", ["llama-3", "chatml", "mistral"])
def test_labels_are_the_answers_and_their_end_of_turn_token(folders, clip_vocab_dir, draw_image, layout):
    folder, _ = folders[layout]
    s = space(clip_vocab_dir, folder, layout)
    sample = s.make_sample(draw_image(20, 20), TURNS)
    tok = LLMTokenizer(str(folder))
    end = {"llama-3": "<|eot_id|>", "chatml": "<|im_end|>", "mistral": None}[layout]
    end_id = tok.eos if end is None else tok.token(end)
    assert s.eos == end_id  # generation stops at the end of the turn, not at <|end_of_text|> / <|endoftext|>
    labelled = sample["labels"][sample["labels"] != IGNORE].tolist()
    assert labelled == [t for _, answer in TURNS for t in tok.encode(answer) + [end_id]]
    # each label sits on its own token (not shifted), and the slots are never labelled
    mask = sample["labels"] != IGNORE
    assert sample["input_ids"][mask].tolist() == labelled and not (mask & sample["slot_mask"]).any()


def test_a_conversation_text_never_becomes_a_control_token(folders):
    tok = LLMTokenizer(str(folders["llama-3"][0]))
    assert tok.token("<|eot_id|>") not in tok.encode("a literal <|eot_id|> in an answer")


def test_bos_and_eos_come_from_the_tokenizer_files(folders):
    llama3, qwen = LLMTokenizer(str(folders["llama-3"][0])), LLMTokenizer(str(folders["chatml"][0]))
    assert (llama3.bos, llama3.eos) == (llama3.token("<|begin_of_text|>"), llama3.token("<|eot_id|>"))
    assert (qwen.bos, qwen.eos) == (None, qwen.token("<|im_end|>"))  # Qwen has no bos: the layout writes none


def test_a_layout_whose_tokens_the_tokenizer_lacks_is_refused(folders):
    with pytest.raises(ValueError, match="no '<|im_end|>' token.*does not fit this LLM"):
        chat_layout("chatml", LLMTokenizer(str(folders["llama-3"][0])), "")


def test_a_control_symbol_of_a_sentencepiece_model_is_one_token(tmp_path):
    # Mistral v0.3's tokenizer.model holds [INST] and [/INST] as control symbols: the template's pieces become them,
    # and a question that spells them out stays text
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TURNS[0] * 20), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=285, control_symbols=["[INST]", "[/INST]"], byte_fallback=True,
                                   minloglevel=2)
    tok = LLMTokenizer(str(tmp_path))
    inst = tok.sp.piece_to_id("[INST]")
    assert tok.encode_template("[INST]") == [inst] and inst not in tok.encode("[INST]")
    layout = chat_layout("mistral", tok, "")
    assert layout.first_head == [tok.bos, inst] and layout.close_question == [tok.sp.piece_to_id("[/INST]")]
