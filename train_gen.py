"""
Stages 2 and 3: next-token loss on the answers through the frozen LLM.

    python train_gen.py config/tiny.py --init_from=out/align/ckpt.safetensors      # CPU, seconds
    torchrun --standalone --nproc_per_node=8 train_gen.py config/paper_gen.py       # stage 2, from stage 1
    torchrun --standalone --nproc_per_node=8 train_gen.py config/paper_finetune.py --n_l=64 --out_dir=out/ft-64

Trains the CLIP vision trunk, the merge conv, the fused model and the bridge; the LLM is frozen (bf16 on GPU, no
gradients, not in the optimizer, not in DDP's buckets, never in a checkpoint). init_from: a stage-1 checkpoint (its
vision and fused weights; the bridge starts fresh, the text tower and alignment head are dropped) or a stage-2 one
(bridge included); empty: the vision trunk from clip_path and a random fused model.

compressor (model.py) chooses what makes the n_l / n_s LLM tokens: fused (the paper's fused model), pool (average
pooling, no parameters) or resampler (learned queries cross-attending to the vision tokens, fused_layers x
fused_heads x fused_mlp). Stage 1 (train_align.py) aligns the fused model's outputs, so it trains fused models
only; init_from a stage-1 checkpoint with compressor=pool or resampler takes its vision tower (trunk, merge conv,
norm) and starts the compressor fresh (a log line says so), which makes stage 1 a vision-tower pre-training for
them. So does init_from a stage-2/3 checkpoint of another compressor (a compressor swapped onto a trained vision
tower, as the miniature compares them). A checkpoint records its compressor (model_config); resume refuses another.
drop_question=True (the VQ ablation) is refused with pool and resampler: they never read the question.

Loss: cross-entropy on the answer tokens and their </s>, normalised by the supervised-token count N of the WHOLE
optimizer step. Each step first collates its micro-batches, counts their label tokens and all-reduces the count;
then micro-batch m on rank r back-propagates loss_sum[r, m] * world_size / N. DDP averages gradients over ranks,
so the step's gradient is (1 / world_size) * sum_r sum_m world_size / N * grad loss_sum[r, m] = grad of
sum_{r, m} loss_sum[r, m] / N: the token mean over the global batch, whatever the split into ranks and micro-steps
and however the answer lengths vary. The price: a step's grad_accum micro-batches sit in host memory together.

fsdp=True (torchrun) shards the trainable parts AND the frozen LLM over the ranks, block by block (training.py):
the LLM is read from llama_path straight into each rank's shards, so a 13B or 70B LLM fits where DDP's whole copy
per GPU does not. The loss and its normalisation are the same; so is the checkpoint (full tensors).

val_file: every eval_interval steps and at the end, the token-mean answer loss over the whole validation set
(every rank a shard of it), and the same with the images rolled by one within each validation batch, so every
conversation sees another sample's image: the gap says how much the model reads its images.

data_fraction < 1 (stage 3) trains on a fixed random subset of the JSONL's lines, drawn with its own seed: the same
lines for every n_l and every seed (a line that does not fit max_seq_len at some n_l is skipped and counted there).
"""
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from backbones import Llama, ViT
from checkpoint import (checkpoint_meta, init_from, load_trainable, read_resumable, restore_training_state,
                        save_training_checkpoint, trained_weights)
from configurator import InputError, report_input_errors
from fusion import TokenSpace, TokenSpaceConfig
from model import COMPRESSORS, FusedVLM, FusedVLMConfig
from training import (answer_loss_step, configure_optimizer, distribute, epoch_steps, read_config, read_datasets,
                      shard, start_training, supervised_tokens, train, val_mean, wrap_blocks)

DATA_FRACTION_SEED = 0  # fixed on purpose: every n_l of a sweep fine-tunes on the same lines


@dataclass
class Config:
    # I/O
    out_dir: str = "out/gen"
    data_dir: str = "data/llava/out"  # holds train_file; the image paths in it are relative to data_dir
    train_file: str = "train.jsonl"
    clip_path: str = "weights/CLIP-ViT-H-14-laion2B-s32B-b79K"  # vision trunk config (+ weights without init_from), BPE
    llama_path: str = "weights/Llama-2-7b-chat-hf"  # the frozen LLM's folder: Llama-2/3.x, Mistral or Qwen2/2.5
    init_from: str = ""  # a stage-1 or stage-2 checkpoint; empty: vision from clip_path, fused model random
    skip_bad: bool = False  # count and skip malformed JSONL lines instead of stopping at the first
    resume: bool = False  # continue out_dir/ckpt.safetensors exactly (init_from is then ignored)
    stop_at_step: int = 0  # end this run early (with a checkpoint) at this step, e.g. for a job time limit
    log_interval: int = 10
    ckpt_interval: int = 200
    seed: int = 1337  # model init (fresh parts) and the data order
    num_workers: int = 4
    wandb_log: bool = False  # also log metrics.jsonl's records to Weights & Biases (pip install wandb)
    wandb_project: str = "tokenspace"
    wandb_run_name: str = ""  # "" = out_dir's name
    data_fraction: float = 1.0
    val_file: str = ""  # in data_dir, like train_file; empty: no validation loss
    eval_interval: int = 200  # steps between validation losses (and one at the end)
    # token space (fusion.py)
    image_size: int = 336
    num_crops: int = 16
    n_l: int = 256
    n_s: int = 8
    drop_question: bool = False  # the VQ ablation: the fused model does not see the question (the LLM does)
    max_seq_len: int = 4096
    chat_template: str = "llama-2"  # the LLM's conversation layout: llama-2, vicuna, mistral, llama-3 or chatml (Qwen)
    # model (must match init_from's)
    compressor: str = "fused"  # fused | pool | resampler: vision tokens -> the n_l / n_s LLM tokens (see above)
    fused_layers: int = 12
    fused_heads: int = 20
    fused_mlp: int = 5120
    bridge_init_std: float = 1e-3  # the fresh bridge's N(0, std) init (a stage-1 or no init_from)
    # optimisation
    batch_size: int = 5  # conversations per micro-batch per process
    grad_accum: int = 64
    epochs: int = 2  # sets max_iters when max_iters is 0
    max_iters: int = 0
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    # system
    dtype: str = "bfloat16"  # autocast dtype and LLM weights on GPU ("bfloat16" or "float32"); CPU runs float32
    fsdp: bool = False  # under torchrun: shard weights, gradients, optimizer state and the frozen LLM (FSDP2)
    compile: bool = False  # torch.compile each ViT, fused-model and LLM block
    activation_checkpointing: bool = False  # recompute each ViT and fused block in the backward


report_input_errors()
cfg = read_config(Config(), sys.argv[1:], "train_gen.py")
if not 0 < cfg.data_fraction <= 1:
    raise InputError(f"data_fraction must be in (0, 1], got {cfg.data_fraction}")
if cfg.compressor not in COMPRESSORS:
    raise InputError(f"compressor must be one of {', '.join(COMPRESSORS)}, got {cfg.compressor!r}")
if cfg.drop_question and cfg.compressor != "fused":
    raise InputError(f"drop_question=True is the fused model's VQ ablation (compressor={cfg.compressor} never reads "
                     f"the question)")
run, train_path, val_path, ckpt_path = start_training(
    cfg, "download the LLM's folder (config.json, *.safetensors, tokenizer.model or tokenizer.json), e.g. "
         "meta-llama/Llama-2-7b-chat-hf, and put it there",
    more_inputs=[("init_from", cfg.init_from, "train the previous stage first: this is the ckpt.safetensors in its "
                                              "out_dir")] if cfg.init_from and not cfg.resume else [])
device, world_size, log = run.device, run.world_size, run.log

# -----------------------------------------------------------------------------
# data: fusion.step_batches cuts a seeded permutation per epoch into steps of global_batch conversations, the same
# micro-batches for any split into ranks x accumulation.
token_space = TokenSpace(TokenSpaceConfig(clip_path=cfg.clip_path, llama_path=cfg.llama_path, image_size=cfg.image_size,
                                          num_crops=cfg.num_crops, n_l=cfg.n_l, n_s=cfg.n_s,
                                          drop_question=cfg.drop_question, max_seq_len=cfg.max_seq_len,
                                          chat_template=cfg.chat_template))
dataset, val_set = read_datasets(cfg, token_space, train_path, val_path, log)
if cfg.data_fraction < 1:
    with open(train_path, "rb") as f:
        n_lines = sum(1 for _ in f)
    chosen = np.random.default_rng(DATA_FRACTION_SEED).permutation(n_lines)[:round(cfg.data_fraction * n_lines)] + 1
    subset = np.flatnonzero(np.isin(dataset.line_numbers, chosen))
    log(f"data_fraction {cfg.data_fraction}: {len(chosen)} of {n_lines} lines chosen, {len(subset)} of them usable")
    dataset = torch.utils.data.Subset(dataset, subset.tolist())
steps_per_epoch = epoch_steps(len(dataset), cfg.batch_size, cfg.grad_accum, world_size, log)
max_iters = cfg.max_iters or cfg.epochs * steps_per_epoch
log(f"{max_iters} steps in all")

# -----------------------------------------------------------------------------
# model: the frozen LLM from llama_path; the vision trunk from clip_path; compressor and bridge random, then
# overwritten by the previous stage's weights (init_from) or this run's (resume). All before DDP or FSDP wraps it.
vit = ViT.from_hf(cfg.clip_path, image_size=cfg.image_size)


def shard_llm(llm):
    """FSDP: the LLM is sharded while still empty, then every rank reads only its shards from llama_path."""
    wrap_blocks(llm.layers, activation_checkpointing=False, compile=cfg.compile)
    shard(llm, [llm.embed_tokens, *llm.layers], device, run.bf16)  # embed_tokens: FusedVLM calls it directly


llm = Llama.from_hf(cfg.llama_path, dtype=torch.bfloat16 if run.bf16 else torch.float32,
                    shard=shard_llm if cfg.fsdp else None).requires_grad_(False)
if cfg.compile and not cfg.fsdp:
    wrap_blocks(llm.layers, activation_checkpointing=False, compile=True)
model_cfg = FusedVLMConfig(vit=vit.cfg, llm=llm.cfg, fused_layers=cfg.fused_layers, fused_heads=cfg.fused_heads,
                           fused_mlp=cfg.fused_mlp, fused_vocab_size=len(token_space.clip),
                           bridge_init_std=cfg.bridge_init_std, compressor=cfg.compressor)
raw_model = FusedVLM(model_cfg, llm=llm)
raw_model.vision.vit = vit  # after the random init, so the other parts draw as they always did
del vit, llm
if cfg.resume:
    resumed, resumed_meta = read_resumable(ckpt_path, "gen", model_cfg, cfg,
                                           ("seed", "batch_size", "grad_accum", "data_fraction"), world_size, log)
    load_trainable(raw_model, trained_weights(resumed), ckpt_path)
elif cfg.init_from:
    init_from(raw_model, cfg.init_from, log)
# every rank loads the same LLM from llama_path: no 13 GB broadcast at start
model = distribute(raw_model, run, cfg, frozen=raw_model.llm)
trainable = [p for p in raw_model.parameters() if p.requires_grad]
log(f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters, "
    f"{sum(p.numel() for p in raw_model.llm.parameters()) / 1e6:.2f}M frozen in the LLM"
    f"{f', all sharded over {world_size} processes' if cfg.fsdp else ''}")

optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (0.9, 0.999), device.type)
start_step = (restore_training_state(ckpt_path, resumed, resumed_meta, raw_model, optimizer, run.rank, device, log)
              if cfg.resume else 0)


def save(step):
    meta = checkpoint_meta("gen", step, steps_per_epoch, world_size, cfg, model_cfg, token_space, max_iters=max_iters,
                           wandb_run_id=run.wandb_id)
    save_training_checkpoint(ckpt_path, raw_model, raw_model.trainable_state_dict(), optimizer, meta, device, log)


def train_step(micro_batches, step_log):
    """The loss normalised by the whole step's supervised tokens (see the docstring), backward, clip, AdamW."""
    loss_sum, n_labels, grad_norm = answer_loss_step(model, micro_batches, optimizer, trainable, cfg.grad_clip,
                                                     world_size, device, run.autocast, step_log)
    return loss_sum, n_labels.item(), grad_norm


# -----------------------------------------------------------------------------
# validation


def images_rolled(batch):
    """The batch with sample b's crops replaced by sample (b + 1) % B's: every conversation sees another image."""
    B = len(batch["fused_ids"])
    crops = [batch["pixel_values"][batch["crop_to_sample"] == (b + 1) % B] for b in range(B)]
    return dict(batch, pixel_values=torch.cat(crops),
                crop_to_sample=torch.arange(B).repeat_interleave(torch.tensor([len(c) for c in crops])))


def answer_loss(module, batch):
    """-> (a validation batch's answer-loss sum, its supervised tokens): summed over the set, a token mean."""
    n = supervised_tokens(batch)
    with run.autocast:
        _, loss_sum = module({k: v.to(device, non_blocking=True) for k, v in batch.items()})
    return loss_sum, n


def validate(step):
    t_val = time.time()
    record = {"step": step, "val_loss": val_mean(raw_model, val_set, run, cfg, answer_loss),
              "val_loss_images_rolled": val_mean(raw_model, val_set, run, cfg,
                                                 lambda module, batch: answer_loss(module, images_rolled(batch)))}
    log(f"step {step} | val loss {record['val_loss']:.5f} | with the images rolled in each batch "
        f"{record['val_loss_images_rolled']:.5f} | {len(val_set)} samples in {time.time() - t_val:.1f} s")
    return record


# -----------------------------------------------------------------------------
train(run, cfg, raw_model, dataset, val_set, steps_per_epoch, start_step, max_iters, optimizer, train_step, validate,
      save)
