"""
Stage 0, vision side: pre-train the tiny random CLIP contrastively on the synthetic world's images and their scenes
in words, so the pipeline starts, as the paper's does, from a CLIP whose vision tower already sees something.

    python data/synthetic/pretrain_clip.py --data_dir=data/synthetic/out --out_dir=data/synthetic/out/clip-pretrained

CLIP's own objective (symmetric InfoNCE between the image embedding and the text embedding, the other pairs of the
batch as negatives) on fresh scenes every step: the global view of each rendered image (fusion.py's, as the pipeline
computes it) against its scene in words ("E red F empty ... V green"). The model is transformers' CLIPModel, the
class prepare.py writes the random one with: the output folder (save_pretrained, safetensors, plus vocab.json and
merges.txt) is exactly what ViT.from_hf and CLIPText.from_hf read.
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from transformers import CLIPModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import parse_config  # noqa: E402
from fusion import global_view  # noqa: E402
from training import cosine_lr  # noqa: E402
from prepare import random_scene, render, scene_words  # noqa: E402  (this folder's prepare.py)


@dataclass
class Config:
    data_dir: str = "data/synthetic/out"  # train.jsonl, images/, clip/ (the random start)
    out_dir: str = "data/synthetic/out/clip-pretrained"
    image_size: int = 112  # the global view's side, as the pipeline's token space
    max_iters: int = 300
    batch_size: int = 64  # image-caption pairs per step: each is the others' negative
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    log_interval: int = 50
    seed: int = 0  # init and the stream of scenes


def pairs(rng, n, image_size):
    """n fresh scenes -> their global views (n, 3, S, S) and their scenes in words."""
    scenes = [random_scene(rng) for _ in range(n)]
    return torch.stack([global_view(render(s), image_size) for s in scenes]), [scene_words(s) for s in scenes]


def main(cfg):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    source = os.path.join(cfg.data_dir, "clip")
    tokenizer = CLIPTokenizer(vocab=os.path.join(source, "vocab.json"), merges=os.path.join(source, "merges.txt"))
    clip = CLIPModel.from_pretrained(source)
    clip.train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    print(f"{sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters; {cfg.max_iters} steps of "
          f"{cfg.batch_size} fresh image-text pairs")
    rng = random.Random(f"{cfg.seed}-clip")
    t_log = time.time()
    for step in range(cfg.max_iters):
        views, texts = pairs(rng, cfg.batch_size, cfg.image_size)
        text = tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        lr = cosine_lr(step, cfg.max_iters, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=views,
                    return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            dt = (time.time() - t_log) / (step % cfg.log_interval + 1)
            print(f"step {step + 1}/{cfg.max_iters} | loss {loss.item():.4f} (chance {torch.log(torch.tensor(cfg.batch_size)):.2f}) "
                  f"| lr {lr:.2e} | {dt * 1000:.0f} ms/step")
            t_log = time.time()
    clip.save_pretrained(cfg.out_dir, safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(cfg.out_dir, name))
    print(f"saved {cfg.out_dir} in {time.time() - t0:.1f} s total")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional:
        sys.exit(f"unexpected arguments {positional}; use --key=value")
    print(json.dumps(asdict(config)))
    main(config)
