"""The data converters on hand-made files in the original formats (the synthetic world: test_synthetic.py)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", os.path.join(ROOT, "data", name, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, *args):
    result = subprocess.run([sys.executable, os.path.join("data", name, "prepare.py"), *args], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# ----------------------------------------------------------------------------------------------------------------
# converters

def llava_sample(image, *values, first="human"):
    other = {"human": "gpt", "gpt": "human"}
    turns, speaker = [], first
    for value in values:
        turns.append({"from": speaker, "value": value})
        speaker = other[speaker]
    return {"id": "x", **({"image": image} if image else {}), "conversations": turns}


def test_llava_converter(tmp_path):
    from PIL import Image

    sample = llava_sample
    (tmp_path / "gqa").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "gqa" / "2.jpg")  # square: the padded frame is the image's
    records = [
        sample("coco/1.jpg", "<image>\nWhat is this?", "A cat.", "And the colour <image> of it?", "Black."),
        sample("gqa/2.jpg", "Describe it.\n<image>", "A dog [0.1, 0.2, 0.5, 0.9] on grass."),
        sample(None, "Text only?", "Yes."),
        sample("textvqa/3.jpg", "<image>\nWhat is written?\nReference OCR token: STOP", "STOP"),
        sample("coco/4.jpg", "Hello", "<image>\nHi", first="gpt"),
        sample("coco/5.jpg", "<image>\nQ1", "A1", "Q2 without answer"),
        sample("coco/6.jpg", "<image>", "an answer to nothing", "Second question?", "Second answer."),
        sample("coco/7.jpg", "<image>\n", "only an empty question"),
    ]
    source, out = tmp_path / "mix.json", tmp_path / "out.jsonl"
    source.write_text(json.dumps(records))
    printed = run_script("llava", f"--input={source}", f"--out={out}", f"--image_root={tmp_path}",
                         "--image_prefix=llava/")
    assert read_jsonl(out) == [
        {"image": "llava/coco/1.jpg", "messages": [user("What is this?"), assistant("A cat."),
                                                   user("And the colour of it?"), assistant("Black.")]},
        {"image": "llava/gqa/2.jpg", "messages": [user("Describe it."),  # int(x * 999), truncated
                                                  assistant("A dog <bbox>99,199,499,899</bbox> on grass.")]},
        {"image": "llava/coco/6.jpg", "messages": [user("Second question?"), assistant("Second answer.")]},
    ]
    assert "kept 3 of 8 records" in printed
    for line in ("dropped: no image: 1", "dropped: Reference OCR token: 1", "dropped: no non-empty turn: 1",
                 "dropped: not alternating user/assistant from the user, ending with an answer: 2",
                 "turns removed: empty question or answer: 2"):
        assert f"  {line}\n" in printed, printed


def test_llava_malformed_record_names_the_row(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text(json.dumps([{"image": "a.jpg", "conversations": [{"from": "human", "value": "Q"},
                                                                        {"from": "gpt", "value": "A"}]},
                                  {"image": "b.jpg", "conversations": [{"from": "human"}]}]))
    with pytest.raises(ValueError, match=r"bad.json: record 1 is malformed"):
        load("llava").main(load("llava").Config(input=str(source), out=str(tmp_path / "o.jsonl"),
                                                image_root=str(tmp_path)))


def test_llava_boxed_sample_without_its_image_names_the_row(tmp_path):
    source = tmp_path / "boxes.json"
    source.write_text(json.dumps([llava_sample("a.jpg", "Where is the cat in the picture?", "At [0.1, 0.2, 0.3, 0.4].")]))
    with pytest.raises(ValueError, match=r"boxes.json: record 0 has boxes, which need its image's size"):
        load("llava").main(load("llava").Config(input=str(source), out=str(tmp_path / "o.jsonl"),
                                                image_root=str(tmp_path / "nowhere")))


def test_llava_done_when(tmp_path):
    """The CLI on a boxed sample, a 20-character sample and a 60-message conversation."""
    from PIL import Image

    Image.new("RGB", (300, 200)).save(tmp_path / "wide.jpg")
    long_conversation = [text for k in range(30) for text in (f"Question number {k}?", f"Answer number {k}.")]
    records = [
        llava_sample("wide.jpg", "<image>\nWhere is the dog?", "It is at [0.25, 0.5, 0.75, 1.0] in the image."),
        llava_sample("wide.jpg", "Twelve chars", "8 chars."),  # 12 + 8 = 20 characters
        llava_sample("wide.jpg", *long_conversation),
    ]
    source, out = tmp_path / "mix.json", tmp_path / "out.jsonl"
    source.write_text(json.dumps(records))
    printed = run_script("llava", f"--input={source}", f"--out={out}", f"--image_root={tmp_path}")
    boxed, long = read_jsonl(out)
    # the padded square is 300 x 300 with the image 50 px down: y 0.5 -> (150 - 50) / 200 = 0.5, y 1.0 -> 1.0 (250 px)
    x0, y0, x1, y1 = 0.25 * 300 / 300, (0.5 * 300 - 50) / 200, 0.75 * 300 / 300, (1.0 * 300 - 50) / 200
    expected = ",".join(str(int(min(max(v, 0), 1) * 999)) for v in (x0, y0, x1, y1))
    assert boxed["messages"][1]["content"] == f"It is at <bbox>{expected}</bbox> in the image."
    assert len(long["messages"]) == 48
    assert long["messages"][-1] == assistant("Answer number 23.")
    assert "kept 2 of 3 records" in printed
    assert "  dropped: fewer than 25 characters in all: 1\n" in printed
    assert "  conversations cut to their first 48 messages: 1\n" in printed


def test_svit_converter(tmp_path):
    def dialogue(*values, first="user"):
        speakers = [first, "gpt" if first == "user" else "user"]
        return {"content": [{"from": speakers[i % 2], "value": v} for i, v in enumerate(values)]}

    long_dialogue = [text for k in range(11) for text in (f"Question {k} here?", f"Answer {k}.")]
    records = [
        # 11 + 4 = 15 rounds of one image, concatenated -> chunks of 7 + 7 + 1 rounds
        {"image_id": 10, "conversations": [dialogue(*long_dialogue), dialogue(*long_dialogue[:8])]},
        {"image_id": 20, "conversations": [dialogue("Where is <st>the cat<ed> [0.1, 0.25, 0.5, 1.0]?", "On the mat."),
                                           dialogue("And the dog?", "Gone.")]},
        {"image_id": 30, "conversations": [dialogue("What?", "Something.")]},
        {"image_id": "20", "conversations": [dialogue("Answer first", "Question?", first="gpt"),
                                             dialogue("Why is it so?", ""), dialogue("Hi", "Hello, how are you today?")]},
    ]
    image_data = [{"image_id": 10, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg"},
                  {"image_id": 20, "url": "https://cs.stanford.edu/people/rak248/VG_100K_2/20.jpg"}]
    source, vg, out = tmp_path / "complex_reasoning.json", tmp_path / "image_data.json", tmp_path / "out.jsonl"
    source.write_text(json.dumps(records))
    vg.write_text(json.dumps(image_data))
    printed = run_script("svit", f"--input={source}", f"--vg_image_data={vg}", f"--out={out}")
    rounds = [[user(f"Question {k} here?"), assistant(f"Answer {k}.")] for k in list(range(11)) + list(range(4))]
    assert read_jsonl(out) == [
        {"image": "VG_100K/10.jpg", "messages": sum(rounds[:7], [])},
        {"image": "VG_100K/10.jpg", "messages": sum(rounds[7:14], [])},
        {"image": "VG_100K/10.jpg", "messages": sum(rounds[14:], [])},  # "Question 3 here?Answer 3." = 25 characters
        {"image": "VG_100K_2/20.jpg", "messages": [user("Where is <st>the cat<ed> <bbox>99,249,499,999</bbox>?"),
                                                   assistant("On the mat."), user("And the dog?"), assistant("Gone.")]},
    ]
    assert "svit complex_reasoning: 4 records, 8 dialogues -> kept 4 chunks" in printed
    for line in ("dropped: first message shorter than 4 characters: 1",
                 "dialogues dropped: image_id not in image_data.json: 1",
                 "dropped: not alternating user/assistant from the user, ending with an answer: 1",
                 "dropped: no non-empty turn: 1", "turns removed: empty question or answer: 1"):
        assert f"  {line}\n" in printed, printed


def test_svit_unsplit_subsets_keep_each_dialogue_whole(tmp_path):
    long_dialogue = [text for k in range(12) for text in (f"Question {k} here?", f"Answer {k}.")]
    records = [{"image_id": 10, "conversations": [{"content": [{"from": ["user", "gpt"][i % 2], "value": v}
                                                               for i, v in enumerate(dialogue)]}
                                                  for dialogue in (long_dialogue, long_dialogue[:4])]}]
    image_data = [{"image_id": 10, "url": "https://cs.stanford.edu/people/rak248/VG_100K/10.jpg"}]
    source, vg, out = tmp_path / "some_name.json", tmp_path / "image_data.json", tmp_path / "out.jsonl"
    source.write_text(json.dumps(records))
    vg.write_text(json.dumps(image_data))
    printed = run_script("svit", f"--input={source}", f"--vg_image_data={vg}", f"--out={out}", "--subset=conversation")
    assert [len(r["messages"]) for r in read_jsonl(out)] == [24, 4]
    assert "svit conversation: 1 records, 2 dialogues -> kept 2 dialogues" in printed
    svit = load("svit")
    with pytest.raises(ValueError, match="subset 'some_name' is none of complex_reasoning"):
        svit.main(svit.Config(input=str(source), vg_image_data=str(vg), out=str(out)))


def test_svit_split_rounds_sizes():
    svit = load("svit")
    # the authors' rule: halve the total until <= 10, then chunks of that many rounds
    for rounds, sizes in ((10, [10]), (11, [5, 5, 1]), (15, [7, 7, 1]), (25, [6, 6, 6, 6, 1]), (3, [3]),
                          (40, [10, 10, 10, 10]), (41, [10, 10, 10, 10, 1])):
        messages = [user("q"), assistant("a")] * rounds
        assert [len(chunk) // 2 for chunk in svit.split_rounds(messages, 10)] == sizes


def test_docdownstream_converter(tmp_path):
    lines = [
        {"image": ["./imgs/DUE_Benchmark/DocVQA/pngs/a.png"],
         "messages": [user("<|image|>what is the date mentioned in this letter?"), assistant("1/8/93")],
         "task_name": "qa_sft", "dataset_name": "DocVQA"},
        {"image": ["./imgs/a.png", "./imgs/b.png"], "messages": [user("<|image|><|image|>Compare."), assistant("x")]},
        {"image": [], "messages": [user("No image?"), assistant("No.")]},
        {"image": ["./imgs/c.png"], "messages": [user("<|image|>Read it.\nReference OCR token: A"), assistant("A")]},
        {"image": ["./imgs/d.png"], "messages": [assistant("Hi"), user("<|image|>Q")]},
        {"image": ["./imgs/e.png"], "messages": [user("<|image|>"), assistant("x"), user("Real question?"),
                                                 assistant("Real answer.")]},
    ]
    source, out = tmp_path / "train.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    printed = run_script("docdownstream", f"--input={source}", f"--out={out}", "--image_prefix=doc/")
    assert read_jsonl(out) == [
        {"image": "doc/imgs/DUE_Benchmark/DocVQA/pngs/a.png",
         "messages": [user("what is the date mentioned in this letter?"), assistant("1/8/93")]},
        {"image": "doc/imgs/e.png", "messages": [user("Real question?"), assistant("Real answer.")]},
    ]
    assert "kept 2 of 6 records" in printed
    for line in ("dropped: several images: 1", "dropped: no image: 1", "dropped: Reference OCR token: 1",
                 "dropped: not alternating user/assistant from the user, ending with an answer: 1",
                 "turns removed: empty question or answer: 1"):
        assert f"  {line}\n" in printed, printed


def test_docdownstream_malformed_line_names_the_line(tmp_path):
    source = tmp_path / "train.jsonl"
    source.write_text(json.dumps({"image": ["a.png"], "messages": [user("Q?"), assistant("A")]}) + "\n{not json\n")
    doc = load("docdownstream")
    with pytest.raises(ValueError, match=r"train.jsonl:2: malformed record"):
        doc.main(doc.Config(input=str(source), out=str(tmp_path / "o.jsonl")))
