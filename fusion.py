"""
Token space: how one image and one conversation become the model's inputs, as explicit tensors and masks.

Image -> crops (the authors' conventions, so that their checkpoints see the pixels they were trained on):
  global view  the image pasted centred on a black square (a non-square image whose longer side exceeds S is
               first LANCZOS-resized to longer side S; a square image is never resized here), converted with
               ToTensor + Normalize(OpenAI CLIP mean/std), then resized to S x S *in tensor space* with
               F.interpolate(bicubic, align_corners=False, no antialias), also when shrinking.
  local tiles  the Phi-3-V HD rule in landscape orientation (portrait images are transposed first and back):
               the largest integer scale with scale * ceil(scale / aspect) <= num_crops; PIL-bilinear resize to
               width scale*S, height int(scale*S / aspect); white padding to a multiple of S with
               top = int(pad / 2); tiles of S x S in row-major order, after the global view.
  Every tile holds image pixels (the padding is less than S and split between top and bottom), so no tile is
  ever "empty"; the authors' drop_empty_crops only removed the zero crops their batching added, which a
  per-sample list never has.

Conversation -> the fused-model sequence (CLIP BPE vocabulary, no <|startoftext|>), one block per question i:
  [question_i tokens (all of them, as the authors' fused side; none with drop_question)] [n_i - 1 query slots] [EOS]
  n_1 = n_l, n_i = n_s for i > 1. Query slots hold the row of the learned query table (0 .. n_i - 2; later
  questions reuse the first n_s - 1 rows); the n_i - 1 slots and the EOS are the question's n_i outputs.

Conversation -> the LLM sequence (Llama-2 chat; chat.py has the other layouts), each piece encoded on its own with
the raw SentencePiece model (so each piece gets the dummy-prefix space, exactly as the authors' models were trained
and evaluated):
  turn 1:  <s> | "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n" | n_l slots | "{Q1}" | "[/INST]" | "{A1} " | </s>
  turn t:  <s> | "[INST]"                                | n_s slots | "{Qt}" | "[/INST]" | "{At} " | </s>
  <s> (1) and </s> (2) are control ids, never encoded text; slots hold the placeholder id 0 and are overwritten
  by the bridge outputs in order. The answer piece keeps the space before </s> that Llama-2-chat's own format
  has (SentencePiece encodes it as a lone "▁"). Labels: the answer piece's tokens and its </s>, -100 elsewhere,
  not shifted. With an empty system prompt turn 1 starts like turn t. A generation prompt ends after the last
  "[/INST]". Texts are used as written (no strip; <bbox> tags as the loader mapped them, see below).
  chat_template="vicuna" (Vicuna v1.1, the layout Vicuna-7B/13B v1.5 were tuned with: "{system} USER: {Q}
  ASSISTANT: {A}</s>USER: ..."), the same pieces and labels, one <s> for the whole conversation:
  turn 1:  <s> | "{system}" | "USER:" | n_l slots | "{Q1}" | "ASSISTANT:" | "{A1}" | </s>
  turn t:        "USER:"              | n_s slots | "{Qt}" | "ASSISTANT:" | "{At}" | </s>
  and a generation prompt ends after the last "ASSISTANT:".

Stage 1 also gets one CLIP row per turn: the answer's tokens (at most max_answer_tokens - 1) + EOS, truncated
before the EOS is appended so every row ends in exactly one EOS.

Length: max_seq_len bounds both sequences, the LLM's and the fused model's text part (questions, query slots and
EOS; the vision tokens come on top). A conversation that exceeds it on either side loses whole trailing turns (on
both sides); one whose first turn alone does not fit is skipped and counted. No question or answer is ever cut
(the stage-1 answer rows aside).

Bounding boxes: our JSONL writes a box as <bbox>x0,y0,x1,y1</bbox>, integers 0..999 in the original image's frame
(the converters write them so); when a sample is loaded they are mapped into the frame of its global view, the
black-padded square, each step truncating with int(x * 999) as the authors' loader did.

Bad input: ConversationDataset scans the whole JSONL at construction (JSON, fields, user/assistant
alternation starting with the user and ending with an answer, empty questions or answers, the image file's
existence, the length fit), so every count is known before training starts. Images are decoded only when a
sample is read; a file that does not decode then raises (or, with skip_bad, is counted, reported on stderr
and replaced by the next readable sample).
"""
import collections
import copy
import json
import math
import os
import re
import sys
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPTokenizer

from chat import LLMTokenizer, chat_layout
from configurator import InputError

DEFAULT_SYSTEM_PROMPT = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                         "gives helpful, detailed, and polite answers to the user's questions.")


@dataclass
class TokenSpaceConfig:
    clip_path: str                  # folder with vocab.json + merges.txt (the fused model's CLIP BPE vocabulary)
    llama_path: str                 # the LLM's folder: SentencePiece tokenizer.model or tokenizer.json
    image_size: int = 336           # S: side of the global view and of every local tile
    num_crops: int = 16             # at most this many local tiles (Phi-3-V HD rule); 0 = global view only
    n_l: int = 256                  # vision tokens handed to the LLM for the first question
    n_s: int = 8                    # ... and for every later question
    drop_question: bool = False     # VQ ablation: the fused model does not see the question (the LLM still does)
    max_seq_len: int = 4096         # LLM tokens (Llama-2's context), and fused text tokens: longer conversations
                                    # lose trailing turns
    max_answer_tokens: int = 512    # CLIP tokens of one stage-1 answer row incl. EOS (the text tower's positions)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    chat_template: str = "llama-2"  # the LLM's conversation layout: one of chat.CHAT_TEMPLATES


# -----------------------------------------------------------------------------
# image -> crops

CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def to_clip_tensor(img):
    """PIL RGB (W x H) -> (3, H, W) float32, the same values as torchvision's ToTensor + Normalize(OpenAI CLIP)."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return (x - CLIP_MEAN) / CLIP_STD


def global_view_frame(width, height, size):
    """Where the global view puts the image on its square: (w, h after any shrink, side, left, top)."""
    w, h = width, height
    if w != h and max(w, h) > size:  # their expand2square: shrink the longer side to S first (never a square)
        if w > h:
            w, h = size, max(1, int(h * (size / w)))
        else:
            w, h = max(1, int(w * (size / h))), size
    side = max(w, h)
    return w, h, side, (side - w) // 2, (side - h) // 2


def global_view(img, size):
    """(3, S, S): black square padding, then the authors' tensor-space bicubic resize."""
    if img.width != img.height:
        w, h, side, left, top = global_view_frame(img.width, img.height, size)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        square = Image.new("RGB", (side, side))  # black
        square.paste(img, (left, top))
        img = square
    x = to_clip_tensor(img).unsqueeze(0)
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False)[0]


def local_tiles(img, size, num_crops):
    """(k, 3, S, S) with k <= num_crops: the Phi-3-V HD transform, tiles in row-major order."""
    if num_crops == 0:
        return torch.empty(0, 3, size, size)
    portrait = img.width < img.height
    if portrait:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    ratio = img.width / img.height  # >= 1
    scale = 1
    while (scale + 1) * math.ceil((scale + 1) / ratio) <= num_crops:
        scale += 1
    new_w = scale * size
    new_h = max(1, int(new_w / ratio))  # max(): an image over scale*S times wider than tall would reach 0
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    padded_h = math.ceil(new_h / size) * size
    canvas = Image.new("RGB", (new_w, padded_h), (255, 255, 255))
    canvas.paste(img, (0, int((padded_h - new_h) / 2)))
    if portrait:
        canvas = canvas.transpose(Image.Transpose.TRANSPOSE)
    x = to_clip_tensor(canvas)  # (3, rows*S, cols*S)
    rows, cols = x.shape[1] // size, x.shape[2] // size
    return x.view(3, rows, size, cols, size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)


def image_crops(img, size, num_crops):
    """(1 + k, 3, S, S): the global view first, then the local tiles."""
    img = img.convert("RGB")
    return torch.cat([global_view(img, size).unsqueeze(0), local_tiles(img, size, num_crops)])


# -----------------------------------------------------------------------------
# conversation -> the fused-model sequence and the LLM sequence

IGNORE = -100   # label of positions without loss
MIX_SEED = 0    # ConversationDataset's per-line draw of a token space from a mix
SLOT_ID = 0     # LLM placeholder id at the positions the bridge outputs overwrite


class TokenSpace:
    """Holds the settings and both tokenizers; make_sample() turns (image, turns) into one sample's tensors.
    turns = [(question, answer), ...]; the last answer may be None for a generation prompt."""

    def __init__(self, cfg: TokenSpaceConfig):
        missing = [f for f in ("vocab.json", "merges.txt") if not os.path.isfile(os.path.join(cfg.clip_path, f))]
        if missing:
            raise InputError(f"{cfg.clip_path}: clip_path lacks {', '.join(missing)} (point clip_path at the "
                             f"checkpoint folder that holds vocab.json and merges.txt)")
        if cfg.n_l < 1 or cfg.n_s < 1:
            raise InputError(f"n_l and n_s must be >= 1, got n_l={cfg.n_l}, n_s={cfg.n_s}")
        if cfg.image_size < 1 or cfg.num_crops < 0 or cfg.max_answer_tokens < 1:
            raise InputError(f"bad token-space sizes in {cfg}")
        self.cfg = cfg
        self.tokenizer = LLMTokenizer(cfg.llama_path)
        self.sp = self.tokenizer.sp  # the raw SentencePiece model (None for a tokenizer.json), for callers in its ids
        self.layout = chat_layout(cfg.chat_template, self.tokenizer, cfg.system_prompt)
        self.eos = self.layout.end_of_turn  # where an answer ends: </s> for llama-2, <|eot_id|> for llama-3, ...
        self.clip = CLIPTokenizer(vocab=os.path.join(cfg.clip_path, "vocab.json"),
                                  merges=os.path.join(cfg.clip_path, "merges.txt"))
        self.clip_eos = self.clip.eos_token_id  # <|endoftext|>, 49407 for real CLIP

    def replaced(self, **changes):
        """This token space with some settings changed (e.g. n_l, drop_question), sharing the tokenizers."""
        other = copy.copy(self)
        other.cfg = replace(self.cfg, **changes)
        return other

    def clip_ids(self, text):
        # split_special_tokens: a literal "<|endoftext|>" in the text must not become an EOS
        return self.clip(text, add_special_tokens=False, split_special_tokens=True).input_ids

    def llm_turn(self, index, question, answer):
        """One turn's LLM ids, slot flags and labels (lists); answer None ends the turn after [/INST]."""
        n = self.cfg.n_l if index == 0 else self.cfg.n_s
        layout = self.layout
        head = layout.first_head if index == 0 else layout.later_head
        prompt = self.tokenizer.encode(question) + layout.close_question
        ids = head + [SLOT_ID] * n + prompt
        slots = [False] * len(head) + [True] * n + [False] * len(prompt)
        labels = [IGNORE] * len(ids)
        if answer is not None:
            reply = self.tokenizer.encode(answer + layout.answer_end) + [layout.end_of_turn]
            ids, slots = ids + reply + layout.after_turn, slots + [False] * (len(reply) + len(layout.after_turn))
            labels = labels + reply + [IGNORE] * len(layout.after_turn)
        return ids, slots, labels

    def fused_question(self, question):
        return [] if self.cfg.drop_question else self.clip_ids(question)

    def turns_that_fit(self, turns):
        """How many leading turns fit in max_seq_len tokens on both sides (0: not even the first)."""
        outputs = [self.cfg.n_l] + [self.cfg.n_s] * (len(turns) - 1)
        # a CLIP BPE token spans at least one byte of the lowercased text: only when this bound does not fit is the
        # (slow) CLIP tokenizer needed, which spares it on almost every line of the dataset scan
        fused = [n + (0 if self.cfg.drop_question else len(q.lower().encode())) for n, (q, _) in zip(outputs, turns)]
        if sum(fused) > self.cfg.max_seq_len:
            fused = [n + len(self.fused_question(q)) for n, (q, _) in zip(outputs, turns)]
        llm_length = fused_length = 0
        for index, (question, answer) in enumerate(turns):
            llm_length += len(self.llm_turn(index, question, answer)[0])
            fused_length += fused[index]
            if max(llm_length, fused_length) > self.cfg.max_seq_len:
                return index
        return len(turns)

    def fused_sequence(self, questions):
        """fused_ids, query_mask, output_mask (lists) for the questions of one conversation."""
        ids, query, output = [], [], []
        for index, question in enumerate(questions):
            n = self.cfg.n_l if index == 0 else self.cfg.n_s
            text = self.fused_question(question)
            ids += text + list(range(n - 1)) + [self.clip_eos]
            query += [False] * len(text) + [True] * (n - 1) + [False]
            output += [False] * len(text) + [True] * n
        return ids, query, output

    def make_sample(self, image, turns):
        """One sample: a dict of tensors (collate() batches them). image: PIL."""
        llm = [self.llm_turn(i, q, a) for i, (q, a) in enumerate(turns)]
        fused_ids, query_mask, output_mask = self.fused_sequence([q for q, _ in turns])
        answers = [self.clip_ids(a)[:self.cfg.max_answer_tokens - 1] + [self.clip_eos]
                   for _, a in turns if a is not None]
        return {
            "pixel_values": image_crops(image, self.cfg.image_size, self.cfg.num_crops),  # (k, 3, S, S)
            "fused_ids": torch.tensor(fused_ids, dtype=torch.long),                       # (Lq,)
            "query_mask": torch.tensor(query_mask, dtype=torch.bool),
            "output_mask": torch.tensor(output_mask, dtype=torch.bool),
            "input_ids": torch.tensor([t for ids, _, _ in llm for t in ids], dtype=torch.long),  # (L,)
            "slot_mask": torch.tensor([s for _, slots, _ in llm for s in slots], dtype=torch.bool),
            "labels": torch.tensor([t for _, _, labels in llm for t in labels], dtype=torch.long),
            "answer_ids": [torch.tensor(a, dtype=torch.long) for a in answers],           # per turn (La_i,)
        }

    def generation_sample(self, image, question):
        """An evaluation sample: the prompt ends right after [/INST]; no labels, no answer rows."""
        return self.make_sample(image, [(question, None)])


# -----------------------------------------------------------------------------
# bounding boxes in the text

BRACKET_BOX = re.compile(r"\[([\d.]+), *([\d.]+), *([\d.]+), *([\d.]+)\]")  # the datasets': floats 0..1
BOX_TAG = re.compile(r"<bbox>(\d+), *(\d+), *(\d+), *(\d+)</bbox>")  # ours: integers 0..999


def clamp01(x):
    return min(max(x, 0.0), 1.0)


def box_tag(x0, y0, x1, y1):
    """Floats (clamped to 0..1) -> "<bbox>x0,y0,x1,y1</bbox>", each int(x * 999) as the authors truncated."""
    return "<bbox>{},{},{},{}</bbox>".format(*(int(clamp01(x) * 999) for x in (x0, y0, x1, y1)))


def boxes_into_global_view(text, width, height, size):
    """Every <bbox> of a width x height image's text, from the image's frame into its global view's square."""
    w, h, side, left, top = global_view_frame(width, height, size)

    def mapped(match):
        x0, y0, x1, y1 = (clamp01(int(g) / 999) for g in match.groups())
        return box_tag((x0 * w + left) / side, (y0 * h + top) / side, (x1 * w + left) / side, (y1 * h + top) / side)
    return BOX_TAG.sub(mapped, text)


# -----------------------------------------------------------------------------
# JSONL dataset: {"image": path relative to image_root, "messages": [{"role", "content"}, ...]} per line

class BadSample(ValueError):
    def __init__(self, reason, detail):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason  # the key under which skip_bad counts it


def parse_record(line):
    """One JSONL line -> (image, [(question, answer), ...]); raises BadSample."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadSample("malformed JSON", str(e)) from None
    if not isinstance(record, dict):
        raise BadSample("bad record", f"expected an object, got {type(record).__name__}")
    image, messages = record.get("image"), record.get("messages")
    if not isinstance(image, str) or not image:
        raise BadSample("bad record", f"'image' must be a non-empty path, got {image!r}")
    if not isinstance(messages, list) or not messages:
        raise BadSample("bad record", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise BadSample("bad record", f"message {i} must have string 'role' and 'content'")
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadSample("roles do not alternate", f"message {i} has role {m['role']!r}, expected {expected!r}")
    if len(messages) % 2:
        raise BadSample("roles do not alternate", "the last message is a question without an answer")
    turns = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
    for t, (question, answer) in enumerate(turns):
        if not question.strip():
            raise BadSample("empty question", f"turn {t}")
        if not answer.strip():
            raise BadSample("empty answer", f"turn {t}")
    return image, turns



# Writing our JSONL: the rules every data/<name>/prepare.py converter applies.

IMAGE_TAG = re.compile(r"\s*(?:<image>|<\|image\|>)\s*")


def remove_image_tags(text):
    # a tag on its own line leaves one line break, a tag inside a line one space; then the ends are trimmed
    return IMAGE_TAG.sub(lambda m: "\n" if "\n" in m.group(0) else " ", text).strip()


def clean_conversation(roles, texts, counts):
    """A downloaded conversation (roles mapped to "user"/"assistant", None where unknown) -> our messages, or
    None after counting why it was dropped. It must alternate from the user and end with an answer; a QA turn
    that is empty once its image tags are removed is removed and counted."""
    if None in roles:
        counts["dropped: unknown role"] += 1
        return None
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
        counts["dropped: not alternating user/assistant from the user, ending with an answer"] += 1
        return None
    messages = []
    for question, answer in zip(texts[0::2], texts[1::2]):
        question, answer = remove_image_tags(question), remove_image_tags(answer)
        if not question or not answer:
            counts["turns removed: empty question or answer"] += 1
            continue
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    if not messages:
        counts["dropped: no non-empty turn"] += 1
        return None
    return messages


MIN_CHARS, MAX_CHARS = 25, 5000  # the authors' filter on the characters of all messages of a sample together


def length_in_bounds(messages, counts):
    """True if the messages' characters add up to MIN_CHARS..MAX_CHARS; else counts why not."""
    chars = sum(len(m["content"]) for m in messages)
    if chars < MIN_CHARS:
        counts[f"dropped: fewer than {MIN_CHARS} characters in all"] += 1
    elif chars > MAX_CHARS:
        counts[f"dropped: more than {MAX_CHARS} characters in all"] += 1
    return MIN_CHARS <= chars <= MAX_CHARS


def write_jsonl(records, out):
    """Writes an iterable of records as JSONL to a temp file renamed over `out`; returns how many."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n = 0
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    os.replace(out + ".tmp", out)
    return n


def image_width_height(path):
    """(width, height) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("unreadable image", f"{path}: {e}") from None


def load_image(path):
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # forces the full decode here, so a truncated file fails here
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadSample("unreadable image", f"{path}: {e}") from None


class ConversationDataset(torch.utils.data.Dataset):
    """Map-style dataset over a JSONL file. skip_bad=False: the first bad line raises, naming file and line.
    skip_bad=True: bad lines are counted in .skipped by reason. A first turn longer than max_seq_len (on either
    side) is always skipped and counted; dropped trailing turns are counted in .turns_dropped. <bbox> tags are
    mapped into the global view's frame, also before the length fit (which then reads the image's header).
    mix: [(token space, share), ...] with shares summing to 1: each line is read in one of them (e.g. another n_l,
    or without the question), drawn once per line of the file with a fixed seed, so a line keeps its token space in
    every run, epoch and process and a bad line shifts no other's draw; empty: token_space for every line."""

    def __init__(self, path, image_root, token_space, skip_bad=False, mix=()):
        self.path, self.image_root, self.token_space, self.skip_bad = path, image_root, token_space, skip_bad
        self.token_spaces = [space for space, _ in mix] or [token_space]
        shares = np.array([share for _, share in mix] or [1.0])
        if (shares < 0).any() or abs(shares.sum() - 1) > 1e-6:
            raise InputError(f"the token-space mix's shares must be >= 0 and sum to 1, got {shares.tolist()}")
        draw = np.random.default_rng(MIX_SEED)
        self.skipped = collections.Counter()
        self.turns_dropped = 0
        offsets, line_numbers, turns_kept, spaces = [], [], [], []
        with open(path, "rb") as f:
            offset = 0
            for line_number, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                space = int(draw.choice(len(shares), p=shares))  # drawn for every line, blank and bad ones too
                if not line.strip():
                    continue  # blank lines hold no sample
                try:
                    image, turns = parse_record(line)
                    image_path = os.path.join(image_root, image)
                    if not os.path.isfile(image_path):
                        raise BadSample("missing image", image_path)
                    if any(BOX_TAG.search(q) or BOX_TAG.search(a) for q, a in turns):  # the fit needs the mapped text
                        turns = self.boxes_mapped(turns, image_width_height(image_path))
                except BadSample as e:
                    self._bad(line_number, e)
                    continue
                kept = self.token_spaces[space].turns_that_fit(turns)
                if kept == 0:
                    self.skipped["first turn longer than max_seq_len"] += 1
                    continue
                self.turns_dropped += len(turns) - kept
                offsets.append(start)
                line_numbers.append(line_number)
                turns_kept.append(kept)
                spaces.append(space)
        # numpy rather than lists of Python ints: DataLoader workers then share the pages instead of copying them
        self.offsets = np.array(offsets, dtype=np.int64)
        self.line_numbers = np.array(line_numbers, dtype=np.int64)
        self.turns_kept = np.array(turns_kept, dtype=np.int64)
        self.space = np.array(spaces, dtype=np.int64)  # each sample's index into token_spaces
        if not len(self):
            raise InputError(f"no usable samples in {self.summary()}")

    def boxes_mapped(self, turns, size):
        S = self.token_space.cfg.image_size
        return [tuple(boxes_into_global_view(text, *size, S) for text in turn) for turn in turns]

    def _bad(self, line_number, error):
        if not self.skip_bad:
            raise InputError(f"{self.path}, line {line_number}: {error} (skip_bad=True skips and counts such lines)")
        self.skipped[error.reason] += 1

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, index):
        """-> the sample, or None when its image does not decode and skip_bad is set: collate leaves it out of its
        batch and counts it there (a DataLoader worker's own count would never reach the training loop), rather
        than filling the slot with another line that the epoch then trains twice."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[index]))
            image, turns = parse_record(f.readline())
        try:
            img = load_image(os.path.join(self.image_root, image))
        except BadSample as e:
            self._bad(self.line_numbers[index], e)
            print(f"skipping {self.path}, line {self.line_numbers[index]}: {e}", file=sys.stderr)
            return None
        turns = self.boxes_mapped(turns[:self.turns_kept[index]], img.size)
        return self.token_spaces[self.space[index]].make_sample(img, turns)

    def summary(self):
        skipped = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items())) or "none"
        mix = ""
        if len(self.token_spaces) > 1:
            counts = np.bincount(self.space, minlength=len(self.token_spaces))
            mix = "; mixed: " + ", ".join(f"{count} with {space_label(space.cfg, self.token_space.cfg)}"
                                          for space, count in zip(self.token_spaces, counts))
        return (f"{self.path}: {len(self)} samples, skipped {sum(self.skipped.values())} ({skipped}), "
                f"{self.turns_dropped} trailing turns dropped (max_seq_len={self.token_space.cfg.max_seq_len}){mix}")


def space_label(cfg, base):
    """The settings in which token-space config cfg differs from base, e.g. "n_l=4 n_s=4"."""
    return " ".join(f"{k}={v}" for k, v in vars(cfg).items() if v != getattr(base, k)) or "the same settings"


# -----------------------------------------------------------------------------
# batching

def pad_stack(rows, value, side="right"):
    """List of 1-D tensors -> (B, max_len), padded with value on the given side."""
    out = torch.full((len(rows), max((len(r) for r in rows), default=0)), value, dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        if side == "right":
            out[b, :len(row)] = row
        else:
            out[b, out.shape[1] - len(row):] = row
    return out


def collate(samples, pad_side="right"):
    """Samples -> one batch dict (the keys FusedVLM and AlignModel read). pad_side applies to the LLM sequence
    ("left" for generation); the fused sequence is always right-padded (FusedModel puts it after each sample's
    vision tokens). A None sample (an unreadable image under skip_bad) is left out and counted in "unreadable"."""
    assert pad_side in ("right", "left"), pad_side
    unreadable = sum(s is None for s in samples)
    samples = [s for s in samples if s is not None]
    if not samples:
        raise InputError(f"every image of a batch of {unreadable} is unreadable (see the lines above; fix or remove "
                         f"those lines)")
    crops = [s["pixel_values"] for s in samples]
    answers = [a for s in samples for a in s["answer_ids"]]
    batch = {
        "pixel_values": torch.cat(crops),  # (K, 3, S, S)
        "crop_to_sample": torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([len(c) for c in crops])),
        "fused_ids": pad_stack([s["fused_ids"] for s in samples], 0),
        "query_mask": pad_stack([s["query_mask"] for s in samples], False),
        "output_mask": pad_stack([s["output_mask"] for s in samples], False),
        "fused_real_mask": pad_stack([torch.ones_like(s["query_mask"]) for s in samples], False),  # not padding
        "input_ids": pad_stack([s["input_ids"] for s in samples], SLOT_ID, pad_side),
        "slot_mask": pad_stack([s["slot_mask"] for s in samples], False, pad_side),
        "labels": pad_stack([s["labels"] for s in samples], IGNORE, pad_side),
        "attention_mask": pad_stack([torch.ones_like(s["slot_mask"]) for s in samples], False, pad_side),
    }
    if answers:
        batch["answer_ids"] = pad_stack(answers, 0)
        batch["answer_attention_mask"] = pad_stack([torch.ones(len(a), dtype=torch.bool) for a in answers], False)
    else:  # generation batches carry no answers
        batch["answer_ids"] = torch.zeros(0, 0, dtype=torch.long)
        batch["answer_attention_mask"] = torch.zeros(0, 0, dtype=torch.bool)
    batch["unreadable"] = torch.tensor(unreadable)
    return batch


def step_batches(dataset, start_step, steps_per_epoch, batch_size, grad_accum, rank, world_size, seed,
                 num_workers=0, pin_memory=False):
    """Yields this process's grad_accum collated micro-batches for every optimizer step from start_step on, across
    epochs. Each epoch is a permutation seeded by (seed, epoch), cut into steps of batch_size * grad_accum *
    world_size samples (the remainder is left out); within a step micro-batch j goes to rank j % world_size, so a
    step holds the same micro-batches for any split into ranks x accumulation, and a resumed run continues the
    same order from its step."""
    global_batch = batch_size * grad_accum * world_size
    step = start_step
    while True:
        epoch, cursor = divmod(step, steps_per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(len(dataset)).tolist()
        micro = [order[i:i + batch_size] for i in range(cursor * global_batch, steps_per_epoch * global_batch, batch_size)]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=micro[rank::world_size], collate_fn=collate,
                                             num_workers=num_workers, pin_memory=pin_memory)
        batches = iter(loader)
        for _ in range(cursor, steps_per_epoch):
            yield [next(batches) for _ in range(grad_accum)]
        step = (epoch + 1) * steps_per_epoch
