"""benchmarks.py and scorers.py without a model: they import without torch, --limit subsets (whole MME pairs, every category),
the per-row extracted answers and scores against hand-worked values, and TSVs of one's own run with a kind."""
import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import benchmarks as bm
import scorers
import evaluate as ev
from test_scorers import load, png_b64


def test_imports_without_torch():
    code = "import benchmarks, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr


def mme_records(images_per_category=3):
    records, index = [], 0
    for category in scorers.MME_PERCEPTION + scorers.MME_REASONING:
        for image in range(images_per_category):
            for answer in ("Yes", "No"):
                records.append(dict(index=index, question="q", answer=answer, category=category,
                                    image_path=f"{category}/{image}.jpg"))
                index += 1
    return records


def test_limit_keeps_whole_mme_pairs_and_every_category(tmp_path):
    rows = load(tmp_path, "MME", mme_records())  # 14 categories x 3 images x 2 questions = 84 rows
    for limit, expected in ((28, 28), (29, 28), (30, 30), (84, 84), (500, 84)):
        subset = bm.limit_rows("MME", rows, limit)
        assert len(subset) == expected
        pairs = Counter((r.fields["category"], r.fields["image_path"]) for r in subset)
        assert set(pairs.values()) == {2}  # both questions of every image taken
        assert {r.fields["category"] for r in subset} == set(scorers.MME_PERCEPTION + scorers.MME_REASONING)
        assert [int(r.index) for r in subset] == sorted(int(r.index) for r in subset)  # file order
        assert bm.limit_rows("MME", rows, limit) == subset  # deterministic
        bm.score("MME", subset, {r.index: "Yes" for r in subset})  # the scorer accepts it
    with pytest.raises(ValueError, match="at least 28 rows"):
        bm.limit_rows("MME", rows, 27)


def test_limit_draws_round_robin_over_categories(tmp_path):
    options = dict(question="q", A="x", B="y", answer="A")
    records = [dict(index=i, category=c, **options) for i, c in enumerate("aaaaaabbc")]
    rows = load(tmp_path, "SEEDBench_IMG", records)
    # sorted categories a, b, c taken in turn: a b c, then a b (c has no row left) -> a 2, b 2, c 1
    assert Counter(r.fields["category"] for r in bm.limit_rows("SEEDBench_IMG", rows, 5)) == {"a": 2, "b": 2, "c": 1}
    assert Counter(r.fields["category"] for r in bm.limit_rows("SEEDBench_IMG", rows, 8)) == {"a": 5, "b": 2, "c": 1}
    assert bm.limit_rows("SEEDBench_IMG", rows, 0) == rows
    first, second = bm.limit_rows("SEEDBench_IMG", rows, 3), bm.limit_rows("SEEDBench_IMG", rows, 3)
    assert first == second and [r.fields["category"] for r in first] == ["a", "b", "c"]


def test_row_results_hand_worked(tmp_path):
    mcq = load(tmp_path, "SEEDBench_IMG", [dict(index=i, question="q", A="red", B="green", C="blue", answer=a)
                                       for i, a in ((1, "A"), (2, "C"), (3, "B"))])
    got = bm.row_results("SEEDBench_IMG", mcq, {"1": "A. red", "2": "(B)", "3": "no idea"})
    # "A. red" -> A, right; "(B)" -> B but the answer is C; "no idea": no letter, no option text -> unreadable
    assert got == {"1": {"extracted": "A", "score": 1.0}, "2": {"extracted": "B", "score": 0.0},
                   "3": {"extracted": None, "score": 0.0}}
    yorn = load(tmp_path, "POPE", [dict(index=1, question="q", answer="Yes"), dict(index=2, question="q", answer="No")])
    assert bm.row_results("POPE", yorn, {"1": "Yes.", "2": "maybe"}) == {
        "1": {"extracted": "Yes", "score": 1.0}, "2": {"extracted": None, "score": 0.0}}
    references = repr(["red"] * 3 + ["blue"] * 7)
    vqa = load(tmp_path, "SYNTH_VQA", [dict(index=1, question="q", answer=references)])
    # TextVQA: leave each reference out once: 3 times 2 of the other 9 match (2/3), 7 times 3 do (1): 0.9
    (only,) = bm.row_results("SYNTH_VQA", vqa, {"1": "The Red."}).values()
    assert only["extracted"] == "red" and only["score"] == pytest.approx(0.9)
    caption = load(tmp_path, "SYNTH_CAPTION", [dict(index=1, answer=repr(["a red dog"]))])
    assert bm.row_results("SYNTH_CAPTION", caption, {"1": "A dog."}) == {"1": {"extracted": "A dog."}}  # no score


def test_an_own_tsv_needs_a_kind_and_uses_its_prompt_and_scorer(tmp_path):
    header = ["index", "image", "question", "A", "B", "answer"]
    with open(tmp_path / "MY_QUIZ.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerow([1, png_b64(), "Which colour?", "red", "green", "B"])
        writer.writerow([2, "1", "Which shape?", "circle", "square", "A"])
    path = str(tmp_path / "MY_QUIZ.tsv")
    with pytest.raises(ValueError, match=r"unknown benchmark 'MY_QUIZ'.*--kind=yes_no\|mcq\|vqa\|caption"):
        bm.load_benchmark("MY_QUIZ", path)
    with pytest.raises(ValueError, match="--kind must be one of"):
        bm.load_benchmark("MY_QUIZ", path, kind="quiz")
    with pytest.raises(ValueError, match="POPE is a built-in benchmark"):
        bm.benchmark_spec("POPE", kind="yes_no")
    rows = bm.load_benchmark("MY_QUIZ", path, kind="mcq")
    assert rows[0].prompt == ("Question: Which colour?\nOptions:\nA. red\nB. green\n"
                              "Please select the correct answer from the options above. \n")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in ((1, "B"), (2, "B"))))
    ev.main(["--score_only=True", "--benchmarks=MY_QUIZ", "--kind=mcq", f"--bench_dir={tmp_path}",
             f"--predictions={predictions}", f"--out_dir={tmp_path / 'out'}"])
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        overall = [r for r in csv.DictReader(f) if r["metric"] == "Overall"]
    assert [(r["benchmark"], r["score"], r["n_samples"]) for r in overall] == [("MY_QUIZ", "50", "2")]  # 1 of 2


def test_the_vqa_kind_is_exact_match_with_one_reference(tmp_path):
    with open(tmp_path / "CAPITALS.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "image", "question", "answer"])
        writer.writerow([1, png_b64(), "Capital of France?", "Paris"])
        writer.writerow([2, "1", "Capital of Italy?", "Rome"])
        writer.writerow([3, "1", "Capital of Spain?", "['Madrid', 'Madrid, Spain']"])
    rows = bm.load_benchmark("CAPITALS", str(tmp_path / "CAPITALS.tsv"), kind="vqa")
    assert rows[0].prompt == "Capital of France?\nAnswer the question using a single word or phrase."
    # " paris " equals "Paris" once stripped and lower-cased; "Rome." keeps its period; "Madrid, Spain" is listed
    per_row = bm.row_results("CAPITALS", rows, {"1": " paris ", "2": "Rome.", "3": "madrid, spain"}, kind="vqa")
    assert [r["score"] for r in per_row.values()] == [1.0, 0.0, 1.0]
    scores = bm.score("CAPITALS", rows, {"1": " paris ", "2": "Rome.", "3": "madrid, spain"}, kind="vqa")
    assert scores["Overall"] == pytest.approx(200 / 3)


def test_score_only_with_limit_scores_the_subset(tmp_path):
    options = dict(question="q", A="x", B="y", answer="A")
    records = [dict(index=i, category=c, **options) for i, c in enumerate("aabb")]
    rows = load(tmp_path, "SEEDBench_IMG", records)
    subset = {r.index for r in bm.limit_rows("SEEDBench_IMG", rows, 2)}
    predictions = tmp_path / "p.jsonl"  # right on the subset, wrong elsewhere
    predictions.write_text("".join(json.dumps({"index": r.index, "prediction": "A" if r.index in subset else "B"})
                                   + "\n" for r in rows))
    ev.main(["--score_only=True", "--benchmarks=SEEDBench_IMG", f"--bench_dir={tmp_path}", "--limit=2",
             f"--predictions={predictions}", f"--out_dir={tmp_path / 'out'}"])
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        overall = [r for r in csv.DictReader(f) if r["metric"] == "Overall"]
    assert [(r["score"], r["n_samples"]) for r in overall] == [("100", "2")]
