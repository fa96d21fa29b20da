"""dtype=bfloat16 on CPU runs the GPU's dtype path (autocast on the device's type, the frozen LLM in bf16, FSDP's
bf16 MixedPrecisionPolicy, torch.compile), so it is checked without a GPU. Reference: the same tiny run in float32
from the same seed.

Tolerance: bf16 keeps 8 significant bits, a relative rounding of 2^-9 (0.2%) on every matmul input, while the
cross-entropy and AdamW stay float32; over 4 steps of the tiny stage-2 run the losses differ by at most 1.5e-4
relative (measured). rel=1e-2 is well above that and far below what a broken path gives (a loss off by whole units,
or NaN). The losses must also differ somewhere: equal ones would mean bf16 never ran.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
import sample
from test_evaluate_run import make_checkpoint
from test_train import argv, metrics, run

ROOT = Path(__file__).resolve().parent.parent
RTOL = 1e-2


def losses(out_dir):
    return [m["loss"] for m in metrics(out_dir)]


def assert_close_but_not_equal(bf16, float32):
    assert len(bf16) == len(float32)
    assert bf16 == pytest.approx(float32, rel=RTOL)
    assert bf16 != float32


@pytest.fixture(scope="module")
def float32_gen(synthetic_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("float32")
    with pytest.MonkeyPatch.context() as mp:
        run("train_gen.py", mp, argv(synthetic_world, out, "--max_iters=4"))
    return out


def test_train_gen_in_bf16_on_cpu_trains_as_float32(synthetic_world, float32_gen, tmp_path, monkeypatch):
    script = run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--max_iters=4", "--dtype=bfloat16"))
    assert script["run"].autocast.device == "cpu" and script["run"].autocast.fast_dtype == torch.bfloat16
    assert {p.dtype for p in script["raw_model"].llm.parameters()} == {torch.bfloat16}
    print("float32", losses(float32_gen), "\nbfloat16", losses(tmp_path))
    assert_close_but_not_equal(losses(tmp_path), losses(float32_gen))


def test_train_align_in_bf16_on_cpu_trains_as_float32(synthetic_world, tmp_path, monkeypatch):
    """The first step only: AdamW's first updates move every weight by about +-lr whatever its gradient's size, so
    bf16's rounding flips the sign of the smallest gradients, and the contrastive loss of 3-4 turns per micro-batch
    then differs by up to 20% at step 2 (measured at lr 1e-3); the first step's loss and gradient norm are the
    comparison, later steps need only be finite."""
    records = {}
    for dtype in ("float32", "bfloat16"):
        run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path / dtype, "--max_iters=2", f"--dtype={dtype}"))
        records[dtype] = metrics(tmp_path / dtype)
    bf16, float32 = records["bfloat16"][0], records["float32"][0]
    assert_close_but_not_equal([bf16["loss"]], [float32["loss"]])
    # the backward's matmuls run in bf16 too, summed over the whole model: 4.3% apart (measured)
    assert bf16["grad_norm"] == pytest.approx(float32["grad_norm"], rel=0.1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records["bfloat16"])


def test_a_bf16_fsdp_step_on_gloo(synthetic_world, float32_gen, tmp_path):
    """FSDP2's bf16 MixedPrecisionPolicy (bf16 all-gathers, float32 reduce-scatters) on 2 CPU processes: the same
    global batch of 4 as the float32 run (2 ranks x batch 2, no accumulation)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_gen.py", *argv(synthetic_world, tmp_path, "--max_iters=2", "--grad_accum=1",
                                                   "--fsdp=True", "--dtype=bfloat16")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_close_but_not_equal(losses(tmp_path), losses(float32_gen)[:2])


def test_evaluate_and_sample_run_bf16_on_cpu_when_asked(synthetic_world, tmp_path):
    make_checkpoint(synthetic_world, tmp_path / "ck", n_l=16, seed=0)
    cpu = torch.device("cpu")
    assert evaluate.torch_dtype(evaluate.Config(), cpu) == torch.float32  # the CPU default stays fast
    dtype = evaluate.torch_dtype(evaluate.Config(dtype="bfloat16"), cpu)  # sample.py reads --dtype the same way
    vlm, token_space = sample.load(sample.Config(ckpt=str(tmp_path / "ck")), cpu, dtype)
    assert {p.dtype for p in vlm.parameters()} == {torch.bfloat16}  # the LLM included
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    (answer,) = sample.chat(vlm, token_space, Image.open(tmp_path / "red.png").convert("RGB"), ["What colour?"], 4,
                            cpu, dtype)
    assert isinstance(answer, str)


@pytest.mark.slow
def test_compile_in_bf16_on_cpu(synthetic_world, float32_gen, tmp_path, monkeypatch):
    """torch.compile of every block (the first step compiles: minutes on a CPU, see docs/training.md)."""
    t0 = time.time()
    run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--max_iters=4", "--dtype=bfloat16",
                                          "--compile=True"))
    print(f"compile=True, 4 steps: {time.time() - t0:.0f} s")
    assert_close_but_not_equal(losses(tmp_path), losses(float32_gen))
