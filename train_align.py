"""
Stage 1: the fused model learns to read before stage 2 puts the LLM behind it; objective=contrastive is the paper's
alignment of its question tokens with the CLIP text encoder, objective=answers a classification of short answers.

    python train_align.py config/tiny.py                                        # CPU, seconds
    torchrun --standalone --nproc_per_node=8 train_align.py config/paper_align.py

Trains the CLIP vision trunk, the merge conv, the fused model (random init), the CLIP text tower (positions
extended to text_max_positions) and the alignment head. For a micro-batch with A question-answer turns:

    loss = symmetric InfoNCE(questions (A, P), answers (A, P)) + eye_weight * MSE(F F^T, I)

questions: each question's EOS output through the alignment head; answers: the CLIP text embedding of the turn's
answer, with entries outside mean +- text_outlier_sigma * std of the micro-batch tensor zeroed (the reference
code does this); both L2-normalised. F (N_out, D): every fused output of the micro-batch, L2-normalised.

Negatives are the other turns of the same micro-batch (gather_negatives=True: of the micro-batches that all ranks
run at the same micro-step; the eye term and the outlier statistics stay per rank). When gathering, every rank
computes the same global contrastive loss; the gather's backward sends each row's gradient from all world_size
copies back to its owner, and DDP's mean over ranks divides by world_size again, so the step's gradient is exactly
that of the global loss, logit scale included (open_clip's gather_with_grad).
So gradient accumulation is not a bigger contrastive batch: a step averages the losses of grad_accum x world_size
micro-batches of batch_size conversations each, and batch_size (x world_size when gathering) sets how many
negatives a turn sees. Micro-batch j of a step goes to rank j % world_size, so one process with grad_accum=2A
trains exactly like two with grad_accum=A.

fsdp=True (torchrun) shards the model, its gradients and AdamW state over the ranks, block by block (training.py);
the logit scale, a scalar fully_shard cannot cut, stays whole on every rank and its gradient is averaged by hand,
as DDP would. val_file: every eval_interval steps and at the end, the loss above on every validation batch of
batch_size conversations in file order (negatives from the same batch, never gathered), averaged over the batches.

objective=answers (model.AnswerModel): the first question's EOS output goes through a linear head over the training
file's answers that occur at least answer_min_count times (the classic VQA answer classifier); loss = cross-entropy,
the mean over the classified turns of the whole step (counted on all ranks first, as train_gen.py counts answer
tokens). A first turn with another answer gets no loss, and so does every later turn: the first question's n_l
outputs are what a sweep varies, and classifying later questions too slowed the learning (in the miniature,
validation loss after 1500 steps: 0.80 with first turns only, 1.71 with every turn even at a higher learning rate).
The vision tower is frozen (as clip_path or init_from holds it); there is no text tower. Why it exists: the
contrastive loss cannot teach one-word answers (a micro-batch of them holds the same answer many times, each the
others' negative); results/tiny/README.md measures both. n_l_mix: each conversation is read at one of these n_l
(drawn once per line, fusion.ConversationDataset's mix), so that the EOS output carries the answer at every n_l a
later sweep uses; empty: n_l for all. init_from: a stage-1 checkpoint's vision tower and fused model start the run
(the miniature runs the contrastive objective first: the answers objective on stage 0's CLIP alone stayed at chance).
"""
import collections
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F

from backbones import CLIPText, ViT
from checkpoint import (checkpoint_meta, load_trainable, read_resumable, restore_training_state,
                        save_training_checkpoint, stage1_init_from, trained_weights)
from configurator import InputError, report_input_errors
from fusion import TokenSpace, TokenSpaceConfig, parse_record
from model import AlignModel, AnswerModel, FusedVLMConfig
from training import (all_reduce, answer_loss_step, clip_gradients, configure_optimizer, distribute, epoch_steps,
                      gradient_sync, read_config, read_datasets, start_training, stop_if_diverged, train, val_mean)


@dataclass
class Config:
    # I/O
    out_dir: str = "out/align"
    data_dir: str = "data/llava/out"  # holds train_file; the image paths in it are relative to data_dir
    train_file: str = "train.jsonl"
    clip_path: str = "weights/CLIP-ViT-H-14-laion2B-s32B-b79K"  # vision trunk, text tower, BPE vocabulary
    llama_path: str = "weights/Llama-2-7b-chat-hf"  # only its tokenizer: the LLM layout decides what fits
    init_from: str = ""  # a stage-1 checkpoint whose vision tower and fused model start this run; empty: clip_path's
    skip_bad: bool = False  # count and skip malformed JSONL lines instead of stopping at the first
    resume: bool = False  # continue out_dir/ckpt.safetensors exactly
    stop_at_step: int = 0  # end this run early (with a checkpoint) at this step, e.g. for a job time limit
    val_file: str = ""  # in data_dir, like train_file; empty: no validation loss
    eval_interval: int = 200  # steps between validation losses (and one at the end)
    log_interval: int = 10
    ckpt_interval: int = 200
    seed: int = 1337  # model init and the data order
    num_workers: int = 4
    wandb_log: bool = False  # also log metrics.jsonl's records to Weights & Biases (pip install wandb)
    wandb_project: str = "tokenspace"
    wandb_run_name: str = ""  # "" = out_dir's name
    # token space (fusion.py)
    image_size: int = 336
    num_crops: int = 16
    n_l: int = 256
    n_s: int = 8
    n_l_mix: tuple = ()  # e.g. (1, 2, 4, 8, 16): each conversation at one of these n_l (n_s capped at it); () = n_l
    max_seq_len: int = 4096
    chat_template: str = "llama-2"  # the LLM layout that decides what fits max_seq_len (chat.CHAT_TEMPLATES)
    # model
    fused_layers: int = 12
    fused_heads: int = 20
    fused_mlp: int = 5120
    text_max_positions: int = 512
    # loss
    objective: str = "contrastive"  # contrastive (the paper's) | answers (see the docstring)
    answer_min_count: int = 20  # answers: an answer is a class when the training file holds it this often
    eye_weight: float = 1.0
    text_outlier_sigma: float = 1.0  # 0 disables
    gather_negatives: bool = False
    # optimisation
    batch_size: int = 32  # conversations per micro-batch per process
    grad_accum: int = 1
    max_iters: int = 1000
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables
    # system
    dtype: str = "bfloat16"  # autocast dtype on GPU ("bfloat16" or "float32"); CPU always runs float32
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP2)
    compile: bool = False  # torch.compile each ViT and fused-model block
    activation_checkpointing: bool = False  # recompute each ViT, fused and text block in the backward


report_input_errors()
cfg = read_config(Config(), sys.argv[1:], "train_align.py")
if cfg.objective not in ("contrastive", "answers"):
    raise InputError(f"objective must be contrastive or answers, got {cfg.objective!r}")
if any(not isinstance(n, int) or n < 1 for n in cfg.n_l_mix):
    raise InputError(f"n_l_mix must hold n_l values >= 1, e.g. (1, 4, 16), got {cfg.n_l_mix}")
run, train_path, val_path, ckpt_path = start_training(
    cfg, "download the LLM's folder with its tokenizer.model or tokenizer.json, e.g. meta-llama/Llama-2-7b-chat-hf, "
         "and put it there",
    more_inputs=[("init_from", cfg.init_from, "train the earlier stage-1 run first: this is the ckpt.safetensors in "
                                              "its out_dir")] if cfg.init_from and not cfg.resume else [])
device, world_size, log = run.device, run.world_size, run.log

# -----------------------------------------------------------------------------
# data: fusion.step_batches cuts a seeded permutation per epoch into steps of global_batch conversations, the same
# micro-batches for any split into ranks x accumulation.
token_space = TokenSpace(TokenSpaceConfig(clip_path=cfg.clip_path, llama_path=cfg.llama_path, image_size=cfg.image_size,
                                          num_crops=cfg.num_crops, n_l=cfg.n_l, n_s=cfg.n_s, max_seq_len=cfg.max_seq_len,
                                          max_answer_tokens=cfg.text_max_positions, chat_template=cfg.chat_template))
mix = [(token_space.replaced(n_l=n, n_s=min(n, cfg.n_s)), 1 / len(cfg.n_l_mix)) for n in cfg.n_l_mix]
dataset, val_set = read_datasets(cfg, token_space, train_path, val_path, log, mix=mix)
steps_per_epoch = epoch_steps(len(dataset), cfg.batch_size, cfg.grad_accum, world_size, log)



def answer_classes(dataset, min_count):
    """objective=answers: {an answer's CLIP ids, as a sample's answer row holds them: class}, the answers of the
    dataset's kept turns that occur at least min_count times, the most frequent first."""
    counts = collections.Counter()
    with open(dataset.path, "rb") as f:
        for offset, kept in zip(dataset.offsets, dataset.turns_kept):
            f.seek(int(offset))
            counts.update(answer for _, answer in parse_record(f.readline())[1][:kept])
    classes = [answer for answer, n in counts.most_common() if n >= min_count]
    if not classes:
        raise InputError(f"{dataset.path}: no answer occurs {min_count} times or more (objective=answers classifies "
                         f"the frequent ones; lower answer_min_count)")
    log(f"objective=answers: {len(classes)} answers occur >= {min_count} times; they cover "
        f"{sum(counts[a] for a in classes)} of {sum(counts.values())} turns (most frequent: {classes[:5]})")
    limit = cfg.text_max_positions - 1  # make_sample's truncation of an answer row
    return {tuple(token_space.clip_ids(a)[:limit] + [token_space.clip_eos]): i for i, a in enumerate(classes)}


# -----------------------------------------------------------------------------
# model: CLIP's vision trunk (and for objective=contrastive its text tower) from clip_path, the rest random.
vit = ViT.from_hf(cfg.clip_path, image_size=cfg.image_size)
if cfg.objective == "answers":
    classes = answer_classes(dataset, cfg.answer_min_count)
    model_cfg = FusedVLMConfig(vit=vit.cfg, fused_layers=cfg.fused_layers, fused_heads=cfg.fused_heads,
                               fused_mlp=cfg.fused_mlp, fused_vocab_size=len(token_space.clip))
    raw_model = AnswerModel(model_cfg, len(classes))
    raw_model.vision.vit = vit
    raw_model.vision.requires_grad_(False)
else:
    text = CLIPText.from_hf(cfg.clip_path, max_positions=cfg.text_max_positions)
    if text.cfg.eos_token_id != token_space.clip_eos:  # the tower pools at its config's EOS id, the answer rows end in it
        raise InputError(f"{cfg.clip_path}/config.json: text eos_token_id {text.cfg.eos_token_id} is not the "
                         f"tokenizer's <|endoftext|> id {token_space.clip_eos}: the text tower would pool at the wrong "
                         f"token")
    model_cfg = FusedVLMConfig(vit=vit.cfg, text=text.cfg, fused_layers=cfg.fused_layers, fused_heads=cfg.fused_heads,
                               fused_mlp=cfg.fused_mlp, fused_vocab_size=len(token_space.clip))
    raw_model = AlignModel(model_cfg)
    raw_model.vision.vit, raw_model.text = vit, text  # after the random init, so the other parts draw as they always did
    del text
del vit
if cfg.resume:
    resumed, resumed_meta = read_resumable(ckpt_path, "align", model_cfg, cfg, ("seed", "batch_size", "grad_accum"),
                                           world_size, log)
    load_trainable(raw_model, trained_weights(resumed), ckpt_path)
elif cfg.init_from:
    stage1_init_from(raw_model, cfg.init_from, log)
model = distribute(raw_model, run, cfg, whole=[raw_model.logit_scale] if cfg.objective == "contrastive" else [])
trainable = [p for p in raw_model.parameters() if p.requires_grad]
log(f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters"
    f"{f', sharded over {world_size} processes' if cfg.fsdp else ''}")

optimizer = configure_optimizer(raw_model, cfg.lr, cfg.weight_decay, (0.9, 0.999), device.type)
start_step = (restore_training_state(ckpt_path, resumed, resumed_meta, raw_model, optimizer, run.rank, device, log)
              if cfg.resume else 0)


def save(step):
    meta = checkpoint_meta("align", step, steps_per_epoch, world_size, cfg, model_cfg, token_space,
                           wandb_run_id=run.wandb_id)
    save_training_checkpoint(ckpt_path, raw_model, raw_model.state_dict(), optimizer, meta, device, log)


# -----------------------------------------------------------------------------
# loss


def gather_rows(x):
    """(n_r, P) on every rank, n_r may differ -> (sum n_r, P) in rank order. Differentiable: the backward sums the
    gradients that every rank's copy of the loss sends to a row back into the rank that owns it."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    sizes = [int(s) for s in sizes]
    parts = dist_nn.all_gather(F.pad(x, (0, 0, 0, max(sizes) - len(x))))
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def align_loss(questions, answers, fused, logit_scale, gather=cfg.gather_negatives):
    """-> (contrastive, eye) for one micro-batch; see the docstring at the top."""
    questions, answers, fused = questions.float(), answers.float(), fused.float()
    if cfg.text_outlier_sigma > 0:
        mean, std = answers.mean(), answers.std()
        answers = torch.where((answers - mean).abs() <= cfg.text_outlier_sigma * std, answers, 0.0)
    q, a = F.normalize(questions, dim=-1), F.normalize(answers, dim=-1)
    if gather:
        q, a = gather_rows(q), gather_rows(a)
    logits = logit_scale.exp() * q @ a.T  # (A, A): row i's positive is column i
    targets = torch.arange(len(q), device=q.device)
    contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    f = F.normalize(fused, dim=-1)
    eye = F.mse_loss(f @ f.T, torch.eye(len(f), device=f.device))
    return contrastive, eye


def answer_targets(batch):
    """(A,) each turn's answer class (AnswerModel's batch["answer_class"]); -1 for an answer that is not one, and for
    every turn after a conversation's first (see the docstring at the top)."""
    rows = [tuple(ids[mask].tolist()) for ids, mask in zip(batch["answer_ids"], batch["answer_attention_mask"])]
    targets = torch.tensor([classes.get(row, -1) for row in rows], dtype=torch.long)
    questions = (batch["output_mask"] & ~batch["query_mask"]).sum(-1)  # (B,): one EOS a question
    first = torch.zeros(len(targets), dtype=torch.bool)
    first[questions.cumsum(0) - questions] = True  # the answers are flattened sample by sample, turn by turn
    return targets.masked_fill(~first, -1)


def classified(batch):
    return int((batch["answer_class"] >= 0).sum())


def answers_step(micro_batches, step_log):
    """objective=answers: the cross-entropy mean over the step's classified turns on all ranks, by train_gen.py's
    arithmetic (training.answer_loss_step, counting classified turns instead of answer tokens)."""
    for batch in micro_batches:
        batch["answer_class"] = answer_targets(batch)
    loss_sum, n_classified, grad_norm = answer_loss_step(model, micro_batches, optimizer, trainable, cfg.grad_clip,
                                                         world_size, device, run.autocast, step_log, count=classified)
    return loss_sum, n_classified.item(), grad_norm


def contrastive_step(micro_batches, step_log):
    """One optimizer step: the micro-batches' mean loss (see the docstring at the top), backward, clip, AdamW, the
    logit scale clamped. -> (the loss sum, its divisor, the gradient norm before clipping)."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for micro_step, batch in enumerate(micro_batches):
        step_log.count(batch)
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with gradient_sync(model, last_micro_step=micro_step == cfg.grad_accum - 1):
            with run.autocast:
                questions, answers, fused = model(batch)
            contrastive, eye = align_loss(questions, answers, fused, raw_model.logit_scale)
            ((contrastive + cfg.eye_weight * eye) / cfg.grad_accum).backward()
        loss_sum += (contrastive + cfg.eye_weight * eye).detach()
    if cfg.fsdp:  # the whole logit scale on every rank: average its gradient as DDP does
        all_reduce(raw_model.logit_scale.grad).div_(world_size)
    grad_norm = clip_gradients(list(raw_model.parameters()), cfg.grad_clip)
    stop_if_diverged(loss_sum, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        raw_model.logit_scale.clamp_(max=math.log(100))  # CLIP's cap on the temperature
    step_log.step_done()
    return loss_sum, cfg.grad_accum * world_size, grad_norm


def val_batch_loss(module, batch):
    """A validation batch's loss: contrastive with negatives from the same batch (never gathered) -> (loss, 1), a
    mean over batches; answers -> (cross-entropy sum, classified turns), a mean over turns."""
    answers = cfg.objective == "answers"
    if answers:
        batch["answer_class"] = answer_targets(batch)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with run.autocast:
        out = module(batch)
    if answers:
        return out[1], classified(batch)
    contrastive, eye = align_loss(*out, module.logit_scale, gather=False)
    return contrastive + cfg.eye_weight * eye, 1


def validate(step):
    t_val = time.time()
    record = {"step": step, "val_loss": val_mean(raw_model, val_set, run, cfg, val_batch_loss)}
    log(f"step {step} | val loss {record['val_loss']:.5f} | {len(val_set)} samples in {time.time() - t_val:.1f} s")
    return record


# -----------------------------------------------------------------------------
train(run, cfg, raw_model, dataset, val_set, steps_per_epoch, start_step, cfg.max_iters, optimizer,
      answers_step if cfg.objective == "answers" else contrastive_step, validate, save)
