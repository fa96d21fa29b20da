"""
LLaVA v1.5 mix665k -> our conversation JSONL.

    python data/llava/prepare.py --input=llava_v1_5_mix665k.json --out=data/llava/out/llava.jsonl

Input: one JSON list of {"id", "image" (path relative to LLaVA's image root, absent for text-only samples),
"conversations": [{"from": "human" | "gpt", "value": str}, ...]}.
Output: one line per kept sample, {"image": image_prefix + image, "messages": [{"role": "user" | "assistant",
"content": str}, ...]}. Rules (SPEC section 5): image samples only; samples with "Reference OCR token" (the
OCR-token prompts of TextCaps-style data) dropped; every <image> tag removed with the whitespace around it;
conversations must alternate user/assistant starting with the user and end with an answer, else dropped; a QA
turn whose question or answer is empty is removed, and a sample with no turn left is dropped. Bounding boxes
stay as written. Every drop is counted by reason and printed.
"""
import collections
import json
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import parse_config  # noqa: E402
from fusion import clean_conversation, write_jsonl  # noqa: E402


@dataclass
class Config:
    input: str = ""  # llava_v1_5_mix665k.json
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "llava/" when several datasets share one root


ROLES = {"human": "user", "gpt": "assistant"}


def convert(record, image_prefix, counts):
    """Returns the output record, or None after counting why the sample was dropped."""
    if not record.get("image"):
        counts["dropped: no image"] += 1
        return None
    turns = record["conversations"]
    if any("Reference OCR token" in turn["value"] for turn in turns):
        counts["dropped: Reference OCR token"] += 1
        return None
    messages = clean_conversation([ROLES.get(t["from"]) for t in turns], [t["value"] for t in turns], counts)
    return messages and {"image": image_prefix + record["image"], "messages": messages}


def main(cfg):
    with open(cfg.input, encoding="utf-8") as f:
        records = json.load(f)
    counts = collections.Counter()

    def converted():
        for i, record in enumerate(records):
            try:
                out = convert(record, cfg.image_prefix, counts)
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{cfg.input}: record {i} is malformed ({e!r})") from None
            if out:
                yield out

    kept = write_jsonl(converted(), cfg.out)
    print(f"llava: kept {kept} of {len(records)} records -> {cfg.out}")
    for reason, n in sorted(counts.items()):
        print(f"  {reason}: {n}")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.out:
        sys.exit("usage: python data/llava/prepare.py --input=llava_v1_5_mix665k.json --out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
