"""
A tiny synthetic visual-QA world whose answers can only come from the image, so the whole pipeline (stage 0 to the
scaling fit) runs offline on CPU and shows whether a model reads its images; plus the tiny tokenizers and random base
models that stand in for CLIP and Llama-2.

    python data/synthetic/prepare.py --out_dir=data/synthetic/out --n_train=10000 --n_val=200 --n_bench=150 --seed=0

The world
---------
Image: 112 x 112 px, a 4 x 4 grid of 28-px cells, each filled with one solid colour (red, green, blue, yellow,
purple, orange) or left empty (the light background), all 7 equally likely and independent (chance: 1/7). A cell is
2 x 2 patches of the tiny ViT (14 px) and one token after the merge conv, so the image has 16 vision tokens (and a
separator): what limits a model is how much of the grid its n_l tokens can carry. Cells are named by letters in
reading order, skipping A-D and I, O: row 1 is E F G H, row 4 is S T U V.

Question types (the `category` of every benchmark row), each asked in exactly one format, the benchmark's:
  cell   "What colour is cell F?" + VQA_SUFFIX -> "red" (or "empty")                           one cell
  row    "What is in row 2?" -> "J red K empty L blue M green"                                  four cells
  grid   COCO's caption prompt -> the filled cells in reading order: "E red G blue H purple ..."  every cell
A cell answer is the bare value, so with the question fused into the vision tokens one token can carry it; without
the question one token would have to carry all 16 cells. Rows and the grid name their cells (the LLM copies each
value after its letter), and need about 4 and 16 tokens, so their scores rise with n_l also when the question is
fused.

The scene in words, what stage 0 (data/synthetic/pretrain_llm.py) puts where the vision tokens go:
  "E red F empty G blue ... V green" (all 16 cells, or a listed subset, in reading order).

Training conversations hold 1-2 turns (so later questions, and n_s, are exercised), types drawn with weights
cell 6, row 2, grid 1 (the grid's 16-32 answer tokens would otherwise dominate the token-mean loss).

Benchmarks (VLMEvalKit TSVs, images base64 PNG, each row a held-out image from its own random stream, categories in
a fixed rotation so each has the same number of rows):
  SYNTH_VQA      cell        10 references, all the canonical answer   (scored like TextVQA; evaluate.py adds the
                                                                        VQA suffix, so the TSV's question lacks it)
  SYNTH_CAPTION  row, grid   one reference, the question in its row    (scored like COCO, CIDEr per category too)
Outputs: train.jsonl, val.jsonl ({"image": "images/train/000000.png", "messages": [...]}), images/, bench/*.tsv,
clip/ (tiny random CLIPModel + vocab.json + merges.txt), llama/ (tiny random LlamaForCausalLM + tokenizer.model).

Importable without side effects: the world (random_scene, render, scene_words, ask, conversation) for stage 0, and
the tokenizer builders for the tests:
  train_llama_tokenizer(texts, out_dir, vocab_size) -> out_dir/tokenizer.model   (SentencePiece BPE, Llama rules)
  build_clip_vocab(texts, out_dir, num_merges) -> out_dir with vocab.json + merges.txt   (CLIP byte-level BPE)
"""
import base64
import collections
import io
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass


@dataclass
class Config:
    out_dir: str = "data/synthetic/out"
    n_train: int = 10000  # training conversations (one image each)
    n_val: int = 200
    n_bench: int = 150  # rows per benchmark TSV
    seed: int = 0
    llama_vocab_size: int = 512
    clip_merges: int = 1000
    # tiny random CLIP (vision + text tower) and Llama written under clip/ and llama/
    image_size: int = 112
    patch_size: int = 14
    vision_width: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 256
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_mlp: int = 128
    projection_dim: int = 64
    llm_dim: int = 128
    llm_layers: int = 2
    llm_heads: int = 4
    llm_kv_heads: int = 2
    llm_mlp: int = 256
    llm_max_positions: int = 2048


GRID, CELL = 4, 28  # cells per side, pixels per cell
CELL_NAMES = "EFGHJKLMNPQRSTUV"  # reading order
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 20)}
EMPTY, BACKGROUND = "empty", (238, 238, 238)
VALUES = (*COLOURS, EMPTY)
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."  # evaluate.py's VQA prompt adds it
CAPTION_PROMPT = ("Please describe this image in general. Directly provide the description, do not include "
                  "prefix like \"This image depicts\". ")
TURN_WEIGHTS = {"cell": 6, "row": 2, "grid": 1}
BENCH_CATEGORIES = {
    "SYNTH_VQA": ("cell",),
    "SYNTH_CAPTION": ("row", "grid"),
}


# ----------------------------------------------------------------------------------------------------------------
# the world: scenes, images, questions

def random_scene(rng):
    """The 16 cells' values in reading order."""
    return tuple(rng.choice(VALUES) for _ in range(GRID * GRID))


def render(scene):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (GRID * CELL, GRID * CELL), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for i, value in enumerate(scene):
        if value != EMPTY:
            r, c = divmod(i, GRID)
            draw.rectangle((c * CELL, r * CELL, (c + 1) * CELL - 1, (r + 1) * CELL - 1), fill=COLOURS[value])
    return image


def scene_words(scene, cells=None):
    """'E red F empty ...' for the given cell indices (all by default), in reading order."""
    return " ".join(f"{CELL_NAMES[i]} {scene[i]}" for i in (range(len(scene)) if cells is None else sorted(cells)))


def caption(scene):
    return " ".join(f"{CELL_NAMES[i]} {value}" for i, value in enumerate(scene) if value != EMPTY)


def ask(scene, category, rng, cells=None):
    """One question in the form the benchmarks ask it: (question, answer). cells: the cells a one-cell question
    may ask about (all by default)."""
    if category == "cell":
        i = rng.choice(sorted(cells) if cells is not None else range(len(scene)))
        return f"What colour is cell {CELL_NAMES[i]}?" + VQA_SUFFIX, scene[i]
    if category == "row":
        r = rng.randrange(GRID)
        return f"What is in row {r + 1}?", scene_words(scene, range(r * GRID, (r + 1) * GRID))
    if category == "grid":
        return CAPTION_PROMPT, caption(scene)
    raise ValueError(f"unknown question category {category!r}")


def conversation(scene, rng, cells=None):
    """1-2 turns, categories drawn by TURN_WEIGHTS. cells: what the context tells of the scene (stage 0 lists a subset);
    questions then stay within it (one-cell questions only, unless every cell is known)."""
    known_all = cells is None or len(cells) == len(scene)
    categories = [c for c in TURN_WEIGHTS if known_all or c == "cell"]
    messages = []
    for _ in range(rng.randint(1, 2)):
        question, answer = ask(scene, rng.choices(categories, [TURN_WEIGHTS[c] for c in categories])[0], rng, cells)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def benchmark_rows(name, n_rows, rng):
    """Header and rows of one benchmark TSV; row i has category i mod (number of categories). The cell questions
    go without VQA_SUFFIX: evaluate.py's VQA prompt adds it."""
    categories = BENCH_CATEGORIES[name]
    rows = []
    for i in range(n_rows):
        scene, category = random_scene(rng), categories[i % len(categories)]
        question, answer = ask(scene, category, rng)
        question = question.removesuffix(VQA_SUFFIX)
        references = [answer] * 10 if name == "SYNTH_VQA" else [answer]  # TextVQA has ten, COCO one here
        rows.append([str(i), png_base64(render(scene)), question, repr(references), category])
    return ["index", "image", "question", "answer", "category"], rows


def write_split(out_dir, split, n, rng):
    """Renders n scenes into images/<split>/ and writes <split>.jsonl; returns every message text."""
    os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
    texts = []
    with open(os.path.join(out_dir, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            scene = random_scene(rng)
            image_path = f"images/{split}/{i:06d}.png"
            render(scene).save(os.path.join(out_dir, image_path))
            messages = conversation(scene, rng)
            texts += [m["content"] for m in messages]
            f.write(json.dumps({"image": image_path, "messages": messages}) + "\n")
    return texts


# ----------------------------------------------------------------------------------------------------------------
# tiny tokenizers and random base models

# CLIP's pre-tokeniser (openai/CLIP simple_tokenizer.py without the special tokens); `regex` comes with transformers
CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


# The chat template's pieces and the system prompt start every sequence; as single pieces of the tiny tokenizer they
# cost 11 tokens (about 50 for Llama-2's), not the ~100 the tiny BPE would split them into, which would make the
# fixed prefix most of every miniature sequence and of its compute.
TEMPLATE_PIECES = (SYSTEM_PROMPT, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")


def train_llama_tokenizer(texts, out_dir, vocab_size, whole_pieces=()):
    """SentencePiece BPE with Llama-2's settings: <unk>=0, <s>=1, </s>=2, no pad, byte fallback, split digits;
    whole_pieces: strings that are always one piece each."""
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, normalization_rule_name="identity", character_coverage=1.0,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2,
        user_defined_symbols=[piece.replace(" ", "\u2581") for piece in whole_pieces],
    )
    path = os.path.join(out_dir, "tokenizer.model")
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def bytes_to_unicode():
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_clip_vocab(texts, out_dir, num_merges):
    """Learns up to num_merges byte-level BPE merges over CLIP's pre-tokenised words and writes a CLIP-format
    vocab.json (bytes, bytes+</w>, merges, <|startoftext|>, <|endoftext|> last) and merges.txt."""
    import regex

    byte_chars = bytes_to_unicode()
    word_counts = collections.Counter()
    for text in texts:
        for word in regex.findall(CLIP_WORD_PATTERN, " ".join(text.split()).lower()):
            symbols = [byte_chars[b] for b in word.encode("utf-8")]
            symbols[-1] += "</w>"
            word_counts[tuple(symbols)] += 1
    words = list(word_counts.items())
    tokens = list(byte_chars.values())
    tokens += [t + "</w>" for t in tokens]
    known = set(tokens)
    merges = []
    for _ in range(num_merges):
        pair_counts = collections.Counter()
        for symbols, count in words:
            for pair in zip(symbols, symbols[1:]):
                if pair[0] + pair[1] not in known:  # keeps every vocab entry unique, ids contiguous
                    pair_counts[pair] += count
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))  # ties broken by the pair itself
        merges.append(best)
        known.add(best[0] + best[1])
        merged_words = []
        for symbols, count in words:
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged_words.append((tuple(out), count))
        words = merged_words

    tokens += ["".join(pair) for pair in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return out_dir


def write_tiny_models(cfg, out_dir, llama_vocab_size, clip_vocab):
    """Random CLIPModel and LlamaForCausalLM saved like the real checkpoints (safetensors + config.json)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    eos, bos = clip_vocab["<|endoftext|>"], clip_vocab["<|startoftext|>"]
    clip = CLIPModel(CLIPConfig(
        vision_config=dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.vision_width,
                           num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                           intermediate_size=cfg.vision_mlp, hidden_act="gelu", layer_norm_eps=1e-5),
        text_config=dict(vocab_size=len(clip_vocab), hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
                         num_attention_heads=cfg.text_heads, intermediate_size=cfg.text_mlp, hidden_act="gelu",
                         max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=eos),
        projection_dim=cfg.projection_dim))
    clip.save_pretrained(os.path.join(out_dir, "clip"), safe_serialization=True)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=llama_vocab_size, hidden_size=cfg.llm_dim, num_hidden_layers=cfg.llm_layers,
        num_attention_heads=cfg.llm_heads, num_key_value_heads=cfg.llm_kv_heads, intermediate_size=cfg.llm_mlp,
        rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=cfg.llm_max_positions, bos_token_id=1,
        eos_token_id=2, tie_word_embeddings=False))
    llama.save_pretrained(os.path.join(out_dir, "llama"), safe_serialization=True)


def folder_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def main(cfg):
    t0 = time.time()
    out = cfg.out_dir
    texts = write_split(out, "train", cfg.n_train, random.Random(f"{cfg.seed}-train"))
    write_split(out, "val", cfg.n_val, random.Random(f"{cfg.seed}-val"))
    os.makedirs(os.path.join(out, "bench"), exist_ok=True)
    for name in BENCH_CATEGORIES:
        header, rows = benchmark_rows(name, cfg.n_bench, random.Random(f"{cfg.seed}-{name}"))
        with open(os.path.join(out, "bench", f"{name}.tsv"), "w", encoding="utf-8") as f:
            for row in [header] + rows:
                assert not any("\t" in field or "\n" in field for field in row[3:]), row[3:]
                f.write("\t".join(row) + "\n")
    t1 = time.time()
    train_llama_tokenizer(texts, os.path.join(out, "llama"), cfg.llama_vocab_size, TEMPLATE_PIECES)
    build_clip_vocab(texts, os.path.join(out, "clip"), cfg.clip_merges)
    with open(os.path.join(out, "clip", "vocab.json"), encoding="utf-8") as f:
        clip_vocab = json.load(f)
    t2 = time.time()
    write_tiny_models(cfg, out, cfg.llama_vocab_size, clip_vocab)
    t3 = time.time()
    print(f"wrote {cfg.n_train} train, {cfg.n_val} val conversations and {len(BENCH_CATEGORIES)} x {cfg.n_bench} "
          f"benchmark rows in {t1 - t0:.1f} s")
    print(f"tokenizers in {t2 - t1:.1f} s (clip vocab {len(clip_vocab)}, "
          f"llama vocab {cfg.llama_vocab_size}); tiny models in {t3 - t2:.1f} s")
    for part in ("images", "bench", "clip", "llama"):
        print(f"  {part}/: {folder_size(os.path.join(out, part)) / 1e6:.1f} MB")
    print(f"total {time.time() - t0:.1f} s -> {out}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from configurator import parse_config

    config, positional = parse_config(Config(), sys.argv[1:])
    if positional:
        sys.exit(f"unexpected arguments {positional}; use --key=value")
    print(json.dumps(asdict(config)))
    main(config)
