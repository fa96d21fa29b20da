"""The data converters on hand-made files in the original formats, and the synthetic generator."""
import ast
import base64
import collections
import csv
import importlib.util
import io
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
csv.field_size_limit(1 << 30)


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


# ----------------------------------------------------------------------------------------------------------------
# synthetic world

N_TRAIN, N_VAL, N_BENCH = 40, 6, 12


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    module = load("synthetic")
    out = tmp_path_factory.mktemp("synthetic")
    module.main(module.Config(out_dir=str(out), n_train=N_TRAIN, n_val=N_VAL, n_bench=N_BENCH, seed=3,
                              llama_vocab_size=400, clip_merges=300))
    return module, out


def grid_cells(image, line_colour):
    """Cell centres found from the pixels alone: grid lines are the rows/columns mostly in the line colour."""
    import numpy as np

    line = np.all(np.asarray(image) == np.array(line_colour, dtype=np.uint8), axis=-1)
    xs = np.flatnonzero(line.sum(0) > line.shape[0] / 2)
    ys = np.flatnonzero(line.sum(1) > line.shape[1] / 2)
    return {(r + 1, c + 1): ((x0 + x1) // 2, (y0 + y1) // 2)
            for r, (y0, y1) in enumerate(zip(ys, ys[1:])) for c, (x0, x1) in enumerate(zip(xs, xs[1:]))}


def test_synthetic_answers_match_the_pixels(synthetic):
    from PIL import Image

    module, out = synthetic
    rgb_to_name = {rgb: name for name, rgb in module.COLOURS.items()}
    checked = collections.Counter()
    for record in read_jsonl(out / "train.jsonl"):
        image = Image.open(out / record["image"]).convert("RGB")
        centres = grid_cells(image, module.GRID_LINE)
        colour_at = {cell: rgb_to_name.get(image.getpixel(xy)) for cell, xy in centres.items()}
        messages = record["messages"]
        for question, answer in zip(messages[0::2], messages[1::2]):
            q, a = question["content"], answer["content"]
            if m := re.fullmatch(r"What colour is the shape in row (\d), column (\d)\?(\n.*)?", q, re.S):
                assert colour_at[int(m[1]), int(m[2])] == a, (record["image"], q, a)
                checked["cell_colour"] += 1
            elif m := re.fullmatch(r"How many (\w+) shapes are there\?(\n.*)?", q, re.S):
                assert sum(name == m[1] for name in colour_at.values()) == int(a), (record["image"], q, a)
                checked["count_colour"] += 1
            elif m := re.fullmatch(r"How many (rows|columns) does the grid have\?(\n.*)?", q, re.S):
                rows, cols = max(centres)
                assert (rows if m[1] == "rows" else cols) == int(a), (record["image"], q, a)
                checked["grid"] += 1
    assert checked["cell_colour"] >= 3 and checked["count_colour"] >= 2, checked


def test_synthetic_files_and_benchmarks(synthetic):
    from PIL import Image

    module, out = synthetic
    train, val = read_jsonl(out / "train.jsonl"), read_jsonl(out / "val.jsonl")
    assert len(train) == N_TRAIN and len(val) == N_VAL
    for record in train + val:
        roles = [m["role"] for m in record["messages"]]
        assert 2 <= len(roles) // 2 <= 4 and roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(m["content"] for m in record["messages"]) and "<image>" not in json.dumps(record)
        assert (out / record["image"]).is_file()
    sizes = {Image.open(out / r["image"]).size for r in train}
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes)
    train_pngs = {(out / r["image"]).read_bytes() for r in train + val}

    expected_columns = {"SYNTH_MCQ": ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]}
    for name, categories in module.BENCH_CATEGORIES.items():
        with open(out / "bench" / f"{name}.tsv", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert list(rows[0]) == expected_columns.get(name, ["index", "image", "question", "answer", "category"])
        assert len(rows) == N_BENCH and [r["index"] for r in rows] == [str(i) for i in range(N_BENCH)]
        assert collections.Counter(r["category"] for r in rows) == {c: N_BENCH // len(categories) for c in categories}
        for row in rows:
            png = base64.b64decode(row["image"])
            assert png not in train_pngs  # held out
            Image.open(io.BytesIO(png)).verify()
            if name == "SYNTH_YORN":
                assert row["answer"] in ("Yes", "No")
            elif name == "SYNTH_MCQ":
                assert row["answer"] in "ABCD" and len({row[k] for k in "ABCD"}) == 4
            elif name == "SYNTH_VQA":
                refs = ast.literal_eval(row["answer"])
                assert len(refs) == 10 and all(isinstance(ref, str) and ref for ref in refs)
            else:
                refs = ast.literal_eval(row["answer"])
                assert len(refs) == 5 and row["question"] == module.CAPTION_PROMPT
        if name == "SYNTH_YORN":
            assert collections.Counter(r["answer"] for r in rows) == {"Yes": N_BENCH // 2, "No": N_BENCH // 2}
        if name == "SYNTH_VQA":  # one held-out row checked against its own pixels
            row = next(r for r in rows if r["category"] == "cell_colour")
            image = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
            r, c = map(int, re.findall(r"\d", row["question"]))
            rgb = image.getpixel(grid_cells(image, module.GRID_LINE)[r, c])
            assert {name for name, value in module.COLOURS.items() if value == rgb} == {ast.literal_eval(row["answer"])[0]}


def test_synthetic_is_deterministic_for_a_seed(synthetic, tmp_path):
    import random

    module, out = synthetic
    module.write_split(str(tmp_path), "train", N_TRAIN, random.Random("3-train"))
    assert (tmp_path / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert (tmp_path / "images/train/000007.png").read_bytes() == (out / "images/train/000007.png").read_bytes()
    other = tmp_path / "other"
    module.write_split(str(other), "train", N_TRAIN, random.Random("4-train"))
    assert (other / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_cli_writes_the_same_bytes_twice(tmp_path):
    args = ["--n_train=8", "--n_val=2", "--n_bench=4", "--seed=5", "--llama_vocab_size=400", "--clip_merges=50"]
    run_script("synthetic", f"--out_dir={tmp_path / 'a'}", *args)
    run_script("synthetic", f"--out_dir={tmp_path / 'b'}", *args)
    for path in ("train.jsonl", "val.jsonl", "bench/SYNTH_VQA.tsv", "clip/vocab.json", "clip/merges.txt",
                 "llama/tokenizer.model", "llama/model.safetensors", "clip/model.safetensors"):
        assert (tmp_path / "a" / path).read_bytes() == (tmp_path / "b" / path).read_bytes(), path


def test_llama_tokenizer_conventions(tmp_path):
    import sentencepiece as spm

    module = load("synthetic")
    texts = ["What colour is the shape in row 2, column 3?", "How many red shapes are there?", "There are 12."] * 30
    path = module.train_llama_tokenizer(texts, str(tmp_path), 300)
    assert path == os.path.join(str(tmp_path), "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.vocab_size() == 300
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    pieces = sp.encode("row 123", out_type=str)
    assert pieces[0].startswith("\u2581") and pieces[-3:] == ["1", "2", "3"]  # dummy prefix, split digits
    unseen = "naïve ✓"
    ids = sp.encode(unseen)
    assert 0 not in ids and sp.decode(ids) == unseen  # byte fallback: no <unk>
    assert sp.id_to_piece(sp.encode("✓")[-3:]) == ["<0xE2>", "<0x9C>", "<0x93>"]


def test_clip_vocab_loads_in_transformers(tmp_path):
    from transformers import CLIPTokenizer

    module = load("synthetic")
    texts = ["A red cube and a blue sphere.", "What colour is the cube?", "The cube is red!"] * 10
    module.build_clip_vocab(texts, str(tmp_path), 60)
    with open(tmp_path / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version") and len(vocab) == 512 + len(merges) - 1 + 2
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert vocab["<|endoftext|>"] == len(vocab) - 1 and vocab["<|startoftext|>"] == len(vocab) - 2
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    assert tokenizer.eos_token_id == len(vocab) - 1 and tokenizer.bos_token_id == len(vocab) - 2
    ids = tokenizer("a red cube")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "red</w>", "cube</w>", "<|endoftext|>"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red cube"
    ids = tokenizer("Zebra? 42")["input_ids"]  # unseen word: bytes, nothing unknown
    assert all(0 <= i < len(vocab) for i in ids) and tokenizer.decode(ids, skip_special_tokens=True) == "zebra ? 4 2"


def test_tiny_models_load_with_transformers(synthetic):
    import sentencepiece as spm
    import torch
    from transformers import CLIPModel, CLIPTokenizer, LlamaForCausalLM

    _, out = synthetic
    clip = CLIPModel.from_pretrained(out / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(out / "clip")
    with open(out / "clip" / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    vision, text = clip.config.vision_config, clip.config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (112, 14, 64, 2)
    assert (text.vocab_size, text.eos_token_id, text.max_position_embeddings) == (len(vocab), len(vocab) - 1, 77)
    with torch.no_grad():
        image_embeds = clip.get_image_features(pixel_values=torch.randn(1, 3, 112, 112))
        text_embeds = clip.get_text_features(**tokenizer(["a red circle"], return_tensors="pt"))
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    assert image_embeds.shape == text_embeds.shape == (1, 64)

    sp = spm.SentencePieceProcessor(model_file=str(out / "llama" / "tokenizer.model"))
    llama = LlamaForCausalLM.from_pretrained(out / "llama")
    config = llama.config
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (sp.vocab_size(), 1, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (128, 2, 2)
    ids = torch.tensor([[1] + sp.encode("How many red shapes are there?")])
    with torch.no_grad():
        assert llama(ids).logits.shape == (1, ids.shape[1], sp.vocab_size())
