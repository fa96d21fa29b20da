"""sample.py on a tiny checkpoint of ours and on a converted tiny authors' checkpoint: its answers against a
cache-free greedy loop over full forwards written here (the whole conversation re-run at every step), and, for the
authors' model, the first answer token against their forward pass re-computed with transformers."""
import torch
from PIL import Image

import convert_authors
import sample
from fusion import TokenSpace, TokenSpaceConfig
from test_convert_authors import build_theirs, load_ours, their_forward
from test_evaluate_run import greedy_without_cache, make_checkpoint


def decode(token_space, ids):
    return token_space.sp.decode([t for t in ids if t not in (0, 1, 2)]).strip()


def textured_image(path, size=(90, 60), seed=0):
    g = torch.Generator().manual_seed(seed)
    image = Image.new("RGB", size)
    image.putdata([tuple(int(v) for v in torch.randint(0, 256, (3,), generator=g)) for _ in range(size[0] * size[1])])
    image.save(path)
    return Image.open(path).convert("RGB")


def test_one_question_and_a_chat_with_an_n_l_override(synthetic_world, tmp_path, capsys):
    world = synthetic_world
    vlm = make_checkpoint(world, tmp_path / "ck", n_l=16, seed=0)
    image = textured_image(tmp_path / "image.png")
    q1, q2 = "What colour is the shape in row 2, column 3?", "Is there a blue triangle in the image?"

    def space(n_l):
        return TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"),
                                           image_size=112, num_crops=2, n_l=n_l, n_s=4, max_seq_len=1024))

    base = [f"--ckpt={tmp_path / 'ck'}", f"--image={tmp_path / 'image.png'}", "--max_new_tokens=12"]
    (answer,) = sample.main(base + [f"--question={q1}"])
    assert capsys.readouterr().out == answer + "\n"
    assert answer == decode(space(16), greedy_without_cache(vlm, space(16), image, [(q1, None)], 12))

    answers = sample.main(base + [f"--question={q1}", f"--question={q2}", "--n_l=8"])
    first = decode(space(8), greedy_without_cache(vlm, space(8), image, [(q1, None)], 12))
    second = decode(space(8), greedy_without_cache(vlm, space(8), image, [(q1, first), (q2, None)], 12))
    assert answers == [first, second]
    assert capsys.readouterr().out == f"Q: {q1}\nA: {first}\n\nQ: {q2}\nA: {second}\n\n"


def test_a_converted_authors_checkpoint(tmp_path, capsys):
    src, out = tmp_path / "theirs", tmp_path / "ours"
    src.mkdir()
    ref = build_theirs(src)
    convert_authors.main([f"--src={src}", f"--out={out}"])
    capsys.readouterr()
    image = textured_image(tmp_path / "image.png", size=(70, 40), seed=3)
    question = "Is there a red circle in row 1, column 2?"
    (answer,) = sample.main([f"--ckpt={out}", f"--image={tmp_path / 'image.png'}", f"--question={question}",
                             "--max_new_tokens=6"])
    vlm, meta = load_ours(out)
    token_space = TokenSpace(TokenSpaceConfig(clip_path=meta["clip_path"], llama_path=meta["llama_path"],
                                              **meta["token_space"]))
    ids = greedy_without_cache(vlm, token_space, image, [(question, None)], 6)
    assert answer == decode(token_space, ids)
    pixels = token_space.make_sample(image, [(question, None)])["pixel_values"]
    logits = their_forward(ref, pixels, [(question, None)])[1][-1]
    logits[token_space.eos] = -float("inf")
    assert ids[0] == int(logits.argmax())
