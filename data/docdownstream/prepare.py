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
an answer, else dropped; empty turns removed; the characters of all kept messages must add up to 25..5000 (the
authors' loader rule); every drop counted by reason and printed. Boxes stay as written.
"""
import collections
import json
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import parse_config  # noqa: E402
from fusion import clean_conversation, length_in_bounds, write_jsonl  # noqa: E402


@dataclass
class Config:
    input: str = ""  # DocDownstream-1.0/train.jsonl
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "DocDownstream-1.0/" when datasets share one root


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
    roles = [t["role"] if t["role"] in ("user", "assistant") else None for t in turns]
    messages = clean_conversation(roles, [t["content"] for t in turns], counts)
    if not messages or not length_in_bounds(messages, counts):
        return None
    return {"image": image_prefix + images[0].removeprefix("./"), "messages": messages}


def main(cfg):
    counts = collections.Counter()
    n = 0

    def converted():
        nonlocal n
        with open(cfg.input, encoding="utf-8") as src:
            for line_number, line in enumerate(src, 1):
                if not line.strip():
                    continue
                n += 1
                try:
                    out = convert(json.loads(line), cfg.image_prefix, counts)
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"{cfg.input}:{line_number}: malformed record ({e!r})") from None
                if out:
                    yield out

    kept = write_jsonl(converted(), cfg.out)
    print(f"docdownstream: kept {kept} of {n} records -> {cfg.out}")
    for reason, count in sorted(counts.items()):
        print(f"  {reason}: {count}")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.out:
        sys.exit("usage: python data/docdownstream/prepare.py --input=train.jsonl --out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
