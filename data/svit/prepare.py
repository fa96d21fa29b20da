"""
BAAI-SVIT (one of complex_reasoning.json, conversation.json, detail_description.json, referring_qa.json)
-> our conversation JSONL, images from Visual Genome.

    python data/svit/prepare.py --input=complex_reasoning.json --vg_image_data=image_data.json \
        --out=data/svit/out/complex_reasoning.jsonl

Input: one JSON list of {"image_id": Visual Genome id, "conversations": [{"content": [{"from": "user" | "gpt",
"value": str}, ...]}, ...]} (other keys are ignored); every entry of "conversations" is one dialogue about the
image. Visual Genome's image_data.json (list of {"image_id", "url", ...}) tells whether an image lives in
VG_100K/ or VG_100K_2/; the output path is image_prefix + "VG_100K[_2]/<id>.jpg".
Output: {"image", "messages": [{"role": "user" | "assistant", "content"}, ...]} per sample. Rules, as the authors'
preparation and loader apply them: boxes [x0, y0, x1, y1] (floats 0..1 in the image's frame) become
<bbox>x0,y0,x1,y1</bbox> with integers int(x * 999); the same cleaning as data/llava/prepare.py (<image> tags
removed, strict user/assistant alternation from the user ending with an answer, empty turns removed, nothing
dropped without a count). complex_reasoning and referring_qa: all dialogues of one image are concatenated and cut
into consecutive chunks of r rounds, r = the total rounds halved (rounded down) until at most max_rounds (15
rounds -> 7 + 7 + 1; 25 -> 6 + 6 + 6 + 6 + 1); conversation and detail_description: one sample per dialogue,
never split. A sample whose first message is shorter than 4 characters, or whose messages' characters do not add
up to 25..5000, is dropped. The subset comes from the input's file name unless --subset names it.
"""
import collections
import json
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repo root
from configurator import parse_config  # noqa: E402
from fusion import BRACKET_BOX, box_tag, clean_conversation, length_in_bounds, write_jsonl  # noqa: E402


@dataclass
class Config:
    input: str = ""  # one SVIT subset file, e.g. complex_reasoning.json
    vg_image_data: str = ""  # Visual Genome image_data.json
    out: str = ""  # output JSONL
    image_prefix: str = ""  # prepended to every image path, e.g. "vg/" when several datasets share one root
    subset: str = ""  # one of SUBSETS; empty: the input's file name without .json
    max_rounds: int = 10  # complex_reasoning and referring_qa: chunks of at most this many QA rounds


SUBSETS = {"complex_reasoning": True, "referring_qa": True, "conversation": False, "detail_description": False}  # chunked?

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
    """The authors' chunks: r = rounds halved until <= max_rounds, then consecutive chunks of r rounds (the last
    one holds the rest)."""
    r = len(messages) // 2
    while r > max_rounds:
        r //= 2
    return [messages[i:i + 2 * r] for i in range(0, len(messages), 2 * r)]


def tag_boxes(text):
    return BRACKET_BOX.sub(lambda match: box_tag(*(float(g) for g in match.groups())), text)


def main(cfg):
    subset = cfg.subset or os.path.splitext(os.path.basename(cfg.input))[0]
    if subset not in SUBSETS:
        raise ValueError(f"{cfg.input}: subset {subset!r} is none of {', '.join(SUBSETS)}: pass --subset=...")
    if cfg.max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {cfg.max_rounds}")
    paths = image_paths(cfg.vg_image_data)
    with open(cfg.input, encoding="utf-8") as f:
        records = json.load(f)
    counts = collections.Counter()
    n_dialogues = 0

    def written():
        nonlocal n_dialogues
        for i, record in enumerate(records):
            try:
                image = paths.get(int(record["image_id"]))
                dialogues = [dialogue["content"] for dialogue in record["conversations"]]
                n_dialogues += len(dialogues)
                if image is None:
                    counts["dialogues dropped: image_id not in image_data.json"] += len(dialogues)
                    continue
                cleaned = []
                for turns in dialogues:
                    roles = [ROLES.get(t["from"]) for t in turns]
                    try:
                        texts = [tag_boxes(t["value"]) for t in turns]
                    except ValueError:  # a bracketed group that is no number, e.g. "[1.2.3, ...]"
                        counts["dialogues dropped: malformed bounding box"] += 1
                        continue
                    cleaned.append(clean_conversation(roles, texts, counts))
            except (KeyError, TypeError, AttributeError, ValueError) as e:
                raise ValueError(f"{cfg.input}: record {i} is malformed ({e!r})") from None
            cleaned = [messages for messages in cleaned if messages]
            if SUBSETS[subset]:
                samples = split_rounds(sum(cleaned, []), cfg.max_rounds) if cleaned else []
            else:
                samples = cleaned
            for messages in samples:
                if len(messages[0]["content"]) < MIN_FIRST_MESSAGE_CHARS:
                    counts[f"dropped: first message shorter than {MIN_FIRST_MESSAGE_CHARS} characters"] += 1
                elif length_in_bounds(messages, counts):
                    yield {"image": cfg.image_prefix + image, "messages": messages}

    kept = write_jsonl(written(), cfg.out)
    shape = f"chunks of at most {cfg.max_rounds} rounds" if SUBSETS[subset] else "dialogues"
    print(f"svit {subset}: {len(records)} records, {n_dialogues} dialogues -> kept {kept} {shape} -> {cfg.out}")
    for reason, n in sorted(counts.items()):
        print(f"  {reason}: {n}")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if positional or not config.input or not config.vg_image_data or not config.out:
        sys.exit("usage: python data/svit/prepare.py --input=SUBSET.json --vg_image_data=image_data.json "
                 "--out=FILE.jsonl")
    print(json.dumps(asdict(config)))
    main(config)
