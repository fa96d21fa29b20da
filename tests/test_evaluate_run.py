"""evaluate.py running checkpoints end to end on the synthetic benchmarks (data/synthetic/prepare.py, written once
here): tiny random FusedVLM checkpoints saved per the checkpoint schema, a sweep through the command line, resume,
batched generation against an independent cache-free greedy loop, the VQ ablation's fused input, bench.py's generate mode.
References are independent of the code under test: the TSV read with csv, a greedy loop over full forwards of the
model object the checkpoint was saved from, CLIP ids from transformers' tokenizer, counts worked out by hand."""
import ast
import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import sentencepiece
import torch
from PIL import Image
from transformers import CLIPTokenizer

import bench
import evaluate as ev
from backbones import Llama, ViT
from checkpoint import save_checkpoint
from configurator import InputError
from fusion import DEFAULT_SYSTEM_PROMPT, TokenSpace, TokenSpaceConfig, collate
from model import FusedVLM, FusedVLMConfig

ROOT = Path(__file__).resolve().parent.parent
SYNTH = ["SYNTH_VQA", "SYNTH_CAPTION"]
N_BENCH = 6  # rows per benchmark (conftest's synthetic_world); batch_size 4 makes one full and one left-padded batch of 2
# the metric names each benchmark family must report (those the paper plots); the yes/no and multiple-choice kinds,
# which the synthetic world does not write, run on TSVs of our own (the `own` fixture)
REQUIRED_METRICS = {"SYNTH_VQA": {"Overall"},
                    "SYNTH_CAPTION": {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "category:row", "category:grid"},
                    "MY_YES_NO": {"Overall", "acc", "precision", "recall", "unparsable_rate"},
                    "MY_MCQ": {"Overall", "unparsable_rate"}}
OWN = {"MY_YES_NO": "yes_no", "MY_MCQ": "mcq"}  # name: --kind
VALUES = ("red", "green", "blue", "yellow", "purple", "orange", "empty")


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world


def make_checkpoint(world, folder, n_l, seed, stage="gen"):
    """A random FusedVLM around the tiny CLIP ViT and Llama, saved per the checkpoint schema; returns the model."""
    vit, llm = ViT.from_hf(str(world / "clip")), Llama.from_hf(str(world / "llama"))
    clip = CLIPTokenizer(vocab=str(world / "clip" / "vocab.json"), merges=str(world / "clip" / "merges.txt"))
    # a bridge far above its 1e-3 training init, so that the answers depend on the image and the question
    cfg = FusedVLMConfig(vit=vit.cfg, llm=llm.cfg, fused_layers=2, fused_heads=4, fused_mlp=128,
                         fused_vocab_size=len(clip), n_queries=15, bridge_init_std=0.3)
    torch.manual_seed(seed)
    vlm = FusedVLM(cfg)
    vlm.vision.vit, vlm.llm = vit, llm.requires_grad_(False)
    os.makedirs(folder, exist_ok=True)
    meta = {"stage": stage, "model_config": asdict(cfg), "clip_path": str(world / "clip"),
            "llama_path": str(world / "llama"),
            "token_space": {"image_size": 112, "num_crops": 2, "n_l": n_l, "n_s": 4, "drop_question": False,
                            "max_seq_len": 1024, "system_prompt": DEFAULT_SYSTEM_PROMPT}}
    save_checkpoint(os.path.join(folder, "ckpt.safetensors"),
                    {f"model.{k}": v for k, v in vlm.trainable_state_dict().items()}, meta)
    return vlm.eval()


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"ck16": (str(root / "ck16"), make_checkpoint(world, root / "ck16", n_l=16, seed=0)),
            "ck4": (str(root / "ck4"), make_checkpoint(world, root / "ck4", n_l=4, seed=1))}


def evaluate_argv(world, out_dir, ckpts, benchmarks=SYNTH, *extra):
    return [f"--ckpt={','.join(ckpts)}", f"--benchmarks={','.join(benchmarks)}", f"--bench_dir={world / 'bench'}",
            f"--out_dir={out_dir}", "--batch_size=4", *extra]


@pytest.fixture(scope="module")
def sweep(world, checkpoints, tmp_path_factory):
    """Both checkpoints over the two synthetic benchmarks in one command-line call."""
    out = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "evaluate.py",
                             *evaluate_argv(world, out, [checkpoints["ck16"][0], checkpoints["ck4"][0]])],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def tsv_rows(world, name, bench_dir=None):
    with open((bench_dir or world / "bench") / f"{name}.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def own_argv(bench_dir, out_dir, ckpt, name, *extra):
    return [f"--ckpt={ckpt}", f"--benchmarks={name}", f"--kind={OWN[name]}", f"--bench_dir={bench_dir}",
            f"--out_dir={out_dir}", "--batch_size=4", *extra]


@pytest.fixture(scope="module")
def own(world, checkpoints, tmp_path_factory):
    """A yes/no and a multiple-choice benchmark of our own on SYNTH_VQA's images and cells (MY_YES_NO: "Is cell F
    red?", half of them Yes; MY_MCQ: "What colour is cell F?" with 4 options, the right one at A, B, C, D in turn),
    categories a, b, c in rotation; and ck16's predictions for them (one call per --kind, batches of 4).
    Returns (bench_dir, out_dir)."""
    root = tmp_path_factory.mktemp("own")
    bench_dir, out = root / "bench", root / "out"
    bench_dir.mkdir()
    yes_no, mcq = [], []
    for i, row in enumerate(tsv_rows(world, "SYNTH_VQA")):
        cell = re.fullmatch(r"What colour is cell ([E-V])\?", row["question"])[1]
        value = ast.literal_eval(row["answer"])[0]
        other = VALUES[(VALUES.index(value) + 1 + i % 6) % len(VALUES)]  # never the value itself
        yes_no.append([row["index"], row["image"], f"Is cell {cell} {value if i % 2 == 0 else other}?",
                       "Yes" if i % 2 == 0 else "No", "abc"[i % 3]])
        options = [v for v in VALUES if v != value][i % 3:][:3]
        options.insert(i % 4, value)
        mcq.append([row["index"], row["image"], f"What colour is cell {cell}?", *options, "ABCD"[i % 4], "abc"[i % 3]])
    write_tsv(bench_dir / "MY_YES_NO.tsv", ["index", "image", "question", "answer", "category"], yes_no)
    write_tsv(bench_dir / "MY_MCQ.tsv", ["index", "image", "question", "A", "B", "C", "D", "answer", "category"], mcq)
    for name in OWN:
        ev.main(own_argv(bench_dir, out, checkpoints["ck16"][0], name))
    return bench_dir, out


def jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def results(out_dir):
    with open(Path(out_dir) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


class GenerateSpy:
    """Wraps FusedVLM.generate: records every batch it is given."""

    def __init__(self, monkeypatch):
        self.batches, original = [], FusedVLM.generate

        def spy(vlm, batch, *args, **kwargs):
            self.batches.append({k: v.clone() for k, v in batch.items()})
            return original(vlm, batch, *args, **kwargs)
        monkeypatch.setattr(FusedVLM, "generate", spy)

    def rows(self):
        return sum(len(b["input_ids"]) for b in self.batches)


# -----------------------------------------------------------------------------


def test_sweep_writes_every_prediction_and_one_results_block_per_checkpoint(world, checkpoints, sweep):
    out, stdout = sweep
    for run_dir in ("VQQ_nl16", "VQQ_nl4"):
        for name in SYNTH:
            lines = jsonl(out / run_dir / f"predictions_{name}.jsonl")
            assert sorted(line["index"] for line in lines) == sorted(r["index"] for r in tsv_rows(world, name))
            assert all(isinstance(line["prediction"], str) for line in lines)
    rows = results(out)
    blocks = []  # (ckpt, benchmark) in file order, one entry per contiguous block
    for r in rows:
        if not blocks or blocks[-1] != (r["ckpt"], r["benchmark"]):
            blocks.append((r["ckpt"], r["benchmark"]))
    ck16, ck4 = checkpoints["ck16"][0], checkpoints["ck4"][0]
    assert blocks == [(ck16, name) for name in SYNTH] + [(ck4, name) for name in SYNTH]
    for ckpt, n_l in ((ck16, "16"), (ck4, "4")):
        for name in SYNTH:
            block = [r for r in rows if r["ckpt"] == ckpt and r["benchmark"] == name]
            assert REQUIRED_METRICS[name] <= {r["metric"] for r in block}
            labels = {(r["variant"], r["n_l"], r["n_s"], r["n_samples"]) for r in block}
            assert labels == {("VQQ", n_l, "4", str(N_BENCH))}
    # progress: a line per batch with speeds (2 batches per benchmark and checkpoint), a total at the end
    assert sum("samples/s" in line and "new tok/s" in line and "/6 |" in line for line in stdout.splitlines()) == 8
    assert "done: 24 samples generated" in stdout


def test_own_yes_no_and_mcq_benchmarks_run_with_their_kind(own):
    bench_dir, out = own
    rows = results(out)
    assert [r["benchmark"] for r in rows if r["metric"] == "Overall"] == list(OWN)  # one block each, in call order
    for name in OWN:
        lines = jsonl(out / "VQQ_nl16" / f"predictions_{name}.jsonl")
        assert [line["index"] for line in lines] == [r["index"] for r in tsv_rows(None, name, bench_dir)]
        block_rows = [r for r in rows if r["benchmark"] == name]
        assert REQUIRED_METRICS[name] <= {r["metric"] for r in block_rows}
        assert {(r["variant"], r["n_l"], r["n_samples"]) for r in block_rows} == {("VQQ", "16", str(N_BENCH))}


def greedy_without_cache(vlm, token_space, image, turns, max_new_tokens):
    """Reference decoding of the answer to the last question of `turns` (its answer None; earlier turns are the chat
    so far): one unpadded sample, the whole sequence re-run through vlm(batch) at every step, no KV cache."""
    batch = collate([token_space.make_sample(image, turns)], pad_side="right")
    eos, new = token_space.eos, []
    for step in range(max_new_tokens):
        with torch.no_grad():
            logits = vlm(batch)[0][0, -1]
        if step == 0:
            logits[eos] = -float("inf")  # at least one new token
        token = int(logits.argmax())
        if token == eos:
            break
        new.append(token)
        for key, value in (("input_ids", token), ("slot_mask", False), ("attention_mask", True), ("labels", -100)):
            batch[key] = torch.cat([batch[key], torch.tensor([[value]], dtype=batch[key].dtype)], dim=1)
    return new


def mcq_prompt(row):
    """VLMEvalKit's multiple-choice prompt, no hint."""
    options = "".join(f"{letter}. {row[letter]}\n" for letter in "ABCD")
    return (f"Question: {row['question']}\nOptions:\n{options}"
            "Please select the correct answer from the options above. \n")


def test_batched_predictions_equal_an_unbatched_cache_free_greedy_loop(world, checkpoints, sweep, own):
    out, _ = sweep
    (own_bench, own_out) = own
    vlm = checkpoints["ck16"][1]
    token_space = TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"),
                                              image_size=112, num_crops=2, n_l=16, n_s=4, max_seq_len=1024))
    sp = sentencepiece.SentencePieceProcessor(model_file=str(world / "llama" / "tokenizer.model"))
    distinct = set()
    # each benchmark kind's prompt and generation budget: TextVQA's 10 new tokens, COCO's, POPE's, SEEDBench's 32
    suffix = "\nAnswer the question using a single word or phrase."
    cases = (("SYNTH_VQA", 10, out, None, lambda row: row["question"] + suffix),
             ("SYNTH_CAPTION", 32, out, None, lambda row: row["question"]),
             ("MY_YES_NO", 32, own_out, own_bench, lambda row: row["question"]),
             ("MY_MCQ", 32, own_out, own_bench, mcq_prompt))
    for name, max_new_tokens, out_dir, bench_dir, prompt_of in cases:
        lines = jsonl(out_dir / "VQQ_nl16" / f"predictions_{name}.jsonl")
        predicted = {line["index"]: line["prediction"] for line in lines}
        for row in tsv_rows(world, name, bench_dir):
            png = Image.open(io.BytesIO(base64.b64decode(row["image"])))
            buffer = io.BytesIO()
            png.convert("RGB").save(buffer, format="JPEG", quality=75)  # VLMEvalKit's round trip
            image = Image.open(buffer).convert("RGB")
            prompt = prompt_of(row)
            with torch.no_grad():
                ids = greedy_without_cache(vlm, token_space, image, [(prompt, None)], max_new_tokens)
            expected = sp.decode([t for t in ids if t not in (0, 1, 2)]).strip()
            assert predicted[row["index"]] == expected, (name, row["index"])
            distinct.add(expected)
    assert len(distinct) > 1  # the answers depend on the input, so a row mix-up would show


def test_resume_generates_only_the_missing_rows(world, checkpoints, sweep, tmp_path, monkeypatch):
    out, _ = sweep
    shutil.copytree(out / "VQQ_nl16", tmp_path / "VQQ_nl16")  # predictions and run.json; no results.csv yet
    path = tmp_path / "VQQ_nl16" / "predictions_SYNTH_CAPTION.jsonl"
    full = path.read_text().splitlines(keepends=True)
    kept = [json.dumps({**json.loads(full[0]), "prediction": "KEPT"}) + "\n", full[1]]
    path.write_text("".join(kept) + full[2][:len(full[2]) // 2])  # killed in the middle of writing row 3
    (tmp_path / "VQQ_nl16" / "predictions_SYNTH_VQA.jsonl").write_text("")  # killed before its first line
    spy = GenerateSpy(monkeypatch)
    ev.main(evaluate_argv(world, tmp_path, [checkpoints["ck16"][0]]))
    assert spy.rows() == N_BENCH - 2 + N_BENCH  # the rows after the 2 kept ones, and all of SYNTH_VQA
    resumed = {line["index"]: line for line in jsonl(path)}
    originals = {line["index"]: line for line in map(json.loads, full)}
    assert resumed[json.loads(full[0])["index"]]["prediction"] == "KEPT"
    assert resumed.keys() == originals.keys()
    assert all(resumed[i] == originals[i] for i in originals if i != json.loads(full[0])["index"])
    assert {r["benchmark"] for r in results(tmp_path)} == set(SYNTH)
    before = (tmp_path / "results.csv").read_text()
    ev.main(evaluate_argv(world, tmp_path, [checkpoints["ck16"][0]]))  # all done: nothing generated or scored again
    assert spy.rows() == 2 * N_BENCH - 2 and (tmp_path / "results.csv").read_text() == before


def test_drop_question_removes_the_question_from_the_fused_input_only(world, checkpoints, own, tmp_path, monkeypatch):
    ckpt, (bench_dir, _) = checkpoints["ck16"][0], own
    clip = CLIPTokenizer(vocab=str(world / "clip" / "vocab.json"), merges=str(world / "clip" / "merges.txt"))
    queries = list(range(15)) + [clip.eos_token_id]  # n_l = 16: 15 query rows and the EOS
    seen = {}
    for flag in ("False", "True"):
        spy = GenerateSpy(monkeypatch)
        ev.main(own_argv(bench_dir, tmp_path, ckpt, "MY_YES_NO", f"--drop_question={flag}", "--batch_size=6"))
        (batch,) = spy.batches
        seen[flag] = batch
        questions = [r["question"] for r in tsv_rows(world, "MY_YES_NO", bench_dir)]  # the yes/no prompt
        for b, question in enumerate(questions):
            fused = batch["fused_ids"][b][batch["fused_real_mask"][b]].tolist()
            text = [] if flag == "True" else clip(question, add_special_tokens=False).input_ids
            assert fused == text + queries
            assert batch["query_mask"][b].sum() == 15 and batch["output_mask"][b].sum() == 16
    assert torch.equal(seen["False"]["input_ids"], seen["True"]["input_ids"])  # the LLM still reads the question
    assert {(r["variant"], r["n_l"]) for r in results(tmp_path)} == {("VQQ", "16"), ("VQ", "16")}
    assert (tmp_path / "VQ_nl16" / "predictions_MY_YES_NO.jsonl").exists()


def test_bench_generate_mode_prints_prefill_and_decode_speeds(checkpoints, capsys):
    cfg = bench.Config(mode="generate", ckpt=checkpoints["ck4"][0], gen_batch_size=2, gen_new_tokens=4, repeats=1,
                       gen_question_len=8)
    bench.bench_generate(cfg, torch.device("cpu"))
    printed = capsys.readouterr().out
    # LLM prompt: 44 template tokens + n_l = 4 slots + 8 question tokens + 4 for [/INST]; crops: 1 + num_crops 2
    assert "batch 2, 3 crops and n_l=4 per sample, LLM prompt 60 tokens, 4 new tokens" in printed
    speeds = [float(line.split("|")[1].split()[0]) for line in printed.splitlines() if "tok/s" in line]
    assert len(speeds) == 2 and all(s > 0 for s in speeds)


def test_refusals(world, checkpoints, sweep, tmp_path):
    out, _ = sweep
    align = make_checkpoint(world, tmp_path / "align", n_l=16, seed=0, stage="align")
    assert align is not None
    ck16 = checkpoints["ck16"][0]
    with pytest.raises(InputError, match="stage 'align' checkpoint"):
        ev.main(evaluate_argv(world, tmp_path / "a", [str(tmp_path / "align" / "ckpt.safetensors")]))
    with pytest.raises(InputError, match="would both write"):
        ev.main(evaluate_argv(world, tmp_path / "b", [ck16, ck16 + "/ckpt.safetensors"]))
    with pytest.raises(InputError, match="n_l=17 needs 16 learned queries"):
        ev.main(evaluate_argv(world, tmp_path / "c", [ck16], SYNTH, "--n_l=17"))
    shutil.copytree(out / "VQQ_nl16", tmp_path / "d" / "VQQ_nl16")
    with pytest.raises(InputError, match="other settings.*num_crops"):
        ev.main(evaluate_argv(world, tmp_path / "d", [ck16], SYNTH, "--num_crops=0"))
    with pytest.raises(InputError, match="not found"):
        ev.main(evaluate_argv(world, tmp_path / "e", [ck16], ["SYNTH_VQA", "MME"]))


def test_a_row_with_several_images_is_shown_its_last(world, checkpoints, tmp_path, monkeypatch):
    def b64(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()
    write_tsv(tmp_path / "MY_YES_NO.tsv", ["index", "image", "question", "answer", "category"],
              [[1, repr([b64("red"), b64("blue")]), "Is it blue?", "Yes", "presence"],
               [2, b64("green"), "Is it blue?", "No", "presence"]])
    spy = GenerateSpy(monkeypatch)
    ev.main([f"--ckpt={checkpoints['ck4'][0]}", "--benchmarks=MY_YES_NO", "--kind=yes_no", f"--bench_dir={tmp_path}",
             f"--out_dir={tmp_path / 'out'}", "--jpeg_reencode=False"])
    (batch,) = spy.batches
    first = batch["pixel_values"][batch["crop_to_sample"] == 0]  # global view + 1 tile, (2, 3, 112, 112)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    blue = (torch.tensor([0.0, 0.0, 1.0]) - mean) / std
    # the global view is blue inside and black where it was padded to a square; the tiles white-padded
    assert torch.allclose(first[0, :, 56, 56], blue, atol=1e-3) and torch.allclose(first[1, :, 56, 56], blue, atol=1e-3)


def block(rows, **match):
    """{metric: score} of the results rows that match."""
    return {r["metric"]: r["score"] for r in rows if all(r[k] == v for k, v in match.items())}


def test_predictions_carry_the_per_row_reading_and_score_the_totals_are_made_of(world, sweep, own):
    (out, _), (own_bench, own_out) = sweep, own
    for name, out_dir, bench_dir in [(n, out, None) for n in SYNTH] + [(n, own_out, own_bench) for n in OWN]:
        lines = jsonl(out_dir / "VQQ_nl16" / f"predictions_{name}.jsonl")
        # the TSV's order
        assert [line["index"] for line in lines] == [r["index"] for r in tsv_rows(world, name, bench_dir)]
        scores = block(results(out_dir), variant="VQQ", n_l="16", benchmark=name)
        if name == "SYNTH_CAPTION":  # corpus metrics: the caption as read, no row score
            assert all("score" not in line and line["extracted"] == line["prediction"] for line in lines)
            continue
        mean_score = 100 * sum(line["score"] for line in lines) / len(lines)
        headline = "acc" if name == "MY_YES_NO" else "Overall"  # POPE's Overall is the F1, acc the mean
        assert float(scores[headline]) == pytest.approx(mean_score, abs=1e-3)
        if name != "SYNTH_VQA":
            unreadable = sum(line["extracted"] is None for line in lines) / len(lines)
            assert float(scores["unparsable_rate"]) == pytest.approx(unreadable, abs=1e-5)


def test_limit_runs_a_subset_then_the_full_run_reuses_it(world, checkpoints, sweep, own, tmp_path, monkeypatch):
    (out, _), (own_bench, own_out) = sweep, own
    ck16 = checkpoints["ck16"][0]
    # the two synthetic benchmarks in one call; the multiple-choice kind, on our own TSV, in another
    calls = [(SYNTH, lambda *extra: evaluate_argv(world, tmp_path / "synth", [ck16], SYNTH, *extra), out, None,
              tmp_path / "synth"),
             (["MY_MCQ"], lambda *extra: own_argv(own_bench, tmp_path / "mcq", ck16, "MY_MCQ", *extra), own_out,
              own_bench, tmp_path / "mcq")]
    for names, argv, reference_dir, bench_dir, out_dir in calls:
        spy = GenerateSpy(monkeypatch)
        ev.main(argv("--limit=4"))
        assert spy.rows() == 4 * len(names)
        for name in names:
            full = {line["index"]: line for line in jsonl(reference_dir / "VQQ_nl16" / f"predictions_{name}.jsonl")}
            limited = jsonl(out_dir / "VQQ_nl16" / f"predictions_{name}.jsonl")
            assert len(limited) == 4 and all(line == full[line["index"]] for line in limited)
            categories = {r["index"]: r["category"] for r in tsv_rows(world, name, bench_dir)}
            # every category once limit allows: SYNTH_VQA's one (cell), SYNTH_CAPTION's two, MY_MCQ's three
            assert len({categories[line["index"]] for line in limited}) == min(4, len(set(categories.values())))
        assert {r["n_samples"] for r in results(out_dir)} == {"4"}
        ev.main(argv())  # the whole files now
        assert spy.rows() == 4 * len(names) + len(names) * (N_BENCH - 4)
        rows, reference = results(out_dir), results(reference_dir)
        for name in names:
            assert block(rows, benchmark=name, n_samples="6") == block(reference, benchmark=name, ckpt=ck16)
            assert block(rows, benchmark=name, n_samples="4")


def test_an_own_tsv_with_a_kind_runs_like_the_benchmark_it_copies(world, checkpoints, sweep, tmp_path):
    out, _ = sweep
    ck16 = checkpoints["ck16"][0]
    shutil.copy(world / "bench" / "SYNTH_CAPTION.tsv", tmp_path / "MY_CAPTIONS.tsv")
    argv = [f"--ckpt={ck16}", "--benchmarks=MY_CAPTIONS", f"--bench_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}",
            "--batch_size=4"]
    with pytest.raises(InputError, match="--kind=yes_no"):
        ev.main(argv)
    ev.main(argv + ["--kind=caption"])
    assert (jsonl(tmp_path / "out" / "VQQ_nl16" / "predictions_MY_CAPTIONS.jsonl")
            == jsonl(out / "VQQ_nl16" / "predictions_SYNTH_CAPTION.jsonl"))
    mine = block(results(tmp_path / "out"), benchmark="MY_CAPTIONS")
    assert mine == block(results(out), benchmark="SYNTH_CAPTION", ckpt=ck16) and "category:grid" in mine


def global_views(batches):
    """The global-view crop of every sample, in generation order."""
    return [b["pixel_values"][b["crop_to_sample"] == k][0] for b in batches for k in range(len(b["input_ids"]))]


def test_shuffled_images_each_row_sees_another_rows_image(world, checkpoints, own, tmp_path, monkeypatch):
    ck16 = checkpoints["ck16"][0]
    # every row asks the same question, so a row shown row j's image must answer what row j answered
    source = tsv_rows(world, "MY_YES_NO", own[0])
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    write_tsv(bench_dir / "MY_YES_NO.tsv", list(source[0]),
              [list({**r, "question": "Is cell F red?"}.values()) for r in source])
    runs = {}
    for label, extra in (("normal", []), ("shuffled", ["--image_ablation=shuffle"]),
                         ("limited", ["--image_ablation=shuffle", "--limit=3"])):
        spy = GenerateSpy(monkeypatch)
        ev.main(own_argv(bench_dir, tmp_path / label, ck16, "MY_YES_NO", "--batch_size=6", *extra))
        run_dir = "VQQ_nl16" if label == "normal" else "VQQ-shuffled_nl16"
        lines = jsonl(tmp_path / label / run_dir / "predictions_MY_YES_NO.jsonl")
        runs[label] = (global_views(spy.batches), {line["index"]: line["prediction"] for line in lines})
        assert {r["variant"] for r in results(tmp_path / label)} == {run_dir.split("_nl")[0]}
    (normal_views, normal), (shuffled_views, shuffled) = runs["normal"], runs["shuffled"]
    indices = [r["index"] for r in source]
    shown = [next(j for j, view in enumerate(normal_views) if torch.equal(view, v)) for v in shuffled_views]
    assert sorted(shown) == list(range(len(indices))) and all(j != i for i, j in enumerate(shown))  # a derangement
    assert len(set(normal.values())) > 1  # the answers depend on the image, so a wrong image would show
    assert all(shuffled[indices[i]] == normal[indices[j]] for i, j in enumerate(shown))
    limited = runs["limited"][1]
    assert len(limited) == 3 and all(shuffled[index] == p for index, p in limited.items())
    with open(tmp_path / "shuffled" / "VQQ-shuffled_nl16" / "run.json") as f:
        assert json.load(f)["image_ablation"] == "shuffle"


def torchrun(argv, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", "evaluate.py", *argv],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_two_processes_write_the_same_predictions_and_scores_as_one(world, checkpoints, sweep, tmp_path):
    out, _ = sweep
    ck4 = checkpoints["ck4"][0]
    stdout = torchrun(evaluate_argv(world, tmp_path, [ck4]))
    for name in SYNTH:  # one process wrote these in the sweep
        assert ((tmp_path / "VQQ_nl4" / f"predictions_{name}.jsonl").read_bytes()
                == (out / "VQQ_nl4" / f"predictions_{name}.jsonl").read_bytes())
    assert not list((tmp_path / "VQQ_nl4").glob("*.rank*"))
    columns = lambda rows: [tuple(r.values()) for r in rows]
    assert columns(results(tmp_path)) == columns([r for r in results(out) if r["ckpt"] == ck4])
    # 2 benchmarks of 6 rows in batches of 4: rank 0 gets the first batch (4 rows), rank 1 the second (2)
    assert "done (rank 0): 8 samples generated" in stdout and "done (rank 1): 4 samples generated" in stdout


def test_two_processes_resume_an_interrupted_shuffled_limited_run(world, checkpoints, tmp_path):
    ck16 = checkpoints["ck16"][0]
    extra = ["--image_ablation=shuffle", "--limit=5", "--batch_size=2"]
    one = tmp_path / "one"
    ev.main(evaluate_argv(world, one, [ck16], SYNTH, *extra))
    # an interrupted 2-process run: two rows merged, rank 1's part file with one row and half of the next
    two = tmp_path / "two" / "VQQ-shuffled_nl16"
    two.mkdir(parents=True)
    shutil.copy(one / "VQQ-shuffled_nl16" / "run.json", two / "run.json")
    lines = (one / "VQQ-shuffled_nl16" / "predictions_SYNTH_VQA.jsonl").read_text().splitlines(keepends=True)
    (two / "predictions_SYNTH_VQA.jsonl").write_text("".join(lines[:2]))
    (two / "predictions_SYNTH_VQA.jsonl.rank1").write_text(lines[3] + lines[4][:20])
    stdout = torchrun(evaluate_argv(world, tmp_path / "two", [ck16], SYNTH, *extra))
    for name in SYNTH:
        assert ((two / f"predictions_{name}.jsonl").read_bytes()
                == (one / "VQQ-shuffled_nl16" / f"predictions_{name}.jsonl").read_bytes())
    columns = lambda rows: [tuple(r.values()) for r in rows]
    assert columns(results(tmp_path / "two")) == columns(results(one))
    # each rank's own line (Run writes a line at a time under torchrun: block-buffered, the ranks' output spliced)
    counts = [int(line.split(": ")[1].split()[0]) for line in stdout.splitlines() if line.startswith("done")]
    assert len(counts) == 2 and sum(counts) == 2 + 5  # VQA: rows 3 and 5 of the subset left; CAPTION: all 5
