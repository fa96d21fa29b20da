"""
Stage 0, vision side: pre-train the tiny random CLIP contrastively on the synthetic images and their captions, so the
pipeline starts, as the paper's does, from a CLIP whose vision tower already sees something.

    python data/synthetic/pretrain_clip.py --data_dir=data/synthetic/out --out_dir=data/synthetic/out/clip-pretrained

CLIP's own objective (symmetric InfoNCE between the image embedding and the caption embedding, other pairs of the
batch as negatives), on the global view of each training image (fusion.py's, as the pipeline computes it) and one
of its 5 caption phrasings drawn per step. Without this the vision tower stays random, and within a CPU budget
neither the alignment loss nor the generation loss taught it anything: their losses with the right images and with
images shuffled across the batch stayed equal to 3 decimals after 400 and 750 steps.

The captions are not in train.jsonl: they are rebuilt by replaying prepare.py's random stream (pretrain_llm.py's
read_conversations checks the replay against the JSONL). The model is transformers' CLIPModel, the class prepare.py
writes the random one with: the output folder (save_pretrained, safetensors, plus vocab.json and merges.txt) is
exactly what ViT.from_hf and CLIPText.from_hf read.
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import parse_config  # noqa: E402
from fusion import global_view, parse_record  # noqa: E402
from model import cosine_lr  # noqa: E402
from prepare import captions, conversation, random_scene  # noqa: E402  (this folder's prepare.py)


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
    seed: int = 0
    data_seed: int = 0  # prepare.py's --seed, to replay its scenes


def read_pairs(data_dir, data_seed, image_size):
    """-> global views (N, 3, S, S) of the training images, their 5 captions each (replayed, checked)."""
    rng = random.Random(f"{data_seed}-train")  # prepare.py's stream for the training split
    views, texts = [], []
    path = os.path.join(data_dir, "train.jsonl")
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            image, turns = parse_record(line)
            scene = random_scene(rng)
            messages = conversation(scene, rng)
            if [m["content"] for m in messages] != [text for turn in turns for text in turn]:
                raise ValueError(f"{path}, line {line_number}: replaying prepare.py (seed {data_seed}) gives another "
                                 f"conversation: was the data made with another --seed or another prepare.py?")
            with Image.open(os.path.join(data_dir, image)) as img:
                views.append(global_view(img.convert("RGB"), image_size))
            texts.append(captions(scene))
    return torch.stack(views), texts


def main(cfg):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    source = os.path.join(cfg.data_dir, "clip")
    views, texts = read_pairs(cfg.data_dir, cfg.data_seed, cfg.image_size)
    tokenizer = CLIPTokenizer(vocab=os.path.join(source, "vocab.json"), merges=os.path.join(source, "merges.txt"))
    clip = CLIPModel.from_pretrained(source)
    clip.train()
    optimizer = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    print(f"{len(views)} image-caption pairs; {sum(p.numel() for p in clip.parameters()) / 1e6:.2f}M parameters")
    generator = torch.Generator().manual_seed(cfg.seed)
    t_log = time.time()
    for step in range(cfg.max_iters):
        chosen = torch.randperm(len(views), generator=generator)[:cfg.batch_size].tolist()
        phrasing = torch.randint(5, (len(chosen),), generator=generator).tolist()
        text = tokenizer([texts[i][k] for i, k in zip(chosen, phrasing)], padding=True, truncation=True,
                         max_length=77, return_tensors="pt")
        lr = cosine_lr(step, cfg.max_iters, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=views[chosen],
                    return_loss=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            dt = (time.time() - t_log) / (step % cfg.log_interval + 1)
            print(f"step {step + 1}/{cfg.max_iters} | loss {loss.item():.4f} (chance {torch.log(torch.tensor(len(chosen))):.2f}) "
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
