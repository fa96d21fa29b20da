"""The tiny reproduction: stage 0 (the LLM's sequence layout, its gate's scoring, the saved LLM against transformers, the
CLIP pairs and the saved CLIP) and reproduce_tiny.sh end to end at CI size."""
import collections
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data" / "synthetic"))

import pretrain_clip  # noqa: E402
import pretrain_llm  # noqa: E402
from backbones import Llama, ViT  # noqa: E402
from conftest import SYSTEM_PROMPT  # noqa: E402


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world


def hf_llama(path):
    model, info = LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key: the names are HF's
    return model.eval()


def test_pretrained_llm_loads_in_transformers_with_equal_logits(world, tmp_path):
    out = tmp_path / "llama-lm"
    pretrain_llm.main(pretrain_llm.Config(data_dir=str(world), llama_path=str(world / "llama"), out_dir=str(out),
                                          max_iters=4, batch_size=8, log_interval=2))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == (world / "llama" / "tokenizer.model").read_bytes()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf_llama(out)(input_ids=ids).logits
        ours = Llama.from_hf(str(out))(input_ids=ids)
        start = hf_llama(world / "llama")(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (reference - start).abs().max() > 1e-2  # the saved weights are the trained ones, not the random start


LETTERS = "EFGHJKLMNPQRSTUV"


@pytest.fixture(scope="module")
def token_space(world):
    from fusion import TokenSpace, TokenSpaceConfig

    return TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"), n_l=1, n_s=1))


def hand_prompt(sp, index, scene_text, question):
    """Stage 2's prompt of turn `index` by hand (Llama-2 chat template, each piece tokenized on its own), the scene
    in words where the vision slots go in the first turn."""
    head = [1] + sp.encode(f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n") + (sp.encode(scene_text) if scene_text else []) \
        if index == 0 else [1] + sp.encode("[INST]")
    return head + sp.encode(question) + sp.encode("[/INST]")


def test_layout_is_stage_two_sequence_with_the_scene_in_words(token_space):
    from fusion import IGNORE

    sp = token_space.sp
    scene = ("red", "empty", "blue", "green") * 4
    words = " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, scene))
    messages = [{"role": "user", "content": "What colour is cell C?"}, {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "What is in row 2?"},
                {"role": "assistant", "content": "E red F empty G blue H green"}]
    for scene_text in (words, "B empty K blue", ""):  # the whole scene, a listed subset, none (the gate's blind run)
        ids, labels = [], []
        for i in range(0, len(messages), 2):
            prompt = hand_prompt(sp, i // 2, scene_text, messages[i]["content"])
            answer = sp.encode(messages[i + 1]["content"] + " ") + [2]
            ids += prompt + answer
            labels += [IGNORE] * len(prompt) + answer
        assert pretrain_llm.layout(token_space, messages, scene_text) == (ids, labels)
    # a generation prompt: ends after [/INST], nothing to learn
    prompt = hand_prompt(sp, 0, words, "Is cell A red?")
    got = pretrain_llm.layout(token_space, [{"content": "Is cell A red?"}, {"content": None}], words)
    assert got == (prompt, [IGNORE] * len(prompt))


def test_batch_of_shifts_labels_and_pads():
    from fusion import IGNORE

    inputs, targets = pretrain_llm.batch_of([([1, 5, 6, 2], [IGNORE, IGNORE, 6, 2]), ([1, 7, 2], [IGNORE, 7, 2])])
    assert inputs.tolist() == [[1, 5, 6], [1, 7, 0]]
    assert targets.tolist() == [[IGNORE, 6, 2], [7, 2, IGNORE]]


class PlantedLLM:
    """Stands in for model.Llama in exact_match: looks each left-padded prompt up in `answers` (prompt -> its
    answers in order; a KeyError if the prompt is not the one built by hand) and emits what a trained LLM would (the
    answer's tokens with the trailing space it was trained on, then </s>), cut at max_new_tokens, rows padded with
    </s> as Llama.generate does."""

    def __init__(self, sp, questions, prompt, planted):
        self.sp, self.answers = sp, collections.defaultdict(list)
        for i, (scene, _, question, answer) in enumerate(questions):
            self.answers[prompt(scene, question)].append(planted(i, answer))

    def generate(self, input_ids, attention_mask, max_new_tokens, eos_token_id):
        rows = [(self.sp.encode(self.answers[tuple(ids[mask].tolist())].pop(0) + " ") + [eos_token_id])[:max_new_tokens]
                for ids, mask in zip(input_ids, attention_mask)]
        return torch.tensor([row + [eos_token_id] * (max(map(len, rows)) - len(row)) for row in rows])


def test_exact_match_scores_planted_answers(token_space):
    sp = token_space.sp
    questions = pretrain_llm.gate_questions(12, seed=0)  # cell, check, row in rotation: 4 each
    assert [c for _, c, _, _ in questions] == ["cell", "check", "row"] * 4

    def with_scene(scene, question):
        words = " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, scene))
        return tuple(hand_prompt(sp, 0, words, question))

    def blind(scene, question):
        return tuple(hand_prompt(sp, 0, "", question))

    # right on the even-numbered questions (2 of each category's 4), a wrong answer on the others
    llm = PlantedLLM(sp, questions, with_scene, lambda i, answer: answer if i % 2 == 0 else f"not {answer}")
    scores = pretrain_llm.exact_match(llm, token_space, questions, with_scene=True, batch_size=5)
    assert scores == {"cell": 0.5, "check": 0.5, "row": 0.5, "lookups": 0.5, "all": 0.5}
    llm = PlantedLLM(sp, questions, blind, lambda i, answer: answer)
    scores = pretrain_llm.exact_match(llm, token_space, questions, with_scene=False)
    assert scores == {"cell": 1.0, "check": 1.0, "row": 1.0, "lookups": 1.0, "all": 1.0}
    llm = PlantedLLM(sp, questions, blind, lambda i, answer: "purple" if answer != "purple" else "red")
    scores = pretrain_llm.exact_match(llm, token_space, questions, with_scene=False)
    assert scores == {"cell": 0.0, "check": 0.0, "row": 0.0, "lookups": 0.0, "all": 0.0}


def test_pretrained_clip_is_an_hf_clip_our_vit_reads(world, tmp_path):
    out = tmp_path / "clip-pretrained"
    pretrain_clip.main(pretrain_clip.Config(data_dir=str(world), out_dir=str(out), max_iters=3, batch_size=8,
                                            log_interval=1))
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (world / "clip" / name).read_bytes()
    trained, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    start = CLIPModel.from_pretrained(world / "clip")
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained.eval().vision_model(pixel_values=pixels).last_hidden_state
        before = start.eval().vision_model(pixel_values=pixels).last_hidden_state
        ours = ViT.from_hf(str(out))(pixels)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (reference - before).abs().max() > 1e-3  # trained weights were saved


def test_clip_pairs_are_the_images_and_their_scenes_in_words():
    """Each global view, read back to pixels at the cell centres (14 + 28 k px), shows what its text says."""
    import random

    from fusion import CLIP_MEAN, CLIP_STD
    from prepare import BACKGROUND, COLOURS

    name_of = {rgb: name for name, rgb in COLOURS.items()} | {BACKGROUND: "empty"}
    views, texts = pretrain_clip.pairs(random.Random(0), 6, 112)
    assert views.shape == (6, 3, 112, 112) and len(texts) == 6 and len(set(texts)) == 6
    pixels = ((views * CLIP_STD + CLIP_MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
    for view, text in zip(pixels, texts):
        cells = [name_of[tuple(view[:, 14 + 28 * r, 14 + 28 * c].tolist())] for r in range(4) for c in range(4)]
        assert text == " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, cells))


CI_NL = (1, 2, 4)  # a fit needs 3 distinct n_l
# 60 small LLM steps: enough for it to answer in the benchmarks' formats, so some scores are positive and get fitted
CI_ENV = {"TINY_NL": " ".join(map(str, CI_NL)), "TINY_BASE_NL": "4", "TINY_TRAIN": "160", "TINY_BENCH": "8",
          "TINY_LM_STEPS": "60", "TINY_LM_BATCH": "8", "TINY_CLIP_STEPS": "2", "TINY_ALIGN_STEPS": "1",
          "TINY_GEN_STEPS": "1", "TINY_SWAP_STEPS": "1", "TINY_FT_STEPS": "1", "TINY_GEN_BATCH": "4",
          # a seconds-long run learns nothing: the gates are measured and printed, but cannot stop it
          "TINY_GATE_LLM": "-1", "TINY_GATE_GAP": "-1000"}
VARIANTS = ("VQQ", "VQ-ft", "VQQ-shuffled", "pool", "resampler")
HEADLINE = {"SYNTH_YORN": {"Overall", "acc", "precision", "recall"}, "SYNTH_MCQ": {"Overall"},
            "SYNTH_VQA": {"Overall"}, "SYNTH_CAPTION": {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"}}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_reproduce_tiny_end_to_end(tmp_path):
    env = dict(os.environ, TINY_OUT=str(tmp_path / "out"), TINY_RESULTS=str(tmp_path / "results"),
               PYTHON=sys.executable, **CI_ENV)
    result = subprocess.run(["bash", "reproduce_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    gates = [line for line in result.stdout.splitlines() if "] GATE " in line]
    assert len(gates) == 3 and all(line.endswith("passed") for line in gates), gates
    assert (tmp_path / "results" / "targets.txt").read_text().rstrip().endswith("of 4 targets met")
    with open(tmp_path / "results" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["variant"], r["benchmark"], r["metric"], int(r["n_l"]), int(r["n_s"])) for r in rows}
    for variant in VARIANTS:
        for n in CI_NL:
            for benchmark, metrics in HEADLINE.items():
                for metric in metrics:
                    assert (variant, benchmark, metric, n, min(n, 4)) in got
    assert len(got) == len(rows)  # one row per number
    # the YORN accuracy recomputed from the predictions file and the TSV with POPE's rule: right when exactly one of
    # the words yes / no occurs and it is the answer
    for r in rows:
        if r["benchmark"] == "SYNTH_YORN" and r["metric"] == "acc":
            sweep = "eval-" + r["variant"].removesuffix("-shuffled")  # VQQ-shuffled runs with VQQ's sweep
            run_dir = tmp_path / "out" / sweep / f"{r['variant']}_nl{r['n_l']}"
            with open(run_dir / "predictions_SYNTH_YORN.jsonl") as f:
                predicted = {p["index"]: p["prediction"] for p in map(json.loads, f)}
            with open(tmp_path / "out" / "data" / "bench" / "SYNTH_YORN.tsv", newline="") as f:
                truth = {t["index"]: t["answer"] for t in csv.DictReader(f, delimiter="\t")}
            words = {i: re.findall(r"[a-z]+", p.lower()) for i, p in predicted.items()}
            hits = [("yes" in words[i]) != ("no" in words[i]) and truth[i].lower() in words[i] for i in truth]
            assert float(r["score"]) == pytest.approx(100 * sum(hits) / len(hits), abs=1e-3)
    with open(tmp_path / "results" / "fits.csv", newline="") as f:
        fits = list(csv.DictReader(f))
    fitted = {(f["variant"], f["benchmark"], f["metric"], f["form"]) for f in fits}
    assert fitted and all(int(f["n_points"]) == len(CI_NL) for f in fits)
    assert {v for v, _, _, _ in fitted} <= set(VARIANTS) and {form for *_, form in fitted} == {"power", "two_regime"}
    # a curve is fitted exactly when all its scores are positive (a log-space fit cannot take a 0)
    positive = {}
    for r in rows:
        key = (r["variant"], r["benchmark"], r["metric"])
        positive[key] = positive.get(key, True) and float(r["score"]) > 0
    headline = {key for key in positive if ":" not in key[2] and key[2] != "unparsable_rate"}
    assert {key for key in headline if positive[key]} == {(v, b, m) for v, b, m, _ in fitted}
    with open(tmp_path / "results" / "fits_all_metrics.csv", newline="") as f:
        all_fitted = {(f["variant"], f["benchmark"], f["metric"]) for f in csv.DictReader(f)}
    assert all_fitted == {key for key, ok in positive.items() if ok}
    for figure in ("scaling_fit.png", "difference.png"):
        assert (tmp_path / "results" / figure).stat().st_size > 1000
