"""
Benchmarks of the paper (and the synthetic ones): run checkpoints over them and score the answers the way
VLMEvalKit scores them.

    python evaluate.py --ckpt=out/ft-64 --benchmarks=MME,POPE,TextVQA_VAL --bench_dir=LMUData --out_dir=out-eval
    python evaluate.py --ckpt=out/ft-1,out/ft-8,out/ft-16 --benchmarks=POPE ...  # a sweep into one results.csv
    python evaluate.py --ckpt=out/ft-64 --drop_question=True ...                 # the VQ ablation
    python evaluate.py --score_only=True --benchmarks=POPE --predictions=preds.jsonl --variant=VQQ --n_l=64 --n_s=8
    python evaluate.py --bench=True --batch_size=8 [--ckpt=out/ft-64]            # prefill / decode tokens/s

A benchmark is a VLMEvalKit TSV file (<bench_dir>/<NAME>.tsv: index, base64 image, question, answer, options...).
Prompts, answer extraction and metrics follow VLMEvalKit at commit 0ff0c3e with no LLM judge: an answer the rules
cannot read counts as wrong, and its share is reported as `unparsable_rate` (a judge could change at most those rows).
Every score is in the paper's units. Scores are appended to <out_dir>/results.csv, one row per number.
The rules, with the VLMEvalKit quirks kept on purpose, are in research/eval_rules.md.

Running a checkpoint (a folder holding ckpt.safetensors, or the file; stage-2/3 "gen" checkpoints only): the frozen
LLM comes from the checkpoint's llama_path, everything else from the checkpoint. The token space is the one the
checkpoint was trained with (its meta "token_space") unless --n_l, --num_crops or --drop_question say otherwise.
Decoding as the authors evaluated: greedy, at least one new token (EOS banned at the first step), stop at </s>,
the new tokens decoded without special tokens and stripped; max_new_tokens per benchmark (BENCHMARKS below);
left-padded batches with the KV cache. Every image goes through VLMEvalKit's JPEG (quality 75) round trip first.
A row with several images (SEEDBench2) is shown its last image only, as the authors' wrapper did: the model reads
one image per question. float32 on CPU, bfloat16 on GPU unless --dtype.

Per checkpoint, <out_dir>/<variant>_nl<n_l>/ holds predictions_<benchmark>.jsonl ({"index", "prediction",
"prompt"} per line, appended and flushed after every batch) and run.json (the settings they were made with).
Rerunning the same command resumes: predicted rows are kept (an incomplete last line is cut off), only the rest is
generated, and a benchmark that results.csv already holds for this variant, n_l, n_s and ckpt is not scored twice.
The variant label defaults to the paper's names: VQQ (question fused), VQ (a VQQ checkpoint run with
drop_question=True), VQ-ft (a checkpoint fine-tuned and run with drop_question=True).
"""
import ast
import base64
import csv
import io
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass

import torch
from PIL import Image

from configurator import parse_config
from fusion import TokenSpace, TokenSpaceConfig, collate
from model import FusedVLM, FusedVLMConfig, Llama, checkpoint_file, load_checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    ckpt: str = ""              # checkpoint folder(s) or file(s), comma-separated; score_only: only a label
    benchmarks: str = "POPE"    # names from BENCHMARKS, comma-separated (score_only: one)
    bench_dir: str = "bench"    # where <benchmark>.tsv lives
    tsv: str = ""               # the file of a single benchmark; default <bench_dir>/<benchmark>.tsv
    out_dir: str = "out-eval"   # results.csv, and one predictions folder per checkpoint
    variant: str = ""           # the results label; default VQQ, VQ or VQ-ft (see above); score_only: "model"
    # token space; 0, -1 or "" = as the checkpoint was trained (score_only: n_l and n_s are only labels)
    n_l: int = 0
    n_s: int = 0                # a label when running: every benchmark question is a first question (n_l)
    num_crops: int = -1
    drop_question: str = ""     # "True": the VQ ablation (the fused model does not see the question), or "False"
    llama_path: str = ""        # "" = the checkpoint's (set it when the weights have moved)
    clip_path: str = ""
    # generation
    batch_size: int = 8
    jpeg_reencode: bool = True  # VLMEvalKit's JPEG q75 round trip of every image (needed to compare numbers)
    device: str = ""            # "" = cuda when there is one, else cpu
    dtype: str = ""             # float32 | bfloat16 | float16; "" = bfloat16 on GPU, float32 on CPU
    # score an existing predictions file instead of running a model
    score_only: bool = False
    predictions: str = ""       # JSONL, one {"index": ..., "prediction": "..."} per line
    # bench=True: prefill and decode speed of batched greedy generation on synthetic prompts (no benchmark files)
    bench: bool = False
    bench_question_len: int = 32  # question tokens, on the fused and the LLM side
    bench_new_tokens: int = 32    # decode steps timed
    bench_repeats: int = 5        # timed runs after one warm-up run; medians are printed


# -----------------------------------------------------------------------------
# the benchmarks


@dataclass(frozen=True)
class Benchmark:
    kind: str             # yorn | mcq | vqa | ocrbench | caption: decides the prompt
    scorer: str           # key of SCORERS (below)
    max_new_tokens: int   # the authors' generation budget per kind
    metrics: tuple        # headline numbers, in this order; per-group numbers ("category:count") follow them
    columns: tuple = ()   # required beyond index, image, answer and (except captions) question


MCQ = Benchmark("mcq", "mcq", 32, ("Overall", "unparsable_rate"), ("A", "B"))
CAPTION = Benchmark("caption", "caption", 32, ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"))
POPE_LIKE = Benchmark("yorn", "pope", 32, ("Overall", "acc", "precision", "recall", "unparsable_rate"))
TEXTVQA_LIKE = Benchmark("vqa", "vqa_accuracy", 10, ("Overall",))
BENCHMARKS = {
    "MME": Benchmark("yorn", "mme", 32, ("Overall", "perception", "reasoning", "unparsable_rate"),
                     ("category", "image_path")),
    "HallusionBench": Benchmark("yorn", "hallusion", 32, ("Overall", "aAcc", "fAcc", "qAcc", "unparsable_rate"),
                                ("category", "l2-category")),
    "POPE": POPE_LIKE,
    "COCO_VAL": CAPTION,
    "OCRBench": Benchmark("ocrbench", "ocrbench", 512, ("Final Score",), ("category",)),
    "AI2D_TEST": MCQ,
    "RealWorldQA": MCQ,
    "MMStar": MCQ,
    "SEEDBench_IMG": MCQ,
    "SEEDBench2": MCQ,
    "SEEDBench2_Plus": MCQ,
    "ScienceQA_TEST": MCQ,
    "OCRVQA_TESTCORE": Benchmark("vqa", "exact_match", 100, ("Overall",)),
    "ChartQA_TEST": Benchmark("vqa", "relaxed_accuracy", 100, ("Overall",)),
    "TextVQA_VAL": TEXTVQA_LIKE,
    # synthetic stand-ins (data/synthetic/prepare.py), each scored like the benchmark it mimics
    "SYNTH_YORN": POPE_LIKE,
    "SYNTH_MCQ": MCQ,
    "SYNTH_VQA": TEXTVQA_LIKE,
    "SYNTH_CAPTION": CAPTION,
}

# -----------------------------------------------------------------------------
# reading a benchmark TSV

# pandas' default NA strings: VLMEvalKit reads with pandas, so an option cell reading "None" is no option at all
PANDAS_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",
             "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Row:
    index: str        # canonical (see index_key), so 7, "7" and "007" name the same row
    images_b64: list  # base64 encoded images, references to other rows resolved (SEEDBench2 rows may hold several)
    question: str
    answer: str       # the answer cell as written: a letter, Yes/No, or a string / list literal
    answers: list     # the reference answers: the list literal's items, else [answer]
    options: dict     # multiple choice: letter -> text, only the options this row has
    hint: str | None
    fields: dict      # every column of the row as read (category, image_path, split, ...)
    prompt: str
    source: str       # the TSV file
    where: str        # "<file> line N (index I)", for error messages

    def images(self, jpeg_reencode=True):
        """The row's images as RGB PIL images. VLMEvalKit saves each benchmark image as a JPEG (quality 75) before
        the model reads it, so by default we do the same round trip: the model then sees the same pixels."""
        out = []
        for b64 in self.images_b64:
            try:
                image = Image.open(io.BytesIO(base64.b64decode(b64)))
                image.load()
            except Exception as e:
                raise ValueError(f"{self.where}: the image does not decode ({e})") from None
            if image.mode not in ("RGB", "L"):  # RGBA and P as VLMEvalKit; other modes have no JPEG form
                image = image.convert("RGB")
            if jpeg_reencode:
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=75)
                image = Image.open(buffer)
            out.append(image.convert("RGB"))
        return out


def index_key(value):
    text = str(value).strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


def read_tsv(path):
    """Returns (header, [(line number, {column: cell})]); every cell a string, exactly as written."""
    csv.field_size_limit(sys.maxsize)  # a base64 image is far beyond the default 128 KiB field limit
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header line")
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise ValueError(f"{path}: column(s) {duplicated} appear more than once in the header")
        records = []
        for cells in reader:
            if not cells:  # a blank line, skipped by pandas too
                continue
            if len(cells) != len(header):
                raise ValueError(f"{path} line {reader.line_num}: {len(cells)} fields, the header has {len(header)}")
            records.append((reader.line_num, dict(zip(header, cells))))
    return header, records


def parse_answers(text, where):
    """A list literal becomes its items (ast.literal_eval: a user's file is never executed); any other text is the
    single reference."""
    if not text.strip().startswith("["):
        return [text]
    try:
        answers = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise ValueError(f"{where}: answer {text[:80]!r} starts with '[' but is not a list literal") from None
    if not isinstance(answers, list) or not answers:
        raise ValueError(f"{where}: answer {text[:80]!r} is not a non-empty list")
    return [str(a) for a in answers]


def load_benchmark(name, tsv_path):
    """Reads one benchmark file into Rows (in file order) with their prompts."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    bench = BENCHMARKS[name]
    header, records = read_tsv(tsv_path)
    required = ("index", "image", "answer") + (() if bench.kind == "caption" else ("question",)) + bench.columns
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{tsv_path}: missing column(s) {missing} needed by {name}; the header has {header}")
    if not records:
        raise ValueError(f"{tsv_path}: no rows")
    letters = [c for c in OPTION_LETTERS if c in header]

    image_cells, line_of = {}, {}
    for line, cells in records:
        where = f"{tsv_path} line {line} (index {cells['index']})"
        for column in required:
            if not cells[column].strip() or (column == "image" and cells[column] in PANDAS_NA):
                raise ValueError(f"{where}: empty {column!r}")
        index = index_key(cells["index"])
        if index in line_of:
            raise ValueError(f"{where}: index {index} already used on line {line_of[index]}")
        line_of[index] = line
        image_cells[index] = cells["image"]

    rows = []
    for line, cells in records:
        index = index_key(cells["index"])
        where = f"{tsv_path} line {line} (index {cells['index']})"
        image = cells["image"]
        if len(image) <= 64:  # VLMEvalKit's convention: a short cell is the index of the row holding the image
            target = index_key(image)
            if target not in image_cells or len(image_cells[target]) <= 64:
                raise ValueError(f"{where}: image cell {image!r} must name a row that holds an image itself")
            images_b64 = [image_cells[target]]
        elif image.startswith("[") and image.endswith("]"):
            try:
                images_b64 = ast.literal_eval(image)
            except (ValueError, SyntaxError):
                raise ValueError(f"{where}: image cell starts with '[' but is not a list literal") from None
            if not isinstance(images_b64, list) or not images_b64 or not all(isinstance(b, str) for b in images_b64):
                raise ValueError(f"{where}: image list literal must hold base64 strings")
        else:
            images_b64 = [image]
        answer, hint = cells["answer"], cells.get("hint")
        row = Row(index=index, images_b64=images_b64, question=cells.get("question", COCO_PROMPT), answer=answer,
                  answers=parse_answers(answer, where),
                  options={c: cells[c] for c in letters if cells[c] not in PANDAS_NA},
                  hint=None if hint is None or hint in PANDAS_NA else hint,
                  fields=cells, prompt="", source=tsv_path, where=where)
        if bench.kind == "yorn" and answer not in ("Yes", "No"):
            raise ValueError(f"{where}: a yes/no answer must be exactly 'Yes' or 'No', got {answer!r}")
        if bench.kind == "mcq" and not re.fullmatch(r"[A-Z]", answer):
            raise ValueError(f"{where}: a multiple-choice answer must be one capital letter, got {answer!r}")
        row.prompt = PROMPTS[bench.kind](row)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# prompts: VLMEvalKit's dataset defaults (the authors' model wrapper does not override them); images come first

COCO_PROMPT = ('Please describe this image in general. Directly provide the description, '
               'do not include prefix like "This image depicts". ')


def mcq_prompt(row):
    prompt = f"Hint: {row.hint}\n" if row.hint is not None else ""
    prompt += f"Question: {row.question}\n"
    if row.options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in row.options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


PROMPTS = {
    "yorn": lambda row: row.question,
    "ocrbench": lambda row: row.question,
    "caption": lambda row: row.question,  # COCO_PROMPT unless the file has a question column
    "mcq": mcq_prompt,
    "vqa": lambda row: row.question + "\nAnswer the question using a single word or phrase.",
}

# -----------------------------------------------------------------------------
# answer normalisation and extraction

VQA_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                   "?", "!"]
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# The VQA evaluation's contraction table. Text is lower-cased first, so its capitalised entries (Im, Ive, Id've)
# can never match and are left out, as are the entries that map a word to itself.
CONTRACTIONS = dict(pair.split(" ") for pair in """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|couldnt've couldn't've
didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|hadn'tve hadn't've|hasnt hasn't
havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|howd how'd|howll how'll|hows how's|isnt isn't
itd it'd|itd've it'd've|it'dve it'd've|itll it'll|maam ma'am|mightnt mightn't|mightnt've mightn't've
mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|neednt needn't|notve not've|oclock o'clock
oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've
shouldve should've|shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|somebodys somebody's|someoned someone'd
someoned've someone'd've|someone'dve someone'd've|someonell someone'll|someones someone's|somethingd something'd
somethingd've something'd've|something'dve something'd've|somethingll something'll|thats that's|thered there'd
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|theyd've they'd've
they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|wasnt wasn't|wed've we'd've
we'dve we'd've|weve we've|werent weren't|whatll what'll|whatre what're|whats what's|whatve what've|whens when's
whered where'd|wheres where's|whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|yall'd've y'all'd've
y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|you'dve you'd've|youll you'll|youre you're
youve you've""".replace("\n", "|").strip("|").split("|"))


def strip_punctuation(text):
    """VQA punctuation rule: a mark is deleted everywhere when it touches a space somewhere in the text, or when the
    text has a digit,digit ("1,000" -> "1000"); otherwise each occurrence becomes a space ("coca-cola" -> "coca cola").
    Then periods not followed by a digit are deleted ("U.S.A." -> "USA", "3.5" stays), at most 32 of them:
    VLMEvalKit passes re.UNICODE (= 32) where re.sub takes its count."""
    delete_everywhere = re.search(r"\d,\d", text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        touches_space = mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete_everywhere or touches_space else " ")
    return re.sub(r"\.(?!\d)", "", out, count=32)


def normalize_vqa_answer(text):
    text = strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ("a", "an", "the"))


def extract_yes_no(prediction):
    """'Yes' / 'No' when exactly one of the whole words yes / no occurs, else 'Unknown' (scored wrong)."""
    words = strip_punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return "Unknown"


MCQ_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer")
LETTER_SEPARATORS = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def extract_option(prediction, options):
    """The chosen option letter, 'Z' (a refusal, or a bare Z), or None when nothing can be read (scored wrong).
    A capital letter standing alone that is one of this row's options wins if it is the only one ("(B)", "B.",
    "**B**", "Answer: B", but also the article in "A dog"); otherwise the option whose text alone occurs in the
    prediction, case-insensitively."""
    if any(refusal in prediction for refusal in MCQ_REFUSALS):
        return "Z"
    tokens = prediction.translate(LETTER_SEPARATORS).split()
    letters = [letter for letter in options if letter in tokens]
    if len(letters) == 1:
        return letters[0]
    if not letters and "Z" in tokens:
        return "Z"
    by_text = [letter for letter, text in options.items() if text.lower() in prediction.lower()]
    return by_text[0] if len(by_text) == 1 else None


# -----------------------------------------------------------------------------
# scorers: each takes the rows and their predictions (same order) and returns {metric: value}


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def group_scores(rows, values, columns=("split", "category", "l2-category"), scale=100.0):
    """Mean of the per-row values within each value of each grouping column the file has: {"category:count": ...}."""
    out = {}
    for column in columns:
        if column not in rows[0].fields:
            continue
        groups = defaultdict(list)
        for row, value in zip(rows, values):
            groups[row.fields[column]].append(value)
        out.update({f"{column}:{group}": scale * mean(v) for group, v in sorted(groups.items())})
    return out


def precision_recall_f1(truth, predicted):
    """Positive = Yes. A prediction that is neither Yes nor No counts as a negative here. 0 where undefined."""
    tp = sum(t and p for t, p in zip(truth, predicted))
    fp = sum(p and not t for t, p in zip(truth, predicted))
    fn = sum(t and not p for t, p in zip(truth, predicted))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def score_pope(rows, predictions):
    extracted = [extract_yes_no(p) for p in predictions]
    # a question may sit in several comma-joined splits; it then counts once per split, in Overall too
    exploded = []  # (split, answer is Yes, prediction is Yes, right)
    for row, guess in zip(rows, extracted):
        splits = row.fields["category"].split(",") if "category" in row.fields else [None]
        exploded += [(split, row.answer == "Yes", guess == "Yes", guess == row.answer) for split in splits]
    precision, recall, f1 = precision_recall_f1([e[1] for e in exploded], [e[2] for e in exploded])
    out = {"Overall": 100 * f1, "acc": 100 * mean(e[3] for e in exploded), "precision": 100 * precision,
           "recall": 100 * recall, "unparsable_rate": mean(g == "Unknown" for g in extracted)}
    for split in sorted({e[0] for e in exploded if e[0] is not None}):
        part = [e for e in exploded if e[0] == split]
        out[f"category:{split}"] = 100 * precision_recall_f1([e[1] for e in part], [e[2] for e in part])[2]
    return out


MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                  "scene")
MME_REASONING = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def score_mme(rows, predictions):
    """Per category: acc (questions right) + acc+ (images with both questions right), each in %, so 0-200.
    perception and reasoning sum their categories; Overall = perception + reasoning (max 2800)."""
    extracted = [extract_yes_no(p) for p in predictions]
    pairs = defaultdict(list)  # (category, image_path) -> [(row, right)], one Yes and one No question by design
    for row, guess in zip(rows, extracted):
        pairs[(row.fields["category"], row.fields["image_path"])].append((row, guess == row.answer))
    for (category, image_path), questions in pairs.items():
        if len(questions) != 2:
            raise ValueError(f"{questions[0][0].where}: MME image {image_path!r} in category {category!r} has "
                             f"{len(questions)} questions (indices {[r.index for r, _ in questions]}), expected 2")
    categories = {category for category, _ in pairs}
    unknown = sorted(categories - set(MME_PERCEPTION + MME_REASONING))
    absent = [c for c in MME_PERCEPTION + MME_REASONING if c not in categories]
    if unknown or absent:
        raise ValueError(f"{rows[0].source}: MME categories do not match the 14 of MME "
                         f"(unknown {unknown}, absent {absent}); its totals would mean something else")
    category_scores = {}
    for category in MME_PERCEPTION + MME_REASONING:
        images = [[right for _, right in q] for (c, _), q in pairs.items() if c == category]
        acc = 100 * mean(right for pair in images for right in pair)
        acc_plus = 100 * mean(all(pair) for pair in images)
        category_scores[category] = acc + acc_plus
    perception = sum(category_scores[c] for c in MME_PERCEPTION)
    reasoning = sum(category_scores[c] for c in MME_REASONING)
    out = {"Overall": perception + reasoning, "perception": perception, "reasoning": reasoning,
           "unparsable_rate": mean(g == "Unknown" for g in extracted)}
    out.update({f"category:{c}": s for c, s in category_scores.items()})
    return out


def score_hallusion(rows, predictions):
    """aAcc: questions right; fAcc: figures with all their questions right; qAcc: questions right on every figure
    they are asked about. Each in %; Overall = their mean (the leaderboard's HallusionBench number)."""
    extracted = [extract_yes_no(p) for p in predictions]
    keyed = []  # (row, right, figure key, question key)
    for row, guess in zip(rows, extracted):
        parts = row.index.split("_")
        if len(parts) < 6:  # VLMEvalKit reads set, figure and question ids from fields 3, 4, 5 of the index
            raise ValueError(f"{row.where}: a HallusionBench index is <category>_<subcategory>_<x>_<set>_<figure>_"
                             f"<question>, got {row.index!r}")
        l2, (set_id, figure_id, question_id) = row.fields["l2-category"], parts[3:6]
        keyed.append((row, guess == row.answer, (l2, set_id, figure_id), (l2, set_id, question_id)))

    def three_scores(part):
        figures, questions = defaultdict(list), defaultdict(list)
        for _, right, figure, question in part:
            figures[figure].append(right)
            questions[question].append(right)
        return (100 * mean(right for _, right, _, _ in part), 100 * mean(map(all, figures.values())),
                100 * mean(map(all, questions.values())))

    a_acc, f_acc, q_acc = three_scores(keyed)
    out = {"Overall": (a_acc + f_acc + q_acc) / 3, "aAcc": a_acc, "fAcc": f_acc, "qAcc": q_acc,
           "unparsable_rate": mean(g == "Unknown" for g in extracted)}
    for column in ("category", "l2-category"):
        for group in sorted({k[0].fields[column] for k in keyed}):
            out[f"{column}:{group}"] = mean(three_scores([k for k in keyed if k[0].fields[column] == group]))
    return out


def score_mcq(rows, predictions):
    chosen = [extract_option(p, row.options) for row, p in zip(rows, predictions)]
    hits = [guess == row.answer for row, guess in zip(rows, chosen)]
    out = {"Overall": 100 * mean(hits), "unparsable_rate": mean(guess is None for guess in chosen)}
    out.update(group_scores(rows, hits))
    return out


def vqa_accuracy(prediction, answers):
    """TextVQA: each reference in turn is left out and the prediction scores min(1, matches among the others / 3);
    the row scores the mean. So 1 of 10 references matching gives 0.3, 4 or more give 1, a lone reference 0."""
    prediction = normalize_vqa_answer(prediction)
    references = [normalize_vqa_answer(a) for a in answers]
    matches = sum(r == prediction for r in references)
    return mean(min(1.0, (matches - (r == prediction)) / 3) for r in references)


def exact_match(prediction, answers):
    """OCRVQA: equal after strip and lower-casing, punctuation included ("Yes." is not "Yes")."""
    return float(any(a.strip().lower() == prediction.strip().lower() for a in answers))


def to_float(text):
    try:
        return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction, answers):
    """ChartQA relaxed accuracy as VLMEvalKit 0ff0c3e computes it: pix2struct's rule with prediction and answer
    swapped. So the 5% tolerance is relative to the *prediction*, and a zero or non-numeric prediction (or a
    non-numeric answer) falls back to case-insensitive string equality. "12%" reads as 0.12."""
    prediction = prediction.strip()
    denominator = to_float(prediction)
    for answer in answers:
        value = to_float(answer)
        if denominator and value is not None:  # nonzero number
            right = abs(value - denominator) / abs(denominator) <= 0.05
        else:
            right = prediction.lower() == answer.lower()
        if right:
            return 1.0
    return 0.0


def make_vqa_scorer(row_score):
    def score_vqa(rows, predictions):
        values = [row_score(p, row.answers) for row, p in zip(rows, predictions)]
        return {"Overall": 100 * mean(values), **group_scores(rows, values)}
    return score_vqa


OCRBENCH_HMER = "Handwritten Mathematical Expression Recognition"


def ocrbench_hit(prediction, answers, category):
    """A reference found inside the prediction; formulas (HMER) compare case-sensitively with all spaces removed."""
    if category == OCRBENCH_HMER:
        clean = lambda s: s.strip().replace("\n", " ").replace(" ", "")
    else:
        clean = lambda s: s.lower().strip().replace("\n", " ")
    return any(clean(a) in clean(prediction) for a in answers)


def score_ocrbench(rows, predictions):
    """Final Score = number of rows hit (0-1000 on the full file); per category the same count."""
    hits = [ocrbench_hit(p, row.answers, row.fields["category"]) for row, p in zip(rows, predictions)]
    out = {"Final Score": float(sum(hits))}
    counts = defaultdict(int)
    for row, hit in zip(rows, hits):
        counts[row.fields["category"]] += hit
    out.update({f"category:{c}": float(n) for c, n in sorted(counts.items())})
    return out


# COCO captions: pycocoevalcap's BLEU, ROUGE-L and CIDEr-D on raw strings (VLMEvalKit skips the PTB tokenizer, so
# case and punctuation count). Each hypothesis is one string, each reference set a list of strings.

def ngram_counts(words, n_max=4):
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def bleu(hypotheses, references):
    """Corpus BLEU-1..4 in [0, 1]. Per image the reference length is the one closest to the hypothesis (ties: the
    shorter); n-gram counts are clipped by their largest count in any single reference; counts are summed over the
    corpus and smoothed with 1e-15 / 1e-9, so a short exact match still gets a small BLEU-4."""
    test_len = ref_len = 0
    guess, correct = [0] * 4, [0] * 4
    for hypothesis, refs in zip(hypotheses, references):
        words = hypothesis.split()
        ref_words = [r.split() for r in refs]
        clip = Counter()
        for r in ref_words:
            clip |= ngram_counts(r)  # | keeps the larger count
        test_len += len(words)
        ref_len += min((len(r) for r in ref_words), key=lambda length: (abs(length - len(words)), length))
        for gram, count in ngram_counts(words).items():
            correct[len(gram) - 1] += min(count, clip[gram])
        for n in range(4):
            guess[n] += max(0, len(words) - n)
    scores, product = [], 1.0
    for n in range(4):
        product *= (correct[n] + 1e-15) / (guess[n] + 1e-9)
        scores.append(product ** (1 / (n + 1)))
    ratio = (test_len + 1e-15) / (ref_len + 1e-9)
    brevity = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    return [s * brevity for s in scores]


def lcs_length(a, b):
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(hypothesis, refs, beta=1.2):
    """ROUGE-L of one image: best precision and best recall over the references (maybe from different ones) into
    an F-measure weighted by beta. Tokens are split on single spaces, so a double space makes an empty token."""
    words = hypothesis.split(" ")
    lcs = [(lcs_length(r.split(" "), words), len(r.split(" "))) for r in refs]
    precision = max(common / len(words) for common, _ in lcs)
    recall = max(common / length for common, length in lcs)
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)


def cider_d(hypotheses, references, sigma=6.0):
    """Corpus CIDEr-D (x10 scale as pycocoevalcap reports it). n-grams weighted by tf * idf, with the document
    frequency counted over this corpus's reference sets (so a 1-image corpus scores 0); per n a cosine whose
    hypothesis weights are clipped by the reference's; times a Gaussian penalty on the length difference, where the
    length counted is the number of bigrams (as pycocoevalcap does; for non-empty captions the difference is the
    word-count difference); averaged over n = 1..4 and the references, x10."""
    log_images = math.log(len(hypotheses))
    hyp_counts = [ngram_counts(h.split()) for h in hypotheses]
    ref_counts = [[ngram_counts(r.split()) for r in refs] for refs in references]
    document_frequency = Counter(gram for refs in ref_counts for gram in set().union(*refs))

    def weights(counts):  # -> per-n {gram: weight}, per-n norms, length
        vectors = [{} for _ in range(4)]
        for gram, tf in counts.items():
            vectors[len(gram) - 1][gram] = tf * (log_images - math.log(max(1, document_frequency[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
        return vectors, norms, sum(tf for gram, tf in counts.items() if len(gram) == 2)

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        h_vectors, h_norms, h_length = weights(hyp)
        total = 0.0
        for ref in refs:
            r_vectors, r_norms, r_length = weights(ref)
            penalty = math.exp(-((h_length - r_length) ** 2) / (2 * sigma ** 2))
            for h, r, h_norm, r_norm in zip(h_vectors, r_vectors, h_norms, r_norms):
                similarity = sum(min(w, r.get(g, 0.0)) * r.get(g, 0.0) for g, w in h.items())
                if h_norm and r_norm:
                    similarity /= h_norm * r_norm
                total += similarity * penalty
        scores.append(10 * total / 4 / len(refs))
    return mean(scores)


def caption_scores(hypotheses, references):
    b1, b2, b3, b4 = bleu(hypotheses, references)
    return {"BLEU-1": 100 * b1, "BLEU-2": 100 * b2, "BLEU-3": 100 * b3, "BLEU-4": 100 * b4,
            "ROUGE-L": 100 * mean(rouge_l(h, refs) for h, refs in zip(hypotheses, references)),
            "CIDEr": 100 * cider_d(hypotheses, references)}


def score_caption(rows, predictions):
    out = caption_scores(predictions, [row.answers for row in rows])
    if "category" in rows[0].fields:  # CIDEr per group (its idf then comes from that group alone)
        for group in sorted({row.fields["category"] for row in rows}):
            part = [(p, row.answers) for row, p in zip(rows, predictions) if row.fields["category"] == group]
            out[f"category:{group}"] = 100 * cider_d([p for p, _ in part], [a for _, a in part])
    return out


SCORERS = {
    "pope": score_pope,
    "mme": score_mme,
    "hallusion": score_hallusion,
    "mcq": score_mcq,
    "vqa_accuracy": make_vqa_scorer(vqa_accuracy),
    "exact_match": make_vqa_scorer(exact_match),
    "relaxed_accuracy": make_vqa_scorer(relaxed_accuracy),
    "ocrbench": score_ocrbench,
    "caption": score_caption,
}


def score(name, rows, predictions, source="predictions"):
    """predictions: {index_key: prediction text}, exactly one per row. Returns {metric: value}, headline first."""
    known = {row.index for row in rows}
    unknown = [index for index in predictions if index not in known]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} prediction(s) for indices not in {name}, e.g. {unknown[:5]}")
    missing = [row.index for row in rows if row.index not in predictions]
    if missing:
        raise ValueError(f"{source}: no prediction for {len(missing)} of the {len(rows)} rows of {name}, e.g. "
                         f"indices {missing[:5]}; a partial score is not reported")
    bench = BENCHMARKS[name]
    scores = SCORERS[bench.scorer](rows, [predictions[row.index] for row in rows])
    return {**{metric: scores.pop(metric) for metric in bench.metrics}, **scores}


# -----------------------------------------------------------------------------
# predictions in, results out

RESULTS_HEADER = ["variant", "benchmark", "metric", "n_l", "n_s", "score", "ckpt", "n_samples"]


def read_predictions(path):
    """JSONL, one {"index": int or str, "prediction": str} per line -> {index_key: prediction}."""
    predictions, line_of = {}, {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "index" not in record or "prediction" not in record:
                raise ValueError(f"{path} line {line_no}: expected an object with 'index' and 'prediction'")
            index, prediction = record["index"], record["prediction"]
            if isinstance(index, bool) or not isinstance(index, (int, str)):
                raise ValueError(f"{path} line {line_no}: index must be an integer or a string, got {index!r}")
            if not isinstance(prediction, str):
                raise ValueError(f"{path} line {line_no}: prediction must be a string, got {prediction!r}")
            key = index_key(index)
            if key in predictions:
                raise ValueError(f"{path} line {line_no}: index {index!r} already predicted on line {line_of[key]}")
            predictions[key], line_of[key] = prediction, line_no
    if not predictions:
        raise ValueError(f"{path}: no predictions in the file")
    return predictions


def append_results(path, variant, benchmark, n_l, n_s, scores, ckpt, n_samples):
    """Appends one row per metric to results.csv; writes the header when the file is new, checks it otherwise."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != RESULTS_HEADER:
            raise ValueError(f"{path}: header {header} is not {RESULTS_HEADER}; write the results somewhere else")
        new = False
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        new = True
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(RESULTS_HEADER)
        for metric, value in scores.items():
            writer.writerow([variant, benchmark, metric, n_l, n_s, f"{value:.6g}", ckpt, n_samples])


def print_table(benchmark, scores, n_samples):
    print(f"{benchmark}: {n_samples} samples")
    width = max(len(metric) for metric in scores)
    for metric, value in scores.items():
        print(f"  {metric:<{width}}  {value:10.4f}")


# -----------------------------------------------------------------------------
# running checkpoints

VARIANTS = {(False, False): "VQQ", (False, True): "VQ", (True, True): "VQ-ft"}  # (drop_question trained, run)


def device_and_dtype(cfg):
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return device, getattr(torch, dtype)


def read_checkpoint(path):
    """-> (trained weights {module name: tensor}, meta) of a stage-2/3 checkpoint."""
    tensors, meta = load_checkpoint(path, prefix="model.")
    if meta.get("stage") != "gen":
        raise SystemExit(f"{path}: a stage {meta.get('stage')!r} checkpoint; evaluate.py runs stage-2/3 ('gen') "
                         f"checkpoints of train_gen.py (a stage-1 'align' checkpoint has no bridge into the LLM)")
    missing = [key for key in ("model_config", "clip_path", "llama_path", "token_space") if key not in meta]
    if missing:
        raise SystemExit(f"{path}: its meta lacks {missing}, which the checkpoint schema requires")
    return {k[len("model."):]: v for k, v in tensors.items()}, meta


def build_vlm(model_cfg, weights, llm, path, device, dtype):
    try:
        vlm = FusedVLM.from_pretrained(model_cfg, weights, llm, path)
    except ValueError as e:  # an LLM that is not the one the checkpoint was trained with
        raise SystemExit(str(e)) from None
    return vlm.to(device=device, dtype=dtype).eval()


def run_settings(cfg, meta, model_cfg, path):
    """-> (TokenSpaceConfig, variant): the checkpoint's token space with the command line's overrides."""
    trained = meta["token_space"]
    if cfg.drop_question not in ("", "True", "False"):
        raise SystemExit(f"drop_question must be True, False or empty (as trained), got {cfg.drop_question!r}")
    drop_question = trained["drop_question"] if cfg.drop_question == "" else cfg.drop_question == "True"
    ts_cfg = TokenSpaceConfig(clip_path=cfg.clip_path or meta["clip_path"],
                              llama_path=cfg.llama_path or meta["llama_path"], image_size=trained["image_size"],
                              num_crops=trained["num_crops"] if cfg.num_crops < 0 else cfg.num_crops,
                              n_l=cfg.n_l or trained["n_l"], n_s=cfg.n_s or trained["n_s"],
                              drop_question=drop_question, max_seq_len=trained["max_seq_len"],
                              system_prompt=trained["system_prompt"])
    if ts_cfg.n_l - 1 > model_cfg.n_queries:
        raise SystemExit(f"{path}: n_l={ts_cfg.n_l} needs {ts_cfg.n_l - 1} learned queries, the checkpoint has "
                         f"{model_cfg.n_queries}")
    variant = cfg.variant or VARIANTS.get((trained["drop_question"], drop_question))
    if variant is None:
        raise SystemExit(f"{path} was trained with drop_question=True and runs with the question: name this "
                         f"combination with --variant")
    return ts_cfg, variant


def claim_run_dir(run_dir, settings):
    """run.json records what the predictions in run_dir were made with; resuming them with other settings (another
    checkpoint, token space, dtype...) would mix two models in one file, so it is refused."""
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = {k: (before.get(k), settings.get(k)) for k in settings.keys() | before.keys()
                       if before.get(k) != settings.get(k)}
            raise SystemExit(f"{path}: the predictions there were made with other settings (then, now): {changed}; "
                             f"use another out_dir or --variant")
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def resume_predictions(path, rows):
    """{index: prediction} already in `path` from an interrupted run (empty when there is no file). An incomplete
    last line (the process died mid-write) is cut off; every other line must be a valid prediction of this file."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: cutting off an incomplete last line ({len(data) - end} bytes) left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(end)
    if not data[:end].strip():
        return {}
    predictions = read_predictions(path)
    known = {row.index for row in rows}
    unknown = [index for index in predictions if index not in known]
    if unknown:
        raise SystemExit(f"{path}: predictions for indices that {rows[0].source} does not have, e.g. {unknown[:5]}; "
                         f"it was made from another file: remove it or use another out_dir")
    return predictions


def predict(vlm, token_space, name, rows, path, cfg, device, dtype, tag):
    """Greedy answers for the rows not yet in `path`, appended to it batch by batch -> ({index: prediction} of all
    rows, samples generated now)."""
    predictions = resume_predictions(path, rows)
    todo = [row for row in rows if row.index not in predictions]
    several = sum(len(row.images_b64) > 1 for row in rows)
    print(f"{tag} {name}: {len(rows)} rows, {len(predictions)} already in {path}, {len(todo)} to generate"
          + (f"; {several} rows hold several images, each is shown its last one" if several else ""))
    specials = {token_space.sp.unk_id(), token_space.sp.bos_id(), token_space.sp.eos_id()}
    t_start, new_tokens = time.time(), 0
    with open(path, "a", encoding="utf-8") as f:
        for start in range(0, len(todo), cfg.batch_size):
            t_batch = time.time()
            chunk = todo[start:start + cfg.batch_size]
            samples = [token_space.generation_sample(row.images(cfg.jpeg_reencode)[-1], row.prompt) for row in chunk]
            batch = {k: v.to(device) for k, v in collate(samples, pad_side="left").items()}
            batch["pixel_values"] = batch["pixel_values"].to(dtype)
            answers = vlm.generate(batch, max_new_tokens=BENCHMARKS[name].max_new_tokens,
                                   eos_token_id=token_space.eos, min_new_tokens=1)
            for row, ids in zip(chunk, answers):
                text = token_space.sp.decode([t for t in ids if t not in specials]).strip()
                f.write(json.dumps({"index": row.index, "prediction": text, "prompt": row.prompt},
                                   ensure_ascii=False) + "\n")
                predictions[row.index] = text
            f.flush()
            dt, tokens = time.time() - t_batch, sum(len(ids) for ids in answers)
            new_tokens += tokens
            print(f"{tag} {name} {start + len(chunk)}/{len(todo)} | {len(chunk) / dt:.2f} samples/s | "
                  f"{tokens / dt:.1f} new tok/s")
    if todo:
        dt = time.time() - t_start
        print(f"{tag} {name}: {len(todo)} samples, {new_tokens} new tokens in {dt:.1f} s "
              f"({len(todo) / dt:.2f} samples/s, {new_tokens / dt:.1f} new tok/s)")
    return predictions, len(todo)


def already_scored(results_path):
    """(variant, benchmark, n_l, n_s, ckpt) of every block results.csv holds."""
    if not os.path.exists(results_path) or os.path.getsize(results_path) == 0:
        return set()
    with open(results_path, newline="") as f:
        return {(r["variant"], r["benchmark"], r["n_l"], r["n_s"], r["ckpt"]) for r in csv.DictReader(f)}


def evaluate_checkpoints(cfg):
    device, dtype = device_and_dtype(cfg)
    names, ckpts = [n for n in cfg.benchmarks.split(",") if n], [c for c in cfg.ckpt.split(",") if c]
    if not ckpts:
        raise SystemExit("give --ckpt=DIR[,DIR2,...] (or --score_only=True / --bench=True)")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        raise SystemExit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    if cfg.tsv and len(names) > 1:
        raise SystemExit("--tsv names the file of a single benchmark; with several use --bench_dir")
    tsv_of = {n: cfg.tsv or os.path.join(cfg.bench_dir, n + ".tsv") for n in names}
    missing = [p for p in list(tsv_of.values()) + [checkpoint_file(c) for c in ckpts] if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"not found: {missing} (benchmark TSVs go in --bench_dir as <NAME>.tsv; a checkpoint is a "
                         f"folder with ckpt.safetensors or the file)")
    results_path = os.path.join(cfg.out_dir, "results.csv")
    scored = already_scored(results_path)
    print(f"{len(ckpts)} checkpoint(s) x {len(names)} benchmark(s) on {device} in {dtype}; results -> {results_path}")
    run_dirs, llm, llm_source, generated, t_start = {}, None, None, 0, time.time()
    for ckpt in ckpts:
        path = checkpoint_file(ckpt)
        weights, meta = read_checkpoint(path)
        model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
        ts_cfg, variant = run_settings(cfg, meta, model_cfg, path)
        run_dir = os.path.join(cfg.out_dir, f"{variant}_nl{ts_cfg.n_l}")
        if run_dir in run_dirs:
            raise SystemExit(f"{ckpt} and {run_dirs[run_dir]} would both write {run_dir}: evaluate them in separate "
                             f"calls with different --out_dir or --variant")
        run_dirs[run_dir] = ckpt
        claim_run_dir(run_dir, {"ckpt": os.path.abspath(path), "variant": variant, "n_l": ts_cfg.n_l,
                                "n_s": ts_cfg.n_s, "num_crops": ts_cfg.num_crops, "image_size": ts_cfg.image_size,
                                "drop_question": ts_cfg.drop_question, "jpeg_reencode": cfg.jpeg_reencode,
                                "dtype": str(dtype).removeprefix("torch.")})
        tag = f"[{variant} n_l={ts_cfg.n_l}]"
        pending = [n for n in names if (variant, n, str(ts_cfg.n_l), str(ts_cfg.n_s), ckpt) not in scored]
        if len(pending) < len(names):
            print(f"{tag} {ckpt}: already in {results_path}: {[n for n in names if n not in pending]}; not redone")
        if not pending:
            continue
        print(f"{tag} {ckpt}: token space {asdict(ts_cfg)}")
        token_space = TokenSpace(ts_cfg)
        if llm_source != (ts_cfg.llama_path, model_cfg.llm):  # a sweep shares one LLM: load it once
            llm = None  # frees the previous one first
            llm = Llama.from_hf(ts_cfg.llama_path, dtype=dtype).to(device)
            llm_source = (ts_cfg.llama_path, model_cfg.llm)
        vlm = build_vlm(model_cfg, weights, llm, path, device, dtype)
        del weights
        for name in pending:
            rows = load_benchmark(name, tsv_of[name])
            predictions_path = os.path.join(run_dir, f"predictions_{name}.jsonl")
            predictions, n_new = predict(vlm, token_space, name, rows, predictions_path, cfg, device, dtype, tag)
            generated += n_new
            scores = score(name, rows, predictions, source=predictions_path)
            append_results(results_path, variant, name, ts_cfg.n_l, ts_cfg.n_s, scores, ckpt, len(rows))
            print_table(f"{tag} {name}", scores, len(rows))
        del vlm
    print(f"done: {generated} samples generated in {time.time() - t_start:.1f} s; results in {results_path}")


# -----------------------------------------------------------------------------
# bench: how fast batched greedy generation is (timings are printed, never asserted)

TEMPLATE_TOKENS = 44  # LLM tokens of <s> + the chat template's system piece before the slots (Llama-2's default)


def synthetic_batch(model_cfg, batch_size, n_l, num_crops, question_len):
    """A generation batch per the batch contract, random pixels and ids: every sample 1 + num_crops crops, a
    question_len-token question and n_l outputs; on the LLM side [template][n_l slots][question][/INST]."""
    B, q, S = batch_size, question_len, model_cfg.vit.image_size
    g = torch.Generator().manual_seed(0)
    false, true = torch.zeros(B, 1, dtype=torch.bool), torch.ones(B, 1, dtype=torch.bool)
    fused_ids = torch.cat([torch.randint(model_cfg.fused_vocab_size - 1, (B, q), generator=g),
                           torch.arange(n_l - 1).expand(B, -1),
                           torch.full((B, 1), model_cfg.fused_vocab_size - 1)], dim=1)  # EOS: CLIP's last id
    query_mask = torch.cat([false.expand(B, q), true.expand(B, n_l - 1), false], dim=1)
    output_mask = torch.cat([false.expand(B, q), true.expand(B, n_l)], dim=1)
    input_ids = torch.randint(3, model_cfg.llm.vocab_size, (B, TEMPLATE_TOKENS + n_l + q + 4), generator=g)
    slot_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    slot_mask[:, TEMPLATE_TOKENS:TEMPLATE_TOKENS + n_l] = True
    return {"pixel_values": torch.randn(B * (1 + num_crops), 3, S, S, generator=g),
            "crop_to_sample": torch.arange(B).repeat_interleave(1 + num_crops),
            "fused_ids": fused_ids, "query_mask": query_mask, "output_mask": output_mask,
            "fused_attention_mask": torch.ones_like(query_mask), "input_ids": input_ids, "slot_mask": slot_mask,
            "attention_mask": torch.ones_like(slot_mask)}


def run_bench(cfg):
    device, dtype = device_and_dtype(cfg)
    ckpts = [c for c in cfg.ckpt.split(",") if c]
    if ckpts:
        path = checkpoint_file(ckpts[0])
        weights, meta = read_checkpoint(path)
        model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
        llm = Llama.from_hf(cfg.llama_path or meta["llama_path"], dtype=dtype).to(device)
        vlm = build_vlm(model_cfg, weights, llm, path, device, dtype)
        trained = meta["token_space"]
        n_l, num_crops, what = trained["n_l"], trained["num_crops"], path
    else:
        if device.type == "cpu":
            raise SystemExit("without --ckpt the bench builds the paper-size model (a 7B LLM): run it on a GPU, or "
                             "give a (tiny) checkpoint")
        model_cfg = FusedVLMConfig()
        with torch.device(device):  # random weights: the speed does not depend on their values
            vlm = FusedVLM(model_cfg)
        vlm = vlm.to(dtype).eval()
        n_l, num_crops, what = 256, 16, "the paper's configuration, random weights"
    n_l = cfg.n_l or n_l
    num_crops = num_crops if cfg.num_crops < 0 else cfg.num_crops
    batch = {k: v.to(device) for k, v in
             synthetic_batch(model_cfg, cfg.batch_size, n_l, num_crops, cfg.bench_question_len).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    B, L = batch["input_ids"].shape
    N = cfg.bench_new_tokens

    def seconds(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = defaultdict(list)
    with torch.no_grad():
        for run in range(1 + cfg.bench_repeats):  # run 0 warms up
            for key, fn in [("front", lambda: vlm.fused_tokens(batch)),
                            ("prefill", lambda: vlm.generate(batch, max_new_tokens=1, eos_token_id=None)),
                            ("full", lambda: vlm.generate(batch, max_new_tokens=N, eos_token_id=None))]:
                t = seconds(fn)
                if run:
                    times[key].append(t)
    front, prefill, full = (statistics.median(times[k]) for k in ("front", "prefill", "full"))
    print(f"bench: {what}\n  batch {B}, {1 + num_crops} crops and n_l={n_l} per sample, LLM prompt {L} tokens, "
          f"{N} new tokens, {dtype} on {device}, median of {cfg.bench_repeats} runs")
    print(f"  vision + fused + bridge   {1000 * front:9.1f} ms")
    print(f"  prefill (all of it)       {1000 * prefill:9.1f} ms | {B * L / prefill:10.1f} prompt tok/s")
    print(f"  decode ({N - 1} steps)         {1000 * (full - prefill):9.1f} ms | "
          f"{B * (N - 1) / (full - prefill):10.1f} new tok/s | {1000 * (full - prefill) / max(1, N - 1):.2f} ms/step")


# -----------------------------------------------------------------------------


def main(argv):
    cfg, positional = parse_config(Config(), argv)
    if positional:
        raise SystemExit(f"evaluate.py takes no positional arguments, got {positional}")
    if cfg.bench:
        return run_bench(cfg)
    if not cfg.score_only:
        return evaluate_checkpoints(cfg)
    if cfg.benchmarks not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {cfg.benchmarks!r} (score_only scores one); "
                         f"known: {', '.join(BENCHMARKS)}")
    if not cfg.predictions:
        raise SystemExit("--score_only=True needs --predictions=FILE.jsonl")
    rows = load_benchmark(cfg.benchmarks, cfg.tsv or os.path.join(cfg.bench_dir, cfg.benchmarks + ".tsv"))
    predictions = read_predictions(cfg.predictions)
    scores = score(cfg.benchmarks, rows, predictions, source=cfg.predictions)
    append_results(os.path.join(cfg.out_dir, "results.csv"), cfg.variant or "model", cfg.benchmarks, cfg.n_l, cfg.n_s,
                   scores, cfg.ckpt, len(rows))
    print_table(cfg.benchmarks, scores, len(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
