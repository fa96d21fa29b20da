"""
Benchmarks that print numbers; nothing here asserts.

    python bench.py --mode=modules   # our ViT, CLIPText, Llama vs transformers: same config, same weights, fwd+bwd
    python bench.py --mode=tokens    # FusedVLM (frozen LLM) step time and memory as n_l and the crop count grow,
                                     # model FLOPs per step, and the paper-size FLOPs per sample (analytic)
    python bench.py --mode=tokens --compressor=pool     # the same with another compressor (fused | pool | resampler)
    python bench.py --mode=generate --device=cuda --gen_batch_size=16 [--ckpt=out/ft-64]
                                     # prefill and decode tokens/s of evaluate.py's batched greedy generation
    python bench.py --mode=train --device=cuda --train_steps=20
                                     # train_gen.py's optimizer step at the paper's shapes: ms/step, samples/s,
                                     # LLM tokens/s, MFU, peak memory

modules: one CLIPModel and one LlamaForCausalLM with random weights are saved to a temp folder; transformers
loads them back (CLIPVisionModel, CLIPTextModelWithProjection, LlamaForCausalLM) and so do our from_hf loaders.
Steps run interleaved, who goes first alternating by round, so that load from other processes hits both sides;
ratios are taken within a round. On a shared CPU keep threads=1: a 2-thread step stalls whenever either thread
is descheduled, which made 2-thread timings swing 4x here. The table also shows the max |difference| of the
forward outputs (0 or rounding: the weights are the same).

tokens: batches are built from synthetic tensors in the layout fusion.collate returns, so this does not
depend on fusion.py. Each sample: its crops, a 16-token question, n_l outputs; on the LLM side a 40-token
prefix, n_l slots, the question and a 32-token answer. Memory is reported two ways:
  saved_MB  bytes autograd keeps for the backward (the activations; distinct storages, parameters excluded),
            counted exactly in this process;
  rss_MB    peak resident memory of a fresh process during one fwd+bwd minus its resident memory just before
            (model and batch built; Linux /proc VmHWM, reset before the step): transient buffers and allocator
            slack included, so it is what the machine feels; on CUDA, torch.cuda.max_memory_allocated instead.
Timed steps of all points run in rounds (every point once per round) so that machine load spreads evenly.
Writes bench_tokens.csv and bench_tokens.png to out_dir.

generate: evaluate.py's decoding (batched greedy with the KV cache) on a synthetic batch: every sample 1 + num_crops
crops, a gen_question_len-token question and n_l outputs; on the LLM side the 44 tokens of <s> and Llama-2's chat
template before the slots, the n_l slots, the question and 4 tokens for [/INST]. With --ckpt the checkpoint's
model and token space (its frozen LLM loaded as evaluate.py does); without, the paper's configuration with random
weights (a 7B LLM: GPU only). One warm-up run, then `repeats` timed ones; medians of the vision + fused front,
the prefill (one new token) and the full decode of gen_new_tokens.

train: train_gen.py's optimizer step (training.answer_loss_step: the token-normalised answer loss, backward,
gradient clipping, AdamW) on one process, with its model built as train_gen.py builds it from train_clip_path and
train_llama_path (the fused model and bridge random: weight values do not change the cost), the frozen LLM in bf16
and bf16 autocast on GPU, and the same synthetic batch of train_batch_size conversations for each of the
train_grad_accum micro-batches: 1 + train_num_crops crops, a 16-token question and train_n_l vision tokens per sample,
on the LLM side a 40-token prefix, the slots, the question and a 32-token answer. TRAIN_WARMUP untimed steps
(allocator, compilation), then train_steps timed ones, a log line each (training.StepLog); medians at the end.
"""
import csv
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from backbones import CLIPText, Llama, LlamaConfig, ViT, ViTConfig
from checkpoint import checkpoint_file, inference_vlm, read_gen_checkpoint
from configurator import InputError, parse_config, report_input_errors
from fusion import IGNORE, SLOT_ID, TokenSpace, TokenSpaceConfig
from model import FusedVLM, FusedVLMConfig, compressor_blocks, peak_flops, train_flops
from training import StepLog, answer_loss_step, configure_optimizer, wrap_blocks

TRAIN_WARMUP = 3  # train steps not timed (allocator warm-up, compilation)


@dataclass
class Config:
    mode: str = "modules"  # modules | tokens | generate | train
    out_dir: str = "out/bench"
    device: str = "cpu"
    threads: int = 1  # torch.set_num_threads, the same for both sides; on a shared machine 1 is the only steady setting
    repeats: int = 7  # timed steps per point (medians)
    seed: int = 0
    compressor: str = "fused"  # fused | pool | resampler: the FusedVLM's in tokens, train, generate (--ckpt: its own)
    # modules: one medium size shared by the three modules
    batch_size: int = 2
    width: int = 512
    layers: int = 4
    seq_len: int = 256  # CLIP text and Llama tokens
    image_size: int = 224  # ViT: (224 / 14)^2 + 1 = 257 tokens
    # tokens
    n_l: str = "1,8,16,32,64,128,256,384,512,768"
    crops: str = "1,5,9,17"
    crops_at: int = 5  # crops per sample during the n_l sweep (global view + 4 tiles)
    n_l_at: int = 256  # n_l during the crop sweep (the paper's base model)
    tokens_batch_size: int = 2
    # generate
    ckpt: str = ""           # a gen checkpoint (folder or file); "" = the paper's configuration, random weights
    llama_path: str = ""     # "" = the checkpoint's
    dtype: str = ""          # float32 | bfloat16 | float16; "" = bfloat16 on GPU, float32 on CPU
    gen_batch_size: int = 16
    gen_n_l: int = 0         # 0 = the checkpoint's (256 without one)
    gen_num_crops: int = -1  # -1 = the checkpoint's (16 without one)
    gen_question_len: int = 32
    gen_new_tokens: int = 32
    # train: train_gen.py's keys of these names (their paper stage-2 values), per GPU
    train_clip_path: str = "weights/CLIP-ViT-H-14-laion2B-s32B-b79K"
    train_llama_path: str = "weights/Llama-2-7b-chat-hf"
    train_image_size: int = 336
    train_num_crops: int = 16
    train_n_l: int = 256
    train_fused_layers: int = 12
    train_fused_heads: int = 20
    train_fused_mlp: int = 5120
    train_batch_size: int = 5
    train_grad_accum: int = 1
    train_activation_checkpointing: bool = True
    train_compile: bool = False
    train_steps: int = 10  # timed, after TRAIN_WARMUP


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, device):
    """-> (wall ms, process CPU ms) of one call; CPU time is what other processes on the machine cannot inflate."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    sync(device)
    return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000


# -----------------------------------------------------------------------------
# modules: ours vs transformers


class Step:
    """Forward + backward of one model on fixed inputs; run(model) -> a tuple of output tensors."""

    def __init__(self, model, run, loss):
        self.model, self.run, self.loss = model, run, loss

    def __call__(self):
        self.model.zero_grad(set_to_none=True)
        self.loss(self.run(self.model)).backward()


def module_pairs(cfg, folder, device):
    """-> [(name, our Step, their Step)] for ViT, CLIP text, Llama, from one set of weights saved to `folder`."""
    from transformers import (CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModel,
                              LlamaConfig as HFLlamaConfig, LlamaForCausalLM)
    heads = cfg.width // 64
    tower = dict(hidden_size=cfg.width, intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers,
                 num_attention_heads=heads, hidden_act="gelu")
    CLIPModel(CLIPConfig(vision_config=dict(tower, image_size=cfg.image_size, patch_size=14),
                         text_config=dict(tower, vocab_size=49408, max_position_embeddings=cfg.seq_len,
                                          projection_dim=cfg.width),
                         projection_dim=cfg.width)).save_pretrained(f"{folder}/clip")
    LlamaForCausalLM(HFLlamaConfig(vocab_size=32000, hidden_size=cfg.width, intermediate_size=11008 * cfg.width // 4096,
                                   num_hidden_layers=cfg.layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=cfg.seq_len, tie_word_embeddings=False)
                     ).save_pretrained(f"{folder}/llama")

    g = torch.Generator().manual_seed(cfg.seed)
    pixels = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    text_ids = torch.randint(0, 49407, (cfg.batch_size, cfg.seq_len), generator=g)
    text_ids[:, -1] = 49407  # the EOS to pool at
    text_ids = text_ids.to(device)
    llama_ids = torch.randint(0, 32000, (cfg.batch_size, cfg.seq_len), generator=g).to(device)

    def square_loss(outputs):
        return sum(y.square().mean() for y in outputs)

    def lm_loss(outputs):
        return F.cross_entropy(outputs[0][:, :-1].flatten(0, 1), llama_ids[:, 1:].flatten())

    def hf_text(m):
        out = m(input_ids=text_ids)
        return out.last_hidden_state, out.text_embeds

    clip, llama = f"{folder}/clip", f"{folder}/llama"
    pairs = [
        ("ViT", Step(ViT.from_hf(clip), lambda m: (m(pixels),), square_loss),
         Step(CLIPVisionModel.from_pretrained(clip), lambda m: (m(pixel_values=pixels).last_hidden_state,), square_loss)),
        ("CLIPText", Step(CLIPText.from_hf(clip, max_positions=cfg.seq_len), lambda m: m(text_ids), square_loss),
         Step(CLIPTextModelWithProjection.from_pretrained(clip), hf_text, square_loss)),
        ("Llama", Step(Llama.from_hf(llama), lambda m: (m(llama_ids),), lm_loss),
         Step(LlamaForCausalLM.from_pretrained(llama), lambda m: (m(input_ids=llama_ids).logits,), lm_loss)),
    ]
    for _, ours, theirs in pairs:
        ours.model.to(device).train()
        theirs.model.to(device).train()
    return pairs


def max_output_diff(ours, theirs):
    with torch.no_grad():
        return max((a.float() - b.float()).abs().max().item() for a, b in zip(ours.run(ours.model), theirs.run(theirs.model)))


def bench_modules(cfg, device):
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as folder:
        pairs = module_pairs(cfg, folder, device)
    diffs = {name: max_output_diff(ours, theirs) for name, ours, theirs in pairs}
    times = {name: ([], []) for name, *_ in pairs}  # (wall ms, CPU ms) per round, ours and theirs
    for name, ours, theirs in pairs:  # warm-up: first-call allocations and kernel selection
        ours(), theirs()
    for r in range(cfg.repeats):
        for name, ours, theirs in pairs:
            sides = [(0, ours), (1, theirs)]
            for side, step in sides if r % 2 == 0 else sides[::-1]:  # alternate who goes first (allocator, caches)
                times[name][side].append(timed(step, device))
        print(f"round {r + 1}/{cfg.repeats}: " +
              ", ".join(f"{n} {t[0][-1][0]:.0f}/{t[1][-1][0]:.0f} ms" for n, t in times.items()))
    print(f"\nforward+backward, batch {cfg.batch_size}, width {cfg.width}, {cfg.layers} layers, text/LLM {cfg.seq_len} "
          f"tokens, ViT {(cfg.image_size // 14) ** 2 + 1} tokens, {device}, {torch.get_num_threads()} threads, "
          f"{cfg.repeats} interleaved rounds")
    print("| module | ours ms | HF ms | ratio | CPU-time ratio | max abs diff fwd |\n|---|---|---|---|---|---|")
    for name, (ours, theirs) in times.items():
        # steps of the same round share the machine's load, so ratios are taken per round
        ratio = statistics.median(a[0] / b[0] for a, b in zip(ours, theirs))
        cpu_ratio = statistics.median(a[1] / b[1] for a, b in zip(ours, theirs))
        print(f"| {name} | {statistics.median(a[0] for a in ours):.0f} | {statistics.median(b[0] for b in theirs):.0f} | "
              f"{ratio:.2f} | {cpu_ratio:.2f} | {diffs[name]:.1e} |")
    print("ms: median wall time; ratio: median over rounds of ours / HF (wall, and process CPU time)")


# -----------------------------------------------------------------------------
# tokens: cost of vision tokens


def small_vlm_config(compressor):
    """Narrow enough for CPU, with the paper's proportions: 224 px crops of 14 px patches -> 65 tokens per crop
    after the merge (the paper's 336 px give 145), the fused model as wide as the ViT, a Llama-shaped LLM."""
    return FusedVLMConfig(ViTConfig(image_size=224, patch_size=14, width=128, layers=2, heads=4, mlp=512),
                          LlamaConfig(vocab_size=4000, dim=256, layers=2, heads=4, kv_heads=4, mlp=688),
                          fused_layers=2, fused_heads=4, fused_mlp=512, fused_vocab_size=1000, n_queries=767,
                          compressor=compressor)


def synthetic_batch(batch_size, crops, image_size, n_l, clip_vocab_size, llama_vocab_size, question_len=16,
                    prefix_len=40, answer_len=32, seed=0, pixels=True):
    """A collated training batch of given shapes with random content, for benchmarks: every sample has `crops`
    crops and one question with n_l outputs, then a prefix_len-token prompt, the slots, the question and an answer.
    pixels=False leaves pixel_values on the meta device (enough for FLOP counting, which reads only shapes)."""
    B, eos = batch_size, clip_vocab_size - 1
    g = torch.Generator().manual_seed(seed)
    question = torch.randint(1, eos, (B, question_len), generator=g)
    queries = torch.arange(n_l - 1).expand(B, -1)  # rows of the query table
    fused_ids = torch.cat([question, queries, torch.full((B, 1), eos)], dim=1)
    query_mask = torch.cat([torch.zeros(B, question_len), torch.ones(B, n_l - 1), torch.zeros(B, 1)], dim=1).bool()
    output_mask = torch.cat([torch.zeros(B, question_len), torch.ones(B, n_l)], dim=1).bool()
    prefix = torch.randint(3, llama_vocab_size, (B, prefix_len), generator=g)
    prefix[:, 0] = 1  # Llama's <s>; ids 0-2 (<unk>, <s>, </s>) are never drawn
    answer = torch.cat([torch.randint(3, llama_vocab_size, (B, answer_len), generator=g), torch.full((B, 1), 2)], dim=1)
    input_ids = torch.cat([prefix, torch.full((B, n_l), SLOT_ID), question % llama_vocab_size, answer], dim=1)
    slot_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    slot_mask[:, prefix_len:prefix_len + n_l] = True
    labels = torch.full_like(input_ids, IGNORE)
    labels[:, -answer.shape[1]:] = answer
    pixel_shape = (B * crops, 3, image_size, image_size)
    return dict(pixel_values=torch.randn(pixel_shape, generator=g) if pixels else torch.empty(pixel_shape, device="meta"),
                crop_to_sample=torch.arange(B).repeat_interleave(crops), fused_ids=fused_ids, query_mask=query_mask,
                output_mask=output_mask, fused_real_mask=torch.ones_like(fused_ids, dtype=torch.bool),
                input_ids=input_ids, slot_mask=slot_mask, labels=labels,
                attention_mask=torch.ones_like(input_ids, dtype=torch.bool))


def batch_for(cfg, n_l, crops, batch_size, device, pixels=True, **lengths):
    """synthetic_batch for the model of config cfg, seeded by its shape."""
    batch = synthetic_batch(batch_size, crops, cfg.vit.image_size, n_l, cfg.fused_vocab_size, cfg.llm.vocab_size,
                            seed=n_l * 100 + crops, pixels=pixels, **lengths)
    return {k: v.to(device) for k, v in batch.items()} if pixels else batch


def train_step(vlm, batch):
    vlm.zero_grad(set_to_none=True)
    vlm(batch)[1].backward()


def saved_bytes(vlm, batch):
    """Bytes of the distinct tensors autograd saves for the backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in vlm.parameters()}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t
    vlm.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vlm(batch)[1]
    loss.backward()
    return sum(storages.values())


def resident_kb(field):
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in KB (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_of_step(cfg, n_l, crops):
    """Runs in a fresh process (a warm allocator would hide the growth): how much one fwd+bwd raises memory
    (MB) above the built model and batch."""
    torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    vlm = FusedVLM(small_vlm_config(cfg.compressor)).to(device)
    batch = batch_for(vlm.cfg, n_l, crops, cfg.tokens_batch_size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        train_step(vlm, batch)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = resident_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (ru_maxrss cannot be reset and survives exec)
    train_step(vlm, batch)
    return (resident_kb("VmHWM") - before) / 1024


def paper_flops(n_l, compressor, crops=13):
    """Paper model FLOPs of one training sample, by part: ViT-H/14 at 336 px on `crops` views (13 = global + 12
    tiles, what num_crops=16 makes of a 4:3 photo such as COCO's 640x480), a 20-token question, and on the LLM
    side a 60-token system prompt and template, the n_l slots, the question and a 40-token answer; the paper's
    sizes with the given compressor."""
    with torch.device("meta"):
        vlm = FusedVLM(FusedVLMConfig(compressor=compressor))
    batch = batch_for(vlm.cfg, n_l, crops, 1, "cpu", pixels=False, question_len=20, prefix_len=60, answer_len=40)
    return flops_by_part(vlm, batch)


def flops_by_part(vlm, batch):
    """train_flops split into vision tower, compressor + bridge, LLM: train_flops counts the LLM over the
    attention_mask's tokens and the vision tower over pixel_values' crops, so zeroing each isolates it."""
    total = train_flops(vlm, batch)
    no_llm = train_flops(vlm, dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"])))
    no_vision = train_flops(vlm, dict(batch, pixel_values=batch["pixel_values"][:0]))
    return dict(total=total, llm=total - no_llm, vision=total - no_vision, fused=no_llm + no_vision - total)


def bench_tokens(cfg, device):
    torch.manual_seed(cfg.seed)
    vlm = FusedVLM(small_vlm_config(cfg.compressor)).to(device).train()
    print(f"small FusedVLM: vit {vlm.cfg.vit}\n  llm {vlm.cfg.llm}\n  compressor {cfg.compressor}, {len(compressor_blocks(vlm.compressor))} layers, "
          f"{vlm.vision.tokens_per_crop()} vision tokens per crop; batch {cfg.tokens_batch_size} samples")
    n_ls, crop_counts = [int(n) for n in cfg.n_l.split(",")], [int(k) for k in cfg.crops.split(",")]
    points = [(n, cfg.crops_at) for n in n_ls] + [(cfg.n_l_at, k) for k in crop_counts]
    points = list(dict.fromkeys(points))  # (n_l_at, crops_at) may appear in both sweeps
    batches = {p: batch_for(vlm.cfg, *p, cfg.tokens_batch_size, device) for p in points}

    rows = {}
    for p, batch in batches.items():
        n_l, crops = p
        fused_len = crops * vlm.vision.tokens_per_crop() + batch["fused_ids"].shape[1]
        rows[p] = dict(n_l=n_l, crops=crops, fused_len=fused_len, llm_len=batch["input_ids"].shape[1],
                       gflops=train_flops(vlm, batch) / 1e9, saved_MB=saved_bytes(vlm, batch) / 2**20)  # also the warm-up step
    # one fresh process per point: memory an earlier step freed but the allocator kept would hide the growth
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        for p in points:
            rows[p]["rss_MB"] = pool.apply(peak_memory_of_step, (cfg, *p))
    times = {p: [] for p in points}
    for r in range(cfg.repeats):
        for p in points:
            times[p].append(timed(lambda: train_step(vlm, batches[p]), device)[0])
        print(f"round {r + 1}/{cfg.repeats} done")
    for p in points:
        rows[p]["step_ms"] = statistics.median(times[p])
        rows[p]["gflop_per_s"] = rows[p]["gflops"] / rows[p]["step_ms"] * 1000

    columns = ["n_l", "crops", "fused_len", "llm_len", "step_ms", "gflops", "gflop_per_s", "saved_MB", "rss_MB"]
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "bench_tokens.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        for p in points:
            writer.writerow({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[p].items()})
    print(f"\nFusedVLM forward+backward (frozen LLM), {device}, {torch.get_num_threads()} threads, median of {cfg.repeats}")
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for p in points:
        print("| " + " | ".join(f"{rows[p][k]:.1f}" if isinstance(rows[p][k], float) else str(rows[p][k]) for k in columns) + " |")

    print(f"\npaper model (ViT-H/14 336 px x 13 views, compressor {cfg.compressor} at the paper's fused-model sizes, "
          f"Llama-2-7B frozen), analytic, per sample:")
    print("| n_l | TFLOPs | vision | compressor+bridge | LLM | LLM share |\n|---|---|---|---|---|---|")
    paper = {n: paper_flops(n, cfg.compressor) for n in n_ls}
    for n, f in paper.items():
        print(f"| {n} | {f['total'] / 1e12:.2f} | {f['vision'] / 1e12:.2f} | {f['fused'] / 1e12:.2f} | "
              f"{f['llm'] / 1e12:.2f} | {f['llm'] / f['total']:.0%} |")
    first, last = n_ls[0], n_ls[-1]
    print(f"each extra vision token costs {(paper[last]['total'] - paper[first]['total']) / (last - first) / 1e9:.0f} "
          f"GFLOPs per sample on average between n_l={first} and {last}")
    plot(cfg, {"n_l": [rows[(n, cfg.crops_at)] for n in n_ls], "crops": [rows[(cfg.n_l_at, k)] for k in crop_counts]}, paper)


def plot(cfg, sweeps, paper):
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    titles = {"n_l": f"small FusedVLM ({cfg.compressor}), {cfg.crops_at} crops, {cfg.device}",
              "crops": f"small FusedVLM ({cfg.compressor}), n_l = {cfg.n_l_at}"}
    for a, (key, sweep) in zip(ax, sweeps.items()):
        x = [r[key] for r in sweep]
        for column, style, label in (("step_ms", "o-", "step ms (measured)"), ("saved_MB", "s-", "saved activations MB"),
                                     ("rss_MB", "^-", "peak memory rise MB")):
            a.plot(x, [r[column] for r in sweep], style, label=label)
        a.set(xlabel=key if key == "n_l" else "crops per sample", ylabel="ms or MB", title=titles[key])
    n_ls = list(paper)
    for part, label in (("vision", "vision tower"), ("fused", f"{cfg.compressor} + bridge"), ("llm", "frozen LLM"), ("total", "total")):
        ax[2].plot(n_ls, [paper[x][part] / 1e12 for x in n_ls], "o-", label=label)
    ax[2].set(xlabel="n_l", ylabel="TFLOPs per sample", title="paper model, analytic (13 views)")
    for a in ax:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "bench_tokens.png"), dpi=90)
    print(f"wrote {cfg.out_dir}/bench_tokens.csv and bench_tokens.png")


# -----------------------------------------------------------------------------
# generate: how fast evaluate.py's batched greedy generation is

TEMPLATE_TOKENS = 44  # LLM tokens of <s> + Llama-2's default chat template before the slots


def generation_model(cfg, device, dtype):
    """-> (FusedVLM in eval mode, n_l, num_crops, what it is): the checkpoint's, or the paper's with random weights."""
    if cfg.ckpt:
        path = checkpoint_file(cfg.ckpt)
        weights, meta = read_gen_checkpoint(path)
        model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
        llm = Llama.from_hf(cfg.llama_path or meta["llama_path"], dtype=dtype).to(device)
        trained = meta["token_space"]
        return inference_vlm(model_cfg, weights, llm, path, device, dtype), trained["n_l"], trained["num_crops"], path
    if device.type == "cpu":
        raise InputError("--mode=generate without --ckpt builds the paper-size model (a 7B LLM): run it with "
                         "--device=cuda, or give a (tiny) checkpoint")
    with torch.device(device):  # random weights: the speed does not depend on their values
        vlm = FusedVLM(FusedVLMConfig(compressor=cfg.compressor))
    return vlm.to(dtype).eval(), 256, 16, "the paper's configuration, random weights"


def bench_generate(cfg, device):
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    vlm, n_l, num_crops, what = generation_model(cfg, device, dtype)
    n_l = cfg.gen_n_l or n_l
    num_crops = num_crops if cfg.gen_num_crops < 0 else cfg.gen_num_crops
    # the prompt ends with [/INST]: 3 random "answer" tokens + the </s> synthetic_batch closes with stand in for it
    batch = synthetic_batch(cfg.gen_batch_size, 1 + num_crops, vlm.cfg.vit.image_size, n_l,
                                   vlm.cfg.fused_vocab_size, vlm.cfg.llm.vocab_size, question_len=cfg.gen_question_len,
                                   prefix_len=TEMPLATE_TOKENS, answer_len=3, seed=cfg.seed)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    B, L = batch["input_ids"].shape
    N = cfg.gen_new_tokens
    steps = [("front", lambda: vlm.fused_tokens(batch)),
             ("prefill", lambda: vlm.generate(batch, max_new_tokens=1, eos_token_id=None)),
             ("full", lambda: vlm.generate(batch, max_new_tokens=N, eos_token_id=None))]
    times = {key: [] for key, _ in steps}
    with torch.no_grad():
        for run in range(1 + cfg.repeats):  # run 0 warms up
            for key, step in steps:
                ms = timed(step, device)[0]
                if run:
                    times[key].append(ms / 1000)
    front, prefill, full = (statistics.median(times[k]) for k in ("front", "prefill", "full"))
    print(f"generate: {what}\n  batch {B}, {1 + num_crops} crops and n_l={n_l} per sample, LLM prompt {L} tokens, "
          f"{N} new tokens, {dtype} on {device}, median of {cfg.repeats} runs")
    print(f"  vision + fused + bridge   {1000 * front:9.1f} ms")
    print(f"  prefill (all of it)       {1000 * prefill:9.1f} ms | {B * L / prefill:10.1f} prompt tok/s")
    print(f"  decode ({N - 1} steps)         {1000 * (full - prefill):9.1f} ms | "
          f"{B * (N - 1) / (full - prefill):10.1f} new tok/s | {1000 * (full - prefill) / max(1, N - 1):.2f} ms/step")


# -----------------------------------------------------------------------------
# train: how fast train_gen.py's optimizer step is


def bench_train(cfg, device):
    for key in ("train_clip_path", "train_llama_path"):
        if not os.path.exists(getattr(cfg, key)):
            raise InputError(f"{key}: {getattr(cfg, key)!r} does not exist: the CLIP and Llama folders train_gen.py "
                             f"reads (or pass --{key}=...)")
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("bfloat16", "float32"):
        raise InputError(f"--mode=train runs as train_gen.py: dtype bfloat16 or float32, got {dtype!r}")
    bf16 = dtype == "bfloat16"  # as train_gen.py: the same on CPU as on GPU
    autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else nullcontext()
    token_space = TokenSpace(TokenSpaceConfig(
        clip_path=cfg.train_clip_path, llama_path=cfg.train_llama_path, image_size=cfg.train_image_size,
        num_crops=cfg.train_num_crops, n_l=cfg.train_n_l))
    torch.manual_seed(cfg.seed)
    vit = ViT.from_hf(cfg.train_clip_path, image_size=cfg.train_image_size)
    llm = Llama.from_hf(cfg.train_llama_path, dtype=torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)
    vlm = FusedVLM(FusedVLMConfig(vit=vit.cfg, llm=llm.cfg, fused_layers=cfg.train_fused_layers,
                                  fused_heads=cfg.train_fused_heads, fused_mlp=cfg.train_fused_mlp,
                                  fused_vocab_size=len(token_space.clip), compressor=cfg.compressor), llm=llm)
    vlm.vision.vit = vit
    wrap_blocks(vlm.blocks(), cfg.train_activation_checkpointing, cfg.train_compile)
    vlm.to(device).train()
    if cfg.train_compile:
        wrap_blocks(llm.layers, activation_checkpointing=False, compile=True)
    trainable = [p for p in vlm.parameters() if p.requires_grad]
    lr = 2e-5  # train_gen.py's defaults; their values do not change the step's cost
    optimizer = configure_optimizer(vlm, lr, 0.0, (0.9, 0.999), device.type)
    batch = synthetic_batch(cfg.train_batch_size, 1 + cfg.train_num_crops, cfg.train_image_size, cfg.train_n_l,
                                   len(token_space.clip), len(token_space.tokenizer), seed=cfg.seed)
    print(f"train: {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters, "
          f"{sum(p.numel() for p in llm.parameters()) / 1e6:.2f}M frozen in the LLM; {cfg.train_grad_accum} x "
          f"{cfg.train_batch_size} synthetic conversations per step, {1 + cfg.train_num_crops} crops each, "
          f"n_l {cfg.train_n_l}, {'bf16' if bf16 else 'float32'} on {device}")
    step_log = StepLog(vlm, device, 1, peak_flops(device), print)
    steps = TRAIN_WARMUP + cfg.train_steps
    rows = []  # (ms/step, samples/s, LLM tokens/s, MFU, peak memory) of every timed step
    for step in range(steps):
        loss_sum, n_labels, grad_norm = answer_loss_step(vlm, [batch] * cfg.train_grad_accum, optimizer, trainable,
                                                         1.0, 1, device, autocast, step_log)
        record = step_log.line(step + 1, steps, loss_sum, n_labels.item(), lr, grad_norm)
        if step >= TRAIN_WARMUP:
            rows.append([record[k] or float("nan") for k in ("ms_per_step", "samples_per_s", "llm_tokens_per_s",
                                                             "mfu", "peak_mem_gb")])
    ms, samples_s, tokens_s, mfu, memory = (statistics.median(column) for column in zip(*rows))
    print(f"train: median of {len(rows)} steps after {TRAIN_WARMUP} warm-up: {ms:.0f} ms/step | "
          f"{samples_s:.1f} samples/s | {tokens_s:.0f} LLM tok/s | MFU {'n/a' if mfu != mfu else f'{100 * mfu:.1f}%'} | "
          f"peak mem {memory:.2f} GB")
    return rows


if __name__ == "__main__":
    report_input_errors()
    cfg, positional = parse_config(Config(), sys.argv[1:])
    if positional:
        raise InputError(f"bench.py takes no positional arguments, got {positional}")
    modes = {"modules": bench_modules, "tokens": bench_tokens, "generate": bench_generate, "train": bench_train}
    if cfg.mode not in modes:
        raise InputError(f"--mode must be one of {', '.join(modes)}, got {cfg.mode!r}")
    print(asdict(cfg))
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    modes[cfg.mode](cfg, torch.device(cfg.device))
    print(f"total {time.time() - t0:.0f} s")
