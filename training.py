"""
The training run around the networks, shared by train_align.py and train_gen.py: the out_dir and path checks,
seeding, the per-block wrappers (activation checkpointing, compile, FSDP2 sharding), AdamW and its schedule,
gradient clipping, checkpoint save and exact resume, the validation batches, the log line and the metrics record.

DDP or FSDP (--fsdp=True, torchrun only). DDP keeps a whole copy of every weight on every GPU. FSDP2's fully_shard
cuts every block's parameters (the trainable ones, their gradients and AdamW moments, and the frozen LLM's) into
world_size pieces along dim 0; a block's full weights exist only while it runs (all-gathered before its forward
and again before its backward), and its gradients are reduce-scattered after its backward, averaged over ranks as
DDP averages them, so the trainers' loss normalisation is the same under both. On GPU with dtype=bfloat16 the
gathered weights are bf16 and the gradients are reduced in fp32; the sharded master weights and AdamW stay fp32.

A training checkpoint is one safetensors file (model.py's format) in the same layout under DDP and FSDP: the
trainable weights and the AdamW state as full tensors (FSDP gathers them from their shards, one tensor at a time),
every rank's RNG states, and as JSON the step, the data cursor and both configs. An exact resume needs the same
world_size (the RNG states are per rank); the trained weights go into the model before it is sharded or wrapped,
the optimizer state after, cut like its parameter.
"""
import json
import math
import os
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from configurator import parse_config
from fusion import IGNORE, collate
from model import load_checkpoint, save_checkpoint, train_flops


def read_config(config, argv, script):
    """configurator.parse_config plus the checks both trainers share."""
    cfg, positional = parse_config(config, argv)
    if positional:
        sys.exit(f"unexpected arguments {positional}: use --key=value")
    if cfg.dtype not in ("bfloat16", "float32"):
        sys.exit(f"dtype must be bfloat16 or float32, got {cfg.dtype!r}")
    if cfg.fsdp and "RANK" not in os.environ:
        sys.exit(f"fsdp=True shards over the processes of torchrun: run torchrun --nproc_per_node=N {script} ...")
    return cfg


def check_inputs(cfg, llama_remedy, more=()):
    """Stops at the first input folder or file that does not exist, saying what to put there; -> the paths of
    train_file and val_file ("" without one). more: further (config key, path, remedy)."""
    train_path = os.path.join(cfg.data_dir, cfg.train_file)  # train_file and val_file may also be absolute
    val_path = os.path.join(cfg.data_dir, cfg.val_file) if cfg.val_file else ""
    entries = [("clip_path", cfg.clip_path, "download a CLIP checkpoint folder (config.json, model.safetensors, "
                                            "vocab.json, merges.txt), e.g. laion/CLIP-ViT-H-14-laion2B-s32B-b79K from "
                                            "the Hugging Face hub, and put it there"),
               ("llama_path", cfg.llama_path, llama_remedy),
               ("train_file", train_path, "download the data set and write our JSONL there with data/<name>/prepare.py")]
    if val_path:
        entries.append(("val_file", val_path, "write a held-out JSONL there, as for train_file"))
    for key, path, remedy in [*entries, *more]:
        if not os.path.exists(path):
            sys.exit(f"{key}: {path!r} does not exist: {remedy} (or pass --{key}=...)")
    return train_path, val_path


def claim_out_dir(out_dir, resume, master):
    """-> out_dir/ckpt.safetensors. A fresh run refuses an out_dir that holds a checkpoint and starts a fresh
    metrics.jsonl."""
    ckpt_path = os.path.join(out_dir, "ckpt.safetensors")
    if not resume and os.path.exists(ckpt_path):
        sys.exit(f"{ckpt_path} exists: pass --resume=True to continue it, or choose another out_dir")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        if not resume:
            open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    return ckpt_path


def epoch_steps(n_samples, batch_size, grad_accum, world_size, log):
    """Optimizer steps in one pass over n_samples at a global batch of batch_size x grad_accum x world_size; stops
    when not even one fits."""
    global_batch = batch_size * grad_accum * world_size
    steps = n_samples // global_batch
    if steps == 0:
        sys.exit(f"{n_samples} samples do not fill one global batch of {global_batch}: lower batch_size or grad_accum")
    log(f"global batch {global_batch} = {batch_size} x {grad_accum} accumulation x {world_size} processes; {steps} "
        f"steps per epoch; each epoch leaves out {n_samples - steps * global_batch} samples (a different random set "
        f"every epoch)")
    return steps


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# -----------------------------------------------------------------------------
# Per-block wrappers and the two ways of running on several GPUs


def wrap_blocks(blocks, activation_checkpointing, compile):
    for block in blocks:
        if activation_checkpointing:
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
        if compile:
            block.compile()  # per block: the fused model's variable crop counts would recompile a whole-model graph


def shard(module, blocks, device, bf16, ignored=()):
    """FSDP2: each block its own unit (gathered just before it runs), the rest of `module` the outer unit; a module
    still on the meta device (an LLM about to be read into its shards) gets memory for this rank's shards only.
    ignored: parameters fully_shard cannot shard (scalars), left whole on every rank."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(module, mesh=mesh, mp_policy=policy, ignored_params=set(ignored) or None)
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device=device)


def gradient_sync(model, last_micro_step):
    """DDP all-reduces gradients only at the step's last micro-batch (forward AND backward inside, or nothing is
    skipped). FSDP reduce-scatters after every micro-batch, which keeps the gradients sharded."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_step else nullcontext()


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def clip_gradients(params, max_norm):
    """torch's clip_grad_norm_ for parameters that may be FSDP shards (DTensors), whole tensors, or both; max_norm
    0 only measures. -> the total gradient norm (float32, 0-dim)."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = torch.zeros((), device=local(grads[0]).device)  # the sum of squares over the shards of all ranks
    whole = torch.zeros((), device=sharded.device)
    for g in grads:
        if isinstance(g, DTensor):
            sharded += local(g).float().pow(2).sum()
        else:
            whole += g.float().pow(2).sum()
    if any(isinstance(g, DTensor) for g in grads):
        dist.all_reduce(sharded)
    norm = (sharded + whole).sqrt()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            local(g).mul_(scale.to(g.device, g.dtype))
    return norm


# -----------------------------------------------------------------------------
# Optimizer and schedule


def configure_optimizer(model, lr, weight_decay, betas, device_type):
    """AdamW over trainable parameters only; matrices decay, norms/biases/embeddings-as-vectors do not. FSDP shards
    and whole tensors go into separate groups (the fused kernel takes one kind per call)."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((p.dim() >= 2, isinstance(p, DTensor)), []).append(p)
    param_groups = [{"params": ps, "weight_decay": weight_decay if decay else 0.0} for (decay, _), ps in groups.items()]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device_type == "cuda")


def cosine_lr(step, max_steps, lr, warmup_ratio, min_lr=0.0):
    """Linear warm-up over warmup_ratio * max_steps, then cosine to min_lr (step counts from 0)."""
    warmup = math.ceil(warmup_ratio * max_steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


# -----------------------------------------------------------------------------
# Checkpoint save and exact resume


def full_tensor(t):
    """A whole tensor on the CPU; an FSDP shard is all-gathered first (collective: every rank calls it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def rng_state(device):
    """This process's RNG states; save_training_checkpoint gathers one per rank."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "numpy": np.random.get_state()}


def checkpoint_meta(stage, step, steps_per_epoch, world_size, train_cfg, model_cfg, token_space, **extra):
    epoch, cursor = divmod(step, steps_per_epoch)
    return {"stage": stage, "step": step, **extra, "data_seed": train_cfg.seed, "epoch": epoch, "cursor": cursor,
            "steps_per_epoch": steps_per_epoch, "world_size": world_size, "train_config": asdict(train_cfg),
            "model_config": asdict(model_cfg), "clip_path": os.path.abspath(train_cfg.clip_path),
            "llama_path": os.path.abspath(train_cfg.llama_path),
            "token_space": {k: v for k, v in asdict(token_space.cfg).items() if not k.endswith("_path")}}


def save_training_checkpoint(path, model, weights, optimizer, meta, device, log):
    """Collective: every rank calls it, rank 0 writes. weights: the trainable state dict (shards or whole)."""
    distributed = dist.is_initialized()
    master = not distributed or dist.get_rank() == 0
    states = [None] * dist.get_world_size() if distributed else [rng_state(device)]
    if distributed:
        dist.all_gather_object(states, rng_state(device))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for k, v in weights.items():
        tensors[f"model.{k}"] = full_tensor(v)
    for p, state in optimizer.state.items():  # the same order on every rank, so the gathers pair up
        for key, value in state.items():
            tensors[f"optim.{names[id(p)]}.{key}"] = full_tensor(value)
    if not master:
        return
    for r, state in enumerate(states):
        tensors[f"rng.torch.{r}"] = state["torch"]
        if state["cuda"] is not None:
            tensors[f"rng.cuda.{r}"] = state["cuda"]
    meta = dict(meta, rng_python=[[s["python"][0], list(s["python"][1]), s["python"][2]] for s in states],
                rng_numpy=[[s["numpy"][0], s["numpy"][1].tolist(), *s["numpy"][2:]] for s in states])
    save_checkpoint(path, tensors, meta)
    log(f"saved {path} at step {meta['step']}")


def config_diff(theirs, ours, ignore=()):
    """{key: (checkpoint's value, ours)} where a dataclass config differs from a checkpoint's JSON copy of one. A key
    the checkpoint lacks, written before the key existed, counts as the key's default (e.g. compressor: fused)."""
    defaults = json.loads(json.dumps(asdict(type(ours)())))
    theirs = {**defaults, **theirs}
    ours = json.loads(json.dumps(asdict(ours)))
    return {k: (theirs[k], v) for k, v in ours.items() if k not in ignore and theirs[k] != v}


def read_resumable(path, stage, model_cfg, train_cfg, data_order_keys, world_size, log):
    """-> (tensors, meta) of a checkpoint that can continue this run exactly (or a stop saying why not); logs the
    other settings that changed."""
    tensors, meta = load_checkpoint(path)
    if meta.get("stage") != stage:
        raise SystemExit(f"{path}: a {meta.get('stage')!r} checkpoint, this run trains {stage!r}")
    diff = config_diff(meta["model_config"], model_cfg)
    if diff:
        raise SystemExit(f"{path}: model config differs from this run's (checkpoint, now): {diff}")
    for key in data_order_keys:
        if meta["train_config"][key] != getattr(train_cfg, key):
            raise SystemExit(f"{path}: {key}={meta['train_config'][key]} in the checkpoint, {getattr(train_cfg, key)} "
                             f"now: the data order would not continue; resume with the checkpoint's value")
    if meta["world_size"] != world_size:
        raise SystemExit(f"{path}: saved by {meta['world_size']} processes, resumed by {world_size}: use the same count")
    changed = {k: (v, getattr(train_cfg, k)) for k, v in meta["train_config"].items()
               if k != "resume" and hasattr(train_cfg, k) and v != getattr(train_cfg, k)}
    if changed:
        log(f"resuming with changed settings (checkpoint, now): {changed}")
    return tensors, meta


def trained_weights(tensors):
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def restore_training_state(path, tensors, meta, model, optimizer, rank, device, log):
    """AdamW state (each tensor cut like its parameter) and this rank's RNG states; -> the step to continue at."""
    for name, p in model.named_parameters():
        if p.requires_grad and f"optim.{name}.step" in tensors:
            state = {}
            for key in ("exp_avg", "exp_avg_sq"):
                value = tensors[f"optim.{name}.{key}"].to(local(p).device)
                state[key] = (distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
                              if isinstance(p, DTensor) else value)
            # AdamW keeps `step` on the CPU unless it is fused (or capturable), where it lives with the parameter
            state["step"] = tensors[f"optim.{name}.step"].to(local(p).device if optimizer.defaults.get("fused") else "cpu")
            optimizer.state[p] = state
    torch.set_rng_state(tensors[f"rng.torch.{rank}"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], device)
    version, state, gauss = meta["rng_python"][rank]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = meta["rng_numpy"][rank]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    log(f"resumed from {path} at step {meta['step']}")
    return meta["step"]


# -----------------------------------------------------------------------------
# Validation batches, the log line and the metrics record


def val_batches(dataset, batch_size, rank, world_size, num_workers=0, pin_memory=False):
    """Yields (batch, counted) for this rank: the validation set in file order cut into batches of batch_size (the
    last one may be smaller), batch j on rank j % world_size. Every rank runs the same number of batches (FSDP's
    forward is collective): a rank with none left runs batch 0 again with counted=False."""
    batches = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
    per_rank = math.ceil(len(batches) / world_size)
    mine = [batches[j] if j < len(batches) else batches[0] for j in range(rank, per_rank * world_size, world_size)]
    counted = [j < len(batches) for j in range(rank, per_rank * world_size, world_size)]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=mine, collate_fn=collate, num_workers=num_workers,
                                         pin_memory=pin_memory, generator=torch.Generator())  # no draw from the global RNG
    return zip(loader, counted)


def supervised_tokens(batch):
    """The answer tokens a batch's loss covers (the model shifts the labels)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def answer_loss_step(model, micro_batches, optimizer, params, grad_clip, world_size, device, autocast, step_log):
    """One optimizer step of train_gen.py's loss (its docstring works out the arithmetic): each micro-batch
    back-propagates its answer-loss sum * world_size / N, N the supervised tokens of the whole step on all ranks,
    so the gradient is that of the token mean over the global batch. Also what bench.py --mode=train times.
    -> (this rank's loss sum, N, the gradient norm before clipping)."""
    n_labels = all_reduce(torch.tensor(sum(supervised_tokens(b) for b in micro_batches), device=device))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro_step, batch in enumerate(micro_batches):
        step_log.count(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(model, last_micro_step=micro_step == len(micro_batches) - 1):
            with autocast:
                _, micro_loss_sum = model(batch)
            (micro_loss_sum * world_size / n_labels).backward()
        loss_sum += micro_loss_sum.detach()
    grad_norm = clip_gradients(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_log.step_done()
    return loss_sum, n_labels, grad_norm


def write_metrics(out_dir, record, master):
    if master:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


class StepLog:
    """Counts samples, tokens and FLOPs since the last log line; line() all-reduces them with the loss sum and prints
    step, loss, lr, speed, MFU and peak memory. Fused tokens: the vision tokens of every crop plus the fused text
    sequence (what the fused model runs on, both stages); LLM tokens: the frozen LLM's sequence (stages 2-3)."""

    def __init__(self, model, device, world_size, peak_flops, log):
        self.model, self.device, self.world_size, self.peak, self.log = model, device, world_size, peak_flops, log
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)  # samples, fused tokens, LLM tokens, FLOPs
        self.t_last, self.steps = time.time(), 0

    def count(self, batch):
        """Before the batch goes to the device: no device syncs."""
        fused = len(batch["crop_to_sample"]) * self.model.vision.tokens_per_crop() + int(batch["fused_attention_mask"].sum())
        llm = int(batch["attention_mask"].sum()) if hasattr(self.model, "llm") else 0
        self.totals += torch.tensor([len(batch["fused_ids"]), fused, llm, train_flops(self.model, batch)],
                                    dtype=torch.float64, device=self.device)

    def step_done(self):
        self.steps += 1

    def line(self, step, max_iters, loss_sum, loss_divisor, lr, grad_norm):
        """-> the metrics record of the steps since the last line (loss: the last step's loss_sum / loss_divisor)."""
        stats = all_reduce(torch.cat([loss_sum.view(1).to(torch.float64), self.totals]))
        dt = (time.time() - self.t_last) / self.steps
        samples_s, fused_s, llm_s = (stats[1:4] / self.steps / dt).tolist()
        mfu = stats[4].item() / self.steps / dt / (self.peak * self.world_size) if self.peak else None
        memory = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
        record = {"step": step, "loss": stats[0].item() / loss_divisor, "lr": lr, "grad_norm": grad_norm.item(),
                  "ms_per_step": dt * 1000, "samples_per_s": samples_s, "fused_tokens_per_s": fused_s,
                  **({"llm_tokens_per_s": llm_s} if hasattr(self.model, "llm") else {}), "mfu": mfu,
                  "peak_mem_gb": memory}
        tokens = f"{fused_s:.0f} fused tok/s" + (f" | {llm_s:.0f} LLM tok/s" if hasattr(self.model, "llm") else "")
        self.log(f"step {step}/{max_iters} | loss {record['loss']:.5f} | lr {lr:.3e} | {dt * 1000:.0f} ms/step | "
                 f"{samples_s:.1f} samples/s | {tokens} | MFU {f'{100 * mfu:.1f}%' if mfu else 'n/a'} | "
                 f"peak mem {memory:.2f} GB")
        self.totals.zero_()
        self.t_last, self.steps = time.time(), 0
        return record
