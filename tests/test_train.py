"""Tests of train_align.py and train_gen.py on a tiny synthetic world (data/synthetic/prepare.py, written once here).

The scripts run in this process with runpy (their globals come back for inspection) or, for DDP and the kill test,
as subprocesses. References are independent of the code under test: a loss worked out by hand, the LLM weights
read back from their own folder, an uninterrupted run against an interrupted one, one process against two.
"""
import copy
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones import Llama
from checkpoint import load_checkpoint
from configurator import InputError
from fusion import collate
from training import configure_optimizer

ROOT = Path(__file__).resolve().parent.parent

STEPS = 8
# 16 conversations, global batch 4: 4 steps per epoch, so STEPS crosses an epoch boundary (and so does a resume at 3)
TINY = ["--num_crops=0", "--batch_size=2", "--grad_accum=2", f"--max_iters={STEPS}", "--log_interval=1",
        "--ckpt_interval=100", "--lr=3e-3", "--warmup_ratio=0.25"]


@pytest.fixture(scope="module")
def data_dir(synthetic_world):
    return synthetic_world


def argv(data_dir, out_dir, *extra):
    return [str(ROOT / "config" / "tiny.py"), f"--data_dir={data_dir}", f"--clip_path={data_dir}/clip",
            f"--llama_path={data_dir}/llama", f"--out_dir={out_dir}", *TINY, *extra]


def run(script, monkeypatch, args):
    monkeypatch.setattr(sys, "argv", [script] + args)
    monkeypatch.chdir(ROOT)
    return runpy.run_path(str(ROOT / script), run_name="__main__")


def metrics(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def turns_naming_their_cells(data_dir, out_dir):
    """-> a JSONL of the world's training conversations with only their row and grid turns (the answers that name
    cells: "J red K empty ..."), for stage 1. Its InfoNCE loss takes each question's answer against the others in its
    micro-batch; the world's cell answers are one of 7 words, so a micro-batch often holds the same answer twice and
    the loss cannot fall towards 0 (nor reliably in a few steps), whereas these answers are all different."""
    records = []
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        messages = record["messages"]
        pairs = [(q, a) for q, a in zip(messages[::2], messages[1::2]) if len(a["content"].split()) > 1]
        if pairs:
            records.append(dict(record, messages=[m for pair in pairs for m in pair]))
    answers = [m["content"] for r in records for m in r["messages"][1::2]]
    assert len(records) >= 6 and len(set(answers)) == len(answers), answers  # 2 steps per epoch at least, distinct
    path = out_dir / "train_rows_and_grids.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def keeping_the_start(mp):
    """Patch the optimizer's construction to keep the weights a run starts from; -> that dict, filled at the run's
    start (its keys: the model's state dict)."""
    start = {}

    def configure_optimizer_keeping_the_start(model, *args):
        start.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return configure_optimizer(model, *args)

    mp.setattr("training.configure_optimizer", configure_optimizer_keeping_the_start)
    return start


@pytest.fixture(scope="module")
def align_run(data_dir, tmp_path_factory):
    """The run's globals and folder; globals["start_state"]: the model's weights before the first step. It trains
    on the turns whose answers differ (turns_naming_their_cells); the image paths stay relative to data_dir."""
    out = tmp_path_factory.mktemp("align")
    train_file = turns_naming_their_cells(data_dir, tmp_path_factory.mktemp("align-data"))
    with pytest.MonkeyPatch.context() as mp:
        start = keeping_the_start(mp)
        script_globals = run("train_align.py", mp, argv(data_dir, out, f"--train_file={train_file}"))
    return {**script_globals, "start_state": start}, out


@pytest.fixture(scope="module")
def gen_run(data_dir, align_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    with pytest.MonkeyPatch.context() as mp:
        script_globals = run("train_gen.py", mp, argv(data_dir, out, f"--init_from={align_run[1]}/ckpt.safetensors"))
    return script_globals, out


def test_align_loss_falls(align_run):
    """On the same micro-batches, before and after training: a step's logged loss depends on which answers share its
    micro-batch, which hides the fall in 8 steps. The answers all differ (align_run), so each question has one right
    answer among its micro-batch's."""
    script_globals, out = align_run
    assert len(metrics(out)) == STEPS
    model, dataset, align_loss = script_globals["raw_model"], script_globals["dataset"], script_globals["align_loss"]
    batches = [collate([dataset[i] for i in range(start, start + 4)]) for start in range(0, len(dataset), 4)]
    trained = copy.deepcopy(model.state_dict())

    def mean_loss():
        with torch.no_grad():
            losses = [align_loss(*model(b), model.logit_scale) for b in batches]
        return np.mean([(contrastive + script_globals["cfg"].eye_weight * eye).item() for contrastive, eye in losses])

    after = mean_loss()
    model.load_state_dict(script_globals["start_state"])
    before = mean_loss()
    model.load_state_dict(trained)
    print(f"align loss on the training set: {before:.3f} before, {after:.3f} after")
    assert after < before - 0.05  # with no optimizer step the two are equal


def test_align_loss_by_hand(align_run):
    align_loss = align_run[0]["align_loss"]  # the run's config: text_outlier_sigma 1, no gathering
    questions = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    answers = torch.tensor([[2.0, 0.1, 0.3], [0.2, 2.1, 9.0]])  # 9.0 is the outlier; with it zeroed the rows are
    fused = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])    # nearly the questions
    scale = torch.tensor(np.log(2.0))
    contrastive, eye = align_loss(questions, answers, fused, scale)

    a = answers.numpy().astype(np.float64)
    a = np.where(np.abs(a - a.mean()) <= a.std(ddof=1), a, 0.0)
    assert a[1, 2] == 0 and np.count_nonzero(a) == 5  # only the planted outlier goes
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    logits = 2.0 * questions.numpy() @ a.T
    def ce(x):
        return np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(x)])
    assert contrastive.item() == pytest.approx((ce(logits) + ce(logits.T)) / 2, rel=1e-5)
    # normalised fused rows (1,0,0) and (1,1,0)/sqrt(2): Gram off-diagonals 1/sqrt(2), so the MSE is 2 * 0.5 / 4
    assert eye.item() == pytest.approx(0.25, rel=1e-5)


def test_gen_loss_falls_llm_frozen_and_not_saved(gen_run, align_run, data_dir):
    script_globals, out = gen_run
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == STEPS
    print("gen loss", " ".join(f"{x:.3f}" for x in losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05

    model = script_globals["raw_model"]
    reference = Llama.from_hf(str(data_dir / "llama"))
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.llm.state_dict()[name], tensor), name
    optimized = {id(p) for group in script_globals["optimizer"].param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.llm.parameters())

    tensors, meta = load_checkpoint(str(out / "ckpt.safetensors"))
    assert not [k for k in tensors if k.startswith(("model.llm.", "optim.llm."))]
    assert meta["step"] == STEPS and meta["stage"] == "gen"
    stage1, _ = load_checkpoint(str(align_run[1] / "ckpt.safetensors"), prefix="model.")
    trained = model.compressor.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(stage1["model.compressor.layers.0.self_attn.q_proj.weight"], trained)  # training did move it
    assert torch.equal(tensors["model.compressor.layers.0.self_attn.q_proj.weight"], trained)


def test_gen_resume_equals_uninterrupted(gen_run, align_run, data_dir, tmp_path, monkeypatch):
    init = f"--init_from={align_run[1]}/ckpt.safetensors"
    run("train_gen.py", monkeypatch, argv(data_dir, tmp_path, init, "--stop_at_step=3"))
    assert load_checkpoint(str(tmp_path / "ckpt.safetensors"))[1]["step"] == 3
    run("train_gen.py", monkeypatch, argv(data_dir, tmp_path, init, "--resume=True"))
    resumed, uninterrupted = metrics(tmp_path), metrics(gen_run[1])
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, uninterrupted):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"]), a["step"]


def test_resume_refuses_a_different_model(gen_run, data_dir, monkeypatch, tmp_path):
    (tmp_path / "ckpt.safetensors").symlink_to(gen_run[1] / "ckpt.safetensors")
    with pytest.raises(InputError, match="model config differs.*fused_layers"):
        run("train_gen.py", monkeypatch, argv(data_dir, tmp_path, "--resume=True", "--fused_layers=3"))


def test_activation_checkpointing_changes_no_number(gen_run, align_run, data_dir, tmp_path, monkeypatch):
    run("train_gen.py", monkeypatch, argv(data_dir, tmp_path, f"--init_from={align_run[1]}/ckpt.safetensors",
                                          "--activation_checkpointing=True", "--stop_at_step=3"))
    for a, b in zip(metrics(tmp_path), metrics(gen_run[1])[:3], strict=True):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-6), a["step"]


def test_a_fresh_run_does_not_overwrite_a_checkpoint(gen_run, data_dir, monkeypatch):
    before = (gen_run[1] / "ckpt.safetensors").read_bytes()
    with pytest.raises(InputError, match="exists \\(pass --resume=True"):
        run("train_gen.py", monkeypatch, argv(data_dir, gen_run[1]))
    assert (gen_run[1] / "ckpt.safetensors").read_bytes() == before


@pytest.mark.parametrize("script,config", [("train_align.py", "tiny"), ("train_gen.py", "tiny"),
                                           ("train_align.py", "paper_align"), ("train_gen.py", "paper_gen"),
                                           ("train_gen.py", "paper_finetune"), ("train_gen.py", "llama3_gen")])
def test_config_files_parse(script, config, monkeypatch, tmp_path):
    # parse_config raises on any key the script does not have; the first thing after parsing is the path check
    with pytest.raises(InputError, match="none: clip_path does not exist \\(download a CLIP checkpoint folder"):
        run(script, monkeypatch, [str(ROOT / "config" / f"{config}.py"), f"--clip_path={tmp_path}/none"])


def test_missing_weights_say_what_to_download(data_dir, monkeypatch, tmp_path):
    with pytest.raises(InputError, match="nowhere: llama_path does not exist \\(download the LLM.s folder"):
        run("train_gen.py", monkeypatch, argv(data_dir, tmp_path, f"--llama_path={tmp_path}/nowhere"))


def torchrun(script, args, nproc=2):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                             script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_processes_equal_one_with_twice_the_accumulation(gen_run, align_run, data_dir, tmp_path):
    torchrun("train_gen.py", argv(data_dir, tmp_path, f"--init_from={align_run[1]}/ckpt.safetensors", "--grad_accum=1"))
    two, one = metrics(tmp_path), metrics(gen_run[1])
    print("max |loss difference|", max(abs(a["loss"] - b["loss"]) for a, b in zip(two, one)))
    assert [m["step"] for m in two] == list(range(1, STEPS + 1))
    for a, b in zip(two, one):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]


def test_gathered_negatives_on_two_ranks_equal_one_big_batch(data_dir, tmp_path, monkeypatch):
    # gathering makes a rank's micro-batch see the other rank's as negatives: 2 ranks x batch 2 = 1 rank x batch 4.
    # The eye term and the outlier statistics stay per rank by design, so they are off here.
    same = ["--eye_weight=0.0", "--text_outlier_sigma=0.0", "--max_iters=3"]
    torchrun("train_align.py", argv(data_dir, tmp_path / "two", *same, "--gather_negatives=True"))
    run("train_align.py", monkeypatch, argv(data_dir, tmp_path / "one", *same, "--batch_size=4"))
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(two) == len(one) == 3
    for a, b in zip(two, one):  # float32 sums in another order, through AdamW steps: up to 2.5e-5 relative seen (the
        assert a["loss"] == pytest.approx(b["loss"], rel=5e-5), a["step"]  # logit-scale gradient bug it caught: 5e-3)


def test_killed_while_saving_leaves_the_last_checkpoint(align_run, data_dir, tmp_path, monkeypatch):
    """SIGKILL as soon as a checkpoint write is seen in progress (the .tmp file exists), after one has been saved."""
    args = argv(data_dir, tmp_path, f"--init_from={align_run[1]}/ckpt.safetensors", "--ckpt_interval=1",
                "--max_iters=200", "--log_interval=100")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "train_gen.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    ckpt, tmp = tmp_path / "ckpt.safetensors", tmp_path / "ckpt.safetensors.tmp"
    deadline = time.time() + 120
    while not (ckpt.exists() and tmp.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    print("partial .tmp left behind:", tmp.exists())

    _, meta = load_checkpoint(str(ckpt))
    step = meta["step"]
    assert step >= 1
    run("train_gen.py", monkeypatch, args + ["--resume=True", f"--stop_at_step={step + 1}"])
    assert load_checkpoint(str(ckpt))[1]["step"] == step + 1
    assert not tmp.exists()
