"""The synthetic world (data/synthetic/prepare.py): every answer checked against its image's pixels, the file layout,
the benchmarks' columns and rotation, determinism, and the tiny tokenizers and models it writes."""
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

N_TRAIN, N_VAL, N_BENCH = 40, 6, 12
LETTERS = "EFGHJKLMNPQRSTUV"  # reading order: row 1 is E F G H, row 4 is S T U V
VALUES = {"red", "green", "blue", "yellow", "purple", "orange", "empty"}
BENCHMARKS = {"SYNTH_VQA": ["cell"], "SYNTH_CAPTION": ["row", "grid"]}  # the category rotation of each TSV
COLUMNS = ["index", "image", "question", "answer", "category"]
# what VLMEvalKit (and benchmarks.py) add to a VQA question, and COCO_VAL's caption prompt
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
COCO_PROMPT = ('Please describe this image in general. Directly provide the description, do not include prefix like '
               '"This image depicts". ')
CELL = re.compile(r"What colour is cell ([A-Z])\?")
ROW = re.compile(r"What is in row ([1-4])\?")


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
    """(header, rows as dicts), split on tabs and newlines only: a field holding either would break the row."""
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")
    assert lines[-1] == "", f"{path} does not end with a newline"
    header, *rows = [line.split("\t") for line in lines[:-1]]
    assert all(len(row) == len(header) for row in rows), path
    csv.field_size_limit(1 << 30)  # benchmarks.py's reader (csv, as pandas for VLMEvalKit) reads the same cells
    assert list(csv.reader(io.StringIO("\n".join(lines)), delimiter="\t")) == [header] + rows, path
    return header, [dict(zip(header, row)) for row in rows]


def tsv_image(row):
    return Image.open(io.BytesIO(base64.b64decode(row["image"], validate=True)))


def read_cells(image, module):
    """{letter: value} read from the pixels: each 28-px cell must be one solid colour, named by the palette (the
    background colour is "empty"); the cell centres are at 14 + 28 k px."""
    name_of = {rgb: name for name, rgb in module.COLOURS.items()} | {module.BACKGROUND: "empty"}
    assert len(name_of) == 7, "two values share a colour"
    assert image.format in ("PNG", None) and image.mode == "RGB"  # a file is lossless; None: rendered here
    pixels = np.asarray(image)
    assert pixels.shape == (112, 112, 3)
    cells = {}
    for i, letter in enumerate(LETTERS):
        r, c = divmod(i, 4)
        centre = tuple(int(v) for v in pixels[14 + 28 * r, 14 + 28 * c])
        assert (pixels[28 * r:28 * r + 28, 28 * c:28 * c + 28] == centre).all(), f"cell {letter} is not solid"
        cells[letter] = name_of[centre]
    return cells


def row_words(cells, number):
    return " ".join(f"{letter} {cells[letter]}" for letter in LETTERS[4 * (number - 1):4 * number])


def grid_words(cells):
    return " ".join(f"{letter} {value}" for letter, value in cells.items() if value != "empty")


def check_turn(question, answer, cells):
    """The category of a training turn, after checking its question's form and its answer against the cells: a cell
    question is asked as SYNTH_VQA's prompt reaches the model (with the VQA suffix) and answered by the bare value;
    a row question as SYNTH_CAPTION asks it, answered by the row's four cells, named; the caption prompt by the
    filled cells in reading order, named."""
    if m := CELL.fullmatch(question.removesuffix(VQA_SUFFIX)):
        assert question.endswith(VQA_SUFFIX), question
        assert m[1] in LETTERS, question
        assert answer in VALUES and answer == cells[m[1]], (question, answer, cells[m[1]])
        return "cell"
    if m := ROW.fullmatch(question):
        words = answer.split()
        assert words[0::2] == list(LETTERS[4 * (int(m[1]) - 1):4 * int(m[1])]), (question, answer)
        assert answer == row_words(cells, int(m[1])), (question, answer)
        return "row"
    if question == COCO_PROMPT:
        words = answer.split()
        assert "empty" not in words and set(words[1::2]) <= VALUES, answer
        assert set(words[0::2]) == {letter for letter, value in cells.items() if value != "empty"}, answer
        assert answer == grid_words(cells), answer
        return "grid"
    raise AssertionError(f"unknown question format {question!r}")


def test_palette_names_its_colours():
    """The pixels decide every answer, so the palette must look like its names, distinct from the light background."""
    module = load_prepare()
    assert set(module.VALUES) == VALUES and module.EMPTY == "empty" and module.CELL_NAMES == LETTERS
    assert module.CAPTION_PROMPT == COCO_PROMPT and module.VQA_SUFFIX == VQA_SUFFIX
    colours = {name: np.array(rgb, dtype=int) for name, rgb in module.COLOURS.items()}
    background = np.array(module.BACKGROUND, dtype=int)
    assert background.min() >= 200 and np.ptp(background) <= 20  # light grey
    assert all(np.abs(rgb - background).max() >= 60 for rgb in colours.values())
    for channel, name in enumerate(("red", "green", "blue")):  # the named channel dominates
        assert colours[name][channel] > 2 * max(np.delete(colours[name], channel)), name
    yr, yg, yb = colours["yellow"]
    assert min(yr, yg) > 2 * yb
    pr, pg, pb = colours["purple"]
    assert min(pr, pb) > 2 * pg
    orr, og, ob = colours["orange"]
    assert orr > og > ob and orr > 1.5 * og


def test_training_answers_match_the_pixels(synthetic):
    module, out = synthetic
    checked = collections.Counter()
    for record in read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl"):
        cells = read_cells(Image.open(out / record["image"]), module)
        messages = record["messages"]
        checked[f"{len(messages) // 2} turns"] += 1
        for question, answer in zip(messages[0::2], messages[1::2]):
            category = check_turn(question["content"], answer["content"], cells)
            checked[category] += 1
            checked["empty cell"] += category == "cell" and answer["content"] == "empty"
    print(checked)
    assert all(checked[k] >= 2 for k in ("cell", "row", "grid", "empty cell", "1 turns", "2 turns")), checked
    assert checked["cell"] > checked["row"] + checked["grid"]  # weights 6 : 2 : 1


def test_benchmark_answers_match_the_pixels(synthetic):
    module, out = synthetic
    values = collections.Counter()
    for name in BENCHMARKS:
        for row in read_tsv(out / "bench" / f"{name}.tsv")[1]:
            cells = read_cells(tsv_image(row), module)
            references = ast.literal_eval(row["answer"])
            assert isinstance(references, list) and all(isinstance(r, str) for r in references), row["answer"]
            question, where = row["question"], (name, row["index"])
            if name == "SYNTH_VQA":  # the plain question: benchmarks.py's VQA prompt adds the suffix
                m = CELL.fullmatch(question)
                assert m and m[1] in LETTERS and row["category"] == "cell", where
                assert references == [cells[m[1]]] * 10, where
                values[cells[m[1]]] += 1
            elif row["category"] == "row":
                m = ROW.fullmatch(question)
                assert m, where
                assert references == [row_words(cells, int(m[1]))], where
            else:
                assert row["category"] == "grid" and question == COCO_PROMPT, where
                assert references == [grid_words(cells)], where
            # the prompt the model gets (benchmarks.py adds the VQA suffix) is a training question's exact form
            prompt = question + VQA_SUFFIX if name == "SYNTH_VQA" else question
            assert check_turn(prompt, references[0], cells) == row["category"], where
    assert len(values) >= 3, values  # the references are not all one value


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
            assert all(set(m) == {"role", "content"} for m in record["messages"])
            assert all(isinstance(m["content"], str) and m["content"] for m in record["messages"])
            assert "<image>" not in json.dumps(record)
            assert Image.open(out / record["image"]).size == (112, 112)
    assert sorted(os.listdir(out / "bench")) == sorted(f"{name}.tsv" for name in BENCHMARKS)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(out / "clip"))
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= set(os.listdir(out / "llama"))

    for name, rotation in BENCHMARKS.items():
        header, rows = read_tsv(out / "bench" / f"{name}.tsv")
        assert header == COLUMNS, name
        assert [r["index"] for r in rows] == [str(i) for i in range(N_BENCH)]
        # row i has category i mod the number of categories: each the same number of rows
        assert [r["category"] for r in rows] == [rotation[i % len(rotation)] for i in range(N_BENCH)], name
        assert all(len(r["image"]) > 64 and Image.open(io.BytesIO(base64.b64decode(r["image"]))).size == (112, 112)
                   for r in rows)
        assert all(not r["question"].endswith(VQA_SUFFIX) and "\n" not in r["question"] for r in rows)
        references = [ast.literal_eval(r["answer"]) for r in rows]
        if name == "SYNTH_VQA":  # TextVQA's ten references, all the one answer
            assert all(len(refs) == 10 and len(set(refs)) == 1 and refs[0] in VALUES for refs in references)
        else:  # COCO-like: one reference
            assert all(len(refs) == 1 and refs[0] for refs in references)
            assert all((r["question"] == COCO_PROMPT) == (r["category"] == "grid") for r in rows)


def test_benchmark_images_are_held_out(synthetic):
    """Every image of the world is its own scene: a benchmark drawn from the training stream (or from another
    benchmark's) would repeat scenes."""
    module, out = synthetic
    scenes = [tuple(read_cells(Image.open(out / r["image"]), module).values())
              for split in ("train", "val") for r in read_jsonl(out / f"{split}.jsonl")]
    for name in BENCHMARKS:
        scenes += [tuple(read_cells(tsv_image(r), module).values()) for r in read_tsv(out / "bench" / f"{name}.tsv")[1]]
    assert len(scenes) == N_TRAIN + N_VAL + len(BENCHMARKS) * N_BENCH and len(set(scenes)) == len(scenes)
    # the 7 values equally likely (chance 1/7): 1/7 of the cells is 160 here, with a standard deviation of about 12
    counts = collections.Counter(value for scene in scenes for value in scene)
    assert set(counts) == VALUES and all(100 < n < 220 for n in counts.values()), counts


def test_conversation_keeps_to_the_listed_cells():
    """Stage 0's use of the world: with a subset of the cells listed only cell questions, about listed cells; with
    every cell listed (or none given) all categories. Checked on rendered pixels."""
    module = load_prepare()
    rng = random.Random(5)
    seen = collections.Counter()
    for k in range(150):
        scene = module.random_scene(rng)
        cells = read_cells(module.render(scene), module)
        listed = set(rng.sample(range(16), rng.randint(1, 15)))
        words = module.scene_words(scene, listed)  # what stage 0 writes in place of the vision tokens
        assert words == " ".join(f"{LETTERS[i]} {cells[LETTERS[i]]}" for i in sorted(listed))
        assert module.scene_words(scene) == " ".join(f"{letter} {value}" for letter, value in cells.items())
        for subset, allowed in ((listed, {"cell"}), (set(range(16)), {"cell", "row", "grid"}),
                                (None, {"cell", "row", "grid"})):
            messages = module.conversation(scene, rng, subset)
            assert [m["role"] for m in messages] in (["user", "assistant"], ["user", "assistant"] * 2)
            for question, answer in zip(messages[0::2], messages[1::2]):
                category = check_turn(question["content"], answer["content"], cells)
                assert category in allowed, (subset, question)
                if subset is listed:
                    assert LETTERS.index(CELL.match(question["content"])[1]) in listed, (listed, question)
                seen[category, len(subset or range(16)) == 16] += 1
    assert all(seen[c, True] >= 20 for c in ("cell", "row", "grid")), seen
    with pytest.raises(ValueError):
        module.ask(module.random_scene(rng), "check", rng)  # the yes/no questions are gone


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
    assert "wrote 40 train, 12 val conversations and " in result.stdout
    assert sorted(os.listdir(cli / "bench")) == sorted(f"{name}.tsv" for name in BENCHMARKS)
    for name in BENCHMARKS:  # the default size: 150 rows each
        header, rows = read_tsv(cli / "bench" / f"{name}.tsv")
        assert header == COLUMNS and len(rows) == 150
    module = load_prepare()
    again, other = tmp_path / "again", tmp_path / "other"
    module.main(module.Config(out_dir=str(again), seed=1, n_train=40, n_val=12))
    module.main(module.Config(out_dir=str(other), seed=2, n_train=40, n_val=12))
    assert files_under(cli) == files_under(again) == files_under(other)
    for path in files_under(cli):
        assert (cli / path).read_bytes() == (again / path).read_bytes(), path
    for path in ("train.jsonl", "val.jsonl", "images/train/000000.png", "bench/SYNTH_VQA.tsv",
                 "bench/SYNTH_CAPTION.tsv", "clip/model.safetensors", "llama/model.safetensors"):
        assert (cli / path).read_bytes() != (other / path).read_bytes(), path


def test_llama_tokenizer_conventions(tmp_path):
    import sentencepiece as spm

    module = load_prepare()
    rng = random.Random(0)
    texts = [m["content"] for _ in range(30) for m in module.conversation(module.random_scene(rng), rng)]
    template = (SYSTEM_PROMPT, "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
    assert module.TEMPLATE_PIECES == template
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
    question = "What colour is cell F?" + VQA_SUFFIX
    assert sp.encode(question + " [/INST]", out_type=str)[-1] == "[/INST]"
    for text in (head, question + " [/INST]", "E red F empty G blue", "[INST]", COCO_PROMPT):
        assert sp.decode(sp.encode(text)) == text
    plain = spm.SentencePieceProcessor(model_file=module.train_llama_tokenizer(texts, str(tmp_path / "plain"), 400))
    assert len(plain.encode(SYSTEM_PROMPT)) > 10  # without whole_pieces the prompt is split up

    pieces = sp.encode("row 123", out_type=str)
    assert pieces[0].startswith("\u2581") and pieces[-3:] == ["1", "2", "3"]  # dummy prefix, split digits
    unseen = "naïve ✓"
    ids = sp.encode(unseen)
    assert 0 not in ids and sp.decode(ids) == unseen  # byte fallback: no <unk>
    assert sp.id_to_piece(sp.encode("✓")[-3:]) == ["<0xE2>", "<0x9C>", "<0x93>"]


def test_full_size_tokenizer_keeps_names_and_values_whole(tmp_path):
    """On the full-size run's text (the training conversations of the default seed, written as write_split draws
    them) and vocabulary, every value and cell name is one piece, as a bare answer and inside a row or caption."""
    import sentencepiece as spm

    module = load_prepare()
    cfg = module.Config()
    rng = random.Random(f"{cfg.seed}-train")
    texts = []
    for _ in range(cfg.n_train):
        scene = module.random_scene(rng)
        texts += [m["content"] for m in module.conversation(scene, rng)]
    sp = spm.SentencePieceProcessor(model_file=module.train_llama_tokenizer(
        texts, str(tmp_path), cfg.llama_vocab_size, module.TEMPLATE_PIECES))
    for value in VALUES:
        assert sp.encode(value, out_type=str) == ["\u2581" + value], value
    words = " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, sorted(VALUES) * 3))
    assert sp.encode(words, out_type=str) == ["\u2581" + word for word in words.split()]


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
