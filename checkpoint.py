"""
Our checkpoint format, in one place: what train_align.py and train_gen.py write, and what train_gen.py's init_from,
evaluate.py, sample.py, bench.py and divergence.py read.

One safetensors file (ckpt.safetensors in the run's out_dir), written to a temp file, synced, then renamed over the
old one, so a crash mid-write never loses a checkpoint. Its tensors:

    model.<name>              the trained weights (a FusedVLM's trainable_state_dict, or a whole AlignModel)
    optim.<name>.<state>      AdamW's state of parameter <name> (exp_avg, exp_avg_sq, step)
    rng.torch.<r>, rng.cuda.<r>  every rank's torch RNG states

and as JSON metadata: stage ("align" or "gen"), step, the data cursor, world_size, train_config, model_config, the
clip_path and llama_path it was trained with, its token_space, and every rank's Python and NumPy RNG states.
Tensors are full tensors under DDP and FSDP alike (FSDP gathers them from their shards, one tensor at a time). An
exact resume needs the same world_size (the RNG states are per rank); the trained weights go into the model before
it is sharded or wrapped, the optimizer state after, cut like its parameter.

Reading is strict: every trained tensor present with its shape and a float dtype (float16/bfloat16 into float32 is
allowed and logged), nothing unexpected, and every float tensor finite (a diverged run's weights would otherwise
evaluate to a silent score of 0). Writing is guarded too: a checkpoint with a non-finite tensor is never written, so
it never replaces the last finite one. A checkpoint of an older format is brought to today's by upgrade() as it is
read: every fix for an older checkpoint lives there.
"""
import json
import os
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from backbones import open_safetensors
from configurator import InputError
from model import FusedVLM

# -----------------------------------------------------------------------------
# The file: written atomically, read with every older format brought up to date


def save_checkpoint(path, tensors, meta):
    bad = first_non_finite(tensors)
    if bad:  # the training loop stops before this; a file holding NaN must never replace a finite one
        raise SystemExit(f"error: {path}: not saved: {bad} holds non-finite values (the last checkpoint there stays)")
    tmp = path + ".tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"meta": json.dumps(meta)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_file(path):
    """A checkpoint folder (holding ckpt.safetensors, what the training scripts write) or the file itself."""
    return os.path.join(path, "ckpt.safetensors") if os.path.isdir(path) else path


def first_non_finite(tensors):
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)


def load_checkpoint(path, prefix=""):
    """path: a checkpoint folder or file -> (tensors whose key, in today's names, starts with prefix; meta dict)."""
    path = checkpoint_file(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: checkpoint not found (give a folder holding ckpt.safetensors, or the file)")
    with open_safetensors(path) as f:
        meta = meta_of(f, path)
        names = {today_key(k): k for k in f.keys()}
        tensors = {k: f.get_tensor(stored) for k, stored in names.items() if k.startswith(prefix)}
    bad = first_non_finite(tensors)
    if bad:
        raise InputError(f"{path}: {today_key(bad)} holds non-finite values (a diverged run's checkpoint; use an "
                         f"earlier one)")
    return tensors, upgrade(meta)


def meta_of(f, path):
    """The meta dict of an open checkpoint file (path: its name for errors), as save_checkpoint wrote it (not
    upgraded)."""
    try:
        return json.loads((f.metadata() or {}).get("meta", "{}"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: its meta is not valid JSON ({e.msg}; not a file this project wrote)") from None


def read_meta(path):
    """A checkpoint file's meta in today's schema, without reading its tensors."""
    with open_safetensors(path) as f:
        return upgrade(meta_of(f, path))


# Older formats. Each entry names the last format that needs it.
RENAMED = {  # written up to commit 2bbe1ac (2026-12-02): FusedVLM and AlignModel held their compressor as `fused`
    "model.fused.": "model.compressor.",
    "optim.fused.": "optim.compressor.",
}


def today_key(key):
    for old, new in RENAMED.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def upgrade(meta):
    """A checkpoint's meta in today's schema: the keys added since it was written get the value they stood for."""
    if "model_config" in meta:  # written before commit 4169f8a (2026-12-02), the fused model was the only compressor
        meta["model_config"].setdefault("compressor", "fused")
    if "token_space" in meta:  # written before commit c32831c (2026-12-01), the only chat layout was Llama-2's
        meta["token_space"].setdefault("chat_template", "llama-2")
    return meta


def load_trainable(module, tensors, path, unused_prefixes=(), log=print):
    """Strictly load trained weights into `module`'s trainable part: every trainable key must be present with
    its shape and a float dtype (load_state_dict would cast an int32 tensor into an all-zero weight without a word);
    keys under unused_prefixes (e.g. the stage-1 text tower when building stage 2) are dropped on purpose."""
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith("llm.")}
    extra = [k for k in tensors if k not in expected and not k.startswith(tuple(unused_prefixes))]
    missing = [k for k in expected if k not in tensors]
    if missing or extra:
        raise InputError(f"{path}: does not match the model (missing {missing[:5]}, unexpected {extra[:5]})")
    cast = set()
    for k, v in expected.items():
        if tensors[k].shape != v.shape:
            raise InputError(f"{path}: model.{k} has shape {tuple(tensors[k].shape)}, the model expects "
                             f"{tuple(v.shape)} (a checkpoint of another model)")
        if not tensors[k].is_floating_point():
            raise InputError(f"{path}: model.{k} is {tensors[k].dtype}, a weight must be a float tensor (not a file "
                             f"this project wrote)")
        if tensors[k].dtype != v.dtype:
            cast.add(f"{tensors[k].dtype} into {v.dtype}".replace("torch.", ""))
    if cast:
        log(f"{path}: weights cast {', '.join(sorted(cast))}")
    module.load_state_dict({k: tensors[k] for k in expected}, strict=False)


def trained_weights(tensors):
    return {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}


def config_diff(theirs, ours, ignore=()):
    """{key: (checkpoint's value, ours)} where a dataclass config differs from a checkpoint's JSON copy of one. A key
    the checkpoint lacks, written before the key existed, counts as the key's default (e.g. compressor: fused), also
    inside a sub-config (e.g. llm.qkv_bias: False)."""
    defaults = json.loads(json.dumps(asdict(type(ours)())))
    theirs = {k: {**defaults[k], **theirs[k]} if isinstance(defaults[k], dict) and isinstance(theirs.get(k), dict)
              else theirs.get(k, defaults[k]) for k in defaults}
    ours = json.loads(json.dumps(asdict(ours)))
    return {k: (theirs[k], v) for k, v in ours.items() if k not in ignore and theirs[k] != v}


# -----------------------------------------------------------------------------
# The trained model: a stage-2/3 checkpoint around a frozen LLM loaded from its own folder


def read_gen_checkpoint(path):
    """-> (trained weights {module name: tensor}, meta) of a stage-2/3 checkpoint."""
    tensors, meta = load_checkpoint(path, prefix="model.")
    if meta.get("stage") != "gen":
        raise InputError(f"{path}: a stage {meta.get('stage')!r} checkpoint; evaluate.py runs stage-2/3 ('gen') "
                         f"checkpoints of train_gen.py (a stage-1 'align' checkpoint has no bridge into the LLM)")
    missing = [key for key in ("model_config", "clip_path", "llama_path", "token_space") if key not in meta]
    if missing:
        raise InputError(f"{path}: its meta lacks {missing}, which the checkpoint schema requires")
    return trained_weights(tensors), meta


def trained_vlm(cfg, weights, llm, path):
    """The trained model: `weights` = a stage-2/3 checkpoint's trainable tensors (load_checkpoint with prefix
    "model.", stripped), around an already loaded frozen LLM (a sweep shares one). Built on the meta device, so
    nothing is randomly initialised; only the trained parts get memory, on the CPU."""
    if llm.cfg != cfg.llm:
        raise InputError(f"{path}: trained with the LLM {cfg.llm}, given one with {llm.cfg} (pass its --llama_path)")
    with torch.device("meta"):
        vlm = FusedVLM(cfg, llm=llm)
    for part in (vlm.vision, vlm.compressor, vlm.bridge):
        part.to_empty(device="cpu")
    load_trainable(vlm, weights, path)  # strict: every trained tensor present, with its shape, nothing extra
    return vlm


def inference_vlm(model_cfg, weights, llm, path, device, dtype):
    """trained_vlm on `device` in `dtype`, in eval mode."""
    return trained_vlm(model_cfg, weights, llm, path).to(device=device, dtype=dtype).eval()


STAGE1_ONLY = ("text.", "align_head.", "logit_scale", "answer_head.")  # stage 1's own parts, left behind by init_from


def init_from(model, path, log):
    """train_gen.py's init_from: a stage-1 checkpoint gives its vision tower and fused model (the bridge starts
    fresh; its text tower and alignment head, or its answer head, are dropped), a stage-2/3 one everything it
    trained. A checkpoint of another compressor (every stage-1 one is fused) gives only its vision tower; that
    compressor and the bridge keep the fresh init `model` was built with."""
    tensors, meta = load_checkpoint(path, prefix="model.")
    stage1 = meta.get("stage") == "align"
    theirs, ours = meta.get("model_config", {}).get("compressor", "fused"), model.cfg.compressor
    swapped = theirs != ours
    fresh = ("bridge.", "compressor.") if swapped else ("bridge.",) if stage1 else ()
    # what the trained parts were built for must match: the vision tower alone after a swap; a stage-1 checkpoint
    # knows no LLM
    ignore = ([k for k in asdict(model.cfg) if k != "vit"] if swapped
              else ("text", "bridge_init_std") + (("llm",) if stage1 else ()))
    diff = config_diff(meta.get("model_config", {}), model.cfg, ignore=ignore)
    if diff:
        raise InputError(f"{path}: init_from's model differs from this config's (checkpoint, now): {diff} (set "
                         f"these keys as the checkpoint has them)")
    weights = trained_weights(tensors)
    if fresh:
        weights = {k: v for k, v in weights.items() if not k.startswith(fresh)}
        weights.update({k: v.detach().clone() for k, v in model.trainable_state_dict().items() if k.startswith(fresh)})
    load_trainable(model, weights, path, unused_prefixes=STAGE1_ONLY, log=log)
    log(f"initialised from {path} ({meta.get('stage')} checkpoint at step {meta.get('step')})")
    if swapped:
        log(f"compressor={ours}: {path} holds a {theirs} model; only its vision tower is taken, the {ours} and the "
            f"bridge start fresh")


def stage1_init_from(model, path, log):
    """train_align.py's init_from: a stage-1 checkpoint's vision tower and fused model start this run; the rest
    (text tower and alignment head, or answer head) keeps the fresh init `model` was built with, so one stage-1
    objective can follow another."""
    tensors, meta = load_checkpoint(path, prefix="model.")
    if meta.get("stage") != "align":
        raise InputError(f"{path}: a {meta.get('stage')!r} checkpoint; train_align.py's init_from takes a stage-1 one")
    diff = config_diff(meta.get("model_config", {}), model.cfg, ignore=("text",))
    if diff:
        raise InputError(f"{path}: init_from's model differs from this config's (checkpoint, now): {diff} (set "
                         f"these keys as the checkpoint has them)")
    taken = ("vision.", "compressor.")
    weights = {k: v for k, v in trained_weights(tensors).items() if k.startswith(taken)}
    weights.update({k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith(taken)})
    load_trainable(model, weights, path, unused_prefixes=STAGE1_ONLY, log=log)
    log(f"vision tower and fused model initialised from {path} (stage-1 checkpoint at step {meta.get('step')})")


# -----------------------------------------------------------------------------
# Training checkpoints: save and exact resume


def full_tensor(t):
    """A whole tensor on the CPU; an FSDP shard is all-gathered first (collective: every rank calls it)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def local(t):
    return t.to_local() if isinstance(t, DTensor) else t


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


def read_resumable(path, stage, model_cfg, train_cfg, data_order_keys, world_size, log):
    """-> (tensors, meta) of a checkpoint that can continue this run exactly (or a stop saying why not); logs the
    other settings that changed."""
    tensors, meta = load_checkpoint(path)
    if meta.get("stage") != stage:
        raise InputError(f"{path}: a {meta.get('stage')!r} checkpoint, this run trains {stage!r}")
    diff = config_diff(meta["model_config"], model_cfg)
    if diff:
        raise InputError(f"{path}: model config differs from this run's (checkpoint, now): {diff}")
    for key in data_order_keys:
        if meta["train_config"][key] != getattr(train_cfg, key):
            raise InputError(f"{path}: {key}={meta['train_config'][key]} in the checkpoint, {getattr(train_cfg, key)} "
                             f"now: the data order would not continue; resume with the checkpoint's value")
    if meta["world_size"] != world_size:
        raise InputError(f"{path}: saved by {meta['world_size']} processes, resumed by {world_size}: use the same count")
    changed = {k: (v, getattr(train_cfg, k)) for k, v in meta["train_config"].items()
               if k != "resume" and hasattr(train_cfg, k) and v != getattr(train_cfg, k)}
    if changed:
        log(f"resuming with changed settings (checkpoint, now): {changed}")
    return tensors, meta


def restore_training_state(path, tensors, meta, model, optimizer, rank, device, log):
    """AdamW state (each tensor cut like its parameter) and this rank's RNG states; -> the step to continue at."""
    for name, p in model.named_parameters():
        if p.requires_grad and f"optim.{name}.step" in tensors:
            missing = [k for k in ("exp_avg", "exp_avg_sq") if f"optim.{name}.{k}" not in tensors]
            if missing:
                raise InputError(f"{path}: optim.{name} lacks {missing} (the optimizer state is incomplete; resume "
                                 f"from another checkpoint, or start from it with init_from)")
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
