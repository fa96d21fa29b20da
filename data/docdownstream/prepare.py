"""
mPLUG DocDownstream-1.0 (train.jsonl) -> our conversation JSONL.

    python data/docdownstream/prepare.py --input=DocDownstream-1.0/train.jsonl --out=data/docdownstream/out/doc.jsonl

Input, one JSON object per line, as documented in mPLUG-DocOwl's DocOwl1.5 README:
    {"image": ["./imgs/DUE_Benchmark/DocVQA/pngs/xnbl0037_1.png"],
     "messages": [{"role": "user", "content": "<|image|>what is the date mentioned in this letter?"},
                  {"role": "assistant", "content": "1/8/93"}],
     "task_name": "qa_sft", "dataset_name": "DocVQA"}
Image paths are relative to the DocDownstream-1.0 folder (its imgs/ comes from the partial-imgs.* archives).
Output: {"image": image_prefix + path without its leading "./", "messages": [...]}. Rules: exactly one image
(samples with none or several are dropped, counted); <|image|> and <image> tags removed with the whitespace
around them; "Reference OCR token" samples dropped; strict user/assistant alternation from the user ending with
an answer, else dropped; empty turns removed; every drop counted by reason and printed.
"""
import collections
import json
import os
import re
import sys
from dataclasses import asdict, dataclass


@dataclass
class Config:
    input: str = ""  # DocDownstream-1.0/train.jsonl
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "DocDownstream-1.0/" when datasets share one root


ROLES = ("user", "assistant")
IMAGE_TAG = re.compile(r"\s*(?:<\|image\|>|<image>)\s*")


def remove_image_tags(text):
    return IMAGE_TAG.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text).strip()


def convert(record, image_prefix, counts):
    """Returns the output record, or None after counting why the sample was dropped."""
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if len(images) != 1:
        counts["dropped: no image" if not images else "dropped: several images"] += 1
        return None
    turns = record["messages"]
    if any("Reference OCR token" in turn["content"] for turn in turns):
        counts["dropped: Reference OCR token"] += 1
        return None
    if any(turn["role"] not in ROLES for turn in turns):
        counts["dropped: unknown role"] += 1
        return None
    roles = [turn["role"] for turn in turns]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        counts["dropped: not alternating user/assistant from the user, ending with an answer"] += 1
        return None
    messages = []
    for question, answer in zip(turns[0::2], turns[1::2]):
        question, answer = remove_image_tags(question["content"]), remove_image_tags(answer["content"])
        if not question or not answer:
            counts["turns removed: empty question or answer"] += 1
            continue
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if not messages:
        counts["dropped: no non-empty turn"] += 1
        return None
    return {"image": image_prefix + images[0].removeprefix("./"), "messages": messages}


def main(cfg):
    counts = collections.Counter()
    n = kept = 0
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.input, encoding="utf-8") as src, open(cfg.out + ".tmp", "w", encoding="utf-8") as f:
        for line_number, line in enumerate(src, 1):
            if not line.strip():
                continue
            n += 1
            try:
                converted = convert(json.loads(line), cfg.image_prefix, counts)
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{cfg.input}:{line_number}: malformed record ({e!r})") from None
            if converted is not None:
                f.write(json.dumps(converted, ensure_ascii=False) + "\n")
                kept += 1
    os.replace(cfg.out + ".tmp", cfg.out)
    print(f"docdownstream: kept {kept} of {n} records -> {cfg.out}")
    for reason, count in sorted(counts.items()):
        print(f"  {reason}: {count}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from configurator import parse_config

    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.out:
        sys.exit("usage: python data/docdownstream/prepare.py --input=train.jsonl --out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
