"""The tiny reproduction: stage 0's saved LLM against transformers, and reproduce_tiny.sh end to end at CI size."""
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
from model import ViT, Llama  # noqa: E402


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


def test_pretraining_text_is_stage_two_layout_with_the_scene_in_words(world):
    """A conversation with a "describe" turn: its answer is the scene description, so the data file itself says what
    stage 0 must put where the vision slots go."""
    from fusion import IGNORE, TokenSpace, TokenSpaceConfig

    token_space = TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"),
                                              n_l=1, n_s=1))
    texts = pretrain_llm.read_conversations(world / "train.jsonl", "train", token_space, data_seed=0)
    with open(world / "train.jsonl") as f:
        records = [json.loads(line)["messages"] for line in f]
    line = next(i for i, m in enumerate(records) if any(x["content"] == "Describe the image in detail." for x in m))
    messages = records[line]
    scene = next(m["content"] for q, m in zip(messages[::2], messages[1::2]) if q["content"] == "Describe the image in detail.")
    sp, system = token_space.sp, token_space.cfg.system_prompt
    ids, labels = [], []
    for i in range(0, len(messages), 2):
        head = [1] + sp.encode(f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n") + sp.encode(scene) if i == 0 \
            else [1] + sp.encode("[INST]")
        prompt = head + sp.encode(messages[i]["content"]) + sp.encode("[/INST]")
        answer = sp.encode(messages[i + 1]["content"] + " ") + [2]
        ids += prompt + answer
        labels += [IGNORE] * len(prompt) + answer
    assert texts[line] == (ids, labels)
    blind = pretrain_llm.read_conversations(world / "train.jsonl", "train", token_space, data_seed=0, with_scene=False)
    assert len(blind[line][0]) == len(ids) - len(sp.encode(scene))
    with pytest.raises(ValueError, match="line 1: replaying prepare.py"):
        pretrain_llm.read_conversations(world / "train.jsonl", "train", token_space, data_seed=1)


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


def test_clip_pairs_are_the_images_and_their_captions(world):
    """Every caption turn of train.jsonl answers with one of its image's 5 phrasings: the replayed pairs must agree."""
    views, texts = pretrain_clip.read_pairs(str(world), data_seed=0, image_size=112)
    with open(world / "train.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert views.shape == (len(records), 3, 112, 112) and len(texts) == len(records)
    checked = 0
    for record, phrasings in zip(records, texts):
        messages = record["messages"]
        for question, answer in zip(messages[::2], messages[1::2]):
            if question["content"].startswith("Please describe this image in general."):
                assert answer["content"] in phrasings
                checked += 1
    assert checked > 0
    with pytest.raises(ValueError, match="line 1: replaying prepare.py"):
        pretrain_clip.read_pairs(str(world), data_seed=1, image_size=112)


CI_NL = (1, 2, 4)  # a fit needs 3 distinct n_l
# 60 small LLM steps: enough for it to answer in the benchmarks' formats, so some scores are positive and get fitted
CI_ENV = {"TINY_NL": " ".join(map(str, CI_NL)), "TINY_BASE_NL": "4", "TINY_TRAIN": "160", "TINY_BENCH": "8",
          "TINY_LM_STEPS": "60", "TINY_LM_BATCH": "8", "TINY_CLIP_STEPS": "2", "TINY_ALIGN_STEPS": "1",
          "TINY_GEN_STEPS": "1", "TINY_FT_STEPS": "1"}
HEADLINE = {"SYNTH_YORN": {"Overall", "acc", "precision", "recall"}, "SYNTH_MCQ": {"Overall"},
            "SYNTH_VQA": {"Overall"}, "SYNTH_CAPTION": {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"}}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_reproduce_tiny_end_to_end(tmp_path):
    env = dict(os.environ, TINY_OUT=str(tmp_path / "out"), TINY_RESULTS=str(tmp_path / "results"),
               PYTHON=sys.executable, **CI_ENV)
    result = subprocess.run(["bash", "reproduce_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    with open(tmp_path / "results" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["variant"], r["benchmark"], r["metric"], int(r["n_l"]), int(r["n_s"])) for r in rows}
    for variant in ("VQQ", "VQ-ft"):
        for n in CI_NL:
            for benchmark, metrics in HEADLINE.items():
                for metric in metrics:
                    assert (variant, benchmark, metric, n, min(n, 4)) in got
    assert len(got) == len(rows)  # one row per number
    # the YORN accuracy recomputed from the predictions file and the TSV with POPE's rule: right when exactly one of
    # the words yes / no occurs and it is the answer
    for r in rows:
        if r["benchmark"] == "SYNTH_YORN" and r["metric"] == "acc":
            run_dir = tmp_path / "out" / f"eval-{r['variant']}" / f"{r['variant']}_nl{r['n_l']}"
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
    assert {v for v, _, _, _ in fitted} == {"VQQ", "VQ-ft"} and {form for *_, form in fitted} == {"power", "two_regime"}
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
