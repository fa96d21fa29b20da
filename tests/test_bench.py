"""bench.py --mode=train on the tiny synthetic world: it times train_gen.py's step on synthetic batches of the
configured shapes. References worked out in the test: the LLM tokens per sample from the synthetic layout, the
samples per step from the batch keys, and the first step's loss recomputed from a model built here with the same seed.
"""
import re

import torch
import torch.nn.functional as F

import bench
import fusion
from backbones import Llama, ViT
from model import FusedVLM, FusedVLMConfig


def test_train_mode_times_the_training_step_on_batches_of_the_configured_shapes(synthetic_world, tmp_path, capsys,
                                                                                monkeypatch):
    world = synthetic_world
    shapes = dict(train_image_size=112, train_num_crops=2, train_n_l=5, train_fused_layers=2, train_fused_heads=4,
                  train_fused_mlp=256, train_batch_size=2, train_grad_accum=2)
    cfg = bench.Config(mode="train", train_clip_path=f"{world}/clip", train_llama_path=f"{world}/llama", seed=3,
                       train_activation_checkpointing=False, train_steps=2, **shapes)
    monkeypatch.chdir(tmp_path)
    rows = bench.bench_train(cfg, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no data read, nothing written
    assert len(rows) == 2 and "train: median of 2 steps after 3 warm-up" in printed
    for ms, samples_s, llm_tokens_s, _, _ in rows:
        assert abs(samples_s * ms / 1000 - 2 * 2) < 1e-6  # grad_accum x batch_size conversations per step
        # each: a 40-token prefix, n_l slots, the 16-token question, a 32-token answer and </s>
        assert abs(llm_tokens_s / samples_s - (40 + 5 + 16 + 33)) < 1e-6

    # the first step's loss: the token mean of a fresh model (same seed, same loaders) over a batch of those shapes
    space = fusion.TokenSpace(fusion.TokenSpaceConfig(clip_path=f"{world}/clip", llama_path=f"{world}/llama",
                                                      image_size=112, num_crops=2, n_l=5))
    torch.manual_seed(3)
    vit = ViT.from_hf(f"{world}/clip", image_size=112)
    llm = Llama.from_hf(f"{world}/llama")
    vlm = FusedVLM(FusedVLMConfig(vit=vit.cfg, llm=llm.cfg, fused_layers=2, fused_heads=4, fused_mlp=256,
                                  fused_vocab_size=len(space.clip)), llm=llm)
    vlm.vision.vit = vit
    batch = bench.synthetic_batch(2, 3, 112, 5, len(space.clip), space.sp.get_piece_size(), seed=3)
    assert batch["pixel_values"].shape == (2 * 3, 3, 112, 112)
    with torch.no_grad():
        logits = vlm(batch)[0]
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    first_loss = float(re.search(r"step 1/5 \| loss ([0-9.]+)", printed).group(1))
    assert abs(first_loss - expected.item()) < 1e-4
