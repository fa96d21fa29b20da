"""
An estimate, not a measurement: GPU memory per process of stage-2 training (train_gen.py) under DDP and FSDP, for
Llama-2-7B/13B/70B and Llama-3.1-8B (config/llama3_gen.py) behind the CLIP ViT-H/14 or ViT-L/14 tower at 336 px,
from parameter counts of our modules built on the meta device (nothing is allocated, nothing downloaded).

    python memory.py                         # docs/training.md's table: 8 GPUs, 5 conversations of 17 crops per GPU
    python memory.py --gpus=16 --llm_tokens=2048

Per GPU, DDP holds the frozen LLM in bf16 (2 bytes a weight) and the trainable parts in fp32 with their gradients
and AdamW's two moments (4 + 4 + 8 bytes a weight); FSDP divides all of it by the GPU count and adds the bf16 copies
of the units being gathered (the running block and the prefetched next one, taken as twice the largest unit).
Activations, with activation checkpointing on the ViT and fused blocks (the paper configs) and none on the frozen
LLM, whose saved tensors the gradient to the bridge needs: per checkpointed block its bf16 input; per LLM layer and
token 16 x dim + 6 x mlp bytes (two fp32 RMSNorm inputs, attention's q, k, v and output, SwiGLU's gate, its SiLU
and up projection; a frozen Linear keeps nothing for the backward; k and v at full width, which over-counts a little
for grouped KV heads). Not counted: the CUDA context, the allocator's
fragmentation, the logits at the labelled positions, one block's recomputed activations; hence "fits" leaves 10%
of the GPU free. bench.py --mode=train prints the measured peak on a GPU.
"""
import sys
from dataclasses import dataclass

import torch

from configurator import parse_config
from backbones import LlamaConfig, ViTConfig
from model import FusedVLM, FusedVLMConfig

GiB = 2 ** 30
LLMS = {"Llama-2-7B": LlamaConfig(dim=4096, layers=32, heads=32, kv_heads=32, mlp=11008),
        "Llama-2-13B": LlamaConfig(dim=5120, layers=40, heads=40, kv_heads=40, mlp=13824),
        "Llama-2-70B": LlamaConfig(dim=8192, layers=80, heads=64, kv_heads=8, mlp=28672),
        "Llama-3.1-8B": LlamaConfig(vocab_size=128256, dim=4096, layers=32, heads=32, kv_heads=8, mlp=14336,
                                    rope_theta=5e5)}
TOWERS = {"ViT-H/14": ViTConfig(width=1280, layers=32, heads=16, mlp=5120),
          "ViT-L/14": ViTConfig(width=1024, layers=24, heads=16, mlp=4096, act="quick_gelu")}


@dataclass
class Config:
    gpus: int = 8
    batch_size: int = 5  # conversations per GPU per micro-batch (the paper's)
    crops: int = 17  # per conversation: the global view and num_crops=16 tiles
    llm_tokens: int = 768  # LLM tokens per conversation: system prompt, n_l slots, questions and answers
    question_tokens: int = 32  # CLIP tokens of the questions in the fused sequence
    n_l: int = 256


def numel(module):
    return sum(p.numel() for p in module.parameters())


def estimate(llm_cfg, vit_cfg, cfg):
    with torch.device("meta"):
        vlm = FusedVLM(FusedVLMConfig(vit=vit_cfg, llm=llm_cfg, fused_heads=vit_cfg.width // 64, fused_mlp=4 * vit_cfg.width))
    frozen, trainable = numel(vlm.llm), numel(vlm) - numel(vlm.llm)
    units = [*vlm.llm.layers, vlm.llm.embed_tokens, *vlm.vision.vit.layers, *vlm.compressor.layers]
    gathered = 2 * 2 * max(numel(u) for u in units)  # two units at a time, bf16
    crop_tokens = (vit_cfg.image_size // vit_cfg.patch_size) ** 2 + 1
    fused_tokens = cfg.crops * vlm.vision.tokens_per_crop() + cfg.question_tokens + cfg.n_l
    B = cfg.batch_size
    activations = (2 * vit_cfg.width * (B * cfg.crops * crop_tokens * vit_cfg.layers + B * fused_tokens * len(vlm.compressor.layers))
                   + B * cfg.llm_tokens * llm_cfg.layers * (16 * llm_cfg.dim + 6 * llm_cfg.mlp))
    return frozen, trainable, gathered, activations


def main():
    cfg, _ = parse_config(Config(), sys.argv[1:])
    print(f"estimate: {cfg.gpus} GPUs, {cfg.batch_size} conversations x {cfg.crops} crops x {cfg.llm_tokens} LLM tokens "
          f"per GPU, activation checkpointing on the ViT and fused blocks\n")
    print("| LLM | tower | frozen LLM / trainable params | mode | LLM weights | trainable weights + grads + AdamW | "
          "gathered units | activations | total per GPU | 40 GB | 80 GB |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|:-:|:-:|")
    for llm_name, llm_cfg in LLMS.items():
        for tower, vit_cfg in TOWERS.items():
            frozen, trainable, gathered, activations = estimate(llm_cfg, vit_cfg, cfg)
            for mode, share, extra in [("DDP", 1, 0), (f"FSDP x {cfg.gpus}", cfg.gpus, gathered)]:
                weights, state = 2 * frozen / share, 16 * trainable / share
                total = weights + state + extra + activations
                fits = ["yes" if total <= 0.9 * gb * 1e9 else "no" for gb in (40, 80)]
                print(f"| {llm_name} | {tower} | {frozen / 1e9:.2f} B / {trainable / 1e9:.2f} B | {mode} | "
                      f"{weights / GiB:.1f} | {state / GiB:.1f} | {extra / GiB:.1f} | {activations / GiB:.1f} | "
                      f"{total / GiB:.1f} | {fits[0]} | {fits[1]} |")


if __name__ == "__main__":
    main()
