"""The files of evaluation: VLMEvalKit TSVs (benchmarks.py: images, references, options, hints, list answers), prompts,
predictions JSONL and results.csv (predictions.py), and the --score_only command line, bad input included."""
import base64
import csv
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

import benchmarks as bm
import evaluate as ev
from configurator import InputError
from predictions import RESULTS_HEADER, append_results, read_predictions


def encode(image, fmt="PNG"):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def noise_image(size=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


RED = encode(Image.new("RGB", (8, 8), (255, 0, 0)))


def write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def mcq_file(tmp_path, name="SEEDBench_IMG.tsv"):
    header = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
    rows = [[1, RED, "What colour?", "red", "blue", "", "", "A", "colour"],
            [2, "1", "How many?", "1", "2", "3", "None", "C", "count"],
            [3, "1", "How many?", "1", "2", "3", "4", "D", "count"]]
    return write_tsv(tmp_path / name, header, rows)


# ----------------------------------------------------------------------------- images


def test_image_reference_and_jpeg_reencoding(tmp_path):
    original = noise_image()
    path = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"],
                     [[1, encode(original), "Is it?", "Yes"], [2, "1", "Is it?", "No"]])
    rows = bm.load_benchmark("POPE", path)
    assert rows[1].images_b64 == rows[0].images_b64  # the short cell "1" names row 1's image
    raw = np.asarray(rows[1].images(jpeg_reencode=False)[0])
    assert np.array_equal(raw, np.asarray(original))
    # VLMEvalKit writes every image with PIL's default JPEG settings (quality 75) and reads the file back
    buffer = io.BytesIO()
    original.save(buffer, format="JPEG")
    expected = np.asarray(Image.open(buffer).convert("RGB"))
    reencoded = np.asarray(rows[1].images()[0])
    assert np.array_equal(reencoded, expected)
    assert not np.array_equal(reencoded, raw)  # noise does not survive JPEG: the round trip really happened


def test_rgba_and_palette_images_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    path = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"],
                     [[1, encode(rgba), "q", "Yes"], [2, encode(palette), "q", "No"]])
    rows = bm.load_benchmark("POPE", path)
    first, second = rows[0].images(jpeg_reencode=False)[0], rows[1].images(jpeg_reencode=False)[0]
    assert first.mode == second.mode == "RGB"
    assert first.getpixel((3, 3)) == (10, 200, 30)  # alpha dropped, colour kept
    assert second.getpixel((3, 3)) == (0, 0, 255)


def test_multi_image_row(tmp_path):
    blue = encode(Image.new("RGB", (8, 8), (0, 0, 255)))
    path = write_tsv(tmp_path / "SEEDBench2.tsv", ["index", "image", "question", "A", "B", "answer"],
                     [[1, str([RED, blue]), "q", "x", "y", "A"]])
    images = bm.load_benchmark("SEEDBench2", path)[0].images(jpeg_reencode=False)
    assert [im.getpixel((0, 0)) for im in images] == [(255, 0, 0), (0, 0, 255)]


@pytest.mark.parametrize("cell, message", [("1", "must name a row that holds an image"),   # 2 -> 1 -> itself a ref
                                           ("9", "is too short for a base64 image and names no row"),  # no row 9
                                           ("iVBORw0KGgo=", "is too short for a base64 image")])  # a cut image
def test_bad_image_references(tmp_path, cell, message):
    path = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"],
                     [[0, RED, "q", "Yes"], [1, "0", "q", "No"], [2, cell, "q", "No"]])
    with pytest.raises(ValueError, match=f"POPE.tsv line 4 \\(index 2\\): image cell '{cell}' {message}"):
        bm.load_benchmark("POPE", path)


def test_undecodable_image_names_the_row(tmp_path):
    path = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"],
                     [[1, "A" * 100, "q", "Yes"]])
    row = bm.load_benchmark("POPE", path)[0]
    with pytest.raises(ValueError, match="line 2 \\(index 1\\): the image does not decode"):
        row.images()


# ----------------------------------------------------------------------------- TSV parsing


def test_quoted_fields_and_huge_cells(tmp_path):
    big = encode(noise_image(300), fmt="PNG")
    assert len(big) > 131072  # beyond csv's default field limit
    question = 'a "quoted"\tquestion\nover two lines'
    path = write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "image", "question", "answer"],
                     [[1, big, question, str(["x"] * 10)], [2, "1", "plain", "['y']"]])
    rows = bm.load_benchmark("TextVQA_VAL", path)
    assert rows[0].question == question
    assert rows[0].answers == ["x"] * 10 and rows[1].answers == ["y"]
    assert rows[1].where.endswith("line 4 (index 2)")  # the quoted newline takes a line
    assert rows[0].images(jpeg_reencode=False)[0].size == (300, 300)


def test_missing_column_names_file_and_column(tmp_path):
    path = write_tsv(tmp_path / "MME.tsv", ["index", "image", "question", "answer", "category"],
                     [[1, RED, "q", "Yes", "OCR"]])
    with pytest.raises(ValueError, match=r"MME.tsv: missing column\(s\) \['image_path'\]"):
        bm.load_benchmark("MME", path)


@pytest.mark.parametrize("row, message", [
    ([2, RED, "", "Yes"], "line 3 \\(index 2\\): empty 'question'"),
    ([2, "nan", "q", "Yes"], "line 3 \\(index 2\\): empty 'image'"),
    ([2, RED, "q"], "line 3: 3 fields, the header has 4"),
    ([1, RED, "q", "No"], "line 3 \\(index 1\\): index 1 already used on line 2"),
    ([2, RED, "q", "yes"], "line 3 \\(index 2\\): a yes/no answer must be exactly 'Yes' or 'No'"),
])
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    path = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"], [[1, RED, "q", "Yes"], row])
    with pytest.raises(ValueError, match="POPE.tsv " + message):
        bm.load_benchmark("POPE", path)


def test_mcq_answer_must_be_a_letter(tmp_path):
    path = write_tsv(tmp_path / "MMStar.tsv", ["index", "image", "question", "A", "B", "answer"],
                     [[1, RED, "q", "x", "y", "x"]])
    with pytest.raises(ValueError, match="line 2 \\(index 1\\): a multiple-choice answer must be one capital letter"):
        bm.load_benchmark("MMStar", path)


def test_list_answers_are_literals_never_code(tmp_path):
    marker = tmp_path / "executed"
    payload = f"[__import__('pathlib').Path({str(marker)!r}).touch()]"
    path = write_tsv(tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"],
                     [[1, RED, "q", payload, "Doc-oriented VQA"]])
    with pytest.raises(ValueError, match="line 2 \\(index 1\\): answer .* is not a list literal"):
        bm.load_benchmark("OCRBench", path)
    assert not marker.exists()
    path = write_tsv(tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"],
                     [[1, RED, "q", "[]", "Doc-oriented VQA"]])
    with pytest.raises(ValueError, match="is not a non-empty list"):
        bm.load_benchmark("OCRBench", path)


def test_unknown_benchmark(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'MMBench'"):
        bm.load_benchmark("MMBench", mcq_file(tmp_path))


# ----------------------------------------------------------------------------- prompts


def test_mcq_prompt_bytes_hint_and_missing_options(tmp_path):
    header = ["index", "image", "question", "hint", "A", "B", "C", "D", "E", "answer"]
    path = write_tsv(tmp_path / "ScienceQA_TEST.tsv", header,
                     [[1, RED, "Which is a mammal?", "Look at the animals.", "cat", "frog", "NA", "", "None", "A"],
                      [2, "1", "Which is a bird?", "nan", "owl", "bee", "ant", "", "", "A"]])
    first, second = bm.load_benchmark("ScienceQA_TEST", path)
    # C "NA", D "" and E "None" are pandas NA: no such options; a hint "nan" is no hint
    assert first.prompt == ("Hint: Look at the animals.\nQuestion: Which is a mammal?\nOptions:\nA. cat\nB. frog\n"
                            "Please select the correct answer from the options above. \n")
    assert second.prompt == ("Question: Which is a bird?\nOptions:\nA. owl\nB. bee\nC. ant\n"
                             "Please select the correct answer from the options above. \n")


def test_prompts_per_kind(tmp_path):
    vqa = write_tsv(tmp_path / "ChartQA_TEST.tsv", ["index", "image", "question", "answer"],
                    [[1, RED, "What is the peak?", "12"]])
    assert bm.load_benchmark("ChartQA_TEST", vqa)[0].prompt == \
        "What is the peak?\nAnswer the question using a single word or phrase."
    yorn = write_tsv(tmp_path / "POPE.tsv", ["index", "image", "question", "answer"],
                     [[1, RED, "Is there a dog in the image?", "No"]])
    assert bm.load_benchmark("POPE", yorn)[0].prompt == "Is there a dog in the image?"
    ocr = write_tsv(tmp_path / "OCRBench.tsv", ["index", "image", "question", "answer", "category"],
                    [[1, RED, "what is written?", "['a']", "Doc-oriented VQA"]])
    assert bm.load_benchmark("OCRBench", ocr)[0].prompt == "what is written?"
    coco = write_tsv(tmp_path / "COCO_VAL.tsv", ["index", "image", "answer"], [[1, RED, "['A dog.']"]])
    assert bm.load_benchmark("COCO_VAL", coco)[0].prompt == (
        'Please describe this image in general. Directly provide the description, do not include prefix like '
        '"This image depicts". ')
    own = write_tsv(tmp_path / "SYNTH_CAPTION.tsv", ["index", "image", "question", "answer"],
                    [[1, RED, "Describe it.", "['A dog.']"]])
    assert bm.load_benchmark("SYNTH_CAPTION", own)[0].prompt == "Describe it."


def test_max_new_tokens_table():
    # the authors' adjust_kwargs: 32 multiple choice, yes/no and COCO; 100 OCRVQA, ChartQA; 10 TextVQA; else 512
    expected = {"MME": 32, "HallusionBench": 32, "POPE": 32, "COCO_VAL": 32, "OCRBench": 512, "AI2D_TEST": 32,
                "RealWorldQA": 32, "MMStar": 32, "SEEDBench_IMG": 32, "SEEDBench2": 32, "SEEDBench2_Plus": 32,
                "ScienceQA_TEST": 32, "OCRVQA_TESTCORE": 100, "ChartQA_TEST": 100, "TextVQA_VAL": 10,
                "SYNTH_VQA": 10, "SYNTH_CAPTION": 32}
    assert {name: b.max_new_tokens for name, b in bm.BENCHMARKS.items()} == expected


# ----------------------------------------------------------------------------- predictions


def test_read_predictions_matches_int_and_string_indices(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ['{"index": 7, "prediction": "A"}', "",
                                              '{"index": "008", "prediction": " B "}'])
    assert read_predictions(path) == {"7": "A", "8": " B "}


@pytest.mark.parametrize("lines, message", [
    (['{"index": 1, "prediction": "A"}', '{"index": 2, "prediction": "B"'], "p.jsonl line 2: not valid JSON"),
    (['{"index": 1}'], "p.jsonl line 1: expected an object with 'index' and 'prediction'"),
    (['[1, "A"]'], "p.jsonl line 1: expected an object"),
    (['{"index": 1, "prediction": null}'], "p.jsonl line 1: prediction must be a string"),
    (['{"index": 1.5, "prediction": "A"}'], "p.jsonl line 1: index must be an integer or a string"),
    (['{"index": 1, "prediction": "A"}', '{"index": "1", "prediction": "B"}'],
     "p.jsonl line 2: index '1' already predicted on line 1"),
    ([], "p.jsonl: no predictions"),
    (["", "  "], "p.jsonl: no predictions"),
])
def test_bad_predictions_files(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        read_predictions(path)


def test_score_refuses_partial_or_foreign_predictions(tmp_path):
    rows = bm.load_benchmark("SEEDBench_IMG", mcq_file(tmp_path))
    with pytest.raises(ValueError, match=r"p.jsonl: no prediction for 2 of the 3 rows of SEEDBench_IMG, e.g. "
                                         r"indices \['2', '3'\]"):
        bm.score("SEEDBench_IMG", rows, {"1": "A"}, source="p.jsonl")
    with pytest.raises(ValueError, match=r"1 prediction\(s\) for indices not in SEEDBench_IMG, e.g. \['4'\]"):
        bm.score("SEEDBench_IMG", rows, {"1": "A", "2": "C", "3": "D", "4": "A"})


# ----------------------------------------------------------------------------- results.csv and the command line


def test_append_results_writes_and_checks_the_header(tmp_path):
    path = str(tmp_path / "sub" / "results.csv")
    append_results(path, "VQQ", "POPE", 64, 8, {"Overall": 81.25, "acc": 80.0}, "ckpt.safetensors", 16)
    append_results(path, "VQQ", "MME", 64, 8, {"Overall": 1234.5}, "ckpt.safetensors", 2374)
    with open(path, newline="") as f:
        assert list(csv.reader(f)) == [
            ["variant", "benchmark", "metric", "n_l", "n_s", "score", "ckpt", "n_samples"],
            ["VQQ", "POPE", "Overall", "64", "8", "81.25", "ckpt.safetensors", "16"],
            ["VQQ", "POPE", "acc", "64", "8", "80", "ckpt.safetensors", "16"],
            ["VQQ", "MME", "Overall", "64", "8", "1234.5", "ckpt.safetensors", "2374"]]
    other = tmp_path / "other.csv"
    other.write_text("variant,benchmark,metric,n_l,n_s,score\n")
    with pytest.raises(ValueError, match="other.csv: header"):
        append_results(str(other), "VQQ", "POPE", 64, 8, {"Overall": 1.0}, "", 1)


def test_score_only_command_line(tmp_path, capsys):
    tsv = mcq_file(tmp_path)
    predictions = write_jsonl(tmp_path / "p.jsonl", [json.dumps({"index": i, "prediction": p})
                                                     for i, p in [(1, "A. red"), (2, "(B)"), (3, "there are 4")]])
    out_dir = tmp_path / "out"
    argv = ["--score_only=True", "--benchmarks=SEEDBench_IMG", f"--tsv={tsv}", f"--predictions={predictions}",
            f"--out_dir={out_dir}", "--variant=VQQ", "--n_l=16", "--n_s=8"]
    ev.main(argv)
    ev.main(argv)  # appends under the same header
    # row 1 "A. red" -> A, right; row 2 "(B)" -> B, answer C, wrong; row 3 "there are 4": no letter, only option
    # text "4" occurs -> D, right
    # Overall 2/3; nothing unreadable; colour 1/1, count 1/2
    expected = [["VQQ", "SEEDBench_IMG", "Overall", "16", "8", "66.6667", "", "3"],
                ["VQQ", "SEEDBench_IMG", "unparsable_rate", "16", "8", "0", "", "3"],
                ["VQQ", "SEEDBench_IMG", "category:colour", "16", "8", "100", "", "3"],
                ["VQQ", "SEEDBench_IMG", "category:count", "16", "8", "50", "", "3"]]
    with open(out_dir / "results.csv", newline="") as f:
        assert list(csv.reader(f)) == [RESULTS_HEADER] + expected + expected
    printed = capsys.readouterr().out
    assert "SEEDBench_IMG: 3 samples" in printed and "66.6667" in printed


def test_score_only_default_tsv_location_and_bad_arguments(tmp_path):
    mcq_file(tmp_path)  # <bench_dir>/SEEDBench_IMG.tsv
    predictions = write_jsonl(tmp_path / "p.jsonl", ['{"index": 1, "prediction": "A"}'])
    with pytest.raises(ValueError, match="no prediction for 2 of the 3 rows"):
        ev.main(["--score_only=True", "--benchmarks=SEEDBench_IMG", f"--bench_dir={tmp_path}",
                 f"--predictions={predictions}", f"--out_dir={tmp_path / 'out'}"])
    assert not os.path.exists(tmp_path / "out" / "results.csv")  # nothing written for a refused score
    with pytest.raises(InputError, match="unknown benchmark"):
        ev.main(["--score_only=True", "--benchmarks=NOPE", f"--predictions={predictions}"])
    with pytest.raises(InputError, match="needs --predictions"):
        ev.main(["--score_only=True", "--benchmarks=SEEDBench_IMG"])
    with pytest.raises(InputError, match="no positional arguments"):
        ev.main(["extra", "--score_only=True"])
