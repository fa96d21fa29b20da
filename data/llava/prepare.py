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
import re
import sys
from dataclasses import asdict, dataclass


@dataclass
class Config:
    input: str = ""  # llava_v1_5_mix665k.json
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "llava/" when several datasets share one root


ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_TAG = re.compile(r"\s*<image>\s*")


def remove_image_tags(text):
    # a tag on its own line leaves one line break, a tag inside a line one space; then the ends are trimmed
    return IMAGE_TAG.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text).strip()


def convert(record, image_prefix, counts):
    """Returns the output record, or None after counting why the sample was dropped."""
    if not record.get("image"):
        counts["dropped: no image"] += 1
        return None
    turns = record["conversations"]
    if any("Reference OCR token" in turn["value"] for turn in turns):
        counts["dropped: Reference OCR token"] += 1
        return None
    if any(turn["from"] not in ROLES for turn in turns):
        counts["dropped: unknown role"] += 1
        return None
    roles = [ROLES[turn["from"]] for turn in turns]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        counts["dropped: not alternating user/assistant from the user, ending with an answer"] += 1
        return None
    messages = []
    for question, answer in zip(turns[0::2], turns[1::2]):
        question, answer = remove_image_tags(question["value"]), remove_image_tags(answer["value"])
        if not question or not answer:
            counts["turns removed: empty question or answer"] += 1
            continue
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if not messages:
        counts["dropped: no non-empty turn"] += 1
        return None
    return {"image": image_prefix + record["image"], "messages": messages}


def main(cfg):
    with open(cfg.input, encoding="utf-8") as f:
        records = json.load(f)
    counts = collections.Counter()
    kept = 0
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out + ".tmp", "w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            try:
                converted = convert(record, cfg.image_prefix, counts)
            except (KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{cfg.input}: record {i} is malformed ({e!r})") from None
            if converted is not None:
                f.write(json.dumps(converted, ensure_ascii=False) + "\n")
                kept += 1
    os.replace(cfg.out + ".tmp", cfg.out)
    print(f"llava: kept {kept} of {len(records)} records -> {cfg.out}")
    for reason, n in sorted(counts.items()):
        print(f"  {reason}: {n}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from configurator import parse_config

    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.out:
        sys.exit("usage: python data/llava/prepare.py --input=llava_v1_5_mix665k.json --out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
