"""
The benchmarks as VLMEvalKit scores them (commit 0ff0c3e, no LLM judge), with no torch: the benchmark table, reading
a benchmark TSV, the prompts, which scorer a benchmark takes (the rules themselves: scorers.py), the --limit
subset. evaluate.py runs checkpoints over these (its predictions and results files: predictions.py);
`evaluate.py --score_only=True` scores a predictions file with them.

A benchmark is a VLMEvalKit TSV file (<NAME>.tsv: index, base64 image, question, answer, options...). An answer the
rules cannot read counts as wrong, and its share is reported as `unparsable_rate` (a judge could change at most
those rows). Every score is in the paper's units. VLMEvalKit's quirks are kept on purpose where they change a
number; each is described where it is implemented.
"""
import ast
import base64
import csv
import io
import random
import re
import sys
from collections import defaultdict
from dataclasses import dataclass

from PIL import Image

from configurator import InputError
from scorers import MME_PERCEPTION, MME_REASONING, SCORERS

# -----------------------------------------------------------------------------
# the benchmarks


@dataclass(frozen=True)
class Benchmark:
    kind: str             # yes_no | mcq | vqa | ocrbench | caption: decides the prompt
    scorer: str           # key of SCORERS (below)
    max_new_tokens: int   # the authors' generation budget per kind
    metrics: tuple        # headline numbers, in this order; per-group numbers ("category:count") follow them
    columns: tuple = ()   # required beyond index, image, answer and (except captions) question


MCQ = Benchmark("mcq", "mcq", 32, ("Overall", "unparsable_rate"), ("A", "B"))
CAPTION = Benchmark("caption", "caption", 32, ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"))
POPE_LIKE = Benchmark("yes_no", "pope", 32, ("Overall", "acc", "precision", "recall", "unparsable_rate"))
TEXTVQA_LIKE = Benchmark("vqa", "vqa_accuracy", 10, ("Overall",))
BENCHMARKS = {
    "MME": Benchmark("yes_no", "mme", 32, ("Overall", "perception", "reasoning", "unparsable_rate"),
                     ("category", "image_path")),
    "HallusionBench": Benchmark("yes_no", "hallusion", 32, ("Overall", "aAcc", "fAcc", "qAcc", "unparsable_rate"),
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
        raise InputError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if name in BENCHMARKS:
        if kind:
            raise InputError(f"{name} is a built-in benchmark with its own rules; --kind is for a TSV of your own "
                             f"under another name")
        return BENCHMARKS[name]
    if not kind:
        raise InputError(f"unknown benchmark {name!r}: built in are {', '.join(BENCHMARKS)}; for a TSV of your own "
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
                raise InputError(f"{self.where}: the image does not decode ({e})") from None
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
            raise InputError(f"{path}: empty file, expected a header line")
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise InputError(f"{path}: column(s) {duplicated} appear more than once in the header")
        records = []
        for cells in reader:
            if not cells:  # a blank line, skipped by pandas too
                continue
            if len(cells) != len(header):
                raise InputError(f"{path} line {reader.line_num}: {len(cells)} fields, the header has {len(header)}")
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
        raise InputError(f"{where}: answer {text[:80]!r} starts with '[' but is not a list literal") from None
    if not isinstance(answers, list) or not answers:
        raise InputError(f"{where}: answer {text[:80]!r} is not a non-empty list")
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
    "yes_no": lambda row: row.question,
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
        raise InputError(f"{tsv_path}: missing column(s) {missing} needed by {name}; the header has {header}")
    if not records:
        raise InputError(f"{tsv_path}: no rows")
    letters = [c for c in OPTION_LETTERS if c in header]

    image_cells, line_of = {}, {}
    for line, cells in records:
        where = f"{tsv_path} line {line} (index {cells['index']})"
        for column in required:
            if not cells[column].strip() or (column == "image" and cells[column] in PANDAS_NA):
                raise InputError(f"{where}: empty {column!r}")
        index = index_key(cells["index"])
        if index in line_of:
            raise InputError(f"{where}: index {index} already used on line {line_of[index]}")
        line_of[index] = line
        image_cells[index] = cells["image"]

    rows = []
    for line, cells in records:
        index = index_key(cells["index"])
        where = f"{tsv_path} line {line} (index {cells['index']})"
        image = cells["image"]
        if len(image) <= 64:  # VLMEvalKit's convention: a short cell is the index of the row holding the image
            target = index_key(image)
            if target not in image_cells:  # e.g. a truncated base64 image, not a reference
                raise InputError(f"{where}: image cell {image!r} is too short for a base64 image and names no row "
                                 f"(a cell of 64 characters or fewer is the index of the row holding the image)")
            if len(image_cells[target]) <= 64:
                raise InputError(f"{where}: image cell {image!r} must name a row that holds an image itself")
            images_b64 = [image_cells[target]]
        elif image.startswith("[") and image.endswith("]"):
            try:
                images_b64 = ast.literal_eval(image)
            except (ValueError, SyntaxError):
                raise InputError(f"{where}: image cell starts with '[' but is not a list literal") from None
            if not isinstance(images_b64, list) or not images_b64 or not all(isinstance(b, str) for b in images_b64):
                raise InputError(f"{where}: image list literal must hold base64 strings")
        else:
            images_b64 = [image]
        answer, hint = cells["answer"], cells.get("hint")
        row = Row(index=index, images_b64=images_b64, question=cells.get("question", COCO_PROMPT), answer=answer,
                  answers=parse_answers(answer, where),
                  options={c: cells[c] for c in letters if cells[c] not in PANDAS_NA},
                  hint=None if hint is None or hint in PANDAS_NA else hint,
                  fields=cells, prompt="", source=tsv_path, where=where)
        if bench.kind == "yes_no" and answer not in ("Yes", "No"):
            raise InputError(f"{where}: a yes/no answer must be exactly 'Yes' or 'No', got {answer!r}")
        if bench.kind == "mcq" and not re.fullmatch(r"[A-Z]", answer):
            raise InputError(f"{where}: a multiple-choice answer must be one capital letter, got {answer!r}")
        row.prompt = PROMPTS[bench.kind](row)
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# scoring a benchmark's predictions (the rules: scorers.py)


def check_indices(name, rows, predictions, source):
    """No prediction for an index that is not a row."""
    known = {row.index for row in rows}
    unknown = [index for index in predictions if index not in known]
    if unknown:
        raise InputError(f"{source}: {len(unknown)} prediction(s) for indices not in {name}, e.g. {unknown[:5]}")


def check_predictions(name, rows, predictions, source):
    """Exactly one prediction per row, none for another index."""
    check_indices(name, rows, predictions, source)
    missing = [row.index for row in rows if row.index not in predictions]
    if missing:
        raise InputError(f"{source}: no prediction for {len(missing)} of the {len(rows)} rows of {name}, e.g. "
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
        raise InputError(f"--limit={limit}: MME is scored from its 14 categories with both questions of an image, "
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
