"""
BAAI-SVIT (one of complex_reasoning.json, conversation.json, detail_description.json, referring_qa.json)
-> our conversation JSONL, images from Visual Genome.

    python data/svit/prepare.py --input=complex_reasoning.json --vg_image_data=image_data.json \
        --out=data/svit/out/complex_reasoning.jsonl

Input: one JSON list of {"image_id": Visual Genome id, "conversations": [{"content": [{"from": "user" | "gpt",
"value": str}, ...]}, ...]} (other keys are ignored); every entry of "conversations" is one dialogue about the
image. Visual Genome's image_data.json (list of {"image_id", "url", ...}) tells whether an image lives in
VG_100K/ or VG_100K_2/; the output path is image_prefix + "VG_100K[_2]/<id>.jpg".
Output: {"image", "messages": [{"role": "user" | "assistant", "content"}, ...]} per dialogue chunk. Rules: the
same cleaning as data/llava/prepare.py (<image> tags removed, strict user/assistant alternation from the user
ending with an answer, empty turns removed, nothing dropped without a count); dialogues longer than 10 rounds
are split into ceil(rounds / 10) consecutive chunks of near-equal length (15 rounds -> 8 + 7); a chunk whose
first user message is shorter than 4 characters is dropped. Bounding boxes stay as written.
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
    input: str = ""  # one SVIT subset file, e.g. complex_reasoning.json
    vg_image_data: str = ""  # Visual Genome image_data.json
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "vg/" when several datasets share one root
    max_rounds: int = 10  # longer dialogues are split into chunks of at most this many QA rounds


ROLES = {"user": "user", "gpt": "assistant"}
MIN_FIRST_MESSAGE_CHARS = 4


def image_paths(vg_image_data):
    """Visual Genome id -> "VG_100K/<id>.jpg" or "VG_100K_2/<id>.jpg", read from the image urls."""
    with open(vg_image_data, encoding="utf-8") as f:
        images = json.load(f)
    paths = {}
    for i, image in enumerate(images):
        folder, name = image["url"].split("/")[-2:]
        if folder not in ("VG_100K", "VG_100K_2"):
            raise ValueError(f"{vg_image_data}: image {i} has url {image['url']!r}, not in VG_100K or VG_100K_2")
        paths[image["image_id"]] = f"{folder}/{name}"
    return paths


def split_rounds(messages, max_rounds):
    """Consecutive chunks of at most max_rounds QA rounds, sizes differing by at most one round."""
    rounds = len(messages) // 2
    n_chunks = -(-rounds // max_rounds)
    bounds = [round(k * rounds / n_chunks) for k in range(n_chunks + 1)]  # 15 rounds, 2 chunks: 0, 8, 15
    return [messages[2 * a:2 * b] for a, b in zip(bounds, bounds[1:])]


def main(cfg):
    paths = image_paths(cfg.vg_image_data)
    with open(cfg.input, encoding="utf-8") as f:
        records = json.load(f)
    counts = collections.Counter()
    n_dialogues = 0

    def chunks():
        nonlocal n_dialogues
        for i, record in enumerate(records):
            try:
                image = paths.get(int(record["image_id"]))
                dialogues = [dialogue["content"] for dialogue in record["conversations"]]
                n_dialogues += len(dialogues)
                if image is None:
                    counts["dialogues dropped: image_id not in image_data.json"] += len(dialogues)
                    continue
                cleaned = [clean_conversation([ROLES.get(t["from"]) for t in turns], [t["value"] for t in turns], counts)
                           for turns in dialogues]
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"{cfg.input}: record {i} is malformed ({e!r})") from None
            for messages in filter(None, cleaned):
                for chunk in split_rounds(messages, cfg.max_rounds):
                    if len(chunk[0]["content"]) < MIN_FIRST_MESSAGE_CHARS:
                        counts[f"chunks dropped: first message shorter than {MIN_FIRST_MESSAGE_CHARS} characters"] += 1
                        continue
                    yield {"image": cfg.image_prefix + image, "messages": chunk}

    kept = write_jsonl(chunks(), cfg.out)
    print(f"svit: {len(records)} records, {n_dialogues} dialogues -> kept {kept} chunks of at most "
          f"{cfg.max_rounds} rounds -> {cfg.out}")
    for reason, n in sorted(counts.items()):
        print(f"  {reason}: {n}")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.vg_image_data or not config.out:
        sys.exit("usage: python data/svit/prepare.py --input=SUBSET.json --vg_image_data=image_data.json "
                 "--out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
