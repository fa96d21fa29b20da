"""chat_template=vicuna: the Vicuna v1.1 layout in fusion.py, and a tiny Vicuna-layout model that trains, records its
template in the checkpoint and is evaluated with it.

References: the pieces of Vicuna v1.1 ("{system} USER: {Q} ASSISTANT: {A}</s>USER: ...") encoded here with
SentencePiece, one piece at a time; the generation prompt checked by reading the ids back as text; evaluate.py's
predictions against a greedy loop over a Vicuna prompt built from those pieces (and shown to differ from Llama-2's).
"""
import json
import runpy
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import benchmarks as bm
import evaluate as ev
from backbones import Llama
from checkpoint import load_checkpoint, trained_vlm
from conftest import SYSTEM_PROMPT
from fusion import TokenSpace, TokenSpaceConfig, collate, load_image
from model import FusedVLMConfig

ROOT = Path(__file__).resolve().parent.parent
Q1, A1 = "What colour is the shape in row 2, column 3?", "The shape is red."
Q2, A2 = "How many circles are there in the image?", "There are 3 circles."


@pytest.fixture(scope="module")
def sp(llama_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))


def vicuna_space(clip_vocab_dir, llama_tokenizer_dir, **overrides):
    settings = dict(image_size=28, num_crops=0, n_l=3, n_s=2, system_prompt=SYSTEM_PROMPT, chat_template="vicuna")
    return TokenSpace(TokenSpaceConfig(clip_path=str(clip_vocab_dir), llama_path=str(llama_tokenizer_dir),
                                       **dict(settings, **overrides)))


def test_vicuna_layout_two_turns(clip_vocab_dir, llama_tokenizer_dir, sp, draw_image):
    s = vicuna_space(clip_vocab_dir, llama_tokenizer_dir).make_sample(draw_image(20, 20), [(Q1, A1), (Q2, A2)])
    turn1 = [1] + sp.encode(SYSTEM_PROMPT) + sp.encode("USER:") + [0] * 3 + sp.encode(Q1) + sp.encode("ASSISTANT:")
    answer1 = sp.encode(A1) + [2]  # no space before </s>, unlike Llama-2-chat
    turn2 = sp.encode("USER:") + [0] * 2 + sp.encode(Q2) + sp.encode("ASSISTANT:")  # one <s> per conversation
    answer2 = sp.encode(A2) + [2]
    assert s["input_ids"].tolist() == turn1 + answer1 + turn2 + answer2
    start1 = 1 + len(sp.encode(SYSTEM_PROMPT)) + len(sp.encode("USER:"))
    start2 = len(turn1) + len(answer1) + len(sp.encode("USER:"))
    assert s["slot_mask"].nonzero().flatten().tolist() == [start1, start1 + 1, start1 + 2, start2, start2 + 1]
    labelled = (s["labels"] != -100).nonzero().flatten().tolist()
    assert labelled == (list(range(len(turn1), len(turn1) + len(answer1)))
                        + list(range(len(turn1) + len(answer1) + len(turn2), len(s["input_ids"]))))
    assert s["labels"][labelled].tolist() == answer1 + answer2
    text = sp.decode([t for t, slot in zip(s["input_ids"].tolist(), s["slot_mask"].tolist()) if not slot])
    assert text == " ".join([SYSTEM_PROMPT, "USER:", Q1, "ASSISTANT:", A1, "USER:", Q2, "ASSISTANT:", A2])


def test_vicuna_generation_prompt_ends_after_assistant(clip_vocab_dir, llama_tokenizer_dir, sp, draw_image):
    s = vicuna_space(clip_vocab_dir, llama_tokenizer_dir, system_prompt="").generation_sample(draw_image(8, 8), Q1)
    assert s["input_ids"].tolist() == [1] + sp.encode("USER:") + [0] * 3 + sp.encode(Q1) + sp.encode("ASSISTANT:")
    assert sp.decode(s["input_ids"][-len(sp.encode("ASSISTANT:")):].tolist()) == "ASSISTANT:"
    assert (s["labels"] == -100).all()


def test_an_unknown_template_is_refused(clip_vocab_dir, llama_tokenizer_dir):
    with pytest.raises(ValueError, match="chat_template must be one of llama-2, vicuna, mistral, llama-3, chatml, got 'alpaca'"):
        vicuna_space(clip_vocab_dir, llama_tokenizer_dir, chat_template="alpaca")


def test_a_vicuna_model_trains_records_its_template_and_evaluates_with_it(synthetic_world, tmp_path, monkeypatch):
    world = synthetic_world
    args = [str(ROOT / "config" / "tiny.py"), f"--data_dir={world}", f"--clip_path={world}/clip",
            f"--llama_path={world}/llama", f"--out_dir={tmp_path}", "--num_crops=0", "--batch_size=2", "--grad_accum=2",
            "--max_iters=4", "--log_interval=1", "--lr=3e-3", "--chat_template=vicuna"]
    monkeypatch.setattr(sys, "argv", ["train_gen.py"] + args)
    monkeypatch.chdir(ROOT)
    trained = runpy.run_path(str(ROOT / "train_gen.py"), run_name="__main__")
    sample = trained["dataset"][0]
    assert trained["token_space"].cfg.chat_template == "vicuna"
    assert 1 not in sample["input_ids"][1:].tolist()  # a single <s>: the Vicuna layout reached the trained batches
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(loss == loss for loss in losses)

    # evaluation: the token space rebuilt from the checkpoint's meta, as evaluation scripts do, answers greedily
    tensors, meta = load_checkpoint(str(tmp_path))
    assert meta["token_space"]["chat_template"] == "vicuna"
    space = TokenSpace(TokenSpaceConfig(clip_path=f"{world}/clip", llama_path=f"{world}/llama", **meta["token_space"]))
    vlm = trained_vlm(FusedVLMConfig.from_dict(meta["model_config"]),
                                   {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                                   Llama.from_hf(f"{world}/llama"), str(tmp_path)).eval()
    record = json.loads((world / "val.jsonl").read_text().splitlines()[0])
    prompt = space.generation_sample(load_image(str(world / record["image"])), record["messages"][0]["content"])
    assert prompt["input_ids"][-len(space.layout.close_question):].tolist() == space.layout.close_question
    with torch.no_grad():
        answers = vlm.generate(collate([prompt], pad_side="left"), max_new_tokens=4, eos_token_id=space.eos)
    assert len(answers) == 1 and 1 <= len(answers[0]) <= 4

    # evaluate.py on the checkpoint answers each row as a greedy loop over a Vicuna-layout prompt built here by hand
    ev.main([f"--ckpt={tmp_path}", "--benchmarks=SYNTH_CAPTION", f"--bench_dir={world / 'bench'}",
             f"--out_dir={tmp_path / 'eval'}", "--batch_size=1"])
    [predictions_file] = (tmp_path / "eval").glob("*/predictions_SYNTH_CAPTION.jsonl")
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    rows = bm.load_benchmark("SYNTH_CAPTION", str(world / "bench" / "SYNTH_CAPTION.tsv"))
    assert [p["index"] for p in predictions] == [row.index for row in rows]
    sp, trained = space.sp, meta["token_space"]
    llama_2 = TokenSpace(TokenSpaceConfig(clip_path=f"{world}/clip", llama_path=f"{world}/llama",
                                          **dict(trained, chat_template="llama-2")))

    def greedy(token_space, row):
        sample = token_space.generation_sample(row.images()[-1], row.prompt)  # evaluate.py's JPEG round trip too
        with torch.no_grad():
            ids = vlm.generate(collate([sample], pad_side="left"), eos_token_id=space.eos,
                               max_new_tokens=bm.benchmark_spec("SYNTH_CAPTION").max_new_tokens)[0]
        return sample, sp.decode([t for t in ids if t not in (0, 1, 2)]).strip()  # unk, <s>, </s>

    differs = 0
    for row, prediction in zip(rows, predictions):
        sample, answer = greedy(space, row)
        vicuna = ([1] + sp.encode(trained["system_prompt"]) + sp.encode("USER:") + [0] * trained["n_l"]
                  + sp.encode(row.prompt) + sp.encode("ASSISTANT:"))
        assert sample["input_ids"].tolist() == vicuna
        assert prediction["prompt"] == row.prompt and prediction["prediction"] == answer
        differs += greedy(llama_2, row)[1] != answer
    assert differs > 0  # the two layouts give other answers here, so the comparison above can tell them apart
