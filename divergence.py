"""
The paper's theory check (section 3): how far apart do two branches of a causal LM drift, and does
E[D(n)] follow lambda * sqrt(Upsilon(n))?

    python divergence.py --data=orca_rlhf.jsonl --llama_path=weights/llama-2-7b-chat   # Intel/orca_dpo_pairs
    python divergence.py --data=pairs.jsonl --llama_path=... --normalize=True          # our {prefix, a, b} rows

Two inputs share a prefix, then branch for n tokens (A, B); h_i^A, h_i^B are the hidden states of layer `layer`
(HF numbering: 0 = embeddings, -1 = after the final norm) at the branch tokens i = 1..n. For every n, over pairs:
  D(n)       = || sum_{i<=n} (h_i^A - h_i^B) ||                        mean and std (population, ddof 0)
  psi_eq(n)  = mean_{i<=n} cos(h_i^A, h_i^B)
  psi_AA(n)  = mean_{i!=j<=n} cos(h_i^A, h_j^A), averaged with the same for B
  psi_AB(n)  = mean_{i!=j<=n} cos(h_i^A, h_j^B)
  Upsilon(n) = n (1 - psi_eq) + n (n - 1) (psi_AA - psi_AB)           from the pair-averaged psi terms
  n_b(n)     = (1 - psi_eq) / (psi_AA - psi_AB) - 1                  the sqrt(n) -> n turn; compare with y = n
and lambda of lambda * sqrt(Upsilon(n)) fitted to mean D(n) by least squares (closed form).
For unit-norm states (--normalize=True) ||sum(u^A - u^B)||^2 = 2 Upsilon for every pair, so the run checks
mean D^2 = D_mean^2 + D_std^2 = 2 Upsilon and prints the deviation. The paper's D uses raw states (the default).

Input: JSONL (or parquet, when pyarrow is installed) with either our rows {"prefix", "a", "b"} (the prefix text
is used as written) or Intel/orca_dpo_pairs rows {"system", "question", "chosen", "rejected"} (A = chosen,
B = rejected; the prefix is turn 1 of the Llama-2 chat layout of fusion.py without the vision slots:
"[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n" | question | "[/INST]", just "[INST]" when system is empty).
Every sequence is bos + prefix + branch, each piece encoded on its own by the LLM's tokenizer (as fusion.py does), so
A and B branch at the same token. Both branches are cut to the shorter one, to n_max and to max_seq_len; a pair
adds to D(n) for each n it reaches (the `pairs` column).

Vision mode (--vision=True) runs a tokenspace FusedVLM instead: A and B are the fused vision tokens of two images
for the same question, written into the LLM's slots; the branches are the LLM hidden states at the slots and the
prefix is the system prompt before them.

Writes divergence.csv and divergence.png to out_dir.
"""
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from configurator import InputError, parse_config, report_input_errors
from chat import LLMTokenizer
from fusion import TokenSpace, TokenSpaceConfig, collate, load_image
from backbones import Llama
from checkpoint import load_checkpoint, trained_vlm, trained_weights
from model import FusedVLMConfig


@dataclass
class Config:
    out_dir: str = "out/divergence"
    data: str = ""          # JSONL/parquet of branch pairs (text mode) or of image pairs (vision mode)
    llama_path: str = ""    # the LLM's HF folder (chat.py reads its tokenizer.model or tokenizer.json)
    layer: int = -1         # hidden_states index, HF convention
    normalize: bool = False  # unit-normalise the states first (then D^2 = 2 Upsilon exactly)
    n_max: int = 512        # longest branch looked at
    max_seq_len: int = 4096  # prefix + branch; Llama-2's context
    max_pairs: int = 0      # 0 = every pair in the file
    batch_size: int = 4     # pairs per forward (2 sequences each)
    skip_bad: bool = False  # skip and list bad rows instead of stopping at the first
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: str = "bfloat16" if torch.cuda.is_available() else "float32"
    # vision mode: branch pairs are two images with one question, n_max is the LLM slot count n_l
    vision: bool = False
    ckpt: str = ""          # a tokenspace stage-2 checkpoint (its folder or ckpt.safetensors)
    clip_path: str = ""     # vision mode: CLIP tokenizer folder; "" = the checkpoint's (llama_path likewise)


CSV_COLUMNS = ["n", "D_mean", "D_std", "psi_eq", "psi_AA", "psi_AB", "upsilon", "n_b", "fit", "pairs"]
DELTA_EPS = 1e-9  # |psi_AA - psi_AB| below this leaves n_b undefined


# -----------------------------------------------------------------------------
# the statistics of one batch of pairs


def branch_statistics(h_a, h_b, lengths, normalize=False):
    """h_a, h_b (P, N, D) branch states, lengths (P,) -> dict of (P, N) float64 tensors over n = 1..N: D, psi_eq,
    psi_AA, psi_BB, psi_AB; NaN where n > the pair's length, and the cross terms at n = 1 (no i != j).
    normalize=True measures D on unit-normalised states (the cosines do not change)."""
    P, N, _ = h_a.shape
    valid = torch.arange(N, device=h_a.device) < lengths[:, None].to(h_a.device)  # (P, N)
    h_a = h_a.double() * valid[..., None]  # positions past a pair's end add nothing to any sum below
    h_b = h_b.double() * valid[..., None]
    if normalize:
        h_a, h_b = F.normalize(h_a, dim=-1), F.normalize(h_b, dim=-1)
    n = torch.arange(1, N + 1, dtype=torch.float64, device=h_a.device)
    u_a, u_b = F.normalize(h_a, dim=-1), F.normalize(h_b, dim=-1)
    cos_aa, cos_bb, cos_ab = u_a @ u_a.mT, u_b @ u_b.mT, u_a @ u_b.mT  # (P, N, N); cos_ab[i, j] = cos(a_i, b_j)

    def off_diagonal_mean(cos):  # mean over i != j <= n, for every n at once via 2-D cumulative sums
        block_sums = cos.cumsum(1).cumsum(2).diagonal(dim1=1, dim2=2)
        return (block_sums - cos.diagonal(dim1=1, dim2=2).cumsum(1)) / (n * (n - 1))

    stats = {
        "D": (h_a - h_b).cumsum(1).norm(dim=-1),
        "psi_eq": cos_ab.diagonal(dim1=1, dim2=2).cumsum(1) / n,
        "psi_AA": off_diagonal_mean(cos_aa),
        "psi_BB": off_diagonal_mean(cos_bb),
        "psi_AB": off_diagonal_mean(cos_ab),
    }
    return {k: torch.where(valid, v, math.nan) for k, v in stats.items()}


class Accumulator:
    """Per-n sums over pairs; a pair adds to every n up to its length."""

    def __init__(self, n_max):
        self.sums = {k: np.zeros(n_max) for k in ("count", "D", "D2", "psi_eq", "psi_AA", "psi_BB", "psi_AB")}

    def add(self, stats):
        valid = ~torch.isnan(stats["D"])
        N = valid.shape[1]
        self.sums["count"][:N] += valid.sum(0).cpu().numpy()
        self.sums["D2"][:N] += torch.where(valid, stats["D"] ** 2, 0).sum(0).cpu().numpy()
        for k in ("D", "psi_eq", "psi_AA", "psi_BB", "psi_AB"):
            self.sums[k][:N] += torch.nan_to_num(stats[k], nan=0.0).sum(0).cpu().numpy()

    def table(self):
        """-> dict of arrays over n = 1..(longest n any pair reached), the CSV columns without `fit`."""
        s = self.sums
        reached = np.flatnonzero(s["count"])
        N = int(reached[-1]) + 1 if len(reached) else 0
        count = s["count"][:N]
        n = np.arange(1, N + 1, dtype=float)
        mean = {k: s[k][:N] / count for k in s if k != "count"}
        psi_cross = 0.5 * (mean["psi_AA"] + mean["psi_BB"])
        psi_cross[:1] = mean["psi_AB"][:1] = np.nan  # no i != j at n = 1
        delta = psi_cross - mean["psi_AB"]
        upsilon = n * (1 - mean["psi_eq"]) + n * (n - 1) * np.nan_to_num(delta)  # n(n-1) = 0 at n = 1
        with np.errstate(divide="ignore", invalid="ignore"):
            n_b = np.where(np.abs(delta) > DELTA_EPS, (1 - mean["psi_eq"]) / delta - 1, np.nan)
        return {"n": n.astype(int), "D_mean": mean["D"], "D_std": np.sqrt(np.maximum(mean["D2"] - mean["D"] ** 2, 0)),
                "psi_eq": mean["psi_eq"], "psi_AA": psi_cross, "psi_AB": mean["psi_AB"], "upsilon": upsilon,
                "n_b": n_b, "pairs": count.astype(int)}


def fit_lambda(d_mean, upsilon):
    """Least squares of d_mean ~ lambda * sqrt(upsilon) -> (lambda, R^2 about the mean)."""
    x, y = np.sqrt(np.maximum(upsilon, 0)), d_mean
    if not (x @ x) > 0:  # identical branches: Upsilon and D are 0 everywhere, there is no scale to fit
        return math.nan, math.nan
    lam = float(x @ y / (x @ x))
    spread = ((y - y.mean()) ** 2).sum()
    r2 = 1 - float(((y - lam * x) ** 2).sum() / spread) if len(y) > 1 and spread > 0 else math.nan
    return lam, r2


# -----------------------------------------------------------------------------
# reading branch pairs


def records(path):
    """-> list of (where, record): JSONL lines (text, blank lines left out) or parquet rows (dicts)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: data file not found (pass --data=PAIRS.jsonl)")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); or export the rows to "
                             f"JSONL, one JSON object a line") from None
        return [(f"{path}: row {i}", row) for i, row in enumerate(pq.read_table(path).to_pylist())]
    with open(path, encoding="utf-8") as f:
        return [(f"{path}:{line_no}", line) for line_no, line in enumerate(f, 1) if line.strip()]


def as_dict(record):
    if isinstance(record, dict):
        return record
    try:
        row = json.loads(record)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    return row


def strings(row, keys):
    for key in keys:
        if not isinstance(row[key], str):
            raise ValueError(f"field {key!r} must be a string, got {type(row[key]).__name__}")
    return [row[key] for key in keys]


def chat_prompt(system, question):
    """orca_dpo_pairs prefix as fusion.py lays out Llama-2 chat turn 1 (without the slots): pieces encoded apart."""
    head = f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n" if system else "[INST]"
    return [head, question, "[/INST]"]


def text_pair(record):
    """One row -> (prefix pieces, branch A text, branch B text)."""
    row = as_dict(record)
    if {"prefix", "a", "b"} <= row.keys():
        branches = ("a", "b")
        prefix = strings(row, ("prefix",))
    elif {"system", "question", "chosen", "rejected"} <= row.keys():
        branches = ("chosen", "rejected")
        prefix = chat_prompt(*strings(row, ("system", "question")))
    else:
        raise ValueError(f"needs fields prefix, a, b (tokenspace) or system, question, chosen, rejected "
                         f"(orca_dpo_pairs); got {sorted(row)}")
    a, b = strings(row, branches)
    for name, text in zip(branches, (a, b)):
        if not text.strip():
            raise ValueError(f"branch {name!r} is empty")
    return prefix, a, b


def tokenize_pair(tokenizer, prefix, a, b, n_max, max_seq_len):
    """-> (bos + prefix ids, A ids, B ids), both branches cut to the same length n >= 1. Every piece is encoded on
    its own (SentencePiece gives each its leading space), so A and B start at the same token. No bos where the
    tokenizer has none (Qwen)."""
    bos = [] if tokenizer.bos is None else [tokenizer.bos]
    prefix_ids = bos + [t for piece in prefix for t in tokenizer.encode(piece)]
    a_ids, b_ids = tokenizer.encode(a), tokenizer.encode(b)
    n = min(len(a_ids), len(b_ids), n_max, max_seq_len - len(prefix_ids))
    if n < 1:
        raise ValueError(f"the prefix is {len(prefix_ids)} tokens, max_seq_len={max_seq_len} leaves no branch token")
    return prefix_ids, a_ids[:n], b_ids[:n]


def image_pair(record, root):
    """One vision-mode row {"image_a", "image_b", "question"} (paths relative to the data file) -> (A, B, question)."""
    row = as_dict(record)
    bad = [k for k in ("image_a", "image_b", "question") if not isinstance(row.get(k), str) or not row[k].strip()]
    if bad:
        raise ValueError(f"needs non-empty string fields image_a, image_b, question; bad or missing: {bad}")
    paths = [os.path.join(root, row[k]) for k in ("image_a", "image_b")]
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"image not found: {path}")
    return paths[0], paths[1], row["question"]


def read_pairs(cfg, parse):
    """-> list of (where, parse(record)), at most max_pairs; bad rows stop the run or are skipped and listed."""
    pairs, skipped = [], []
    for where, record in records(cfg.data):
        if cfg.max_pairs and len(pairs) == cfg.max_pairs:
            break
        try:
            pairs.append((where, parse(record)))
        except ValueError as e:
            if not cfg.skip_bad:
                raise InputError(f"{where}: {e} (use --skip_bad=True to skip bad rows)") from None
            skipped.append(f"{where}: {e}")
    if skipped:
        print(f"skipped {len(skipped)} bad rows:")
        print("\n".join(f"  {line}" for line in skipped))
    if not pairs:
        raise InputError(f"{cfg.data}: no branch pair to run")
    return pairs


# -----------------------------------------------------------------------------
# running the model


@torch.no_grad()
def text_batch_states(llama, batch, layer, device):
    """batch of (prefix, A, B) id lists -> h_a, h_b (P, N, D) at the branch tokens, lengths (P,), tokens run."""
    seqs = [prefix + a for prefix, a, _ in batch] + [prefix + b for prefix, _, b in batch]
    ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)  # right padding: causal attention never sees it
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
    hidden = llama.hidden_states(input_ids=ids.to(device))[layer]  # (2P, L, D)
    starts = torch.tensor([len(prefix) for prefix, _, _ in batch] * 2, device=device)
    lengths = torch.tensor([len(a) for _, a, _ in batch], device=device)
    positions = (starts[:, None] + torch.arange(int(lengths.max()), device=device)).clamp(max=ids.shape[1] - 1)
    states = hidden[torch.arange(len(seqs), device=device)[:, None], positions]  # (2P, N, D)
    return states[:len(batch)], states[len(batch):], lengths, sum(map(len, seqs))


def text_mode(cfg):
    """-> an iterator of (h_a, h_b, lengths, tokens) per batch, and the number of pairs."""
    if not cfg.llama_path or not cfg.data:
        raise InputError("text mode needs --data=PAIRS.jsonl and --llama_path=LLAMA_FOLDER")
    tokenizer = LLMTokenizer(cfg.llama_path)
    pairs = [pair for _, pair in read_pairs(cfg, lambda r: tokenize_pair(tokenizer, *text_pair(r), cfg.n_max, cfg.max_seq_len))]
    llama = Llama.from_hf(cfg.llama_path, dtype=getattr(torch, cfg.dtype)).to(cfg.device).eval()
    batches = (pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size))
    return (text_batch_states(llama, batch, cfg.layer, cfg.device) for batch in batches), len(pairs)


@torch.no_grad()
def vision_batch_states(vlm, space, batch, layer, device):
    """batch of (where, (image A, image B, question)) -> h_a, h_b (P, n_l, D) at the LLM slots, lengths, tokens run."""
    samples = []
    for side in (0, 1):  # rows 0..P-1 see image A, rows P..2P-1 image B
        for where, (*images, question) in batch:
            try:
                samples.append(space.generation_sample(load_image(images[side]), question))
            except ValueError as e:
                raise InputError(f"{where}: {e}") from None
    inputs = {k: v.to(device) for k, v in collate(samples).items()}
    hidden = vlm.llm.hidden_states(inputs_embeds=vlm.input_embeds(inputs))[layer]  # (2P, L, D), right-padded
    n_l, P = space.cfg.n_l, len(batch)
    states = hidden[inputs["slot_mask"]].view(2 * P, n_l, -1)  # slots in order, row by row
    return states[:P], states[P:], torch.full((P,), n_l), int(inputs["attention_mask"].sum())


def vision_mode(cfg):
    """FusedVLM from a stage-2 checkpoint (the trainers' schema); n_max is the slot count n_l."""
    if not cfg.ckpt or not cfg.data:
        raise InputError("vision mode needs --ckpt=CKPT.safetensors and --data=IMAGE_PAIRS.jsonl")
    tensors, meta = load_checkpoint(cfg.ckpt, prefix="model.")
    if meta.get("stage") != "gen":
        raise InputError(f"{cfg.ckpt}: stage {meta.get('stage')!r}; vision mode needs a stage-2 ('gen') FusedVLM "
                         f"checkpoint")
    model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
    if not 1 <= cfg.n_max <= model_cfg.n_queries + 1:
        raise InputError(f"n_max = n_l = {cfg.n_max}; the checkpoint has {model_cfg.n_queries} queries, so "
                         f"1..{model_cfg.n_queries + 1}")
    llama_path, clip_path = cfg.llama_path or meta["llama_path"], cfg.clip_path or meta["clip_path"]
    space = TokenSpace(TokenSpaceConfig(clip_path, llama_path, **dict(meta["token_space"], n_l=cfg.n_max)))
    root = os.path.dirname(os.path.abspath(cfg.data))
    pairs = read_pairs(cfg, lambda r: image_pair(r, root))

    dtype = getattr(torch, cfg.dtype)
    try:
        vlm = trained_vlm(model_cfg, trained_weights(tensors), Llama.from_hf(llama_path, dtype=dtype), cfg.ckpt)
    except ValueError as e:  # an LLM that is not the one the checkpoint was trained with
        raise InputError(str(e)) from None
    vlm = vlm.to(device=cfg.device, dtype=dtype).eval()
    batches = (pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size))
    return (vision_batch_states(vlm, space, batch, cfg.layer, cfg.device) for batch in batches), len(pairs)


# -----------------------------------------------------------------------------
# outputs


def write_csv(table, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for i in range(len(table["n"])):
            writer.writerow([table[k][i] if k in ("n", "pairs") else f"{table[k][i]:.8g}" for k in CSV_COLUMNS])


def plot(table, lam, r2, title, path):
    n = table["n"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    mean, std = table["D_mean"], table["D_std"]
    ax.fill_between(n, mean - 2 * std, mean + 2 * std, color="C0", alpha=0.15, lw=0, label="±2 std")
    ax.fill_between(n, mean - std, mean + std, color="C0", alpha=0.3, lw=0, label="±1 std")
    ax.plot(n, mean, color="C0", label="mean D(n)")
    ax.plot(n, table["fit"], "k--", label=f"λ√Υ(n), λ={lam:.4g}, R²={r2:.3f}")
    ax.set(xlabel="n (branch tokens)", ylabel="D(n)", title="accumulated branch distance")
    ax.legend(fontsize=8)
    ax = axes[1]
    for key, label in (("psi_eq", "ψ_eq (same position)"), ("psi_AA", "ψ_AA (within a branch, AA and BB)"),
                       ("psi_AB", "ψ_AB (across branches)")):
        ax.plot(n, table[key], label=label)
    ax.set(xlabel="n", ylabel="mean cosine", title="correlation terms")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(n, table["n_b"], label="n_b(n) = (1-ψ_eq)/(ψ_AA-ψ_AB) - 1")
    ax.plot(n, n, "k:", label="y = n")
    ax.set_ylim(-0.25 * n[-1], 2 * n[-1])  # n_b spikes where psi_AA - psi_AB crosses 0; the crossing with y = n matters
    ax.set(xlabel="n", ylabel="n_b", title="√n regime while n_b > n, linear beyond")
    ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    start = time.time()
    cfg, positional = parse_config(Config(), argv)
    if positional:
        raise InputError(f"unexpected arguments {positional}; use --key=value")
    print(f"config: {json.dumps(asdict(cfg))}")
    batches, n_pairs = vision_mode(cfg) if cfg.vision else text_mode(cfg)
    accumulator = Accumulator(cfg.n_max)
    n_batches, done, tokens = math.ceil(n_pairs / cfg.batch_size), 0, 0
    t0 = t = time.time()
    for step, (h_a, h_b, lengths, batch_tokens) in enumerate(batches):  # the model runs inside the iterator
        accumulator.add(branch_statistics(h_a, h_b, lengths, cfg.normalize))
        done, tokens = done + len(lengths), tokens + batch_tokens
        now = time.time()
        print(f"batch {step + 1}/{n_batches}: {done}/{n_pairs} pairs, {batch_tokens} tokens in {now - t:.2f} s, "
              f"{tokens / (now - t0):.0f} tok/s overall")
        t = now
    table = accumulator.table()
    lam, r2 = fit_lambda(table["D_mean"], table["upsilon"])
    table["fit"] = lam * np.sqrt(np.maximum(table["upsilon"], 0))
    states = "unit-normalised" if cfg.normalize else "raw"
    print(f"{done} pairs, {tokens} tokens, n = 1..{len(table['n'])} in {time.time() - t0:.1f} s; "
          f"{states} layer {cfg.layer} states: lambda = {lam:.6g} (R^2 = {r2:.4f})")
    if cfg.normalize:  # per pair D^2 = 2 Upsilon, so over pairs D_mean^2 + D_std^2 = 2 Upsilon(mean psi)
        deviation = np.abs(table["D_mean"] ** 2 + table["D_std"] ** 2 - 2 * table["upsilon"]).max()
        print(f"unit-norm identity mean D^2 = 2 Upsilon holds to {deviation / (2 * table['upsilon'].max()):.1e} "
              f"(relative); lambda <= sqrt(2) = 1.414 by Jensen")
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_csv(table, os.path.join(cfg.out_dir, "divergence.csv"))
    title = f"{'vision: ' + cfg.ckpt if cfg.vision else cfg.llama_path}, {cfg.data}, layer {cfg.layer}, {states} states"
    plot(table, lam, r2, title, os.path.join(cfg.out_dir, "divergence.png"))
    print(f"wrote divergence.csv, divergence.png to {cfg.out_dir}; total {time.time() - start:.1f} s")
    return table, lam


if __name__ == "__main__":
    report_input_errors()
    main(sys.argv[1:])
