"""The three compressors of model.py (fused, pool, resampler): how many tokens each makes and where they go, against
re-computations written here (pooling with explicit loops and means, the resampler's attention by hand over one
sample's tokens); gradients; train_gen.py checkpoints that record their compressor and load back through
checkpoint.py's loader; the FLOP count against a hand count and FlopCounterMode.

The tiny ViT: 28 px crops of 7 px patches, 4 x 4 patches -> a 2 x 2 merged grid + separator = 5 tokens per crop.
"""
import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import evaluate as ev
from backbones import LlamaConfig, ViTConfig
from checkpoint import config_diff, inference_vlm, load_checkpoint, read_gen_checkpoint
from configurator import InputError
from fusion import collate
from model import FusedVLM, FusedVLMConfig, train_flops
from test_flops import counted_step, make_batch
from test_train import run  # train_gen.py / train_align.py in this process, as the command line runs them

ROOT = Path(__file__).resolve().parent.parent
EOS, SLOT, D = 63, 0, 32
G = 2  # merged grid side


def tiny_config(compressor):
    return FusedVLMConfig(ViTConfig(image_size=28, patch_size=7, width=D, layers=2, heads=4, mlp=64),
                          LlamaConfig(vocab_size=128, dim=48, layers=2, heads=4, kv_heads=2, mlp=96),
                          fused_layers=2, fused_heads=4, fused_mlp=64, fused_vocab_size=64, n_queries=15,
                          compressor=compressor)


def build_batch(samples, seed=0):
    """samples: [(crops, [(question tokens, n), ...])] -> a right-padded batch per fusion.py's contract: per question
    [tokens][n-1 query slots, rows 0..n-2][EOS]; on the LLM side <s>, the slots and questions, a 2-token answer."""
    fused, llm = [], []
    for _, questions in samples:
        ids, query, output, llm_ids, slots = [], [], [], [1], [False]
        for tokens, n in questions:
            ids += tokens + list(range(n - 1)) + [EOS]
            query += [False] * len(tokens) + [True] * (n - 1) + [False]
            output += [False] * len(tokens) + [True] * n
            llm_ids += [SLOT] * n + [5, 6]
            slots += [True] * n + [False, False]
        fused.append((ids, query, output))
        llm.append((llm_ids + [7, 2], slots + [False, False]))

    def pad(rows, value, dtype):
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    labels = [[-100] * (len(ids) - 2) + ids[-2:] for ids, _ in llm]
    return dict(pixel_values=torch.randn(sum(k for k, _ in samples), 3, 28, 28, generator=g),
                crop_to_sample=torch.cat([torch.full((k,), b) for b, (k, _) in enumerate(samples)]),
                fused_ids=pad([f[0] for f in fused], 0, torch.long), query_mask=pad([f[1] for f in fused], False, torch.bool),
                output_mask=pad([f[2] for f in fused], False, torch.bool),
                fused_real_mask=pad([[True] * len(f[0]) for f in fused], False, torch.bool),
                input_ids=pad([ids for ids, _ in llm], 0, torch.long), slot_mask=pad([s for _, s in llm], False, torch.bool),
                labels=pad(labels, -100, torch.long), attention_mask=pad([[True] * len(ids) for ids, _ in llm], False, torch.bool))


# sample 0: 1 crop (4 merged tokens), n_l = 6 (more than its tokens) then n_s = 3; sample 1: 3 crops (12 tokens)
N_L, N_S = 6, 3
SAMPLES = [(1, [([5, 6, 7], N_L), ([8, 9], N_S)]), (3, [([10, 11], N_L), ([12], N_S)])]
SLOTS = [(0, N_L), (0, N_S), (1, N_L), (1, N_S)]  # (sample, n) of the questions in slot order


def vlm_of(compressor, seed=0):
    torch.manual_seed(seed)
    return FusedVLM(tiny_config(compressor))


def compress(vlm, batch):
    vision = vlm.vision(batch["pixel_values"])
    return vision, vlm.compressor(vision, batch["crop_to_sample"], batch["fused_ids"], batch["query_mask"], batch["output_mask"])


def views_of(vision, batch, b):
    """Sample b's merged grids as nested lists [view][row][col] -> (D,) tensor, the separator left out."""
    return [[[crop[r * G + c] for c in range(G)] for r in range(G)] for crop in vision[batch["crop_to_sample"] == b]]


def bins(length, n):
    """Adaptive average pooling's bins: output i averages inputs floor(i L / n) .. ceil((i + 1) L / n) - 1."""
    return [range(i * length // n, -(-(i + 1) * length // n)) for i in range(n)]


def pool_by_hand(views, n):
    s = min(G, math.ceil(math.sqrt(n / len(views))))  # the documented rule: k s^2 >= n tokens where the grid allows
    tokens = [torch.stack([view[r][c] for r in rows for c in cols]).mean(0)
              for view in views for rows in bins(G, s) for cols in bins(G, s)]  # view by view, reading order
    return torch.stack([torch.stack([tokens[t] for t in span]).mean(0) for span in bins(len(tokens), n)])


@pytest.mark.parametrize("compressor", ["fused", "pool", "resampler"])
def test_each_compressor_fills_exactly_the_slots(compressor):
    vlm = vlm_of(compressor)
    batch = build_batch(SAMPLES)
    with torch.no_grad():
        tokens = vlm.fused_tokens(batch)
        assert tokens.shape == (2 * (N_L + N_S), 48) == (int(batch["slot_mask"].sum()), 48)
        vlm(batch)  # the masked scatter accepts them


def test_pool_equals_pooling_by_hand():
    vlm = vlm_of("pool")
    batch = build_batch(SAMPLES)
    with torch.no_grad():
        vision, out = compress(vlm, batch)
        expected = torch.cat([pool_by_hand(views_of(vision, batch, b), n) for b, n in SLOTS])
        assert torch.allclose(out, expected, atol=1e-6)
        assert torch.allclose(vlm.fused_tokens(batch), vlm.bridge(expected), atol=1e-6)
        # one crop, n = 8 = twice its 4 tokens: every token twice, in reading order
        one = build_batch([(1, [([5], 8)])])
        vision, out = compress(vlm, one)
        assert torch.allclose(out, vision[0, :4].repeat_interleave(2, dim=0), atol=1e-6)
        # n = 1: the mean of all the sample's merged tokens, separators not among them
        vision, out = compress(vlm, build_batch([(3, [([5], 1)])]))
        assert torch.allclose(out[0], vision[:, :4].reshape(-1, D).mean(0), atol=1e-6)


def sincos_by_hand(cell):
    row, col = divmod(cell, G)
    quarter = D // 4
    omega = [10000 ** (-i / quarter) for i in range(quarter)]
    return torch.tensor([f(x * w) for x in (row, col) for f in (math.sin, math.cos) for w in omega])


def rms(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def resampler_by_hand(resampler, views, n, eps):
    """Query rows 0..n-1 through every block: attention over this sample's merged tokens only, head by head."""
    keys = [(view[r][c], r * G + c) for view in views for r in range(G) for c in range(G)]
    vision = torch.stack([t for t, _ in keys])
    vision_pos = torch.stack([sincos_by_hand(cell) for _, cell in keys])
    x = resampler.queries[:n].clone()
    query_pos = torch.stack([sincos_by_hand(j % (G * G)) for j in range(n)])
    for block in resampler.layers:
        v_in = rms(vision, block.vision_norm.weight, eps)
        q = (rms(x, block.query_norm.weight, eps) + query_pos) @ block.q_proj.weight.T
        k = (v_in + vision_pos) @ block.k_proj.weight.T
        v = v_in @ block.v_proj.weight.T
        hd = D // block.heads
        heads = []
        for h in range(block.heads):
            part = slice(h * hd, (h + 1) * hd)
            weights = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(hd), dim=-1)
            heads.append(weights @ v[:, part])
        x = x + torch.cat(heads, dim=-1) @ block.o_proj.weight.T
        h = rms(x, block.mlp_norm.weight, eps)
        x = x + (F.silu(h @ block.gate_proj.weight.T) * (h @ block.up_proj.weight.T)) @ block.down_proj.weight.T
    return rms(x, resampler.norm.weight, eps)


def test_resampler_equals_attention_by_hand_over_its_own_sample():
    vlm = vlm_of("resampler")
    batch = build_batch(SAMPLES)
    with torch.no_grad():
        vision, out = compress(vlm, batch)
        expected = torch.cat([resampler_by_hand(vlm.compressor, views_of(vision, batch, b), n, vlm.cfg.fused_eps)
                              for b, n in SLOTS])
        assert torch.allclose(out, expected, atol=1e-5)
        # question-blind, per sample: other questions and another image for sample 0 leave sample 1's outputs alone
        other = build_batch([(1, [([40, 41], N_L), ([42, 43, 44], N_S)]), SAMPLES[1]], seed=0)
        other["pixel_values"][0] = torch.randn(3, 28, 28)
        _, changed = compress(vlm, other)
        assert torch.allclose(changed[N_L + N_S:], out[N_L + N_S:], atol=1e-6)
        assert (changed[:N_L + N_S] - out[:N_L + N_S]).abs().max() > 1e-4
        # queries do not see each other: a later question's n_s outputs are the first question's first n_s
        assert torch.allclose(out[N_L:N_L + N_S], out[:N_S], atol=1e-6)


@pytest.mark.parametrize("compressor", ["pool", "resampler"])
def test_question_blind_compressors_ignore_the_question_and_the_separator(compressor):
    vlm = vlm_of(compressor)
    batch = build_batch(SAMPLES)
    other = build_batch([(1, [([30], N_L), ([31, 32, 33, 34], N_S)]), (3, [([35, 36, 37], N_L), ([38], N_S)])])
    with torch.no_grad():
        before = vlm.fused_tokens(batch)
        assert torch.allclose(vlm.fused_tokens(other), before, atol=1e-6)
        vlm.vision.separator.add_(1.0)
        assert torch.allclose(vlm.fused_tokens(batch), before, atol=1e-6)
        vlm.vision.separator.sub_(1.0)


@pytest.mark.parametrize("compressor", ["fused", "pool", "resampler"])
def test_gradients_reach_the_compressor_and_the_vision_tower(compressor):
    vlm = vlm_of(compressor)
    vlm(build_batch(SAMPLES))[1].backward()
    frozen = {"vision.separator"} if compressor != "fused" else set()  # only the fused model reads it
    trainable = {n: p for n, p in vlm.named_parameters() if not n.startswith("llm.")}
    assert {n for n, p in trainable.items() if not p.requires_grad} == frozen
    assert any(n.startswith("compressor.") for n in trainable) == (compressor != "pool")
    for name, p in trainable.items():
        if name not in frozen:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} gets no gradient"
    assert all(p.grad is None for p in vlm.llm.parameters())


def test_a_checkpoint_without_compressor_is_a_fused_one():
    old = dataclasses.asdict(tiny_config("fused"))
    del old["compressor"]
    assert FusedVLMConfig.from_dict(old).compressor == "fused"
    assert config_diff(old, tiny_config("fused")) == {}
    assert config_diff(old, tiny_config("pool")) == {"compressor": ("fused", "pool")}
    with pytest.raises(ValueError, match="compressor must be one of fused, pool, resampler"):
        FusedVLM(tiny_config("perceiver"))


# -----------------------------------------------------------------------------
# train_gen.py: the checkpoint records its compressor, evaluate.py's loader rebuilds it

TINY = ["--num_crops=1", "--batch_size=2", "--grad_accum=1", "--max_iters=2", "--log_interval=1", "--ckpt_interval=100",
        "--fused_layers=1"]


def argv(world, out_dir, *extra):
    return [str(ROOT / "config" / "tiny.py"), f"--data_dir={world}", f"--clip_path={world}/clip",
            f"--llama_path={world}/llama", f"--out_dir={out_dir}", *TINY, *extra]


@pytest.fixture(scope="module")
def align_ckpt(synthetic_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    with pytest.MonkeyPatch.context() as mp:
        run("train_align.py", mp, argv(synthetic_world, out, "--max_iters=1"))
    return out / "ckpt.safetensors"


@pytest.mark.parametrize("compressor", ["pool", "resampler"])
def test_train_gen_checkpoint_records_its_compressor_and_evaluate_rebuilds_it(compressor, synthetic_world, align_ckpt,
                                                                              tmp_path, monkeypatch, capsys):
    out = tmp_path / compressor
    script = run("train_gen.py", monkeypatch, argv(synthetic_world, out, f"--compressor={compressor}",
                                                   f"--init_from={align_ckpt}"))
    assert f"compressor={compressor}: {align_ckpt} holds a fused model; only its vision tower is taken" in capsys.readouterr().out
    weights, meta = read_gen_checkpoint(str(out / "ckpt.safetensors"))
    assert meta["model_config"]["compressor"] == compressor
    model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
    trained = script["raw_model"].eval()
    rebuilt = inference_vlm(model_cfg, weights, trained.llm, str(out), torch.device("cpu"), torch.float32)
    assert type(rebuilt.compressor) is type(trained.compressor)
    batch = collate([script["dataset"][i] for i in range(3)])
    with torch.no_grad():
        assert torch.equal(rebuilt.fused_tokens(batch), trained.fused_tokens(batch))
    ts_cfg, variant = ev.run_settings(ev.Config(), meta, model_cfg, str(out))
    assert variant == compressor
    with pytest.raises(InputError, match="drop_question=True is the fused model's VQ ablation"):
        ev.run_settings(ev.Config(drop_question=True), meta, model_cfg, str(out))

    # another compressor takes only this checkpoint's vision tower (lr 0: nothing moves); resume refuses it
    other = "resampler" if compressor == "pool" else "fused"
    swapped = run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path / "other", f"--compressor={other}",
                                                    "--lr=0.0", "--max_iters=1", f"--init_from={out}/ckpt.safetensors"))
    vision = swapped["raw_model"].vision.state_dict()
    assert all(torch.equal(vision[k], v) for k, v in trained.vision.state_dict().items())
    torch.manual_seed(swapped["cfg"].seed)
    fresh = FusedVLM(swapped["model_cfg"], llm=trained.llm)
    for k, v in [*fresh.compressor.state_dict().items(), ("weight", fresh.bridge.weight)]:
        part = swapped["raw_model"].bridge if k == "weight" else swapped["raw_model"].compressor
        assert torch.equal(part.state_dict()[k], v), k
    with pytest.raises(InputError, match=f"model config differs.*'compressor': \\('{compressor}', '{other}'\\)"):
        run("train_gen.py", monkeypatch, argv(synthetic_world, out, f"--compressor={other}", "--resume=True"))


def test_stage1_vision_tower_is_taken_by_another_compressor(synthetic_world, align_ckpt, tmp_path, monkeypatch):
    """With lr 0 nothing moves: the vision tower is stage 1's, the resampler is this seed's fresh init."""
    script = run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--compressor=resampler", "--lr=0.0",
                                                   "--max_iters=1", f"--init_from={align_ckpt}"))
    stage1, _ = load_checkpoint(str(align_ckpt), prefix="model.vision.")
    vision = script["raw_model"].vision.state_dict()
    assert all(torch.equal(vision[k[len("model.vision."):]], v) for k, v in stage1.items())
    torch.manual_seed(script["cfg"].seed)
    fresh = FusedVLM(script["model_cfg"], llm=script["raw_model"].llm)
    for k, v in fresh.compressor.state_dict().items():
        assert torch.equal(script["raw_model"].compressor.state_dict()[k], v), k


def test_drop_question_with_a_question_blind_compressor_is_refused(synthetic_world, tmp_path, monkeypatch):
    with pytest.raises(InputError, match="drop_question=True is the fused model's VQ ablation \\(compressor=pool"):
        run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, "--compressor=pool", "--drop_question=True"))


# -----------------------------------------------------------------------------
# FLOPs


def compressor_flops_by_hand(compressor, samples):
    """The compressor's share for the tiny config (D 32, 2 layers, MLP 64), samples [(crops, question_len, n_l, _)]:
    6 FLOPs per trainable weight per token it runs on, attention 12 x layers x D x (keys per query)."""
    if compressor == "pool":
        return 0
    layers, per_layer_attention, mlp = 2, 4 * D * D, 3 * D * 64
    if compressor == "fused":  # every weight over [5 tokens per crop][question][n_l outputs]
        lens = [5 * k + q + n for k, q, n, _ in samples]
        return 6 * layers * (per_layer_attention + mlp) * sum(lens) + 12 * layers * D * sum(t * t for t in lens)
    vision = [4 * k for k, *_ in samples]  # k and v over the merged tokens, q, o and the MLP over the outputs
    outputs = [n for _, _, n, _ in samples]
    return (6 * layers * 2 * D * D * sum(vision) + 6 * layers * (2 * D * D + mlp) * sum(outputs)
            + 12 * layers * D * sum(v * n for v, n in zip(vision, outputs)))


@pytest.mark.parametrize("compressor", ["fused", "pool", "resampler"])
def test_train_flops_of_each_compressor(compressor):
    """The compressor's share (the FLOPs beyond the pool model's, whose compressor does no matmul) against the hand
    count; the whole step against FlopCounterMode, on mixed crop counts (padding is not model FLOPs: each sample
    is counted alone)."""
    torch.manual_seed(4)
    samples = [(1, 3, 6, 20), (3, 2, 9, 24)]
    batch = make_batch(samples)
    vlm = vlm_of(compressor)
    share = train_flops(vlm, batch) - train_flops(vlm_of("pool"), batch)
    assert share == compressor_flops_by_hand(compressor, samples)
    alone = sum(counted_step(vlm, make_batch([s])) for s in samples)
    assert train_flops(vlm, batch) == pytest.approx(alone, rel=1e-9)


@pytest.mark.parametrize("compressor", ["fused", "pool", "resampler"])
def test_bench_paper_flops_per_compressor(compressor):
    """bench.py --compressor: the paper model's compressor + bridge share at n_l = 64 on 13 views of 144 merged
    tokens (+ 13 separators), a 20-token question, width 1280, 12 layers x 5120 MLP, bridge 1280 x 4096."""
    width, layers, mlp, vision, n = 1280, 12, 5120, 13 * 144, 64
    bridge = 6 * width * 4096 * n
    if compressor == "pool":
        expected = bridge
    elif compressor == "resampler":
        expected = bridge + (6 * layers * 2 * width ** 2 * vision + 6 * layers * (2 * width ** 2 + 3 * width * mlp) * n
                             + 12 * layers * width * n * vision)
    else:
        T = vision + 13 + 20 + n
        expected = bridge + 6 * layers * (4 * width ** 2 + 3 * width * mlp) * T + 12 * layers * width * T * T
    assert bench.paper_flops(n, compressor)["fused"] == pytest.approx(expected, rel=1e-12)
