"""
Stage 0 of the tiny reproduction: pre-train the tiny random Llama to answer from a scene written in words, so that
the LLM frozen in stages 1-3 can read its context, as Llama-2 can in the paper. A frozen LLM that cannot take an
answer from its context gives the vision tokens nothing to say: every answer falls back to the answers' prior.

    python data/synthetic/pretrain_llm.py --data_dir=data/synthetic/out --out_dir=data/synthetic/out/llama-lm

Text: fresh conversations of prepare.py's world every batch (a new random scene for each; no data set to memorise),
laid out exactly as fusion.py lays out the LLM sequence of stage 2 (Llama-2 chat template with the system prompt,
each piece tokenized on its own), with the scene in words where stage 2 puts the n_l vision slots and no slots in
later turns:

    <s>[INST] <<SYS>>...<</SYS>> | E red F empty G blue ... V green | {Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] ...

In half the conversations only a random 1-16 of the cells are listed (and the questions ask about listed cells only),
so the LLM learns to read short and partial descriptions too: at small n_l the vision tokens can say only part of
the scene. The loss is on the answer tokens and their </s> only (as in stage 2); the rest is context.

The gate: greedy answers to n_eval fresh single-turn questions (cell, check, row; the formats of the benchmarks), with
the whole scene listed and with none of it. The LLM reads its context when its cell and row answers (copying
colours from the context) are far more often right with the scene than without (the answers' prior). Check
questions ("Is cell F red?" -> "F red Yes") also need a comparison, which this LLM learns far less well (45-58% in
our runs, chance 50%): they are reported, not gated. The last line printed is that measurement as JSON, for reproduce_tiny.sh's gate.

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
from fusion import IGNORE, TokenSpace, TokenSpaceConfig  # noqa: E402
from model import Llama  # noqa: E402
from training import configure_optimizer, cosine_lr  # noqa: E402
from prepare import conversation, random_scene, scene_words, training_turn  # noqa: E402


@dataclass
class Config:
    data_dir: str = "data/synthetic/out"  # clip/ (fusion.py's TokenSpace wants its BPE files)
    llama_path: str = "data/synthetic/out/llama"  # the random start: config.json, model.safetensors, tokenizer.model
    out_dir: str = "data/synthetic/out/llama-lm"
    max_iters: int = 2000
    batch_size: int = 64  # conversations per step, each on a fresh scene
    lr: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_interval: int = 100
    seed: int = 0  # init, the training stream; the gate's questions come from their own stream
    n_eval: int = 300  # gate questions (a third each of cell, check, row)


GATE_CATEGORIES = ("cell", "check", "row")
LOOKUPS = ("cell", "row")  # copying cells' colours from the context; check questions also compare, reported apart


def layout(token_space, messages, scene_text):
    """(ids, labels): stage 2's LLM sequence with scene_text's tokens in place of the first turn's slots and no
    slots in later turns; labels as fusion.py's (answer tokens and their </s>, not shifted, IGNORE elsewhere).
    An assistant message of None ends the sequence after [/INST] (a generation prompt)."""
    scene_ids = token_space.sp.encode(scene_text) if scene_text else []
    ids, labels = [], []
    for index in range(0, len(messages), 2):
        turn_ids, slots, turn_labels = token_space.llm_turn(index // 2, messages[index]["content"],
                                                            messages[index + 1]["content"])
        at, n = slots.index(True), sum(slots)
        inserted = scene_ids if index == 0 else []
        ids += turn_ids[:at] + inserted + turn_ids[at + n:]
        labels += turn_labels[:at] + [IGNORE] * len(inserted) + turn_labels[at + n:]
    return ids, labels


def training_example(token_space, rng):
    scene = random_scene(rng)
    cells = None if rng.random() < 0.5 else rng.sample(range(len(scene)), rng.randint(1, len(scene)))
    return layout(token_space, conversation(scene, rng, cells), scene_words(scene, cells))


def fresh_batches(token_space, rng, batch_size, pool=8):
    """Endless batches of fresh examples; each pool of `pool` batches is sorted by length before it is cut, so a
    batch holds conversations of similar length (a third of the padding), then the pool's batches are shuffled."""
    while True:
        examples = sorted((training_example(token_space, rng) for _ in range(pool * batch_size)), key=lambda e: len(e[0]))
        batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(batches)
        yield from batches


def batch_of(examples):
    """-> input ids (B, L) right-padded, targets (B, L): the next token's label, IGNORE at the padding."""
    L = max(len(ids) for ids, _ in examples) - 1
    inputs = torch.zeros(len(examples), L, dtype=torch.long)
    targets = torch.full((len(examples), L), IGNORE, dtype=torch.long)
    for b, (ids, labels) in enumerate(examples):
        inputs[b, :len(ids) - 1] = torch.tensor(ids[:-1])
        targets[b, :len(ids) - 1] = torch.tensor(labels[1:])
    return inputs, targets


def gate_questions(n, seed):
    """n fresh (scene, category, question, answer), the categories in rotation, in the training formats."""
    rng = random.Random(f"{seed}-gate")
    questions = []
    for i in range(n):
        scene, category = random_scene(rng), GATE_CATEGORIES[i % len(GATE_CATEGORIES)]
        question, answer = training_turn(scene, category, rng)
        questions.append((scene, category, question, answer))
    return questions


@torch.no_grad()
def exact_match(llm, token_space, questions, with_scene, batch_size=50):
    """Greedy answers against the canonical ones -> {category: fraction right, "lookups": cell and row questions
    together (what the gate judges), "all": every question}."""
    right = {c: [] for c in GATE_CATEGORIES}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [layout(token_space, [{"content": q}, {"content": None}], scene_words(s) if with_scene else "")[0]
                   for s, _, q, _ in chunk]
        L = max(map(len, prompts))
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for b, p in enumerate(prompts):  # left-padded, as generate() expects
            ids[b, L - len(p):], mask[b, L - len(p):] = torch.tensor(p), True
        longest = max(len(token_space.sp.encode(answer + " ")) for *_, answer in chunk)
        out = llm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=longest + 1, eos_token_id=token_space.eos)
        for row, (_, category, _, answer) in zip(out.tolist(), chunk):
            row = row[:row.index(token_space.eos)] if token_space.eos in row else row
            right[category].append(token_space.sp.decode(row).strip() == answer)
    scores = {c: sum(r) / len(r) for c, r in right.items()}
    scores["lookups"] = sum(sum(right[c]) for c in LOOKUPS) / sum(len(right[c]) for c in LOOKUPS)
    scores["all"] = sum(map(sum, right.values())) / len(questions)
    return scores


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
                                              n_l=1, n_s=1))
    llm = Llama.from_hf(cfg.llama_path)
    llm.train()
    optimizer = configure_optimizer(llm, cfg.lr, cfg.weight_decay, (0.9, 0.95), "cpu")
    print(f"{sum(p.numel() for p in llm.parameters()) / 1e6:.2f}M parameters; {cfg.max_iters} steps of "
          f"{cfg.batch_size} fresh conversations")
    rng = random.Random(f"{cfg.seed}-train")
    batches = fresh_batches(token_space, rng, cfg.batch_size)
    t_log, answer_tokens = time.time(), 0
    for step in range(cfg.max_iters):
        inputs, targets = batch_of(next(batches))
        lr = cosine_lr(step, cfg.max_iters, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(llm(input_ids=inputs).flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        answer_tokens += int((targets != IGNORE).sum())
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            dt = (time.time() - t_log) / (step % cfg.log_interval + 1)
            print(f"step {step + 1}/{cfg.max_iters} | answer loss {loss.item():.4f} | lr {lr:.2e} | "
                  f"{dt * 1000:.0f} ms/step | {inputs.numel() / dt:.0f} tok/s")
            t_log = time.time()
    print(f"trained in {time.time() - t0:.1f} s on {answer_tokens} answer tokens")
    llm.eval()
    questions = gate_questions(cfg.n_eval, cfg.seed)
    gate = {"with_scene": exact_match(llm, token_space, questions, True),
            "without_scene": exact_match(llm, token_space, questions, False)}
    for name, scores in gate.items():
        print(f"exact match {name.replace('_', ' ')}: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in scores.items()))
    save_hf(llm, cfg.llama_path, cfg.out_dir)
    print(f"saved {cfg.out_dir} in {time.time() - t0:.1f} s total")
    print(json.dumps(gate))


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional:
        sys.exit(f"unexpected arguments {positional}; use --key=value")
    print(json.dumps(asdict(config)))
    main(config)
