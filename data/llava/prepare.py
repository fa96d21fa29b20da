"""
LLaVA v1.5 mix665k -> our conversation JSONL.

    python data/llava/prepare.py --input=llava_v1_5_mix665k.json --out=data/llava/out/llava.jsonl \
        --image_root=data/images

Input: one JSON list of {"id", "image" (path relative to image_root, absent for text-only samples),
"conversations": [{"from": "human" | "gpt", "value": str}, ...]}.
Output: one line per kept sample, {"image": image_prefix + image, "messages": [{"role": "user" | "assistant",
"content": str}, ...]}. Rules, as the authors' preparation and loader apply them: image samples only; a sample
whose first message holds "Reference OCR token" (the OCR-token prompts of TextCaps-style data) dropped; the
conversation cut after its first 48 messages; every <image> tag removed with the whitespace around it; it must
alternate user/assistant from the user and end with an answer, else dropped; a QA turn whose question or answer
is empty is removed, and a sample with no turn left is dropped; the characters of all kept messages must add up to
25..5000. Bounding boxes: LLaVA writes [x0, y0, x1, y1] as floats 0..1 in the frame of the image padded to a
centred square; they become <bbox>x0,y0,x1,y1</bbox> with integers 0..999 in the original image's frame (read
from the image file's header under image_root), as the loader expects. Every drop is counted by reason and
printed.
"""
import collections
import functools
import json
import os
import sys
from dataclasses import asdict, dataclass

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import parse_config  # noqa: E402
from fusion import BRACKET_BOX, box_tag, clamp01, clean_conversation, length_in_bounds, write_jsonl  # noqa: E402


@dataclass
class Config:
    input: str = ""  # llava_v1_5_mix665k.json
    out: str = ""  # output JSONL
    image_root: str = ""  # the folder the JSON's image paths are relative to (image sizes for the boxes)
    image_prefix: str = ""  # prepended to every image path, e.g. "llava/" when several datasets share one root


ROLES = {"human": "user", "gpt": "assistant"}
MAX_MESSAGES = 48  # the authors' cut: 24 QA rounds


def unpad_boxes(text, width, height):
    """LLaVA's boxes (0..1 in the centred square of side max(w, h)) -> <bbox> tags in the image's own frame."""
    side = max(width, height)
    left, top = (0, (width - height) // 2) if width > height else ((height - width) // 2, 0)

    def tag(match):
        x0, y0, x1, y1 = (clamp01(float(g)) for g in match.groups())
        return box_tag((x0 * side - left) / width, (y0 * side - top) / height,
                       (x1 * side - left) / width, (y1 * side - top) / height)
    return BRACKET_BOX.sub(tag, text)


def convert(record, cfg, image_sizes, counts):
    """Returns the output record, or None after counting why the sample was dropped."""
    if not record.get("image"):
        counts["dropped: no image"] += 1
        return None
    turns = record["conversations"]
    if turns and "Reference OCR token" in turns[0]["value"]:
        counts["dropped: Reference OCR token"] += 1
        return None
    if len(turns) > MAX_MESSAGES:
        counts[f"conversations cut to their first {MAX_MESSAGES} messages"] += 1
        turns = turns[:MAX_MESSAGES]
    texts = [t["value"] for t in turns]
    if any(BRACKET_BOX.search(text) for text in texts):
        size = image_sizes(record["image"])
        try:
            texts = [unpad_boxes(text, *size) for text in texts]
        except ValueError:  # a bracketed group that is no number, e.g. "[1.2.3, ...]"
            counts["dropped: malformed bounding box"] += 1
            return None
    messages = clean_conversation([ROLES.get(t["from"]) for t in turns], texts, counts)
    if not messages or not length_in_bounds(messages, counts):
        return None
    return {"image": cfg.image_prefix + record["image"], "messages": messages}


def main(cfg):
    with open(cfg.input, encoding="utf-8") as f:
        records = json.load(f)
    counts = collections.Counter()

    @functools.cache
    def image_sizes(image):
        path = os.path.join(cfg.image_root, image)
        with Image.open(path) as img:  # reads the header only
            return img.size

    def converted():
        for i, record in enumerate(records):
            try:
                out = convert(record, cfg, image_sizes, counts)
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{cfg.input}: record {i} is malformed ({e!r})") from None
            except OSError as e:
                raise ValueError(f"{cfg.input}: record {i} has boxes, which need its image's size, and the image does "
                                 f"not open ({e}); is image_root={cfg.image_root!r} the folder its paths are relative "
                                 f"to?") from None
            if out:
                yield out

    kept = write_jsonl(converted(), cfg.out)
    print(f"llava: kept {kept} of {len(records)} records -> {cfg.out}")
    for reason, n in sorted(counts.items()):
        print(f"  {reason}: {n}")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.out or not config.image_root:
        sys.exit("usage: python data/llava/prepare.py --input=llava_v1_5_mix665k.json --out=FILE.jsonl "
                 "--image_root=DIR")
    print(json.dumps(asdict(config)))
    main(config)
