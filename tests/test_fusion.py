"""Tests of fusion.py: the Llama-2 chat layout, the fused-model sequence, the HD crops, length limits, bad input
and collate.

References are independent of fusion.py: SentencePiece and CLIPTokenizer called here on the chat template's
pieces, crop counts worked out by hand from the Phi-3-V rule, pixel values of solid-colour images normalised here.
"""
import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPTokenizer

from configurator import InputError
from conftest import SYSTEM_PROMPT
from fusion import ConversationDataset, TokenSpace, TokenSpaceConfig, collate, image_crops

S = 28  # crop side in these tests
MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
STD = np.array([0.26862954, 0.26130258, 0.27577711])
RED, WHITE, BLACK = (255, 0, 0), (255, 255, 255), (0, 0, 0)

Q1, A1 = "What colour is the shape in row 2, column 3?", "The shape is red."
Q2, A2 = "How many circles are there in the image?", "There are 3 circles."
Q3, A3 = "Is there a blue triangle in the image?", "Yes"


@pytest.fixture(scope="module")
def sp(llama_tokenizer_dir):
    return spm.SentencePieceProcessor(model_file=str(llama_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def clip(clip_vocab_dir):
    return CLIPTokenizer(vocab=str(clip_vocab_dir / "vocab.json"), merges=str(clip_vocab_dir / "merges.txt"))


@pytest.fixture(scope="module")
def clip_eos(clip_vocab_dir):
    return json.loads((clip_vocab_dir / "vocab.json").read_text())["<|endoftext|>"]


@pytest.fixture(scope="module")
def make_space(clip_vocab_dir, llama_tokenizer_dir):
    def make(**overrides):
        settings = dict(image_size=S, num_crops=4, n_l=3, n_s=2, system_prompt=SYSTEM_PROMPT)
        settings.update(overrides)
        return TokenSpace(TokenSpaceConfig(clip_path=str(clip_vocab_dir), llama_path=str(llama_tokenizer_dir),
                                           **settings))
    return make


def clip_ids(clip, text):
    return clip(text, add_special_tokens=False).input_ids


def system_piece():
    return f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n"


# -----------------------------------------------------------------------------
# the LLM sequence

def test_llm_layout_one_turn(make_space, sp, draw_image):
    s = make_space(n_l=3).make_sample(draw_image(20, 20), [(Q1, A1)])
    head = [1] + sp.encode(system_piece())
    prompt = sp.encode(Q1) + sp.encode("[/INST]")
    answer = sp.encode(A1 + " ") + [2]
    assert s["input_ids"].tolist() == head + [0, 0, 0] + prompt + answer
    assert s["slot_mask"].tolist() == [False] * len(head) + [True] * 3 + [False] * (len(prompt) + len(answer))
    assert s["labels"].tolist() == [-100] * (len(head) + 3 + len(prompt)) + answer
    # the non-slot ids read back as the pieces, each with its dummy-prefix space (the first one's is dropped)
    text = sp.decode([t for t, slot in zip(s["input_ids"].tolist(), s["slot_mask"].tolist()) if not slot])
    assert text == " ".join([system_piece(), Q1, "[/INST]", A1 + " "])


def test_llm_layout_two_turns(make_space, sp, draw_image):
    n_l, n_s = 4, 2
    s = make_space(n_l=n_l, n_s=n_s).make_sample(draw_image(20, 20), [(Q1, A1), (Q2, A2)])
    turn1 = [1] + sp.encode(system_piece()) + [0] * n_l + sp.encode(Q1) + sp.encode("[/INST]")
    answer1 = sp.encode(A1 + " ") + [2]
    turn2 = [1] + sp.encode("[INST]") + [0] * n_s + sp.encode(Q2) + sp.encode("[/INST]")
    answer2 = sp.encode(A2 + " ") + [2]
    assert s["input_ids"].tolist() == turn1 + answer1 + turn2 + answer2
    assert s["slot_mask"].sum().item() == n_l + n_s
    start1 = 1 + len(sp.encode(system_piece()))
    start2 = len(turn1) + len(answer1) + 1 + len(sp.encode("[INST]"))
    slots = list(range(start1, start1 + n_l)) + list(range(start2, start2 + n_s))
    assert s["slot_mask"].nonzero().flatten().tolist() == slots
    labelled = (s["labels"] != -100).nonzero().flatten().tolist()
    a1 = list(range(len(turn1), len(turn1) + len(answer1)))
    a2 = list(range(len(turn1) + len(answer1) + len(turn2), len(s["input_ids"])))
    assert labelled == a1 + a2
    assert s["labels"][labelled].tolist() == answer1 + answer2
    text = sp.decode([t for t, slot in zip(s["input_ids"].tolist(), s["slot_mask"].tolist()) if not slot])
    assert text == " ".join([system_piece(), Q1, "[/INST]", A1 + " ", "[INST]", Q2, "[/INST]", A2 + " "])


def test_generation_prompt_ends_after_inst(make_space, sp, draw_image):
    space = make_space(n_l=3)
    s = space.generation_sample(draw_image(30, 20), Q1)
    assert s["input_ids"].tolist() == [1] + sp.encode(system_piece()) + [0] * 3 + sp.encode(Q1) + sp.encode(
        "[/INST]")
    assert (s["labels"] == -100).all()
    assert s["answer_ids"] == []
    assert s["output_mask"].sum() == s["slot_mask"].sum() == 3


def test_empty_system_prompt_starts_like_a_later_turn(make_space, sp, draw_image):
    s = make_space(n_l=2, system_prompt="").make_sample(draw_image(8, 8), [(Q1, A1)])
    assert s["input_ids"].tolist()[:1 + len(sp.encode("[INST]")) + 2] == [1] + sp.encode("[INST]") + [0, 0]


# -----------------------------------------------------------------------------
# the fused-model sequence and the stage-1 answer rows

@pytest.mark.parametrize("drop_question", [False, True])
def test_fused_sequence(make_space, clip, clip_eos, draw_image, drop_question):
    n_l, n_s = 4, 3
    s = make_space(n_l=n_l, n_s=n_s, drop_question=drop_question).make_sample(
        draw_image(20, 20), [(Q1, A1), (Q2, A2), (Q3, A3)])
    q = {text: ([] if drop_question else clip_ids(clip, text)) for text in (Q1, Q2, Q3)}
    assert len(clip_ids(clip, Q1)) > 5  # the questions really are tokenized
    expected = (q[Q1] + [0, 1, 2] + [clip_eos] + q[Q2] + [0, 1] + [clip_eos] + q[Q3] + [0, 1] + [clip_eos])
    assert s["fused_ids"].tolist() == expected
    query = ([False] * len(q[Q1]) + [True] * 3 + [False] + [False] * len(q[Q2]) + [True] * 2 + [False]
             + [False] * len(q[Q3]) + [True] * 2 + [False])
    assert s["query_mask"].tolist() == query
    output = [False] * len(q[Q1]) + [True] * 4 + [False] * len(q[Q2]) + [True] * 3 + [False] * len(q[Q3]) + [True] * 3
    assert s["output_mask"].tolist() == output
    assert s["output_mask"].sum() == s["slot_mask"].sum() == n_l + 2 * n_s
    # the LLM sees the question in both variants
    assert s["input_ids"].shape == make_space(n_l=n_l, n_s=n_s).make_sample(
        draw_image(20, 20), [(Q1, A1), (Q2, A2), (Q3, A3)])["input_ids"].shape


def test_single_output_per_question(make_space, clip, clip_eos, draw_image):
    s = make_space(n_l=1, n_s=1).make_sample(draw_image(9, 9), [(Q1, A1), (Q3, A3)])
    assert s["fused_ids"].tolist() == clip_ids(clip, Q1) + [clip_eos] + clip_ids(clip, Q3) + [clip_eos]
    assert not s["query_mask"].any()
    assert s["output_mask"].sum() == 2


def test_a_long_question_is_not_cut_on_the_fused_side(make_space, clip, clip_eos, draw_image):
    long_question = " ".join([Q1] * 40)  # several hundred CLIP tokens
    assert len(clip_ids(clip, long_question)) > 300
    s = make_space(n_l=2).make_sample(draw_image(9, 9), [(long_question, A1)])
    assert s["fused_ids"].tolist() == clip_ids(clip, long_question) + [0, clip_eos]


def test_literal_endoftext_in_text_is_not_an_eos(make_space, clip_eos, draw_image):
    s = make_space(n_l=2).make_sample(draw_image(9, 9), [("what is <|endoftext|> here?", "a <|endoftext|> b")])
    assert (s["fused_ids"][~s["query_mask"]] == clip_eos).sum() == 1  # only the question's own EOS
    assert (s["answer_ids"][0] == clip_eos).sum() == 1


def test_answer_rows(make_space, clip, clip_eos, draw_image):
    s = make_space().make_sample(draw_image(9, 9), [(Q1, A1), (Q2, A2)])
    assert [a.tolist() for a in s["answer_ids"]] == [clip_ids(clip, A1) + [clip_eos], clip_ids(clip, A2) + [clip_eos]]
    s = make_space(max_answer_tokens=3).make_sample(draw_image(9, 9), [(Q1, A1)])
    assert s["answer_ids"][0].tolist() == clip_ids(clip, A1)[:2] + [clip_eos]  # cut before the EOS, EOS kept


# -----------------------------------------------------------------------------
# image crops

@pytest.mark.parametrize("width,height,num_crops,tiles", [
    (40, 40, 16, 16),     # square: scale 4 -> 4 x 4
    (1000, 750, 16, 12),  # the reference's example: scale 4, 4*28 / (4/3) = 84 high -> 3 x 4
    (60, 30, 16, 15),     # aspect 2: scale 5 (5*ceil(2.5)=15), height int(140/2)=70 -> padded 84 -> 3 x 5
    (30, 60, 16, 15),     # the same, portrait: 5 x 3
    (1, 1, 16, 16),       # a tiny square is upscaled to fill the budget
    (3, 1, 16, 12),       # aspect 3: scale 6 (6*2=12; 7*3=21 > 16), height 56 -> 2 x 6
    (2, 5, 16, 10),       # portrait aspect 2.5: scale 5 (5*2=10; 6*3=18 > 16), 140 x 56 -> 2 x 5, transposed
    (40, 40, 9, 9),       # 3 x 3
    (50, 40, 1, 1),       # one tile
    (50, 40, 0, 0),       # the global view only
])
def test_crop_counts(draw_image, width, height, num_crops, tiles):
    crops = image_crops(draw_image(width, height), S, num_crops)
    assert crops.shape == (1 + tiles, 3, S, S)
    assert crops.dtype == torch.float32


def normalised(colour):
    return torch.tensor((np.array(colour) / 255 - MEAN) / STD, dtype=torch.float32).view(3, 1, 1)


def test_tiles_landscape_padding_and_order(draw_image):
    # 60x30 red -> 140x70 red, white padding top int(14/2)=7 and bottom 7 -> 140x84 -> 3 rows x 5 tiles
    tiles = image_crops(draw_image(60, 30, RED), S, 16)[1:]
    assert tiles.shape[0] == 15
    canvas = torch.cat([torch.cat(list(tiles[r * 5:(r + 1) * 5]), dim=2) for r in range(3)], dim=1)  # row-major
    expected = normalised(RED).expand(3, 84, 140).clone()
    expected[:, :7] = normalised(WHITE)
    expected[:, 77:] = normalised(WHITE)
    torch.testing.assert_close(canvas, expected)


def test_tiles_follow_the_phi3v_transform(draw_image):
    # authors_checkpoint_format.md item 8, done here with PIL: bilinear to 140 x int(140/2) = 70, white pad 7 + 7
    img = draw_image(60, 30, seed=4)
    canvas = Image.new("RGB", (140, 84), WHITE)
    canvas.paste(img.resize((140, 70), Image.Resampling.BILINEAR), (0, 7))
    expected = torch.tensor((np.asarray(canvas) / 255 - MEAN) / STD, dtype=torch.float32).permute(2, 0, 1)
    tiles = image_crops(img, S, 16)[1:]
    got = torch.cat([torch.cat(list(tiles[r * 5:(r + 1) * 5]), dim=2) for r in range(3)], dim=1)
    torch.testing.assert_close(got, expected)


def test_tiles_portrait_are_transposed_back(draw_image):
    # 30x60 red: transposed to 60x30, padded as above, transposed back -> 84 wide x 140 high, 5 rows x 3 tiles
    tiles = image_crops(draw_image(30, 60, RED), S, 16)[1:]
    canvas = torch.cat([torch.cat(list(tiles[r * 3:(r + 1) * 3]), dim=2) for r in range(5)], dim=1)
    expected = normalised(RED).expand(3, 140, 84).clone()
    expected[:, :, :7] = normalised(WHITE)
    expected[:, :, 77:] = normalised(WHITE)
    torch.testing.assert_close(canvas, expected)


def test_portrait_tiles_are_the_transposed_landscape_tiles(draw_image):
    portrait = draw_image(30, 62, seed=5)  # scale 5: 140 x int(140 / (62/30)) = 67 -> padding 8 + 9, 3 x 5 tiles
    landscape = portrait.transpose(Image.Transpose.TRANSPOSE)
    p, q = image_crops(portrait, S, 16)[1:], image_crops(landscape, S, 16)[1:]
    rows, cols = 5, len(q) // 5
    p_canvas = torch.cat([torch.cat(list(p[r * cols:(r + 1) * cols]), dim=2) for r in range(rows)], dim=1)
    q_canvas = torch.cat([torch.cat(list(q[r * rows:(r + 1) * rows]), dim=2) for r in range(cols)], dim=1)
    # PIL resizes one axis at a time with 8-bit intermediates, so the two orders differ by rounding only
    torch.testing.assert_close(p_canvas, q_canvas.transpose(1, 2), rtol=0, atol=0.02)


def test_no_tile_is_only_padding(draw_image):
    for width, height in [(w, h) for w in (1, 3, 29, 97) for h in (1, 13, 31, 60, 200)]:
        tiles = image_crops(draw_image(width, height, RED), S, 16)[1:]
        green = tiles[:, 1]  # red image: green channel at its minimum on image pixels, higher on white padding
        assert (green.flatten(1).min(1).values < normalised(WHITE)[1, 0, 0] - 1).all(), (width, height)


@pytest.mark.parametrize("width,height", [(32, 20), (64, 40)])  # (64, 40): shrunk to 32x20 first (LANCZOS)
def test_global_view_black_square(draw_image, width, height):
    view = image_crops(draw_image(width, height, RED), 32, 4)[0]
    expected = normalised(BLACK).expand(3, 32, 32).clone()
    expected[:, 6:26] = normalised(RED)  # top = (32 - 20) // 2
    torch.testing.assert_close(view, expected)
    portrait = image_crops(draw_image(height, width, RED), 32, 4)[0]
    torch.testing.assert_close(portrait, expected.transpose(1, 2))


def test_global_view_shrinks_the_longer_side_with_lanczos(draw_image):
    # authors_checkpoint_format.md item 7 / their expand2square, done here with PIL: 64x40 -> 32x20, black square
    img = draw_image(64, 40, seed=6)
    square = Image.new("RGB", (32, 32), BLACK)
    square.paste(img.resize((32, 20), Image.Resampling.LANCZOS), (0, 6))
    expected = torch.tensor((np.asarray(square) / 255 - MEAN) / STD, dtype=torch.float32).permute(2, 0, 1)
    torch.testing.assert_close(image_crops(img, 32, 4)[0], expected, rtol=1e-5, atol=1e-5)


def test_global_view_square_is_resized_in_tensor_space(draw_image):
    # the authors' convention: a square image is not resized in PIL; ToTensor + Normalize, then bicubic
    img = draw_image(50, 50, seed=3)
    x = torch.tensor((np.asarray(img) / 255 - MEAN) / STD, dtype=torch.float32).permute(2, 0, 1)
    expected = F.interpolate(x[None], size=(S, S), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(image_crops(img, S, 4)[0], expected, rtol=1e-5, atol=1e-5)


# -----------------------------------------------------------------------------
# the JSONL dataset: length limits and bad input

def write_jsonl(folder, lines):
    path = folder / "data.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def record(image, *texts):
    roles = ["user", "assistant"] * len(texts)
    return {"image": image, "messages": [{"role": r, "content": t} for r, t in zip(roles, texts)]}


@pytest.fixture
def image_root(tmp_path, draw_image):
    folder = tmp_path / "images"
    folder.mkdir()
    draw_image(30, 20, seed=1).save(folder / "a.png")
    draw_image(20, 40, seed=2).save(folder / "b.png")
    (folder / "garbage.png").write_bytes(b"this is not a png")
    good = (folder / "a.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[:len(good) // 2])
    return folder


def turn_length(sp, index, question, answer, n):
    head = [1] + sp.encode(system_piece() if index == 0 else "[INST]")
    return len(head) + n + len(sp.encode(question)) + len(sp.encode("[/INST]")) + len(sp.encode(answer + " ")) + 1


@pytest.mark.parametrize("slack,turns", [(0, 2), (-1, 1)])
def test_long_conversations_lose_whole_trailing_turns(tmp_path, image_root, make_space, sp, slack, turns):
    n_l, n_s = 3, 2
    fits = turn_length(sp, 0, Q1, A1, n_l) + turn_length(sp, 1, Q2, A2, n_s) + slack
    space = make_space(n_l=n_l, n_s=n_s, max_seq_len=fits)
    ds = ConversationDataset(write_jsonl(tmp_path, [record("a.png", Q1, A1, Q2, A2, Q3, A3)]), str(image_root), space)
    assert len(ds) == 1 and ds.turns_dropped == 3 - turns and not ds.skipped
    s = ds[0]
    assert len(s["input_ids"]) <= fits
    assert (s["labels"] == 2).sum() == turns  # one </s> per kept answer, none cut
    assert s["output_mask"].sum() == s["slot_mask"].sum() == n_l + (turns - 1) * n_s  # same turns on the fused side
    assert len(s["answer_ids"]) == turns


def test_first_turn_too_long_is_skipped_and_counted(tmp_path, image_root, make_space, sp):
    long_question = " ".join([Q1] * 5)
    space = make_space(max_seq_len=turn_length(sp, 0, long_question, A1, 3) - 1)
    lines = [record("a.png", long_question, A1), record("b.png", Q1, A1)]
    ds = ConversationDataset(write_jsonl(tmp_path, lines), str(image_root), space)  # no error without skip_bad
    assert len(ds) == 1
    assert ds.skipped == {"first turn longer than max_seq_len": 1}
    assert ds[0]["pixel_values"].shape[0] == 1 + 2  # b.png, 20x40 with num_crops 4: scale 2 -> 2 x 1 tiles


@pytest.fixture(scope="module")
def letter_clip_dir(tmp_path_factory):
    """A CLIP vocabulary without merges: one token per byte, so the fused side outgrows the LLM side."""
    from conftest import TOKENIZER_TEXTS, load_prepare

    out = tmp_path_factory.mktemp("letter_clip")
    load_prepare().build_clip_vocab(TOKENIZER_TEXTS, str(out), num_merges=0)
    return out


def letter_space(letter_clip_dir, llama_tokenizer_dir, **overrides):
    settings = dict(image_size=S, num_crops=4, n_l=3, n_s=2, system_prompt="")
    settings.update(overrides)
    return TokenSpace(TokenSpaceConfig(clip_path=str(letter_clip_dir), llama_path=str(llama_tokenizer_dir), **settings))


WORDY = " ".join(["circles"] * 12)  # 12 SentencePiece tokens, 84 letter tokens


def llm_length(sp, turns, n_l, n_s):
    """The LLM sequence's length with an empty system prompt, from the layout worked out in the tests above."""
    return sum(len([1] + sp.encode("[INST]")) + (n_l if i == 0 else n_s) + len(sp.encode(q)) + len(sp.encode("[/INST]"))
               + len(sp.encode(a + " ")) + 1 for i, (q, a) in enumerate(turns))


def test_the_fused_side_drops_whole_trailing_turns_too(tmp_path, image_root, letter_clip_dir, llama_tokenizer_dir, sp):
    letters = CLIPTokenizer(vocab=str(letter_clip_dir / "vocab.json"), merges=str(letter_clip_dir / "merges.txt"))
    turns = [(Q1, A1), (WORDY, A2)]
    fused = [len(clip_ids(letters, Q1)) + 3, len(clip_ids(letters, WORDY)) + 2]
    llm = llm_length(sp, turns, 3, 2)
    assert fused[1] == 84 + 2 and sum(fused) > llm  # the fused side is the longer one here
    limit = sum(fused) - 1  # the LLM side fits, the fused side does not
    assert llm <= limit
    ds = ConversationDataset(write_jsonl(tmp_path, [record("a.png", Q1, A1, WORDY, A2)]), str(image_root),
                             letter_space(letter_clip_dir, llama_tokenizer_dir, max_seq_len=limit))
    assert ds.turns_dropped == 1 and not ds.skipped
    s = ds[0]
    assert s["fused_ids"].tolist()[:-3] == clip_ids(letters, Q1)  # the kept question whole, then 2 queries + EOS
    assert s["output_mask"].sum() == s["slot_mask"].sum() == 3  # the same single turn on the LLM side
    assert len(s["answer_ids"]) == 1
    # exactly at the limit both turns stay: the exact CLIP count decides, not its cheap byte bound (bytes > tokens)
    assert sum(len(q.lower().encode()) for q, _ in turns) > sum(len(clip_ids(letters, q)) for q, _ in turns)
    ds = ConversationDataset(write_jsonl(tmp_path, [record("a.png", Q1, A1, WORDY, A2)]), str(image_root),
                             letter_space(letter_clip_dir, llama_tokenizer_dir, max_seq_len=sum(fused)))
    assert ds.turns_dropped == 0 and len(ds[0]["answer_ids"]) == 2


def test_a_first_turn_too_long_on_the_fused_side_is_skipped(tmp_path, image_root, letter_clip_dir,
                                                            llama_tokenizer_dir, sp):
    letters = CLIPTokenizer(vocab=str(letter_clip_dir / "vocab.json"), merges=str(letter_clip_dir / "merges.txt"))
    fused = len(clip_ids(letters, WORDY)) + 3
    assert llm_length(sp, [(WORDY, A1)], 3, 2) < fused
    lines = [record("a.png", WORDY, A1), record("b.png", Q1, A1)]
    ds = ConversationDataset(write_jsonl(tmp_path, lines), str(image_root),
                             letter_space(letter_clip_dir, llama_tokenizer_dir, max_seq_len=fused - 1))
    assert len(ds) == 1 and ds.skipped == {"first turn longer than max_seq_len": 1}
    # the VQ ablation reads no question, so the same line fits
    ds = ConversationDataset(write_jsonl(tmp_path, lines), str(image_root),
                             letter_space(letter_clip_dir, llama_tokenizer_dir, max_seq_len=fused - 1, drop_question=True))
    assert len(ds) == 2 and not ds.skipped


BAD_LINES = [
    ('{"image": "a.png", "messages": [', "malformed JSON"),
    ('["a.png"]', "bad record"),
    (json.dumps({"messages": record("a.png", Q1, A1)["messages"]}), "bad record"),
    (json.dumps({"image": "a.png", "messages": [{"role": "user", "content": 3}]}), "bad record"),
    (json.dumps({"image": "a.png", "messages": [{"role": "assistant", "content": A1},
                                                {"role": "user", "content": Q1}]}), "roles do not alternate"),
    (json.dumps({"image": "a.png", "messages": [{"role": "user", "content": Q1},
                                                {"role": "user", "content": Q2}]}), "roles do not alternate"),
    (json.dumps(record("a.png", Q1, A1, Q2)), "roles do not alternate"),
    (json.dumps(record("a.png", Q1, A1, Q2, "  ")), "empty answer"),
    (json.dumps(record("a.png", "", A1)), "empty question"),
    (json.dumps(record("missing.png", Q1, A1)), "missing image"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_bad_line_names_file_and_line_or_is_counted(tmp_path, image_root, make_space, line, reason):
    path = write_jsonl(tmp_path, [record("a.png", Q1, A1), "", line, record("b.png", Q2, A2)])  # bad: line 3
    with pytest.raises(ValueError, match=rf"{path}, line 3: {reason}"):
        ConversationDataset(path, str(image_root), make_space())
    ds = ConversationDataset(path, str(image_root), make_space(), skip_bad=True)
    assert ds.skipped == {reason: 1}
    assert len(ds) == 2
    assert reason in ds.summary()


@pytest.mark.parametrize("image", ["garbage.png", "truncated.png"])
def test_unreadable_image(tmp_path, image_root, make_space, image):
    path = write_jsonl(tmp_path, [record("a.png", Q1, A1), record(image, Q2, A2), record("b.png", Q3, A3)])
    ds = ConversationDataset(path, str(image_root), make_space())
    assert len(ds) == 3  # the file exists: found out only when decoded
    with pytest.raises(ValueError, match=rf"{path}, line 2: unreadable image: .*{image}"):
        ds[1]
    ds = ConversationDataset(path, str(image_root), make_space(), skip_bad=True)
    assert ds[1] is None and ds.skipped == {"unreadable image": 1}
    # left out of its batch and counted there; its slot is not filled with another line (trained twice)
    batch = collate([ds[0], ds[1], ds[2]])
    assert int(batch["unreadable"]) == 1
    assert batch["input_ids"].tolist() == collate([ds[0], ds[2]])["input_ids"].tolist()
    with pytest.raises(InputError, match="every image of a batch of 1 is unreadable"):
        collate([ds[1]])


def test_no_usable_sample_is_an_error(tmp_path, image_root, make_space):
    path = write_jsonl(tmp_path, [record("missing.png", Q1, A1)])
    with pytest.raises(ValueError, match="no usable samples"):
        ConversationDataset(path, str(image_root), make_space(), skip_bad=True)


def test_missing_tokenizer_files_say_what_to_put_where(tmp_path, llama_tokenizer_dir):
    with pytest.raises(InputError, match="clip_path lacks vocab.json"):
        TokenSpace(TokenSpaceConfig(clip_path=str(tmp_path), llama_path=str(llama_tokenizer_dir)))


# -----------------------------------------------------------------------------
# collate

def test_collate_right_padding(make_space, draw_image):
    space = make_space(n_l=3, n_s=2)
    samples = [space.make_sample(draw_image(60, 30), [(Q1, A1)]),  # num_crops 4, aspect 2: scale 2 -> 1 x 2 tiles
               space.make_sample(draw_image(20, 20), [(Q2, A2), (Q3, A3)])]  # square: 2 x 2 tiles
    crops = [1 + 2, 1 + 4]
    b = collate(samples)
    assert b["pixel_values"].shape == (sum(crops), 3, S, S)
    assert b["crop_to_sample"].tolist() == [0] * crops[0] + [1] * crops[1]
    torch.testing.assert_close(b["pixel_values"][crops[0]:], samples[1]["pixel_values"])
    for key, pad in [("fused_ids", 0), ("query_mask", False), ("output_mask", False), ("input_ids", 0),
                     ("slot_mask", False), ("labels", -100)]:
        length = max(len(s[key]) for s in samples)
        assert b[key].shape == (2, length)
        for row, s in zip(b[key], samples):
            assert row[:len(s[key])].tolist() == s[key].tolist()
            assert (row[len(s[key]):] == pad).all()
    assert b["attention_mask"].sum(1).tolist() == [len(s["input_ids"]) for s in samples]
    assert b["attention_mask"][0, :len(samples[0]["input_ids"])].all()
    assert b["fused_real_mask"].sum(1).tolist() == [len(s["fused_ids"]) for s in samples]
    assert b["output_mask"].sum(1).tolist() == b["slot_mask"].sum(1).tolist() == [3, 3 + 2]
    assert b["answer_ids"].shape[0] == 3  # one row per turn, row-major
    assert b["answer_attention_mask"].sum(1).tolist() == [len(a) for s in samples for a in s["answer_ids"]]
    for row, mask, a in zip(b["answer_ids"], b["answer_attention_mask"], [a for s in samples for a in s["answer_ids"]]):
        assert row[mask].tolist() == a.tolist()
    assert b["input_ids"].dtype == b["labels"].dtype == b["fused_ids"].dtype == torch.long
    assert all(b[k].dtype == torch.bool for k in ("query_mask", "output_mask", "fused_real_mask", "slot_mask",
                                                   "attention_mask", "answer_attention_mask"))


def test_collate_left_padding_for_generation(make_space, draw_image):
    space = make_space(n_l=3)
    samples = [space.generation_sample(draw_image(20, 20), Q3), space.generation_sample(draw_image(30, 20), Q1)]
    b = collate(samples, pad_side="left")
    length = b["input_ids"].shape[1]
    for row, mask, slots, s in zip(b["input_ids"], b["attention_mask"], b["slot_mask"], samples):
        n = len(s["input_ids"])
        assert row[length - n:].tolist() == s["input_ids"].tolist()
        assert mask.tolist() == [False] * (length - n) + [True] * n
        assert slots[length - n:].tolist() == s["slot_mask"].tolist()
    assert b["fused_real_mask"][:, 0].all()  # the fused side stays right-padded
    assert b["output_mask"].sum() == b["slot_mask"].sum() == 6
    assert b["answer_ids"].shape == (0, 0)


def test_a_mix_reads_each_line_in_its_own_token_space_drawn_once_per_line(tmp_path, image_root, make_space):
    """Each line is the sample a token space built at its n_l makes (the reference: TokenSpace built here, not
    replaced()); the draw belongs to the line, so a bad line skipped in the middle moves no other line's n_l."""
    spaces = {n: make_space(n_l=n, n_s=min(n, 2)) for n in (1, 3, 5)}
    mix = [(make_space().replaced(n_l=n, n_s=min(n, 2)), 1 / 3) for n in (1, 3, 5)]
    lines = [record("a.png" if i % 2 else "b.png", Q1, A1, Q2, A2) for i in range(40)]
    ds = ConversationDataset(write_jsonl(tmp_path, lines), str(image_root), make_space(), mix=mix)
    n_ls = [ds[i]["query_mask"][ds[i]["output_mask"]].tolist().index(False) + 1 for i in range(len(ds))]  # 1st EOS
    assert set(n_ls) == {1, 3, 5}  # 40 lines, a third each: all three drawn
    for i, n in enumerate(n_ls):
        image = Image.open(image_root / lines[i]["image"])
        expected = spaces[n].make_sample(image, [(Q1, A1), (Q2, A2)])
        for key in ("fused_ids", "query_mask", "output_mask", "input_ids", "slot_mask", "labels"):
            assert ds[i][key].tolist() == expected[key].tolist(), (i, key)
    assert "mixed: " in ds.summary() and "n_l=5" in ds.summary()

    broken = lines[:7] + [record("missing.png", Q1, A1)] + lines[8:]
    skipped = ConversationDataset(write_jsonl(tmp_path, broken), str(image_root), make_space(), mix=mix, skip_bad=True)
    assert list(skipped.space[:7]) == list(ds.space[:7]) and list(skipped.space[7:]) == list(ds.space[8:])


def test_a_mix_whose_shares_do_not_sum_to_one_is_refused(tmp_path, image_root, make_space):
    path = write_jsonl(tmp_path, [record("a.png", Q1, A1)])
    with pytest.raises(InputError, match="shares must be >= 0 and sum to 1"):
        ConversationDataset(path, str(image_root), make_space(), mix=[(make_space(n_l=1), 0.5)])
