"""
Reading an answer out of a prediction and scoring it, as VLMEvalKit does (commit 0ff0c3e, no LLM judge), with no
torch: answer normalisation and extraction, then one scorer per benchmark family (SCORERS). benchmarks.py says
which benchmark uses which; an answer the rules cannot read counts as wrong and is reported as `unparsable_rate`.
VLMEvalKit's quirks are kept on purpose where they change a number; each is described where it is implemented.
"""
import math
import re
from collections import Counter, defaultdict

from configurator import InputError

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
            raise InputError(f"{questions[0][0].where}: MME image {image_path!r} in category {category!r} has "
                             f"{len(questions)} questions (indices {[r.index for r, _ in questions]}), expected 2")
    categories = {category for category, _ in pairs}
    unknown = sorted(categories - set(MME_PERCEPTION + MME_REASONING))
    absent = [c for c in MME_PERCEPTION + MME_REASONING if c not in categories]
    if unknown or absent:
        raise InputError(f"{rows[0].source}: MME categories do not match the 14 of MME "
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
            raise InputError(f"{row.where}: a HallusionBench index is <category>_<subcategory>_<x>_<set>_<figure>_"
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
