"""
Stage 0 of the tiny reproduction: pre-train the tiny random Llama to answer from a scene told where the vision
tokens go (in words, or one compound position a cell), so that the LLM frozen in stages 1-3 can read its context, as
Llama-2 can in the paper. A frozen LLM that cannot take an answer from its context gives the vision tokens nothing
to say: every answer falls back to the answers' prior.

    python data/synthetic/pretrain_llm.py --data_dir=data/synthetic/out --out_dir=data/synthetic/out/llama-lm

Text: fresh conversations of prepare.py's world every batch (a new random scene for each; no data set to memorise),
laid out exactly as fusion.py lays out the LLM sequence of stage 2 (Llama-2 chat template with the system prompt,
each piece tokenized on its own), with the scene where stage 2 puts the n_l vision slots and no slots in later turns:

    <s>[INST] <<SYS>>...<</SYS>> | scene | {Q1} [/INST] {A1} </s><s>[INST] {Q2} [/INST] ...

The scene is told in one of two forms, half the conversations each:
  words      "E red F empty G blue ... V green", one token a piece;
  compound   one position a cell whose embedding is the sum of the letter's and the value's token embeddings, as a
             vision token carries a place and what is there at once. Attention can then match the question's letter
             with the position directly; with words alone the 2-layer LLM looked up 22-44% of cell questions after
             1000 steps, with compound scenes beside them 95-100% (in both forms).
In half the conversations only a random 1-16 of the cells are told (and the questions ask about those only), so the
LLM learns to read short and partial scenes too: at small n_l the vision tokens can say only part of the scene. The
loss is on the answer tokens and their </s> only (as in stage 2); the rest is context.

The gate: greedy answers to n_eval fresh single-turn questions (cell, row, grid in rotation; the benchmarks'
formats), the whole scene told in words, as compound positions, and not at all. The LLM reads its context when its
cell and row answers (copying values from the context) are far more often right with the scene than without (the
answers' prior); reproduce_tiny.sh gates on the compound form, the one vision tokens resemble. Grid answers (13-16
cells in a row, all of them right) are reported, not gated. The last line printed is that measurement as JSON.

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
from prepare import CELL_NAMES, ask, conversation, random_scene, scene_words  # noqa: E402


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
    n_eval: int = 300  # gate questions (a third each of cell, row, grid)


GATE_CATEGORIES = ("cell", "row", "grid")
LOOKUPS = ("cell", "row")  # copying cells' colours from the context: what the gate judges
SCENE_FORMS = ("words", "compound", "none")


def scene_pieces(token_space, scene, cells, form):
    """The scene where stage 2 puts the vision slots, as a list of positions, each a list of token ids whose
    embeddings are summed: "words" one piece a position (E red F empty ...), "compound" one position a cell
    (the letter's and the value's pieces summed, as one soft token can carry both), "none" nothing."""
    cells = range(len(scene)) if cells is None else sorted(cells)
    if form == "none":
        return []
    if form == "words":
        return [[t] for t in token_space.sp.encode(scene_words(scene, cells))]
    return [token_space.sp.encode(CELL_NAMES[i]) + token_space.sp.encode(scene[i]) for i in cells]


def layout(token_space, messages, scene_positions):
    """(positions, labels): stage 2's LLM sequence with scene_positions (scene_pieces' list) in place of the first
    turn's slots and no slots in later turns; each position a list of ids (summed embeddings); labels as
    fusion.py's (answer tokens and their </s>, not shifted, IGNORE elsewhere). An assistant message of None ends
    the sequence after [/INST] (a generation prompt)."""
    positions, labels = [], []
    for index in range(0, len(messages), 2):
        turn_ids, slots, turn_labels = token_space.llm_turn(index // 2, messages[index]["content"],
                                                            messages[index + 1]["content"])
        at, n = slots.index(True), sum(slots)
        inserted = scene_positions if index == 0 else []
        positions += [[t] for t in turn_ids[:at]] + inserted + [[t] for t in turn_ids[at + n:]]
        labels += turn_labels[:at] + [IGNORE] * len(inserted) + turn_labels[at + n:]
    return positions, labels


def training_example(token_space, rng):
    """A fresh scene, all of it or a random 1-16 of its cells told in words or as compound positions (half each)."""
    scene = random_scene(rng)
    cells = None if rng.random() < 0.5 else rng.sample(range(len(scene)), rng.randint(1, len(scene)))
    form = rng.choice(SCENE_FORMS[:2])
    return layout(token_space, conversation(scene, rng, cells), scene_pieces(token_space, scene, cells, form))


def fresh_batches(token_space, rng, batch_size, pool=8):
    """Endless batches of fresh examples; each pool of `pool` batches is sorted by length before it is cut, so a
    batch holds conversations of similar length (a third of the padding), then the pool's batches are shuffled."""
    while True:
        examples = sorted((training_example(token_space, rng) for _ in range(pool * batch_size)), key=lambda e: len(e[0]))
        batches = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        rng.shuffle(batches)
        yield from batches


def embed(llm, pieces, piece_mask):
    """(B, L, K) ids and their mask -> (B, L, D), the embeddings of each position's pieces summed."""
    return (llm.embed_tokens(pieces) * piece_mask[..., None]).sum(2)


def pieces_tensor(rows, side="right"):
    """Lists of positions (each a list of ids) -> pieces (B, L, K), piece mask (B, L, K), position mask (B, L)."""
    L, K = max(map(len, rows)), max(len(p) for row in rows for p in row)
    pieces = torch.zeros(len(rows), L, K, dtype=torch.long)
    piece_mask = torch.zeros(len(rows), L, K, dtype=torch.bool)
    real = torch.zeros(len(rows), L, dtype=torch.bool)
    for b, row in enumerate(rows):
        start = 0 if side == "right" else L - len(row)
        real[b, start:start + len(row)] = True
        for j, position in enumerate(row):
            pieces[b, start + j, :len(position)] = torch.tensor(position)
            piece_mask[b, start + j, :len(position)] = True
    return pieces, piece_mask, real


def batch_of(examples):
    """-> pieces, piece mask (B, L, K) right-padded, targets (B, L): the next token's label, IGNORE at the padding."""
    pieces, piece_mask, _ = pieces_tensor([positions[:-1] for positions, _ in examples])
    targets = torch.full(pieces.shape[:2], IGNORE, dtype=torch.long)
    for b, (_, labels) in enumerate(examples):
        targets[b, :len(labels) - 1] = torch.tensor(labels[1:])
    return pieces, piece_mask, targets


def gate_questions(n, seed):
    """n fresh (scene, category, question, answer), the categories in rotation, in the benchmarks' formats."""
    rng = random.Random(f"{seed}-gate")
    questions = []
    for i in range(n):
        scene, category = random_scene(rng), GATE_CATEGORIES[i % len(GATE_CATEGORIES)]
        question, answer = ask(scene, category, rng)
        questions.append((scene, category, question, answer))
    return questions


@torch.no_grad()
def exact_match(llm, token_space, questions, form, batch_size=50):
    """Greedy answers against the canonical ones, the whole scene told in `form` -> {category: fraction right,
    "lookups": cell and row questions together (what the gate judges), "all": every question}."""
    right = {c: [] for c in GATE_CATEGORIES}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        prompts = [layout(token_space, [{"content": q}, {"content": None}], scene_pieces(token_space, s, None, form))[0]
                   for s, _, q, _ in chunk]
        pieces, piece_mask, real = pieces_tensor(prompts, side="left")  # left-padded, as generate() expects
        longest = max(len(token_space.sp.encode(answer + " ")) for *_, answer in chunk)
        out = llm.generate(inputs_embeds=embed(llm, pieces, piece_mask), attention_mask=real,
                           max_new_tokens=longest + 1, eos_token_id=token_space.eos)
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
        pieces, piece_mask, targets = batch_of(next(batches))
        lr = cosine_lr(step, cfg.max_iters, cfg.lr, cfg.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = llm(inputs_embeds=embed(llm, pieces, piece_mask))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        answer_tokens += int((targets != IGNORE).sum())
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            dt = (time.time() - t_log) / (step % cfg.log_interval + 1)
            print(f"step {step + 1}/{cfg.max_iters} | answer loss {loss.item():.4f} | lr {lr:.2e} | "
                  f"{dt * 1000:.0f} ms/step | {targets.numel() / dt:.0f} tok/s")
            t_log = time.time()
    print(f"trained in {time.time() - t0:.1f} s on {answer_tokens} answer tokens")
    llm.eval()
    questions = gate_questions(cfg.n_eval, cfg.seed)
    gate = {f"{form}_scene": exact_match(llm, token_space, questions, form) for form in SCENE_FORMS}
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
