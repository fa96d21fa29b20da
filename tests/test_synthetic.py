"""The synthetic world (data/synthetic/prepare.py): every answer checked against its image's pixels, the file layout,
the benchmarks' columns and balance, determinism, and the tiny tokenizers and models it writes."""
import ast
import base64
import collections
import csv
import io
import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SYSTEM_PROMPT, load_prepare

csv.field_size_limit(1 << 30)
N_TRAIN, N_VAL, N_BENCH = 40, 6, 12
LETTERS = "EFGHJKLMNPQRSTUV"  # reading order: row 1 is E F G H
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MCQ = re.compile(r"Question: What colour is cell ([E-V])\?\nOptions:\nA\. (\w+)\nB\. (\w+)\nC\. (\w+)\nD\. (\w+)\n"
                 r"Please select the correct answer from the options above\. \n")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    module = load_prepare()
    out = tmp_path_factory.mktemp("synthetic")
    module.main(module.Config(out_dir=str(out), n_train=N_TRAIN, n_val=N_VAL, n_bench=N_BENCH, seed=3,
                              llama_vocab_size=400, clip_merges=300))
    return module, out


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def read_tsv(path):
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_cells(image, module):
    """{letter: colour name} read from the pixels: each 28-px cell must be one solid colour, named by the palette
    (the background colour is "empty"); the cell centres are at 14 + 28 k px."""
    name_of = {rgb: name for name, rgb in module.COLOURS.items()} | {module.BACKGROUND: "empty"}
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (112, 112, 3)
    cells = {}
    for i, letter in enumerate(LETTERS):
        r, c = divmod(i, 4)
        centre = tuple(int(v) for v in pixels[14 + 28 * r, 14 + 28 * c])
        assert (pixels[28 * r:28 * r + 28, 28 * c:28 * c + 28] == centre).all(), f"cell {letter} is not solid"
        cells[letter] = name_of[centre]
    return cells


def answer_from_pixels(question, cells, caption_prompt, options=None):
    """(category, the answer the cells give, the benchmark's answer column) for a question in any of the world's
    formats; options: a benchmark row's A-D columns (its question is then the plain cell question and its answer
    column a letter). Answers name the cell first ("F red"); POPE's column is the verdict alone."""
    if m := MCQ.fullmatch(question):
        question, options = f"What colour is cell {m[1]}?", m.groups()[1:]
    if m := re.fullmatch(r"What colour is cell ([E-V])\?", question.removesuffix(VQA_SUFFIX)):
        spoken = f"{m[1]} {cells[m[1]]}"
        if options is None:
            return "cell", spoken, spoken
        assert len(set(options)) == 4 and list(options).count(cells[m[1]]) == 1, (question, options)
        return "cell", spoken, "ABCD"[list(options).index(cells[m[1]])]
    if m := re.fullmatch(r"Is cell ([E-V]) (\w+)\?", question):
        verdict = "Yes" if cells[m[1]] == m[2] else "No"
        return "check", f"{m[1]} {cells[m[1]]} {verdict}", verdict
    if m := re.fullmatch(r"What is in row ([1-4])\?", question.removesuffix(VQA_SUFFIX)):
        row = " ".join(f"{letter} {cells[letter]}" for letter in LETTERS[4 * (int(m[1]) - 1):4 * int(m[1])])
        return "row", row, row
    if question == caption_prompt:
        caption = " ".join(f"{letter} {value}" for letter, value in cells.items() if value != "empty")
        return "caption", caption, caption
    raise AssertionError(f"unknown question format {question!r}")


def test_training_answers_match_the_pixels(synthetic):
    module, out = synthetic
    checked = collections.Counter()
    for record in read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl"):
        cells = read_cells(Image.open(out / record["image"]), module)
        messages = record["messages"]
        for question, answer in zip(messages[0::2], messages[1::2]):
            category, expected, _ = answer_from_pixels(question["content"], cells, module.CAPTION_PROMPT)
            assert answer["content"] == expected, (record["image"], question["content"])
            checked[category] += 1
            checked["mcq"] += bool(MCQ.fullmatch(question["content"]))
            checked["vqa suffix"] += question["content"].endswith(VQA_SUFFIX)
    print(checked)
    assert all(checked[k] >= 2 for k in ("cell", "check", "row", "caption", "mcq", "vqa suffix")), checked
    assert checked["check"] > checked["caption"]  # weights 3 : 1


def test_benchmark_answers_match_the_pixels(synthetic):
    module, out = synthetic
    for name in ("SYNTH_YORN", "SYNTH_MCQ", "SYNTH_VQA", "SYNTH_CAPTION"):
        for row in read_tsv(out / "bench" / f"{name}.tsv"):
            cells = read_cells(Image.open(io.BytesIO(base64.b64decode(row["image"]))), module)
            options = [row[k] for k in "ABCD"] if name == "SYNTH_MCQ" else None
            category, _, expected = answer_from_pixels(row["question"], cells, module.CAPTION_PROMPT, options)
            assert row["category"] == category, (name, row["index"])
            if name in ("SYNTH_YORN", "SYNTH_MCQ"):
                assert row["answer"] == expected, (name, row["index"])
            else:
                references = ast.literal_eval(row["answer"])
                assert references == [expected] * (10 if name == "SYNTH_VQA" else 1), (name, row["index"])


def test_files_and_benchmark_layout(synthetic):
    module, out = synthetic
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        records = read_jsonl(out / f"{split}.jsonl")
        assert [r["image"] for r in records] == [f"images/{split}/{i:06d}.png" for i in range(n)]
        assert sorted(os.listdir(out / "images" / split)) == [f"{i:06d}.png" for i in range(n)]
        for record in records:
            assert set(record) == {"image", "messages"}
            roles = [m["role"] for m in record["messages"]]
            assert len(roles) in (2, 4) and roles == ["user", "assistant"] * (len(roles) // 2)
            assert all(isinstance(m["content"], str) and m["content"] for m in record["messages"])
            assert "<image>" not in json.dumps(record)
            assert Image.open(out / record["image"]).size == (112, 112)
    assert sorted(os.listdir(out / "bench")) == ["SYNTH_CAPTION.tsv", "SYNTH_MCQ.tsv", "SYNTH_VQA.tsv", "SYNTH_YORN.tsv"]
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out / "clip"))
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(out / "llama"))

    columns = ["index", "image", "question", "answer", "category"]
    categories = {"SYNTH_YORN": ["check"], "SYNTH_MCQ": ["cell"], "SYNTH_VQA": ["cell", "row"],
                  "SYNTH_CAPTION": ["caption"]}
    for name, wanted in categories.items():
        with open(out / "bench" / f"{name}.tsv", encoding="utf-8") as f:
            header = f.readline().rstrip("\n").split("\t")
        rows = read_tsv(out / "bench" / f"{name}.tsv")
        assert header == (["index", "image", "question", "A", "B", "C", "D", "answer", "category"]
                          if name == "SYNTH_MCQ" else columns)
        assert [r["index"] for r in rows] == [str(i) for i in range(N_BENCH)]
        assert collections.Counter(r["category"] for r in rows) == {c: N_BENCH // len(wanted) for c in wanted}
        if name == "SYNTH_YORN":
            assert collections.Counter(r["answer"] for r in rows) == {"Yes": N_BENCH // 2, "No": N_BENCH // 2}
        if name == "SYNTH_MCQ":
            assert all(r["answer"] in ("A", "B", "C", "D") for r in rows)
        if name == "SYNTH_CAPTION":
            assert all(r["question"] == module.CAPTION_PROMPT for r in rows)


def test_benchmark_images_are_held_out(synthetic):
    """Every image of the world is its own scene: a benchmark drawn from the training stream (or from another
    benchmark's) would repeat scenes."""
    module, out = synthetic
    scenes = [tuple(read_cells(Image.open(out / r["image"]), module).values())
              for split in ("train", "val") for r in read_jsonl(out / f"{split}.jsonl")]
    for name in ("SYNTH_YORN", "SYNTH_MCQ", "SYNTH_VQA", "SYNTH_CAPTION"):
        scenes += [tuple(read_cells(Image.open(io.BytesIO(base64.b64decode(r["image"]))), module).values())
                   for r in read_tsv(out / "bench" / f"{name}.tsv")]
    assert len(scenes) == N_TRAIN + N_VAL + 4 * N_BENCH and len(set(scenes)) == len(scenes)


def files_under(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_cli_at_issue_twelve_size_and_same_bytes_for_a_seed(tmp_path):
    """The command of issue 12 (the old world crashed there), then the same config in this process (another hash
    seed): the same bytes in every file; another seed changes the data and the models."""
    cli = tmp_path / "cli"
    args = ["--seed=1", "--n_train=40", "--n_val=12"]
    result = subprocess.run([sys.executable, "data/synthetic/prepare.py", f"--out_dir={cli}", *args], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote 40 train, 12 val conversations and 4 x 150 benchmark rows" in result.stdout
    module = load_prepare()
    again, other = tmp_path / "again", tmp_path / "other"
    module.main(module.Config(out_dir=str(again), seed=1, n_train=40, n_val=12))
    module.main(module.Config(out_dir=str(other), seed=2, n_train=40, n_val=12))
    assert files_under(cli) == files_under(again) == files_under(other)
    for path in files_under(cli):
        assert (cli / path).read_bytes() == (again / path).read_bytes(), path
    for path in ("train.jsonl", "val.jsonl", "images/train/000000.png", "bench/SYNTH_YORN.tsv", "bench/SYNTH_MCQ.tsv",
                 "bench/SYNTH_VQA.tsv", "bench/SYNTH_CAPTION.tsv", "clip/model.safetensors", "llama/model.safetensors"):
        assert (cli / path).read_bytes() != (other / path).read_bytes(), path


def test_llama_tokenizer_conventions(tmp_path):
    import sentencepiece as spm

    module = load_prepare()
    rng = random.Random(0)
    texts = [m["content"] for _ in range(30) for m in module.conversation(module.random_scene(rng), rng)]
    template = (SYSTEM_PROMPT, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
    path = module.train_llama_tokenizer(texts, str(tmp_path), 400, whole_pieces=template)
    assert path == os.path.join(str(tmp_path), "tokenizer.model")
    sp = spm.SentencePieceProcessor(model_file=path)
    assert sp.vocab_size() == 400
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    # the whole pieces come next (ids 3-7), then the 256 byte pieces
    assert sp.id_to_piece(list(range(3, 8))) == [piece.replace(" ", "\u2581") for piece in template]
    assert sp.id_to_piece([8, 263]) == ["<0x00>", "<0xFF>"]

    head = f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n"  # fusion.py's first turn
    assert sp.encode(head, out_type=str) == ["\u2581", "[INST]", "\u2581", "<<SYS>>", "\n",
                                             SYSTEM_PROMPT.replace(" ", "\u2581"), "\n", "<</SYS>>", "\n", "\n"]
    assert sp.encode("Is cell F red? [/INST]", out_type=str)[-1] == "[/INST]"
    for text in (head, "Is cell F red? [/INST]", "A red B empty C blue", "[INST]"):
        assert sp.decode(sp.encode(text)) == text
    plain = spm.SentencePieceProcessor(model_file=module.train_llama_tokenizer(texts, str(tmp_path / "plain"), 400))
    assert len(plain.encode(SYSTEM_PROMPT)) > 10  # without whole_pieces the prompt is split up

    pieces = sp.encode("row 123", out_type=str)
    assert pieces[0].startswith("\u2581") and pieces[-3:] == ["1", "2", "3"]  # dummy prefix, split digits
    unseen = "naïve ✓"
    ids = sp.encode(unseen)
    assert 0 not in ids and sp.decode(ids) == unseen  # byte fallback: no <unk>
    assert sp.id_to_piece(sp.encode("✓")[-3:]) == ["<0xE2>", "<0x9C>", "<0x93>"]


def test_clip_vocab_loads_in_transformers(tmp_path):
    from transformers import CLIPTokenizer

    module = load_prepare()
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

    from fusion import TokenSpace, TokenSpaceConfig

    _, out = synthetic
    clip = CLIPModel.from_pretrained(out / "clip")
    tokenizer = CLIPTokenizer.from_pretrained(out / "clip")
    with open(out / "clip" / "vocab.json", encoding="utf-8") as f:
        vocab = json.load(f)
    vision, text = clip.config.vision_config, clip.config.text_config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.num_hidden_layers) == (112, 14, 128, 2)
    assert (text.vocab_size, text.eos_token_id, text.max_position_embeddings) == (len(vocab), len(vocab) - 1, 77)
    with torch.no_grad():
        image_embeds = clip.get_image_features(pixel_values=torch.randn(1, 3, 112, 112))
        text_embeds = clip.get_text_features(**tokenizer(["a red cell"], return_tensors="pt"))
    image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
    text_embeds = getattr(text_embeds, "pooler_output", text_embeds)
    assert image_embeds.shape == text_embeds.shape == (1, 64)

    sp = spm.SentencePieceProcessor(model_file=str(out / "llama" / "tokenizer.model"))
    llama = LlamaForCausalLM.from_pretrained(out / "llama")
    config = llama.config
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (sp.vocab_size(), 1, 2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (128, 2, 2)
    ids = torch.tensor([[1] + sp.encode("What colour is cell F?")])
    with torch.no_grad():
        assert llama(ids).logits.shape == (1, ids.shape[1], sp.vocab_size())
    # the chat template's pieces, as fusion.py's default system prompt reaches them, are whole pieces
    token_space = TokenSpace(TokenSpaceConfig(clip_path=str(out / "clip"), llama_path=str(out / "llama")))
    assert len(token_space.layout.first_head) == 11 and len(token_space.layout.later_head) == 3 and len(token_space.layout.close_question) == 2
