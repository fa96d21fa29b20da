"""A run that never lies (issue 24): a diverged run stops before it saves, a run folder belongs to one run, a bad
config stops before any model is built, a checkpoint is checked before it is trusted, and every error a user
causes reaches them as one line `error: ...` with exit status 2 (a bug keeps its traceback).

The trainers run in this process with runpy, or as subprocesses where the exit status and stderr are the point.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from backbones import Llama
from checkpoint import load_checkpoint, load_trainable, restore_training_state, save_checkpoint
from configurator import InputError
from test_train import argv as tiny_argv
from test_train import metrics, run
from training import lock_folder

ROOT = Path(__file__).resolve().parent.parent


def argv(world, out_dir, *extra):
    return tiny_argv(world, out_dir, "--max_iters=6", *extra)


def subprocess_run(script, args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def steps_in(out_dir):
    return [m["step"] for m in metrics(out_dir)]


# -----------------------------------------------------------------------------
# divergence


def test_a_diverged_run_stops_before_its_optimizer_step_and_keeps_the_last_finite_checkpoint(synthetic_world,
                                                                                             tmp_path):
    result = subprocess_run("train_gen.py", argv(synthetic_world, tmp_path, "--lr=1e6", "--ckpt_interval=1"))
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: step ") and "not finite" in last_line and "Traceback" not in result.stderr
    failed_step = int(last_line.split()[2].rstrip(":"))
    tensors, meta = load_checkpoint(str(tmp_path))  # refuses a non-finite tensor: this one is all finite
    assert meta["step"] == failed_step - 1 and tensors
    assert max(steps_in(tmp_path)) == failed_step - 1


def test_a_non_finite_checkpoint_never_replaces_a_finite_one(tmp_path):
    path = str(tmp_path / "ckpt.safetensors")
    save_checkpoint(path, {"model.w": torch.ones(3)}, {"step": 1})
    before = Path(path).read_bytes()
    with pytest.raises(SystemExit, match="not saved: model.w holds non-finite values"):
        save_checkpoint(path, {"model.w": torch.tensor([1.0, float("nan"), 0.0])}, {"step": 2})
    assert Path(path).read_bytes() == before and not Path(path + ".tmp").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_loading_refuses_non_finite_tensors_naming_tensor_and_file(tmp_path, bad):
    path = tmp_path / "ckpt.safetensors"
    save_file({"model.bridge.weight": torch.tensor([[0.0, bad]]), "optim.x.step": torch.tensor(1.0)}, str(path))
    with pytest.raises(InputError, match=f"{path}: model.bridge.weight holds non-finite values"):
        load_checkpoint(str(tmp_path))


# -----------------------------------------------------------------------------
# checkpoint dtype, shape and corrupt files


def test_load_trainable_refuses_a_non_float_or_misshapen_tensor_and_says_when_it_casts():
    module = torch.nn.Linear(2, 3)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    with pytest.raises(InputError, match=r"ckpt: model.weight is torch.int32, a weight must be a float tensor"):
        load_trainable(module, dict(weights, weight=weights["weight"].to(torch.int32)), "ckpt")
    with pytest.raises(InputError, match=r"ckpt: model.bias has shape \(4,\), the model expects \(3,\)"):
        load_trainable(module, dict(weights, bias=torch.zeros(4)), "ckpt")
    said = []
    load_trainable(module, dict(weights, weight=weights["weight"].to(torch.bfloat16)), "ckpt", log=said.append)
    assert said == ["ckpt: weights cast bfloat16 into float32"]
    assert torch.equal(module.weight, weights["weight"].to(torch.bfloat16).float())


@pytest.mark.parametrize("content", [b"", b"\x00\x01 random bytes" * 10, None])
def test_a_corrupt_safetensors_file_is_named(tmp_path, synthetic_world, content):
    path = tmp_path / "ckpt.safetensors"
    if content is None:  # truncated: a real file cut in half
        save_file({"model.w": torch.ones(1000)}, str(path))
        content = path.read_bytes()[:len(path.read_bytes()) // 2]
    path.write_bytes(content)
    with pytest.raises(InputError, match=f"{path}: not a readable safetensors file"):
        load_checkpoint(str(path))
    llama = tmp_path / "llama"  # the LLM's weights too
    llama.mkdir()
    (llama / "config.json").write_bytes((synthetic_world / "llama" / "config.json").read_bytes())
    (llama / "model.safetensors").write_bytes(content)
    with pytest.raises(InputError, match=f"{llama}/model.safetensors: not a readable safetensors file"):
        Llama.from_hf(str(llama))


def test_an_invalid_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n oops}')
    with pytest.raises(InputError, match=f"{tmp_path}/config.json:2: not valid JSON"):
        Llama.from_hf(str(tmp_path))


# -----------------------------------------------------------------------------
# config validation, one-line errors


@pytest.mark.parametrize("script", ["train_align.py", "train_gen.py"])
@pytest.mark.parametrize("setting", ["--batch_size=-1", "--grad_accum=0", "--max_iters=-1", "--ckpt_interval=0",
                                     "--log_interval=0"])
def test_a_config_that_cannot_train_stops_before_any_model_is_built(script, setting, synthetic_world, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr("training.Run", None)  # the first thing built after the config: never reached
    key = setting[2:].split("=")[0]
    with pytest.raises(InputError, match=f"{key} must be a positive integer"):
        run(script, monkeypatch, argv(synthetic_world, tmp_path, setting))


def test_epochs_must_be_positive_when_they_set_max_iters(synthetic_world, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="epochs must be a positive integer, got 0"):
        run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--max_iters=0", "--epochs=0"))


def test_user_errors_are_one_line_with_exit_2_and_bugs_keep_their_traceback(synthetic_world, tmp_path):
    for script, args, message in [
            ("train_gen.py", argv(synthetic_world, tmp_path, "--batch_size=-1"), "batch_size must be a positive"),
            ("train_gen.py", argv(synthetic_world, tmp_path / "t", "--chat_template=nope"), "chat_template must be one of"),
            ("train_align.py", ["config/nowhere.py"], "config/nowhere.py: config file not found"),
            ("evaluate.py", [f"--ckpt={tmp_path}/none", "--benchmarks=POPE"], "not found"),
            ("evaluate.py", [f"--ckpt={tmp_path}/none", "--batch_size=0"], "batch_size must be >= 1"),
            ("scaling_fit.py", [f"{tmp_path}/none.csv"], f"{tmp_path}/none.csv: not found"),
            ("divergence.py", [], "text mode needs --data"),
            ("convert_authors.py", [], "give --src=THEIR_DIR")]:
        result = subprocess_run(script, args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    bug = subprocess.run([sys.executable, "-c", "import configurator; configurator.report_input_errors(); 1 / 0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "ZeroDivisionError" in bug.stderr


# -----------------------------------------------------------------------------
# the run folder


def test_a_folder_locked_by_a_live_process_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, capsys):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "LOCK").write_text(f"{other.pid} {socket.gethostname()}\n")
        with pytest.raises(InputError, match=f"in use by pid {other.pid}"):
            lock_folder(str(tmp_path))
    finally:
        other.kill()
        other.wait()
    lock_folder(str(tmp_path))  # now a dead pid's lock
    assert f"taking over the lock of pid {other.pid}" in capsys.readouterr().out
    assert (tmp_path / "LOCK").read_text().split()[0] == str(os.getpid())
    (tmp_path / "LOCK").write_text(f"{other.pid} another-host\n")  # another host's pid cannot be checked from here
    with pytest.raises(InputError, match="in use by pid"):
        lock_folder(str(tmp_path))


def test_two_runs_into_one_folder_the_second_is_refused(synthetic_world, tmp_path):
    first = subprocess.Popen([sys.executable, "train_gen.py", *argv(synthetic_world, tmp_path, "--max_iters=400")],
                             cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:  # the first has claimed the folder once it logs its device
            if line.startswith("device"):
                break
        second = subprocess_run("train_gen.py", argv(synthetic_world, tmp_path, "--resume=True"))
        assert second.returncode == 2 and f"in use by pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_fresh_run_refuses_a_folder_with_metrics(synthetic_world, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    with pytest.raises(InputError, match="metrics.jsonl: exists \\(pass --resume=True"):
        run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path))
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


def test_resume_drops_the_metrics_past_its_checkpoint(synthetic_world, tmp_path, monkeypatch):
    run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--stop_at_step=2"))
    with open(tmp_path / "metrics.jsonl", "a") as f:  # a run killed after logging steps 3 and 4, before saving them
        f.writelines(json.dumps({"step": step, "loss": 9.0}) + "\n" for step in (3, 4))
    run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--resume=True"))
    assert steps_in(tmp_path) == [1, 2, 3, 4, 5, 6]
    assert 9.0 not in [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]


def test_resume_refuses_an_incomplete_optimizer_state(tmp_path):
    model = torch.nn.Linear(2, 2)
    tensors = {"optim.weight.step": torch.tensor(3.0), "optim.weight.exp_avg": torch.zeros(2, 2)}
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(InputError, match=r"ckpt: optim.weight lacks \['exp_avg_sq'\]"):
        restore_training_state("ckpt", tensors, {}, model, optimizer, 0, torch.device("cpu"), print)
