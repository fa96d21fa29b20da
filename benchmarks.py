"""
The benchmarks as VLMEvalKit scores them (commit 0ff0c3e, no LLM judge), with no torch: the benchmark table, reading
a benchmark TSV, the prompts, reading an answer out of a prediction, the scorers, and the predictions and results
files. evaluate.py runs checkpoints over these; `evaluate.py --score_only=True` scores a predictions file with them.

A benchmark is a VLMEvalKit TSV file (<NAME>.tsv: index, base64 image, question, answer, options...). An answer the
rules cannot read counts as wrong, and its share is reported as `unparsable_rate` (a judge could change at most
those rows). Every score is in the paper's units. VLMEvalKit's quirks are kept on purpose where they change a
number; each is described where it is implemented.
"""
import ast
import base64
import csv
import io
import json
import math
import os
import random
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

from PIL import Image

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
# a TSV of the user's own, whose name is not above, runs as one of these kinds (--kind): that kind's prompt and
# scorer; short answers are scored by OCRVQA's exact match, which works with a single reference (TextVQA's rule
# needs ten: one lone reference always scores 0)
KINDS = {"yes_no": POPE_LIKE, "mcq": MCQ, "vqa": BENCHMARKS["OCRVQA_TESTCORE"], "caption": CAPTION}


def benchmark_spec(name, kind=""):
    """The Benchmark a name stands for: a built-in one, or with kind (a key of KINDS) the user's own file."""
    if kind and kind not in KINDS:
        raise ValueError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if name in BENCHMARKS:
        if kind:
            raise ValueError(f"{name} is a built-in benchmark with its own rules; --kind is for a TSV of your own "
                             f"under another name")
        return BENCHMARKS[name]
    if not kind:
        raise ValueError(f"unknown benchmark {name!r}: built in are {', '.join(BENCHMARKS)}; for a TSV of your own "
                         f"pass --kind={'|'.join(KINDS)} (that kind's prompt and scorer)")
    return KINDS[kind]


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

def load_benchmark(name, tsv_path, kind=""):
    """Reads one benchmark file into Rows (in file order) with their prompts; kind: see benchmark_spec."""
    bench = benchmark_spec(name, kind)
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
    """'Yes' / 'No' when exactly one of the whole words yes / no occurs, else None (unreadable, scored wrong)."""
    words = strip_punctuation(prediction.lower()).split()
    if ("yes" in words) != ("no" in words):
        return "Yes" if "yes" in words else "No"
    return None


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
# scorers. Each benchmark's scorer is a pair: read(row, prediction) -> (what the rules read from the prediction,
# None when nothing can be read; the row's own score, None for corpus metrics), and aggregate(rows, extracted,
# row scores) -> {metric: value}, so the per-row fields of a predictions file are what the totals are made of.


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


def read_yes_no(row, prediction):
    guess = extract_yes_no(prediction)
    return guess, float(guess == row.answer)


def score_pope(rows, extracted, scores):
    # a question may sit in several comma-joined splits; it then counts once per split, in Overall too
    exploded = []  # (split, answer is Yes, prediction is Yes, right)
    for row, guess in zip(rows, extracted):
        splits = row.fields["category"].split(",") if "category" in row.fields else [None]
        exploded += [(split, row.answer == "Yes", guess == "Yes", guess == row.answer) for split in splits]
    precision, recall, f1 = precision_recall_f1([e[1] for e in exploded], [e[2] for e in exploded])
    out = {"Overall": 100 * f1, "acc": 100 * mean(e[3] for e in exploded), "precision": 100 * precision,
           "recall": 100 * recall, "unparsable_rate": mean(g is None for g in extracted)}
    for split in sorted({e[0] for e in exploded if e[0] is not None}):
        part = [e for e in exploded if e[0] == split]
        out[f"category:{split}"] = 100 * precision_recall_f1([e[1] for e in part], [e[2] for e in part])[2]
    return out


MME_PERCEPTION = ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters",
                  "scene")
MME_REASONING = ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")


def score_mme(rows, extracted, scores):
    """Per category: acc (questions right) + acc+ (images with both questions right), each in %, so 0-200.
    perception and reasoning sum their categories; Overall = perception + reasoning (max 2800)."""
    pairs = defaultdict(list)  # (category, image_path) -> [(row, right)], one Yes and one No question by design
    for row, right in zip(rows, scores):
        pairs[(row.fields["category"], row.fields["image_path"])].append((row, right == 1))
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
           "unparsable_rate": mean(g is None for g in extracted)}
    out.update({f"category:{c}": s for c, s in category_scores.items()})
    return out


def score_hallusion(rows, extracted, scores):
    """aAcc: questions right; fAcc: figures with all their questions right; qAcc: questions right on every figure
    they are asked about. Each in %; Overall = their mean (the leaderboard's HallusionBench number)."""
    keyed = []  # (row, right, figure key, question key)
    for row, right in zip(rows, scores):
        parts = row.index.split("_")
        if len(parts) < 6:  # VLMEvalKit reads set, figure and question ids from fields 3, 4, 5 of the index
            raise ValueError(f"{row.where}: a HallusionBench index is <category>_<subcategory>_<x>_<set>_<figure>_"
                             f"<question>, got {row.index!r}")
        l2, (set_id, figure_id, question_id) = row.fields["l2-category"], parts[3:6]
        keyed.append((row, right == 1, (l2, set_id, figure_id), (l2, set_id, question_id)))

    def three_scores(part):
        figures, questions = defaultdict(list), defaultdict(list)
        for _, right, figure, question in part:
            figures[figure].append(right)
            questions[question].append(right)
        return (100 * mean(right for _, right, _, _ in part), 100 * mean(map(all, figures.values())),
                100 * mean(map(all, questions.values())))

    a_acc, f_acc, q_acc = three_scores(keyed)
    out = {"Overall": (a_acc + f_acc + q_acc) / 3, "aAcc": a_acc, "fAcc": f_acc, "qAcc": q_acc,
           "unparsable_rate": mean(g is None for g in extracted)}
    for column in ("category", "l2-category"):
        for group in sorted({k[0].fields[column] for k in keyed}):
            out[f"{column}:{group}"] = mean(three_scores([k for k in keyed if k[0].fields[column] == group]))
    return out


def read_option(row, prediction):
    chosen = extract_option(prediction, row.options)
    return chosen, float(chosen == row.answer)


def score_mcq(rows, extracted, scores):
    out = {"Overall": 100 * mean(scores), "unparsable_rate": mean(chosen is None for chosen in extracted)}
    out.update(group_scores(rows, scores))
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


# what each short-answer rule compares: (read, row score)
VQA_RULES = {
    "vqa_accuracy": (normalize_vqa_answer, vqa_accuracy),
    "exact_match": (lambda prediction: prediction.strip().lower(), exact_match),
    "relaxed_accuracy": (str.strip, relaxed_accuracy),
}


def vqa_reader(rule):
    read, row_score = VQA_RULES[rule]
    return lambda row, prediction: (read(prediction), row_score(prediction, row.answers))


def score_vqa(rows, extracted, scores):
    return {"Overall": 100 * mean(scores), **group_scores(rows, scores)}


OCRBENCH_HMER = "Handwritten Mathematical Expression Recognition"


def ocrbench_clean(text, category):
    """Formulas (HMER) compare case-sensitively with all spaces removed, everything else lower-cased."""
    if category == OCRBENCH_HMER:
        return text.strip().replace("\n", " ").replace(" ", "")
    return text.lower().strip().replace("\n", " ")


def ocrbench_hit(prediction, answers, category):
    """A reference found inside the prediction."""
    return any(ocrbench_clean(a, category) in ocrbench_clean(prediction, category) for a in answers)


def read_ocrbench(row, prediction):
    category = row.fields["category"]
    return ocrbench_clean(prediction, category), float(ocrbench_hit(prediction, row.answers, category))


def score_ocrbench(rows, extracted, scores):
    """Final Score = number of rows hit (0-1000 on the full file); per category the same count."""
    out = {"Final Score": float(sum(scores))}
    counts = defaultdict(float)
    for row, hit in zip(rows, scores):
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


def read_caption(row, prediction):
    return prediction, None  # BLEU and CIDEr are corpus metrics: a row has no score of its own


def score_caption(rows, predictions, scores):
    out = caption_scores(predictions, [row.answers for row in rows])
    if "category" in rows[0].fields:  # CIDEr per group (its idf then comes from that group alone)
        for group in sorted({row.fields["category"] for row in rows}):
            part = [(p, row.answers) for row, p in zip(rows, predictions) if row.fields["category"] == group]
            out[f"category:{group}"] = 100 * cider_d([p for p, _ in part], [a for _, a in part])
    return out


SCORERS = {  # name: (read, aggregate)
    "pope": (read_yes_no, score_pope),
    "mme": (read_yes_no, score_mme),
    "hallusion": (read_yes_no, score_hallusion),
    "mcq": (read_option, score_mcq),
    "vqa_accuracy": (vqa_reader("vqa_accuracy"), score_vqa),
    "exact_match": (vqa_reader("exact_match"), score_vqa),
    "relaxed_accuracy": (vqa_reader("relaxed_accuracy"), score_vqa),
    "ocrbench": (read_ocrbench, score_ocrbench),
    "caption": (read_caption, score_caption),
}


def check_indices(name, rows, predictions, source):
    """No prediction for an index that is not a row."""
    known = {row.index for row in rows}
    unknown = [index for index in predictions if index not in known]
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} prediction(s) for indices not in {name}, e.g. {unknown[:5]}")


def check_predictions(name, rows, predictions, source):
    """Exactly one prediction per row, none for another index."""
    check_indices(name, rows, predictions, source)
    missing = [row.index for row in rows if row.index not in predictions]
    if missing:
        raise ValueError(f"{source}: no prediction for {len(missing)} of the {len(rows)} rows of {name}, e.g. "
                         f"indices {missing[:5]}; a partial score is not reported")


def row_results(name, rows, predictions, kind=""):
    """{index: {"extracted": what the scorer read (None: unreadable), "score": the row's score}} for the rows that
    have a prediction; "score" is left out where the metric is a corpus one (captions)."""
    read = SCORERS[benchmark_spec(name, kind).scorer][0]
    out = {}
    for row in rows:
        if row.index in predictions:
            extracted, row_score = read(row, predictions[row.index])
            out[row.index] = {"extracted": extracted} if row_score is None else {"extracted": extracted,
                                                                                 "score": row_score}
    return out


def score(name, rows, predictions, source="predictions", kind=""):
    """predictions: {index_key: prediction text}, exactly one per row. Returns {metric: value}, headline first."""
    check_predictions(name, rows, predictions, source)
    bench = benchmark_spec(name, kind)
    read, aggregate = SCORERS[bench.scorer]
    extracted, scores = zip(*(read(row, predictions[row.index]) for row in rows))
    metrics = aggregate(rows, list(extracted), list(scores))
    return {**{metric: metrics.pop(metric) for metric in bench.metrics}, **metrics}


# -----------------------------------------------------------------------------
# a quick subset (--limit): a score on it is not the benchmark's number, only a check that runs in minutes


def limit_rows(name, rows, limit, kind=""):
    """A deterministic subset of at most `limit` rows that the benchmark's scorer can still score, in file order.
    Rows are drawn round-robin over the `category` values (sorted), each category in a fixed shuffled order, so
    every category is represented once limit allows. MME keeps whole image pairs (its acc+ needs both questions)
    and needs one pair of each of its 14 categories, so at least 28 rows."""
    if limit <= 0 or limit >= len(rows):
        return rows
    mme = benchmark_spec(name, kind).scorer == "mme"
    if mme and limit < 2 * len(MME_PERCEPTION + MME_REASONING):
        raise ValueError(f"--limit={limit}: MME is scored from its 14 categories with both questions of an image, "
                         f"so a subset needs at least 28 rows")
    units = defaultdict(list)  # the rows that are taken together: one row, or an MME image's two questions
    for position, row in enumerate(rows):
        units[(row.fields["category"], row.fields["image_path"]) if mme else position].append(position)
    strata = defaultdict(list)
    for key, positions in units.items():
        strata[rows[positions[0]].fields.get("category", "")].append(positions)
    rng = random.Random(0)
    queues = []
    for category in sorted(strata):
        queue = strata[category]
        rng.shuffle(queue)
        queues.append(queue)
    taken = []
    while any(queues):
        for queue in queues:
            if queue and len(taken) + len(queue[0]) <= limit:
                taken += queue.pop(0)
            elif queue:
                queue.clear()  # its next unit does not fit any more
    return [rows[position] for position in sorted(taken)]


# -----------------------------------------------------------------------------
# predictions in, results out

RESULTS_HEADER = ["variant", "benchmark", "metric", "n_l", "n_s", "score", "ckpt", "n_samples"]


def read_prediction_records(path, allow_empty=False):
    """JSONL, one {"index": int or str, "prediction": str, ...} per line -> {index_key: the line's object}."""
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
            predictions[key], line_of[key] = record, line_no
    if not predictions and not allow_empty:
        raise ValueError(f"{path}: no predictions in the file")
    return predictions


def read_predictions(path):
    """JSONL, one {"index": int or str, "prediction": str} per line -> {index_key: prediction}."""
    return {key: record["prediction"] for key, record in read_prediction_records(path).items()}


def write_predictions(path, records):
    """Writes records (dicts, in the order given) as JSONL to a temp file renamed over `path`, so an interrupted
    write leaves the old file whole."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def already_scored(results_path):
    """(variant, benchmark, n_l, n_s, ckpt, n_samples) of every block results.csv holds; n_samples tells a run on
    a --limit subset from one on the whole file."""
    if not os.path.exists(results_path) or os.path.getsize(results_path) == 0:
        return set()
    with open(results_path, newline="") as f:
        return {(r["variant"], r["benchmark"], r["n_l"], r["n_s"], r["ckpt"], r["n_samples"])
                for r in csv.DictReader(f)}


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


