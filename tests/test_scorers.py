"""The scorers (scorers.py, through benchmarks.py) against hand-worked values (the arithmetic is in the comments), including VLMEvalKit's
edge cases kept on purpose. Tiny TSVs are written to tmp_path; only the first row carries an image, the
others point at it by index, as MME and POPE do."""
import base64
import csv
import io
import math

import pytest
from PIL import Image

import benchmarks as bm
import scorers


def png_b64(color=(200, 30, 30)):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def load(tmp_path, name, records, kind=""):
    """records: dicts with the columns except image; writes <name>.tsv and loads it (kind: for a TSV of one's own)."""
    columns = ["index", "image"] + [c for c in records[0] if c != "index"]
    path = tmp_path / f"{name}.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(columns)
        for i, record in enumerate(records):
            image = png_b64() if i == 0 else str(records[0]["index"])
            writer.writerow([record["index"], image] + [record[c] for c in columns[2:]])
    return bm.load_benchmark(name, str(path), kind)


def score(name, rows, predictions, kind=""):
    return bm.score(name, rows, {row.index: p for row, p in zip(rows, predictions)}, kind=kind)


# ----------------------------------------------------------------------------- yes / no


@pytest.mark.parametrize("prediction, expected", [
    ("Yes.", "Yes"), ("YES", "Yes"), ("yes!", "Yes"), ("e.g. yes", "Yes"),
    ("No, there is not", "No"), ("no", "No"),
    ("Yes and no", None),   # both words: unreadable
    ("yes/no", None),       # the slash touches no space, so it becomes one: "yes no"
    ("Yes, no", None),
    ("I'm not sure", None),
    ("Nope", None), ("not", None), ("yesterday", None),  # whole words only
    ("", None),
])
def test_yes_no_extraction(prediction, expected):
    assert scorers.extract_yes_no(prediction) == expected


def test_pope_exploded_splits_and_unknown_as_negative(tmp_path):
    records = [
        dict(index=1, question="q", answer="Yes", category="random"),          # "Yes"   -> TP
        dict(index=2, question="q", answer="Yes", category="random,popular"),  # "No"    -> FN, in two splits
        dict(index=3, question="q", answer="No", category="popular"),          # "Yes"   -> FP
        dict(index=4, question="q", answer="No", category="adversarial"),      # "maybe" -> Unknown: negative, wrong
        dict(index=5, question="q", answer="No", category="adversarial"),      # "no"    -> TN
    ]
    predictions = ["Yes", "No", "Yes", "maybe", "no"]
    for name, kind in (("POPE", ""), ("MY_YES_NO", "yes_no")):  # a yes/no TSV of one's own is scored like POPE
        got = score(name, load(tmp_path, name, records, kind), predictions, kind)
        # exploded rows: 1r TP, 2r FN, 2p FN, 3p FP, 4a TN(wrong), 5a TN
        # precision = 1/(1+1) = 0.5, recall = 1/(1+2) = 1/3, F1 = 2*0.5*(1/3)/(0.5+1/3) = (1/3)/(5/6) = 0.4
        # acc over the 6 exploded rows: rows 1 and 5 right -> 2/6
        assert got["Overall"] == pytest.approx(40.0)
        assert got["precision"] == pytest.approx(50.0)
        assert got["recall"] == pytest.approx(100 / 3)
        assert got["acc"] == pytest.approx(100 * 2 / 6)
        assert got["unparsable_rate"] == pytest.approx(1 / 5)  # counted on the 5 questions, not the exploded rows
        # random: TP, FN -> P = 1, R = 0.5, F1 = 2*0.5/1.5 = 2/3
        assert got["category:random"] == pytest.approx(200 / 3)
        # popular: FN, FP -> TP = 0, P = R = 0, F1 0 (no division by zero); adversarial: no positives at all -> 0
        assert got["category:popular"] == 0.0
        assert got["category:adversarial"] == 0.0
        assert list(got)[:5] == ["Overall", "acc", "precision", "recall", "unparsable_rate"]


# ----------------------------------------------------------------------------- MME

PERCEPTION = ["OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position", "posters", "scene"]
REASONING = ["code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation"]


def mme_records():
    # one image per category, all named "same.jpg": pairs must be grouped by (category, image_path), not image alone;
    # artwork has a second image
    records = []
    for category in PERCEPTION + REASONING:
        for image_path in (["a.jpg", "b.jpg"] if category == "artwork" else ["same.jpg"]):
            for answer in ("Yes", "No"):
                records.append(dict(index=len(records) + 1, question="Is it? Please answer yes or no.",
                                    answer=answer, category=category, image_path=image_path))
    return records


def test_mme(tmp_path):
    records = mme_records()
    rows = load(tmp_path, "MME", records)
    flip = {"Yes": "No", "No": "Yes"}
    predictions = []
    for r in records:
        prediction = r["answer"]
        if r["category"] == "OCR" and r["answer"] == "No":
            prediction = "Yes"  # OCR: one of two wrong
        if r["category"] == "count":
            prediction = flip[r["answer"]] if r["answer"] == "Yes" else "maybe"  # count: both wrong, one unparsable
        if r["category"] == "code_reasoning" and r["answer"] == "Yes":
            prediction = "No"
        if r["category"] == "artwork" and r["image_path"] == "b.jpg" and r["answer"] == "No":
            prediction = "Yes"
        predictions.append(prediction)
    got = score("MME", rows, predictions)
    # OCR: acc 1/2 = 50, acc+ 0/1 = 0 -> 50;  count: 0 + 0 = 0;  code_reasoning: 50 + 0 = 50
    # artwork: acc 3/4 = 75, acc+ 1/2 = 50 -> 125;  every other category 100 + 100 = 200
    # perception = 50 + 125 + 0 + 7*200 = 1575; reasoning = 50 + 3*200 = 650; Overall = 2225
    assert got["category:OCR"] == pytest.approx(50)
    assert got["category:artwork"] == pytest.approx(125)
    assert got["category:count"] == pytest.approx(0)
    assert got["category:scene"] == pytest.approx(200)
    assert got["perception"] == pytest.approx(1575)
    assert got["reasoning"] == pytest.approx(650)
    assert got["Overall"] == pytest.approx(2225)
    assert got["unparsable_rate"] == pytest.approx(1 / 30)


def test_mme_needs_exact_pairs_and_all_categories(tmp_path):
    records = mme_records()
    records.append(dict(records[0], index=31))  # a third question on OCR's image
    rows = load(tmp_path, "MME", records)
    with pytest.raises(ValueError, match="has 3 questions"):
        score("MME", rows, [r["answer"] for r in records])
    records = [r for r in mme_records() if r["category"] != "posters"]
    rows = load(tmp_path, "MME", records)
    with pytest.raises(ValueError, match="posters"):
        score("MME", rows, [r["answer"] for r in records])


# ----------------------------------------------------------------------------- HallusionBench


def test_hallusion(tmp_path):
    # index <category>_<subcategory>_<x>_<set>_<figure>_<question>
    records = [
        dict(index="VS_chart_0_0_0_0", answer="Yes", category="VS", **{"l2-category": "VS_chart"}),     # right
        dict(index="VS_chart_0_0_0_1", answer="No", category="VS", **{"l2-category": "VS_chart"}),      # wrong
        dict(index="VS_chart_0_0_1_0", answer="No", category="VS", **{"l2-category": "VS_chart"}),      # right
        dict(index="VS_chart_0_0_1_1", answer="Yes", category="VS", **{"l2-category": "VS_chart"}),     # right
        dict(index="VS_chart_0_1_0_0", answer="Yes", category="VS", **{"l2-category": "VS_chart"}),     # right
        dict(index="VD_illusion_0_0_0_0", answer="Yes", category="VD", **{"l2-category": "VD_illusion"}),  # wrong
    ]
    for r in records:
        r["question"] = "Is it?"
    predictions = ["yes", "Yes", "No.", "yes", "Yes", "No"]
    got = score("HallusionBench", load(tmp_path, "HallusionBench", records), predictions)
    # aAcc = 4/6. Figures (l2, set, figure): VS(0,0) [r,w] no; VS(0,1) [r,r] yes; VS(1,0) [r] yes; VD(0,0) [w] no
    # -> fAcc = 2/4. Questions (l2, set, question): VS(0,q0) [r,r] yes; VS(0,q1) [w,r] no; VS(1,q0) yes; VD no -> 2/4
    assert got["aAcc"] == pytest.approx(400 / 6)
    assert got["fAcc"] == pytest.approx(50)
    assert got["qAcc"] == pytest.approx(50)
    assert got["Overall"] == pytest.approx((400 / 6 + 50 + 50) / 3)
    # VS alone: aAcc 4/5 = 80, fAcc 2/3, qAcc 2/3 -> mean; VD alone: all 0
    assert got["category:VS"] == pytest.approx((80 + 200 / 3 + 200 / 3) / 3)
    assert got["l2-category:VS_chart"] == pytest.approx((80 + 200 / 3 + 200 / 3) / 3)
    assert got["category:VD"] == 0.0
    assert got["unparsable_rate"] == 0.0


def test_hallusion_index_must_carry_set_figure_question(tmp_path):
    rows = load(tmp_path, "HallusionBench",
                [dict(index="VS_chart_0", question="q", answer="Yes", category="VS", **{"l2-category": "VS_chart"})])
    with pytest.raises(ValueError, match="HallusionBench index"):
        score("HallusionBench", rows, ["Yes"])


# ----------------------------------------------------------------------------- multiple choice


@pytest.mark.parametrize("prediction, expected", [
    ("B", "B"), ("(B)", "B"), ("B)", "B"), ("B.", "B"), ("**B**", "B"), ("[B]", "B"), ("Option B", "B"),
    ("Answer:B", "B"), ("The answer is B.", "B"),
    ("b", None),                 # lower case is no letter, and "b" is no option text
    ("A dog", "A"),              # the article trap: a lone capital A is read as the letter
    ("I think it is blue", "D"),  # no letter ("I" is not an option here): the option text decides
    ("B or C", None),            # two letters -> text matching -> no option text in it
    ("red car", None),           # texts "red" and "red car" both occur -> fail
    ("Z", "Z"),
    ("A B Z", None),             # two letters: the Z does not count, text matching finds nothing
    ("Sorry, I can't help with images of people yet.", "Z"),
    ("", None),
])
def test_option_extraction(prediction, expected):
    options = {"A": "cat", "B": "dog", "C": "red car", "D": "blue", "E": "red"}
    assert scorers.extract_option(prediction, options) == expected


def test_option_extraction_ignores_letters_that_are_not_options():
    # "C" is not an option of a 2-option row: no letter found, and "c" holds neither option text
    assert scorers.extract_option("C", {"A": "yes", "B": "no"}) is None


def test_mcq_score(tmp_path):
    four = dict(A="cat", B="dog", C="red", D="red car")
    records = [
        dict(index=1, question="q", **four, answer="B", category="x"),                              # "(B)"  right
        dict(index=2, question="q", **four, answer="D", category="x"),                              # "red car": fail
        dict(index=3, question="q", A="yes", B="no", C="", D="", answer="A", category="y"),         # "C": fail
        dict(index=4, question="q", A="cat", B="dog", C="None", D="", answer="B", category="y"),    # "A dog" -> A
        dict(index=5, question="q", **four, answer="A", category="y"),                              # refusal -> Z
        dict(index=6, question="q", A="cat", B="dog", C="red", D="blue", answer="C", category="y"),  # text -> C
    ]
    predictions = ["(B)", "red car", "C", "A dog", "Sorry, I can't help with images of people yet.",
                   "I think it is red."]
    for name, kind in (("SEEDBench_IMG", ""), ("MY_MCQ", "mcq")):  # an mcq TSV of one's own is scored like SEEDBench
        rows = load(tmp_path, name, records, kind)
        assert rows[3].options == {"A": "cat", "B": "dog"}  # "None" and "" are no options (pandas NA)
        got = score(name, rows, predictions, kind)
        # right: rows 1 and 6 -> 2/6; unreadable: rows 2 and 3 -> 2/6 (the refusal reads as Z, so it is read)
        assert got["Overall"] == pytest.approx(100 * 2 / 6)
        assert got["unparsable_rate"] == pytest.approx(2 / 6)
        assert got["category:x"] == pytest.approx(50)  # rows 1, 2: 1 of 2
        assert got["category:y"] == pytest.approx(25)  # rows 3-6: 1 of 4


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("text, expected", [
    ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),
    ("the dog", "dog"), ("A cat", "cat"), ("an", ""),
    ("1,000", "1000"),              # a digit,digit deletes every mark
    ("1,000-2,000", "10002000"),
    ("coca-cola", "coca cola"),     # a mark touching no space becomes a space
    ("red, white", "red white"),    # a mark touching a space is deleted ...
    ("coca-cola - pepsi", "cocacola pepsi"),  # ... everywhere in the text
    ("dont", "don't"), ("Dog's", "dog's"),
    ("5.", "5"), ("U.S.A.", "usa"), ("3.5", "3.5"),  # 0ff0c3e: every period not followed by a digit goes
    ("." * 40, "." * 8),            # at most 32 periods are removed
    ("  yes\n", "yes"),
])
def test_vqa_normalisation(text, expected):
    assert scorers.normalize_vqa_answer(text) == expected


@pytest.mark.parametrize("k, expected", [
    (0, 0.0),
    (1, 0.3),  # the matching reference left out: 0 others; the 9 others: 1/3 each -> 9/30
    (2, 0.6),  # 2 * (1/3) + 8 * (2/3) = 18/3 -> /10
    (3, 0.9),  # 3 * (2/3) + 7 * 1 = 9 -> /10
    (4, 1.0),
])
def test_vqa_accuracy_leave_one_out(k, expected):
    answers = ["Two"] * k + ["three"] * (10 - k)
    assert scorers.vqa_accuracy("2", answers) == pytest.approx(expected)


def test_vqa_accuracy_single_reference_scores_zero():
    assert scorers.vqa_accuracy("cat", ["cat"]) == 0.0


def test_textvqa_score(tmp_path):
    records = [
        dict(index=1, question="q", answer=str(["two"] * 4 + ["three"] * 6), category="count"),          # 1.0
        dict(index=2, question="q", answer=str(["dog"] + ["cat"] * 9), category="text"),                  # 0.3
        dict(index=3, question="q", answer=str(["the coca-cola"] * 2 + ["pepsi"] * 8), category="text"),  # 0.6
    ]
    for name in ("TextVQA_VAL", "SYNTH_VQA"):
        got = score(name, load(tmp_path, name, records), ["2", "Dog.", "Coca-Cola"])
        assert got["Overall"] == pytest.approx(100 * (1 + 0.3 + 0.6) / 3)
        assert got["category:count"] == pytest.approx(100)
        assert got["category:text"] == pytest.approx(45)  # (0.3 + 0.6) / 2


@pytest.mark.parametrize("prediction, answer, expected", [
    (" The Hobbit ", "the hobbit", 1.0),  # strip and case do not matter
    ("Yes.", "Yes", 0.0),                 # punctuation does
])
def test_ocrvqa_exact_match(prediction, answer, expected):
    assert scorers.exact_match(prediction, [answer]) == expected


@pytest.mark.parametrize("prediction, answer, expected", [
    ("10.52", "10", 1.0),  # 0ff0c3e divides by the prediction: 0.52/10.52 = 4.94% (by the answer it would be 5.2%)
    ("9.5", "10", 0.0),    # 0.5/9.5 = 5.26% (by the answer exactly 5%, right)
    ("0.12", "12%", 1.0),  # "12%" reads as 0.12
    ("12%", "12", 0.0),    # 0.12 vs 12
    ("0", "0", 1.0),       # zero prediction: string comparison
    ("0.0", "0", 0.0),
    ("0.01", "0", 0.0),    # |0 - 0.01| / 0.01 = 100%
    ("$3.5", "3.5", 0.0),  # unparsable prediction: string comparison
    ("1,000", "1000", 0.0),
    ("1995.", "1995", 1.0),
    (" 12 ", "12", 1.0),   # the prediction is stripped
    ("Yes.", "yes", 0.0),
    ("YES", "yes", 1.0),
])
def test_chartqa_relaxed_accuracy(prediction, answer, expected):
    assert scorers.relaxed_accuracy(prediction, [answer]) == expected


def test_chartqa_score_per_split(tmp_path):
    records = [dict(index=1, question="q", answer="10", split="test_human"),
               dict(index=2, question="q", answer="Paris", split="test_human"),
               dict(index=3, question="q", answer="5", split="test_augmented")]
    got = score("ChartQA_TEST", load(tmp_path, "ChartQA_TEST", records), ["10.4", "paris", "6"])
    # 0.4/10.4 = 3.8% right; "paris" == "Paris" case-blind right; 1/6 = 17% wrong -> 2/3
    assert got["Overall"] == pytest.approx(200 / 3)
    assert got["split:test_human"] == pytest.approx(100)
    assert got["split:test_augmented"] == 0.0


# ----------------------------------------------------------------------------- OCRBench


@pytest.mark.parametrize("prediction, answers, category, hit", [
    ("the word is HELLO world", ["Hello"], "Regular Text Recognition", True),   # substring, case-blind
    ("NEW\nYORK", ["new york"], "Scene Text-centric VQA", True),               # newline -> space
    ("10", ["1"], "Scene Text-centric VQA", True),                              # lenient: "1" is in "10"
    ("London", ["Paris"], "Scene Text-centric VQA", False),
    ("x ^ { 2 }", ["x^{2}"], scorers.OCRBENCH_HMER, True),                          # formulas: spaces removed
    ("X^{2}", ["x^{2}"], scorers.OCRBENCH_HMER, False),                             # ... but case kept
])
def test_ocrbench_hit(prediction, answers, category, hit):
    assert scorers.ocrbench_hit(prediction, answers, category) == hit


def test_ocrbench_score(tmp_path):
    records = [
        dict(index=1, question="q", answer="['Hello']", category="Regular Text Recognition"),
        dict(index=2, question="q", answer="['x^{2}']", category=scorers.OCRBENCH_HMER),
        dict(index=3, question="q", answer="['new york']", category="Scene Text-centric VQA"),
        dict(index=4, question="q", answer="['cat', 'cats']", category="Regular Text Recognition"),
        dict(index=5, question="q", answer="['Paris']", category="Scene Text-centric VQA"),
        dict(index=6, question="q", answer="['x^{2}']", category=scorers.OCRBENCH_HMER),
    ]
    predictions = ["HELLO", "x ^ {2}", "New\nYork", "cats", "London", "X^{2}"]
    got = score("OCRBench", load(tmp_path, "OCRBench", records), predictions)
    # hits: rows 1, 2, 3 and 4 (both "cat" and "cats" match row 4, it still counts once) -> 4
    assert got["Final Score"] == 4
    assert got["category:Regular Text Recognition"] == 2
    assert got[f"category:{scorers.OCRBENCH_HMER}"] == 1
    assert got["category:Scene Text-centric VQA"] == 1


# ----------------------------------------------------------------------------- COCO captions


def test_bleu_corpus_with_smoothing_and_brevity():
    # image 1: "a b" vs ref "a b": testlen 2, reflen 2, guess [2,1,0,0], correct [2,1,0,0]
    # image 2: "c" vs ref "c d": testlen 1, reflen 2, guess [1,0,0,0], correct [1,0,0,0]
    # corpus: testlen 3, reflen 4, guess [3,1,0,0], correct [3,1,0,0]; ratio 3/4 -> BP = exp(1 - 4/3)
    # p1 = p2 = 1 (up to 1e-9); p3 = p4 = 1e-15/1e-9 = 1e-6
    # BLEU-3 = (1 * 1 * 1e-6)^(1/3) * BP = 0.01 BP; BLEU-4 = (1e-12)^(1/4) * BP = 0.001 BP
    bp = math.exp(1 - 4 / 3)
    got = scorers.bleu(["a b", "c"], [["a b"], ["c d"]])
    assert got == pytest.approx([bp, bp, 0.01 * bp, 0.001 * bp], rel=1e-6)


def test_bleu_closest_reference_tie_goes_to_the_shorter():
    # hypothesis of 3 words; references of 2 and 4 words are equally close -> reflen 2 -> ratio 1.5, no penalty
    # (with 4, BP would be exp(1 - 4/3)). Precisions 3/3, 2/2, 1/1 (all n-grams in "a b c d"), p4 = 1e-15/1e-9
    got = scorers.bleu(["a b c"], [["a b", "a b c d"]])
    assert got[0] == pytest.approx(1.0)
    assert got[3] == pytest.approx((1e-6) ** 0.25, rel=1e-6)


def test_bleu_counts_are_clipped_per_reference_and_case_sensitive():
    # "the the the" vs refs "the cat", "The the": max count of "the" in one ref is 1 -> p1 = 1/3; raw strings, so
    # "The" is another word. reflen: refs are 2 and 2 -> 2, ratio 3/2, no penalty
    got = scorers.bleu(["the the the"], [["the cat", "The the"]])
    assert got[0] == pytest.approx(1 / 3)


def test_rouge_l():
    # refs "the cat": LCS 2, p 2/3, r 1;  "a cat sat down": LCS 2 ("cat sat"), p 2/3, r 2/4
    # P = 2/3, R = 1 -> (1 + 1.44) * (2/3) * 1 / (1 + 1.44 * 2/3) = 1.626667 / 1.96
    expected = 2.44 * (2 / 3) / (1 + 1.44 * 2 / 3)
    assert scorers.rouge_l("the cat sat", ["the cat", "a cat sat down"]) == pytest.approx(expected)
    # tokens are split on single spaces: "a  b" is ["a", "", "b"], so P = 2/3, R = 1 again (split() would give 1.0)
    assert scorers.rouge_l("a  b", ["a b"]) == pytest.approx(expected)
    assert scorers.rouge_l("a\nb", ["a b"]) == 0.0  # a newline does not split
    assert scorers.rouge_l("x y", ["a b"]) == 0.0


def test_cider_d_two_images():
    # 2 images -> ln N = ln 2; every n-gram is in exactly one image's references -> weight tf * ln 2
    # image 1: "a b" vs "a b": cosines 1, 1 (n = 1, 2), 0, 0 (no 3-, 4-grams); equal length -> 10 * 2/4 = 5
    # image 2: "c" vs "c d": n = 1 cosine ln2^2 / (ln2 * sqrt(2) ln2) = 1/sqrt 2; n = 2: no hypothesis bigram -> 0
    #   lengths in bigrams 0 and 1 -> penalty exp(-1/72) -> 10 * (1/sqrt 2) exp(-1/72) / 4
    image2 = 10 * math.exp(-1 / 72) / (4 * math.sqrt(2))
    assert scorers.cider_d(["a b", "c"], [["a b"], ["c d"]]) == pytest.approx((5 + image2) / 2)


def test_cider_d_clipping_unseen_ngrams_and_length_penalty():
    # image 1: hyp "a b a b" vs ref "a b" (image 2 "c d"/"c d" keeps the idf at ln 2)
    # n = 1: hyp a 2ln2, b 2ln2 (norm 2 sqrt2 ln2); ref a ln2, b ln2 (norm sqrt2 ln2);
    #   clipped dot = 2 * min(2ln2, ln2) * ln2 = 2 ln2^2 -> 2 / (2 sqrt2 * sqrt2) = 1/2
    # n = 2: hyp "a b" 2ln2, "b a" ln2 (unseen: df 0 -> full weight ln 2), norm sqrt5 ln2; ref "a b" ln2
    #   dot = ln2 * ln2 -> 1/sqrt5;  n = 3, 4: the reference has none -> 0
    # lengths (bigrams) 3 and 1 -> penalty exp(-4/72); image 1 = 10 * (1/2 + 1/sqrt5) / 4 * exp(-4/72)
    # image 2: identical 2-word caption -> 10 * 2/4 = 5
    image1 = 10 * (0.5 + 1 / math.sqrt(5)) / 4 * math.exp(-4 / 72)
    assert scorers.cider_d(["a b a b", "c d"], [["a b"], ["c d"]]) == pytest.approx((image1 + 5) / 2)


def test_cider_d_one_image_corpus_is_zero_and_three_words_reach_only_7_5():
    assert scorers.cider_d(["a cat sat"], [["a cat sat"]]) == 0.0  # idf = ln 1 - ln 1 = 0
    # with a second, disjoint image: identical 3-word captions have cosines 1, 1, 1, 0 -> 10 * 3/4
    assert scorers.cider_d(["a cat sat", "x y z"], [["a cat sat"], ["x y z"]]) == pytest.approx(7.5)


def test_coco_score_from_tsv(tmp_path):
    records = [dict(index=1, answer="['a b']", category="one"), dict(index=2, answer="['c d']", category="two")]
    for name in ("COCO_VAL", "SYNTH_CAPTION"):
        got = score(name, load(tmp_path, name, records), ["a b", "c"])
        bp = math.exp(1 - 4 / 3)  # as in test_bleu_corpus_with_smoothing_and_brevity
        assert got["BLEU-1"] == pytest.approx(100 * bp, rel=1e-6)
        assert got["BLEU-4"] == pytest.approx(0.1 * bp, rel=1e-6)
        # ROUGE-L: image 1 = 1; image 2: LCS 1, P = 1, R = 1/2 -> 2.44 * 0.5 / (0.5 + 1.44) -> mean
        assert got["ROUGE-L"] == pytest.approx(100 * (1 + 2.44 * 0.5 / 1.94) / 2)
        assert got["CIDEr"] == pytest.approx(100 * (5 + 10 * math.exp(-1 / 72) / (4 * math.sqrt(2))) / 2)
        assert got["category:one"] == 0.0  # one image per group: CIDEr's idf is 0
        assert list(got)[:6] == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
