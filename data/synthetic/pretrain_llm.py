"""
Stage 0 of the tiny reproduction: pre-train the tiny random Llama as a language model on the synthetic world's text,
so the frozen LLM of stages 1-3 knows the language. The paper freezes a pre-trained Llama-2; a frozen random LLM
cannot answer anything, whatever vision tokens it is given.

    python data/synthetic/pretrain_llm.py --data_dir=data/synthetic/out --out_dir=data/synthetic/out/llama-lm

Text: every training conversation laid out exactly as fusion.py lays out the LLM sequence of stage 2 (Llama-2 chat
template with the system prompt, each piece tokenized on its own, questions and answers), with the scene described in
words where stage 2 puts the n_l vision slots, and no slots in later turns:

    <s>[INST] <<SYS>>...<</SYS>> | The grid has 4 rows and 5 columns and the label reads KX7. Row 1: ... | {Q1} [/INST] {A1} </s>...

So the LLM learns what Llama-2 brings to the paper: the chat format, the answer formats, the answers' prior, and (a
little, at the default budget: val answer loss 0.656 nats with the scene described, 0.703 without) how to take an
answer from what its context says. It never sees an image or a vision token: from the bridge's outputs it can answer
only once stages 1-3 teach the vision side to say, in its embedding space, what the description says in words.
The loss is on the answer tokens only (as in stage 2); the description, questions and template are context.

The descriptions are not in train.jsonl: they are rebuilt by replaying prepare.py's random stream (each scene is
drawn, then its conversation), and every replayed conversation must equal the JSONL's, or this stops.

Output: a Hugging Face folder (config.json, model.safetensors with HF key names, tokenizer.model) that
Llama.from_hf and transformers' LlamaForCausalLM both load.
"""
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import parse_config  # noqa: E402
from fusion import IGNORE, BadSample, TokenSpace, TokenSpaceConfig, parse_record  # noqa: E402
from model import Llama, configure_optimizer, cosine_lr  # noqa: E402
from prepare import conversation, description, random_scene  # noqa: E402  (this folder's prepare.py)


@dataclass
class Config:
    data_dir: str = "data/synthetic/out"  # train.jsonl, val.jsonl and clip/ (fusion.py's TokenSpace wants its BPE)
    llama_path: str = "data/synthetic/out/llama"  # the random start: config.json, model.safetensors, tokenizer.model
    out_dir: str = "data/synthetic/out/llama-lm"
    max_iters: int = 300
    batch_size: int = 32  # conversations per step
    max_seq_len: int = 512  # longer conversations are cut (a language model needs no whole turns)
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_interval: int = 50
    seed: int = 0  # init order and batches
    data_seed: int = 0  # prepare.py's --seed, to replay its scenes


def read_conversations(path, split, token_space, data_seed, with_scene=True):
    """JSONL -> (ids, labels) per conversation: stage 2's LLM layout with the scene description (with_scene) in place
    of the first turn's slots and no slots in later turns; labels as fusion.py's (answer tokens and their </s>, not
    shifted, IGNORE elsewhere)."""
    rng = random.Random(f"{data_seed}-{split}")  # prepare.py's stream for this split
    texts = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                _, turns = parse_record(line)
            except BadSample as e:
                raise ValueError(f"{path}, line {line_number}: {e}") from None
            scene = random_scene(rng)
            messages = conversation(scene, rng)
            if [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)] != turns:
                raise ValueError(f"{path}, line {line_number}: replaying prepare.py (seed {data_seed}) gives another "
                                 f"conversation: was the data made with another --seed or another prepare.py?")
            ids, labels = [], []
            for index, (question, answer) in enumerate(turns):
                turn_ids, slots, turn_labels = token_space.llm_turn(index, question, answer)
                at = slots.index(True)  # the first turn's one slot becomes the description; later turns' are dropped
                scene_ids = token_space.sp.encode(description(scene)) if index == 0 and with_scene else []
                ids += turn_ids[:at] + scene_ids + turn_ids[at + 1:]
                labels += turn_labels[:at] + [IGNORE] * len(scene_ids) + turn_labels[at + 1:]
            texts.append((ids, labels))
    return texts


def batch_of(texts, max_seq_len):
    """-> input ids (B, L) right-padded, targets (B, L): the next token's label, IGNORE at the padding."""
    L = min(max(len(ids) for ids, _ in texts) - 1, max_seq_len)
    inputs = torch.zeros(len(texts), L, dtype=torch.long)
    targets = torch.full((len(texts), L), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(texts):
        n = min(len(ids) - 1, L)
        inputs[b, :n] = torch.tensor(ids[:n])
        targets[b, :n] = torch.tensor(labels[1:n + 1])
    return inputs, targets


def epoch_batches(lengths, batch_size, generator, pool=16):
    """One epoch of batches in random order, each of conversations of similar length (less padding): a random
    permutation is cut into pools of `pool` batches and each pool is sorted by length before it is split."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), pool * batch_size):
        chunk = sorted(order[start:start + pool * batch_size], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


@torch.no_grad()
def answer_loss(llm, texts, cfg):
    """Mean next-token loss over the answer tokens."""
    total, count = 0.0, 0
    for i in range(0, len(texts), cfg.batch_size):
        inputs, targets = batch_of(texts[i:i + cfg.batch_size], cfg.max_seq_len)
        total += F.cross_entropy(llm(input_ids=inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                                 reduction="sum").item()
        count += int((targets != IGNORE).sum())
    return total / count


def save_hf(llm, source, out_dir):
    """config.json (untied: the two tables trained apart), model.safetensors under HF names, tokenizer.model."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(source, "config.json")) as f:
        config = json.load(f)
    config["tie_word_embeddings"] = False
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    names = llm.hf_names()
    tensors = {names[k]: v.contiguous() for k, v in llm.state_dict().items()}
    path = os.path.join(out_dir, "model.safetensors")
    save_file(tensors, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    shutil.copyfile(os.path.join(source, "tokenizer.model"), os.path.join(out_dir, "tokenizer.model"))


def main(cfg):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    token_space = TokenSpace(TokenSpaceConfig(clip_path=os.path.join(cfg.data_dir, "clip"), llama_path=cfg.llama_path,
                                              n_l=1, n_s=1))  # one slot: where the description goes
    train = read_conversations(os.path.join(cfg.data_dir, "train.jsonl"), "train", token_space, cfg.data_seed)
    val_path = os.path.join(cfg.data_dir, "val.jsonl")
    val = read_conversations(val_path, "val", token_space, cfg.data_seed)
    val_blind = read_conversations(val_path, "val", token_space, cfg.data_seed, with_scene=False)
    llm = Llama.from_hf(cfg.llama_path)
    llm.train()
    optimizer = configure_optimizer(llm, cfg.lr, cfg.weight_decay, (0.9, 0.95), "cpu")
    print(f"{len(train)} train / {len(val)} val conversations, {sum(len(ids) for ids, _ in train)} train tokens, "
          f"{sum(sum(t != IGNORE for t in labels) for _, labels in train)} of them answer tokens; "
          f"{sum(p.numel() for p in llm.parameters()) / 1e6:.2f}M parameters")
    generator = torch.Generator().manual_seed(cfg.seed)
    batches, t_log = [], time.time()
    for step in range(cfg.max_iters):
        if not batches:
            batches = epoch_batches([len(ids) for ids, _ in train], cfg.batch_size, generator)
        inputs, targets = batch_of([train[i] for i in batches.pop()], cfg.max_seq_len)
        lr = cosine_lr(step, cfg.max_iters, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(llm(input_ids=inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            dt = (time.time() - t_log) / (step % cfg.log_interval + 1)
            print(f"step {step + 1}/{cfg.max_iters} | loss {loss.item():.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
                  f"{inputs.numel() / dt:.0f} tok/s")
            t_log = time.time()
    llm.eval()
    # how much of the answers the LLM reads from its context: the gap is what the vision tokens can give it
    print(f"val answer loss {answer_loss(llm, val, cfg):.3f} with the scene described, "
          f"{answer_loss(llm, val_blind, cfg):.3f} without")
    save_hf(llm, cfg.llama_path, cfg.out_dir)
    print(f"saved {cfg.out_dir} in {time.time() - t0:.1f} s total")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional:
        sys.exit(f"unexpected arguments {positional}; use --key=value")
    print(json.dumps(asdict(config)))
    main(config)
