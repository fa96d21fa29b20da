"""
What the scripts share to run, nanochat's compute_init and a little more: the run set-up (process group, device,
seed) of train_align.py, train_gen.py and evaluate.py; and for the two trainers the out_dir and path checks, the
per-block wrappers (activation checkpointing, compile, FSDP2 sharding), AdamW and its schedule, gradient clipping,
the validation batches, the log line, the metrics record (also to wandb with wandb_log=True) and the training loop
itself. What a checkpoint holds and how a run resumes exactly is checkpoint.py's.

DDP or FSDP (--fsdp=True, torchrun only). DDP keeps a whole copy of every weight on every GPU. FSDP2's fully_shard
cuts every block's parameters (the trainable ones, their gradients and AdamW moments, and the frozen LLM's) into
world_size pieces along dim 0; a block's full weights exist only while it runs (all-gathered before its forward
and again before its backward), and its gradients are reduce-scattered after its backward, averaged over ranks as
DDP averages them, so the trainers' loss normalisation is the same under both. On GPU with dtype=bfloat16 the
gathered weights are bf16 and the gradients are reduced in fp32; the sharded master weights and AdamW stay fp32.
"""
import atexit
import json
import math
import os
import random
import resource
import socket
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
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.checkpoint import checkpoint

from checkpoint import local, read_meta
from configurator import InputError, parse_config
from fusion import IGNORE, ConversationDataset, collate, step_batches
from model import peak_flops, train_flops

# -----------------------------------------------------------------------------
# The run set-up of every script


class Run:
    """This process's place in the run. torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is the
    only process. device "" = cuda when there is one (under torchrun: this rank's GPU), else cpu."""

    def __init__(self, device=""):
        self.ddp = "RANK" in os.environ
        self.rank, self.local_rank, self.world_size = ((int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                                                        int(os.environ["WORLD_SIZE"])) if self.ddp else (0, 0, 1))
        if self.ddp:  # the ranks share one stdout: a line at a time, or a flush of one can split a line of another
            sys.stdout.reconfigure(line_buffering=True)
        if self.ddp and torch.cuda.is_available() and device in ("", "cuda"):
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        elif self.ddp:
            self.device = torch.device(device or "cpu")
            dist.init_process_group("gloo")
        else:
            self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.master = self.rank == 0

    def log(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs)

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def close(self, barrier=True):
        if self.ddp:
            if barrier:
                dist.barrier()  # without it gloo processes sometimes abort at exit
            dist.destroy_process_group()

    def end(self):
        """The normal end of a torchrun process, after close(): exit 0 at once. gloo's worker threads outlive
        destroy_process_group, and the interpreter's teardown of them now and then aborts a rank whose work is all
        saved (SIGABRT, "terminate called without an active exception"), so a finished run would be reported
        failed. The atexit handlers (the run folder's lock) still run; one process without torchrun ends as usual."""
        if self.ddp:
            sys.stdout.flush()
            sys.stderr.flush()
            atexit._run_exitfuncs()
            os._exit(0)


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# -----------------------------------------------------------------------------
# A training run's set-up: config, inputs, out_dir, data


def read_config(config, argv, script):
    """configurator.parse_config plus the checks both trainers share, all before anything is built: a negative
    batch_size once made fusion.step_batches loop forever, a zero one a ZeroDivisionError minutes in."""
    cfg, positional = parse_config(config, argv)
    if positional:
        raise InputError(f"unexpected arguments {positional} (use --key=value)")
    if cfg.dtype not in ("bfloat16", "float32"):
        raise InputError(f"dtype must be bfloat16 or float32, got {cfg.dtype!r}")
    if cfg.fsdp and "RANK" not in os.environ:
        raise InputError(f"fsdp=True shards over the processes of torchrun (run torchrun --nproc_per_node=N {script} "
                         f"...)")
    positive = ["batch_size", "grad_accum", "log_interval", "ckpt_interval", "eval_interval"]
    positive.append("max_iters" if not hasattr(cfg, "epochs") or cfg.max_iters else "epochs")  # train_gen: either
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise InputError(f"{key} must be a positive integer, got {getattr(cfg, key)} (pass --{key}=N, N >= 1)")
    if cfg.max_iters < 0 or cfg.stop_at_step < 0:
        raise InputError(f"max_iters and stop_at_step must be >= 0, got {cfg.max_iters} and {cfg.stop_at_step}")
    return cfg


def start_training(cfg, llama_remedy, more_inputs=()):
    """Both trainers' set-up after their config: the run, TF32, the autocast of cfg.dtype, the input checks, out_dir
    claimed, the seed. -> (run, train_path, val_path, ckpt_path); run.bf16 and run.autocast say how the model runs."""
    run = Run()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # the same on CPU as on GPU: on CPU it is slower than float32, and there to check the GPU path (docs/training.md)
    run.bf16 = cfg.dtype == "bfloat16"
    run.autocast = torch.autocast(run.device.type, torch.bfloat16) if run.bf16 else nullcontext()
    run.log(json.dumps(asdict(cfg), indent=1))
    run.log(f"device {run.device}, world size {run.world_size}")
    train_path, val_path = check_inputs(cfg, llama_remedy, more_inputs)
    ckpt_path = claim_out_dir(cfg.out_dir, cfg.resume, run)
    run.wandb_id, run.wandb = start_wandb(cfg, ckpt_path, run.master)
    seed_everything(cfg.seed)
    return run, train_path, val_path, ckpt_path


def start_wandb(cfg, ckpt_path, master):
    """nanoGPT's wandb_log: imported only when on, on rank 0 only, the run's config attached. -> (the wandb run id
    for the checkpoint's meta, the wandb run or None). A resumed run continues the wandb run its checkpoint names;
    the id is kept even with logging off, so a later resume with it on still continues that run."""
    wandb_id = None
    if cfg.resume and os.path.exists(ckpt_path):
        wandb_id = read_meta(ckpt_path).get("wandb_run_id")
    if not (cfg.wandb_log and master):
        return wandb_id, None
    import wandb
    name = cfg.wandb_run_name or os.path.basename(os.path.normpath(cfg.out_dir))
    wandb_run = wandb.init(project=cfg.wandb_project, name=name, id=wandb_id, resume="allow", config=asdict(cfg),
                           dir=cfg.out_dir)  # its run folders go to out_dir/wandb
    wandb_run.define_metric("*", step_metric="step")  # our step on the x axis, also after a resume
    return wandb_run.id, wandb_run  # a fresh run: the id wandb chose


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
            raise InputError(f"{path}: {key} does not exist ({remedy}, or pass --{key}=...)")
    return train_path, val_path


def claim_out_dir(out_dir, resume, run):
    """-> out_dir/ckpt.safetensors. The master locks out_dir for this run (lock_folder). A fresh run refuses an
    out_dir that holds a checkpoint or a metrics.jsonl, and starts a fresh metrics.jsonl; a resumed one keeps it."""
    ckpt_path = os.path.join(out_dir, "ckpt.safetensors")
    if run.master:
        os.makedirs(out_dir, exist_ok=True)
        lock_folder(out_dir)
    for path in (ckpt_path, os.path.join(out_dir, "metrics.jsonl")):
        if not resume and os.path.exists(path):
            raise InputError(f"{path}: exists (pass --resume=True to continue its run, or choose another out_dir)")
    run.barrier()  # every rank has looked before the master writes the fresh metrics.jsonl
    if run.master and not resume:
        open(os.path.join(out_dir, "metrics.jsonl"), "w").close()
    return ckpt_path


def lock_folder(folder):
    """Makes `folder` this process's until it exits: folder/LOCK, created only if absent (O_EXCL), holds our pid
    and host. Two runs writing one folder lose a checkpoint and interleave their metrics without a word. A lock
    left by a dead process of this host (kill -9) is taken over with a message; another host's is never guessed
    at. A lock of this very process (a script run again in one interpreter, as the tests do) is ours."""
    path = os.path.join(folder, "LOCK")
    host = socket.gethostname()
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        with open(path) as f:
            pid, _, owner = f.read().strip().partition(" ")
        alive = not pid.isdigit() or owner != host or pid_alive(int(pid))
        if alive and not (owner == host and pid == str(os.getpid())):
            raise InputError(f"{path}: {folder} is in use by pid {pid} on {owner or '?'} (wait for that run, or "
                             f"choose another folder; delete {path} only if that process is gone)") from None
        if pid != str(os.getpid()):
            print(f"{path}: taking over the lock of pid {pid}, which is no longer running")
        os.remove(path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {host}\n")
    atexit.register(unlock_folder, path)


def unlock_folder(path):
    try:
        with open(path) as f:
            mine = f.read().split(" ")[0] == str(os.getpid())
        if mine:
            os.remove(path)
    except FileNotFoundError:
        pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def metrics_up_to(out_dir, step):
    """On resume: metrics.jsonl without the lines past the checkpoint's step (written after it was saved, and about
    to be written again), so every step appears once."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    if len(kept) < len(lines):
        print(f"{path}: {len(lines) - len(kept)} lines past step {step} dropped: they are trained again")


def read_datasets(cfg, token_space, train_path, val_path, log, mix=()):
    """-> (the training set, the validation set or None without val_file), each summarised in the log; mix: see
    fusion.ConversationDataset."""
    dataset = ConversationDataset(train_path, cfg.data_dir, token_space, skip_bad=cfg.skip_bad, mix=mix)
    log(dataset.summary())
    val_set = None
    if val_path:
        val_set = ConversationDataset(val_path, cfg.data_dir, token_space, skip_bad=cfg.skip_bad, mix=mix)
        log(f"validation: {val_set.summary()}")
    return dataset, val_set


def epoch_steps(n_samples, batch_size, grad_accum, world_size, log):
    """Optimizer steps in one pass over n_samples at a global batch of batch_size x grad_accum x world_size; stops
    when not even one fits."""
    global_batch = batch_size * grad_accum * world_size
    steps = n_samples // global_batch
    if steps == 0:
        raise InputError(f"{n_samples} samples do not fill one global batch of {global_batch} (lower batch_size or "
                         f"grad_accum)")
    log(f"global batch {global_batch} = {batch_size} x {grad_accum} accumulation x {world_size} processes; {steps} "
        f"steps per epoch; each epoch leaves out {n_samples - steps * global_batch} samples (a different random set "
        f"every epoch)")
    return steps


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


def distribute(raw_model, run, cfg, whole=(), frozen=None):
    """-> the model the training step calls. fsdp: raw_model sharded block by block (raw_model.blocks()) and moved to
    the device; `whole` parameters, which fully_shard cannot cut, stay whole on every rank. Otherwise raw_model on
    the device, wrapped in DDP under torchrun; `frozen`, a frozen part every rank loaded from its own folder, is left
    out of DDP's start-up broadcast (and DDP buckets only parameters that require grad, so it costs nothing after)."""
    blocks = raw_model.blocks()
    wrap_blocks(blocks, cfg.activation_checkpointing, cfg.compile)
    if cfg.fsdp:
        shard(raw_model, blocks, run.device, run.bf16, ignored=whole)
        for p in whole:  # ignored by fully_shard, so not moved
            p.data = p.data.to(run.device)
        return raw_model
    raw_model.to(run.device)
    if not run.ddp:
        return raw_model
    if frozen is not None:
        prefix = next(name for name, module in raw_model.named_modules() if module is frozen)
        DDP._set_params_and_buffers_to_ignore_for_model(raw_model, [f"{prefix}.{k}" for k in frozen.state_dict()])
    return DDP(raw_model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)


def gradient_sync(model, last_micro_step):
    """DDP all-reduces gradients only at the step's last micro-batch (forward AND backward inside, or nothing is
    skipped). FSDP reduce-scatters after every micro-batch, which keeps the gradients sharded."""
    return model.no_sync() if isinstance(model, DDP) and not last_micro_step else nullcontext()


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


@torch.no_grad()
def val_mean(raw_model, val_set, run, cfg, loss_and_weight):
    """sum of loss / sum of weight over every validation batch (val_batches: every rank a share), where
    loss_and_weight(raw_model, batch) -> (loss, weight) of one batch still on the CPU (under DDP raw_model is the
    module itself: no gradient hooks)."""
    sums = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, weight sum
    for batch, counted in val_batches(val_set, cfg.batch_size, run.rank, run.world_size, cfg.num_workers,
                                      run.device.type == "cuda"):
        loss, weight = loss_and_weight(raw_model, batch)
        if counted:
            sums += torch.stack([loss.double(), torch.tensor(weight, dtype=torch.float64, device=run.device)])
    sums = all_reduce(sums)
    return (sums[0] / sums[1]).item()


def supervised_tokens(batch):
    """The answer tokens a batch's loss covers (the model shifts the labels)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def all_reduce(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


class Diverged(ArithmeticError):
    """A non-finite loss or gradient norm: train() stops the run, naming the step."""


def stop_if_diverged(loss_sum, grad_norm):
    """Between the backward and the optimizer step: a NaN or infinite loss or gradient norm on any rank stops every
    rank before AdamW writes it into the weights (and so before any checkpoint holds it). One all-reduce per step."""
    bad = all_reduce(torch.stack([(~torch.isfinite(loss_sum)).double(), (~torch.isfinite(grad_norm)).double()]))
    if bad.any():
        raise Diverged(f"the {'loss' if bad[0] else 'gradient norm'} is not finite")


def answer_loss_step(model, micro_batches, optimizer, params, grad_clip, world_size, device, autocast, step_log,
                     count=supervised_tokens):
    """One optimizer step of train_gen.py's loss (its docstring works out the arithmetic): each micro-batch
    back-propagates its answer-loss sum (model(batch) -> (_, loss sum)) * world_size / N, N = count(batch) summed
    over the whole step on all ranks (the supervised tokens; train_align.py's answers objective: the classified
    turns), so the gradient is that of the mean over the global batch. Also what bench.py --mode=train times.
    A step with nothing to count adds no gradient (N is taken as 1). -> (this rank's loss sum, N, the gradient
    norm before clipping)."""
    n_labels = all_reduce(torch.tensor(sum(count(b) for b in micro_batches), device=device)).clamp(min=1)
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
    stop_if_diverged(loss_sum, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_log.step_done()
    return loss_sum, n_labels, grad_norm


def write_metrics(out_dir, record, master, wandb_run=None):
    if master:
        with open(os.path.join(out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record)


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
        fused = len(batch["crop_to_sample"]) * self.model.vision.tokens_per_crop() + int(batch["fused_real_mask"].sum())
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


# -----------------------------------------------------------------------------
# The training loop


def train(run, cfg, raw_model, dataset, val_set, steps_per_epoch, start_step, max_iters, optimizer, train_step,
          validate, save):
    """Both trainers' loop, from start_step on: each step at its cosine lr, train_step(micro_batches, step_log) ->
    (loss sum, its divisor, gradient norm); the log line every log_interval steps, validate(step) -> a metrics record
    every eval_interval steps (with a val_set), save(step) every ckpt_interval steps, and each of them at the end
    (max_iters or stop_at_step; validation at max_iters only). Then the run's teardown."""
    if start_step and run.master:
        metrics_up_to(cfg.out_dir, start_step)
    batches = step_batches(dataset, start_step, steps_per_epoch, cfg.batch_size, cfg.grad_accum, run.rank,
                           run.world_size, cfg.seed, cfg.num_workers, pin_memory=run.device.type == "cuda")
    step_log = StepLog(raw_model, run.device, run.world_size, peak_flops(run.device), run.log)
    t_start = time.time()
    steps_run = unreadable = 0
    for step in range(start_step, max_iters):
        lr = cosine_lr(step, max_iters, cfg.lr, cfg.warmup_ratio)
        set_lr(optimizer, lr)
        micro_batches = next(batches)
        unreadable += sum(int(b["unreadable"]) for b in micro_batches)
        try:
            loss_sum, loss_divisor, grad_norm = train_step(micro_batches, step_log)
        except Diverged as e:
            run.close(barrier=False)
            raise SystemExit(f"error: step {step + 1}: {e}; stopped before the optimizer step, the last checkpoint "
                             f"stays as it was (lower lr, or check the data)") from None
        step_done = step + 1
        steps_run += 1
        last = step_done == max_iters or step_done == cfg.stop_at_step
        if step_done % cfg.log_interval == 0 or last:
            write_metrics(cfg.out_dir, step_log.line(step_done, max_iters, loss_sum, loss_divisor, lr, grad_norm),
                          run.master, run.wandb)
        if val_set is not None and (step_done % cfg.eval_interval == 0 or step_done == max_iters):
            t_val = time.time()
            write_metrics(cfg.out_dir, validate(step_done), run.master, run.wandb)
            step_log.t_last += time.time() - t_val  # the next log line times training steps only
        if step_done % cfg.ckpt_interval == 0 or last:
            save(step_done)
        if step_done == cfg.stop_at_step:
            break
    global_batch = cfg.batch_size * cfg.grad_accum * run.world_size
    unreadable = int(all_reduce(torch.tensor(unreadable, device=run.device)))
    run.log(f"done: {steps_run} steps, {steps_run * global_batch - unreadable} samples in {time.time() - t_start:.1f} "
            f"s; skipped while training {unreadable} (" + (f"unreadable image: {unreadable}" if unreadable else "none")
            + ")")
    if run.wandb is not None:
        run.wandb.finish()
    run.close()
    run.end()
