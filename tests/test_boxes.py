"""Bounding boxes: the LLaVA converter's mapping out of LLaVA's padded square and the loader's mapping into the
global view, each against a re-computation of the authors' rule written here, on a wider-than-tall, a
taller-than-wide and a square image (each shape once shrunk to the global view's side, once not)."""
import importlib.util
import json
import os
import random

import pytest
from PIL import Image

from conftest import SYSTEM_PROMPT
from fusion import ConversationDataset, TokenSpace, TokenSpaceConfig, boxes_into_global_view

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(500, 300), (300, 200), (200, 280), (300, 640), (400, 400), (120, 120)]  # wide, tall, square


def authors_preparation(box, width, height):
    """LLaVA [x0, y0, x1, y1] in the square of side max(w, h) with the image centred -> 0..999 in the image."""
    side = max(width, height)
    shift_x = (height - width) // 2 if height >= width else 0
    shift_y = (width - height) // 2 if width > height else 0
    x0, y0, x1, y1 = [min(max(v, 0.0), 1.0) for v in box]
    out = [(x0 * side - shift_x) / width, (y0 * side - shift_y) / height,
           (x1 * side - shift_x) / width, (y1 * side - shift_y) / height]
    return [int(min(max(v, 0.0), 1.0) * 999) for v in out]


def authors_loading(box, width, height, edge):
    """0..999 in the image -> 0..999 in the black-padded square: a non-square image whose longer side exceeds
    edge is first shrunk to it (int() on the shorter side), then centred on a square of its longer side."""
    if width == height:
        w, h, side, left, top = width, height, width, 0, 0
    elif width > height:
        w, h = (edge, int(height * (edge / width))) if width > edge else (width, height)
        side, left, top = w, 0, (w - h) // 2
    else:
        w, h = (int(width * (edge / height)), edge) if height > edge else (width, height)
        side, left, top = h, (h - w) // 2, 0
    x0, y0, x1, y1 = [min(max(v / 999, 0.0), 1.0) for v in box]
    out = [(x0 * w + left) / side, (y0 * h + top) / side, (x1 * w + left) / side, (y1 * h + top) / side]
    return [int(v * 999) for v in out]


def tag(values):
    return "<bbox>" + ",".join(str(v) for v in values) + "</bbox>"


def llava():
    spec = importlib.util.spec_from_file_location("prepare_llava", os.path.join(ROOT, "data", "llava", "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_boxes(rng, n):
    """Floats with 3 decimals as LLaVA writes them, some on the edges and inside the padding."""
    boxes = [[0.0, 0.0, 1.0, 1.0], [0.05, 0.01, 0.99, 0.12]]
    for _ in range(n):
        x0, y0 = rng.random(), rng.random()
        boxes.append([round(x0, 3), round(y0, 3), round(rng.uniform(x0, 1), 3), round(rng.uniform(y0, 1), 3)])
    return boxes


def test_llava_boxes_leave_the_padded_square(tmp_path):
    rng = random.Random(0)
    records, expected = [], []
    for k, (w, h) in enumerate(SIZES):
        Image.new("RGB", (w, h)).save(tmp_path / f"{k}.png")
        boxes = random_boxes(rng, 20)
        answer = " and ".join(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in boxes)
        records.append({"image": f"{k}.png", "conversations": [{"from": "human", "value": "Where are the objects?"},
                                                                {"from": "gpt", "value": answer}]})
        expected.append(" and ".join(tag(authors_preparation(b, w, h)) for b in boxes))
    (tmp_path / "in.json").write_text(json.dumps(records))
    module = llava()
    module.main(module.Config(input=str(tmp_path / "in.json"), out=str(tmp_path / "out.jsonl"), image_root=str(tmp_path)))
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["messages"][1]["content"] for r in written] == expected


@pytest.mark.parametrize("width,height", SIZES)
def test_loader_maps_boxes_into_the_global_view(width, height):
    rng = random.Random(width * height)
    boxes = [[0, 0, 999, 999]] + [sorted(rng.sample(range(1000), 2)) + sorted(rng.sample(range(1000), 2))
                                  for _ in range(200)]
    boxes = [[b[0], b[2], b[1], b[3]] for b in boxes]
    text = "; ".join(f"box {tag(b)}" for b in boxes)
    expected = "; ".join(f"box {tag(authors_loading(b, width, height, 336))}" for b in boxes)
    assert boxes_into_global_view(text, width, height, 336) == expected


def test_loader_applies_the_mapping_to_every_message(tmp_path, clip_vocab_dir, llama_tokenizer_dir):
    Image.new("RGB", (90, 50), (200, 30, 30)).save(tmp_path / "wide.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image")
    question, answer = "Where is <bbox>100,200,300,400</bbox>?", "Next to <bbox>0,0,999,999</bbox>."
    lines = [{"image": name, "messages": [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}]}
             for name in ("wide.png", "garbage.png")]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    space = TokenSpace(TokenSpaceConfig(clip_path=str(clip_vocab_dir), llama_path=str(llama_tokenizer_dir),
                                        image_size=56, num_crops=1, n_l=2, n_s=1, system_prompt=SYSTEM_PROMPT))
    ds = ConversationDataset(str(tmp_path / "data.jsonl"), str(tmp_path), space, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == {"unreadable image": 1}  # its header is read for the length fit
    mapped = [(f"Where is {tag(authors_loading([100, 200, 300, 400], 90, 50, 56))}?",
               f"Next to {tag(authors_loading([0, 0, 999, 999], 90, 50, 56))}.")]
    assert mapped[0][0] != question
    expected = space.make_sample(Image.open(tmp_path / "wide.png").convert("RGB"), mapped)
    sample = ds[0]
    for key in ("fused_ids", "input_ids", "labels"):
        assert sample[key].tolist() == expected[key].tolist(), key
    assert [a.tolist() for a in sample["answer_ids"]] == [a.tolist() for a in expected["answer_ids"]]
