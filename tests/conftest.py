"""Shared fixtures: one torch thread, tiny tokenizers trained here (data/synthetic/prepare.py's builders), a tiny
synthetic world, tiny Pillow images."""
import importlib.util
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent

SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")

# what the tiny tokenizers learn from: the chat template's pieces and a few short visual-QA exchanges
TOKENIZER_TEXTS = [SYSTEM_PROMPT, "[INST] <<SYS>>\n", "\n<</SYS>>\n\n", "[INST]", "[/INST]"] + [
    "What colour is the shape in row 2, column 3?", "The shape is red.",
    "How many circles are there in the image?", "There are 3 circles.",
    "Is there a blue triangle in the image?", "Yes", "No",
    "Describe the image in detail.", "A 4 by 5 grid: a red circle, a blue square and a green diamond.",
    "What text is written on the label?", "KX7",
    "Answer the question using a single word or phrase.",
    "Please answer yes or no. Which option is correct? A. red B. green C. blue D. yellow",
] * 4


def load_prepare():
    spec = importlib.util.spec_from_file_location("synthetic_prepare", ROOT / "data" / "synthetic" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """On a shared 2-core machine, intra-op threads that wait on each other make tiny steps 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_world(tmp_path_factory):
    """A tiny data/synthetic/prepare.py output: 16 training conversations, 6 rows per benchmark, tiny CLIP and Llama.
    Llama's vocabulary is prepare.py's 512: on this little text a smaller one leaves words such as "red" in pieces,
    which the full-size run never does (and stage 0's gate budgets its answers' tokens for whole words)."""
    out = tmp_path_factory.mktemp("synthetic")
    prepare = load_prepare()
    prepare.main(prepare.Config(out_dir=str(out), n_train=16, n_val=2, n_bench=6, llama_vocab_size=512, clip_merges=300))
    return out


@pytest.fixture(scope="session")
def llama_tokenizer_dir(tmp_path_factory):
    """Folder with a tiny SentencePiece `tokenizer.model` (Llama ids: <unk> 0, <s> 1, </s> 2, byte fallback)."""
    out = tmp_path_factory.mktemp("llama")
    load_prepare().train_llama_tokenizer(TOKENIZER_TEXTS, str(out), vocab_size=400)
    return out


@pytest.fixture(scope="session")
def clip_vocab_dir(tmp_path_factory):
    """Folder with a tiny CLIP-format `vocab.json` + `merges.txt` (<|startoftext|>, <|endoftext|> last)."""
    out = tmp_path_factory.mktemp("clip")
    load_prepare().build_clip_vocab(TOKENIZER_TEXTS, str(out), num_merges=200)
    return out


@pytest.fixture(scope="session")
def draw_image():
    """draw_image(width, height, colour=None, seed=0) -> PIL RGB image: one solid colour, or (colour None) a
    light background with a few random coloured rectangles and ellipses."""
    def draw(width, height, colour=None, seed=0):
        if colour is not None:
            return Image.new("RGB", (width, height), colour)
        rng = random.Random(seed)
        img = Image.new("RGB", (width, height), (230, 230, 220))
        pen = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            box = [x0, y0, x0 + rng.randint(1, width), y0 + rng.randint(1, height)]
            fill = tuple(rng.randrange(200) for _ in range(3))
            (pen.ellipse if rng.random() < 0.5 else pen.rectangle)(box, fill=fill)
        return img
    return draw
