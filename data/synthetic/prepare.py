"""
A tiny synthetic visual-QA world, so the whole pipeline (both training stages, evaluation, the scaling fit) runs
offline on a laptop, plus the tiny tokenizers and random base models that stand in for CLIP and Llama-2.

    python data/synthetic/prepare.py --out_dir=data/synthetic/out --n_train=2000 --n_val=200 --seed=0

Design (fixed before any model was run on it; the benchmarks are not tuned on results)
--------------------------------------------------------------------------------------
Image: a grid of R x C cells (R, C in 3..6, cell side 32-40 px: 97-241 px wide, 115-259 px high, so portrait,
square and landscape all occur) on a light background with dark 1-px grid lines, and a white label band (18 px, above or
below the grid) holding a 3-character code such as "KX7" at a random horizontal position. 2-6 cells hold a solid
shape: colour in {red, green, blue, yellow, purple, orange}, shape in {circle, square, triangle, diamond}.
Rows are counted top to bottom and columns left to right from 1. A shape spans 2/3 of a cell, 1-2 patches of
the 112-px global view and the label's characters less than one: small details need the crops and enough
tokens, which is what makes the number of vision tokens matter.

Question types (the `category` of every benchmark row):
  cell_colour   "What colour is the shape in row 2, column 3?" -> "red"      (one cell: many tokens, or the
  cell_shape    "What shape is in row 2, column 3?" -> "circle"               question fused in front of them)
  count_colour  "How many red shapes are there?" -> "2"                       (the whole image, every cell)
  count_shape   "How many circles are there?" -> "1"
  text          "What text is written on the label?" -> "KX7"                (small print: many tokens)
  grid          "How many rows does the grid have?" -> "4"                   (global layout: few tokens suffice)
  presence      "Is there a blue triangle in the image?" -> "Yes" / "No"     (half yes, half no)
  cell_check    "Is the shape in row 2, column 3 red?" -> "Yes" / "No"      (half yes, half no)
  describe      "Describe the image in detail." -> every occupied cell, row by row (needs all tokens)
  caption       COCO's prompt -> "A 4 by 5 grid: red circle, blue square." (objects in reading order)
Training conversations hold 2-4 turns (so n_s, the token count of later questions, is exercised), drawn with
weights 3,2,2,1,2,1,2,2,1,1 over the types above (yes/no answers: a fair coin; in the benchmarks: exactly
half). A short-answer turn is asked plainly, with VLMEvalKit's VQA suffix, or as VLMEvalKit's multiple-choice
prompt answered by a letter, so the tiny model learns the benchmark formats; yes/no turns are bare questions as
in POPE; caption turns use COCO_VAL's prompt and one of the 5 caption phrasings.

Benchmarks (VLMEvalKit TSVs, images base64 PNG, each row its own held-out image drawn from a separate random
stream, categories in a fixed rotation so every category has the same number of rows):
  SYNTH_YORN     presence, cell_check                              answer Yes/No            (scored like POPE)
  SYNTH_MCQ      cell_colour, cell_shape, count_colour, text       options A-D, answer letter (like SEEDBench_IMG)
  SYNTH_VQA      cell_colour, cell_shape, count_colour, count_shape, text, grid
                 answer: 10 references, the canonical answer (counts: 8 digits + 2 number words)   (like TextVQA)
  SYNTH_CAPTION  caption; answer: the 5 caption phrasings                                     (like COCO_VAL)
Outputs: train.jsonl, val.jsonl ({"image": "images/train/000000.png", "messages": [...]}), images/, bench/*.tsv,
clip/ (tiny random CLIPModel + vocab.json + merges.txt), llama/ (tiny random LlamaForCausalLM + tokenizer.model).

The tokenizer builders are importable without side effects (tests use them):
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
    n_train: int = 2000  # training conversations (one image each)
    n_val: int = 200
    n_bench: int = 150  # rows per benchmark TSV
    seed: int = 0
    llama_vocab_size: int = 1000
    clip_merges: int = 1000
    # tiny random CLIP (vision + text tower) and Llama written under clip/ and llama/
    image_size: int = 112
    patch_size: int = 14
    vision_width: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    vision_mlp: int = 128
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


COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30),
           "purple": (140, 60, 180), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "diamond")
BACKGROUND, GRID_LINE, LABEL_PAPER, LABEL_INK = (238, 238, 238), (90, 90, 90), (255, 255, 255), (0, 0, 0)
LABEL_BAND = 18
LABEL_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no I/O/0/1: the code must be readable
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = ("Please describe this image in general. Directly provide the description, do not include "
                  "prefix like \"This image depicts\". ")
TURN_WEIGHTS = {"cell_colour": 3, "cell_shape": 2, "count_colour": 2, "count_shape": 1, "text": 2, "grid": 1,
                "presence": 2, "cell_check": 2, "describe": 1, "caption": 1}
YES_NO = ("presence", "cell_check")
BENCH_CATEGORIES = {
    "SYNTH_YORN": ("presence", "cell_check"),
    "SYNTH_MCQ": ("cell_colour", "cell_shape", "count_colour", "text"),
    "SYNTH_VQA": ("cell_colour", "cell_shape", "count_colour", "count_shape", "text", "grid"),
    "SYNTH_CAPTION": ("caption",),
}


# ----------------------------------------------------------------------------------------------------------------
# the world: scenes, images, questions

def random_scene(rng):
    rows, cols = rng.randint(3, 6), rng.randint(3, 6)
    cells = [(r, c) for r in range(1, rows + 1) for c in range(1, cols + 1)]
    occupied = sorted(rng.sample(cells, rng.randint(2, min(6, len(cells)))))
    return {
        "rows": rows, "cols": cols, "cell": rng.randint(32, 40), "label_on_top": rng.random() < 0.5,
        "label": "".join(rng.choice(LABEL_CHARS) for _ in range(3)), "label_x": rng.random(),
        "objects": {cell: (rng.choice(list(COLOURS)), rng.choice(SHAPES)) for cell in occupied},
    }


def render(scene):
    """Grid lines sit at multiples of the cell side, so cell (r, c) spans the pixels strictly between them."""
    from PIL import Image, ImageDraw, ImageFont

    cell, rows, cols = scene["cell"], scene["rows"], scene["cols"]
    grid_w, grid_h = cols * cell + 1, rows * cell + 1
    image = Image.new("RGB", (grid_w, grid_h + LABEL_BAND), BACKGROUND)
    draw = ImageDraw.Draw(image)
    top = LABEL_BAND if scene["label_on_top"] else 0
    band_top = 0 if scene["label_on_top"] else grid_h
    draw.rectangle((0, band_top, grid_w - 1, band_top + LABEL_BAND - 1), fill=LABEL_PAPER)
    font = ImageFont.load_default(size=14)
    text_w = draw.textlength(scene["label"], font=font)
    draw.text((2 + scene["label_x"] * (grid_w - text_w - 4), band_top + 1), scene["label"], fill=LABEL_INK, font=font)
    for i in range(cols + 1):
        draw.line((i * cell, top, i * cell, top + grid_h - 1), fill=GRID_LINE)
    for i in range(rows + 1):
        draw.line((0, top + i * cell, grid_w - 1, top + i * cell), fill=GRID_LINE)
    margin = cell // 6
    for (r, c), (colour, shape) in scene["objects"].items():
        x0, y0 = (c - 1) * cell + margin, top + (r - 1) * cell + margin
        x1, y1 = c * cell - margin, top + r * cell - margin
        cx, cy, fill = (x0 + x1) // 2, (y0 + y1) // 2, COLOURS[colour]
        if shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
    return image


def plural(shape):
    return shape + "s"


def with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def join_names(names):
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def captions(scene):
    """The 5 reference phrasings of the short caption (objects in reading order)."""
    things = [f"{colour} {shape}" for colour, shape in scene["objects"].values()]
    size, n = f"{scene['rows']} by {scene['cols']}", len(things)
    return [f"A {size} grid: {', '.join(things)}.",
            f"{join_names(things).capitalize()} in a {size} grid.",
            f"A grid with {n} shapes: {', '.join(things)}.",
            f"{n} shapes on a {size} grid: {', '.join(things)}.",
            f"{', '.join(things).capitalize()}."]


def description(scene):
    parts = [f"The grid has {scene['rows']} rows and {scene['cols']} columns and the label reads {scene['label']}."]
    for r in range(1, scene["rows"] + 1):
        in_row = [f"{with_article(colour + ' ' + shape)} in column {c}"
                  for (row, c), (colour, shape) in scene["objects"].items() if row == r]
        parts.append(f"Row {r}: {join_names(in_row)}." if in_row else f"Row {r} is empty.")
    return " ".join(parts)


def ask(scene, category, rng, yes=None):
    """One question of the given category: (question, canonical answer, 3 wrong options or None).
    yes: for yes/no categories, force the answer (benchmarks balance it exactly); None draws it."""
    yes = rng.random() < 0.5 if yes is None else yes
    objects = scene["objects"]
    (r, c), (colour, shape) = rng.choice(sorted(objects.items()))
    where = f"row {r}, column {c}"
    if category == "cell_colour":
        return f"What colour is the shape in {where}?", colour, rng.sample([x for x in COLOURS if x != colour], 3)
    if category == "cell_shape":
        return f"What shape is in {where}?", shape, [x for x in SHAPES if x != shape]
    if category in ("count_colour", "count_shape"):
        # a present value 3 times in 4, so the answer is not mostly "0"
        present = sorted({v[0] if category == "count_colour" else v[1] for v in objects.values()})
        pool = list(COLOURS) if category == "count_colour" else list(SHAPES)
        value = rng.choice(present) if rng.random() < 0.75 else rng.choice(pool)
        index = 0 if category == "count_colour" else 1
        count = sum(v[index] == value for v in objects.values())
        question = f"How many {value} shapes are there?" if index == 0 else f"How many {plural(value)} are there?"
        return question, str(count), [str(n) for n in rng.sample([n for n in range(8) if n != count], 3)]
    if category == "text":
        label = scene["label"]
        wrong = set()
        while len(wrong) < 3:  # one character changed: reading, not guessing
            i = rng.randrange(3)
            candidate = label[:i] + rng.choice(LABEL_CHARS.replace(label[i], "")) + label[i + 1:]
            wrong.add(candidate)
        return "What text is written on the label?", label, sorted(wrong)
    if category == "grid":
        axis = rng.choice(("rows", "columns"))
        n = scene["rows"] if axis == "rows" else scene["cols"]
        return f"How many {axis} does the grid have?", str(n), [str(x) for x in range(3, 7) if x != n]
    if category == "presence":
        present = set(objects.values())
        if yes:
            colour, shape = rng.choice(sorted(present))
        else:
            colour, shape = rng.choice([(x, y) for x in COLOURS for y in SHAPES if (x, y) not in present])
        answer = "Yes" if (colour, shape) in present else "No"
        return f"Is there {with_article(colour + ' ' + shape)} in the image?", answer, None
    if category == "cell_check":
        named = colour if yes else rng.choice([x for x in COLOURS if x != colour])
        return f"Is the shape in {where} {named}?", "Yes" if named == colour else "No", None
    if category == "describe":
        return "Describe the image in detail.", description(scene), None
    if category == "caption":
        return CAPTION_PROMPT, rng.choice(captions(scene)), None
    raise ValueError(f"unknown question category {category!r}")


def mcq_prompt(question, options):
    """VLMEvalKit's ImageMCQDataset.build_prompt text (no hint)."""
    lines = "".join(f"{letter}. {text}\n" for letter, text in zip("ABCD", options))
    return f"Question: {question}\nOptions:\n{lines}Please select the correct answer from the options above. \n"


def shuffled_options(answer, wrong, rng):
    options = [answer] + list(wrong)
    rng.shuffle(options)
    return options, "ABCD"[options.index(answer)]


def training_turn(scene, category, rng):
    question, answer, wrong = ask(scene, category, rng)
    if wrong is None:
        return question, answer
    style = rng.choice(("plain", "vqa", "mcq"))
    if style == "vqa":
        return question + VQA_SUFFIX, answer
    if style == "mcq":
        options, letter = shuffled_options(answer, wrong, rng)
        return mcq_prompt(question, options), letter
    return question, answer


def conversation(scene, rng):
    categories, weights = list(TURN_WEIGHTS), list(TURN_WEIGHTS.values())
    messages = []
    for _ in range(rng.randint(2, 4)):
        question, answer = training_turn(scene, rng.choices(categories, weights)[0], rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages


def vqa_references(answer):
    if answer.isdigit():
        return [answer] * 8 + [NUMBER_WORDS[int(answer)]] * 2
    return [answer] * 10


def png_base64(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def benchmark_rows(name, n_rows, rng):
    """Header and rows of one benchmark TSV; row i has category i mod (number of categories)."""
    categories = BENCH_CATEGORIES[name]
    header = {"SYNTH_MCQ": ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]}.get(
        name, ["index", "image", "question", "answer", "category"])
    rows = []
    for i in range(n_rows):
        scene, category = random_scene(rng), categories[i % len(categories)]
        question, answer, wrong = ask(scene, category, rng, yes=(i // len(categories)) % 2 == 0)
        image = png_base64(render(scene))
        if name == "SYNTH_MCQ":
            options, letter = shuffled_options(answer, wrong, rng)
            rows.append([str(i), image, question, *options, letter, category])
        elif name == "SYNTH_VQA":
            rows.append([str(i), image, question, repr(vqa_references(answer)), category])
        elif name == "SYNTH_CAPTION":
            rows.append([str(i), image, question, repr(captions(scene)), category])
        else:
            rows.append([str(i), image, question, answer, category])
    return header, rows


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


def train_llama_tokenizer(texts, out_dir, vocab_size):
    """SentencePiece BPE with Llama-2's settings: <unk>=0, <s>=1, </s>=2, no pad, byte fallback, split digits."""
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
    # the Llama chat template's pieces are text too: the tiny tokenizer should know them
    tokenizer_texts = texts + [SYSTEM_PROMPT, "[INST] <<SYS>>\n", "\n<</SYS>>\n\n", "[/INST]"]
    train_llama_tokenizer(tokenizer_texts, os.path.join(out, "llama"), cfg.llama_vocab_size)
    build_clip_vocab(texts, os.path.join(out, "clip"), cfg.clip_merges)
    with open(os.path.join(out, "clip", "vocab.json"), encoding="utf-8") as f:
        clip_vocab = json.load(f)
    t2 = time.time()
    write_tiny_models(cfg, out, cfg.llama_vocab_size, clip_vocab)
    t3 = time.time()
    print(f"wrote {cfg.n_train} train, {cfg.n_val} val conversations and 4 x {cfg.n_bench} benchmark rows "
          f"in {t1 - t0:.1f} s")
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
