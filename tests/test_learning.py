"""Does the pipeline learn to read its images? train_gen.py, as users run it, on an easy image-dependent task; then
the validation loss it logs with the right images against the same model shown another sample's image (its
`val_loss_images_rolled`; that loss is re-computed from a checkpoint in tests/test_fsdp.py).

The task: a solid-colour image and "What colour is the image?" -> its colour (one of four). The frozen LLM is the
synthetic world's random Llama taught first, as stage 0 does (data/synthetic/pretrain_llm.py's layout), to answer
from the colour word written where the vision slots go; a random LLM cannot read its context at all. The image can
reach the answer only through the vision tokens written into the slots: the bridge outputs not scattered into the
slots, or the fused outputs cut off from the vision tokens, leave the two losses equal."""
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT / "data" / "synthetic"))
import pretrain_llm  # noqa: E402

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 90, 220), "yellow": (235, 200, 30)}
QUESTION = "What colour is the image?"
MARGIN = 0.5  # nats: chance is log 4 = 1.39; what the trained model gains over shuffled images must clear this


def write_split(folder, split, n, seed, draw_image):
    names = list(COLOURS)
    rows = []
    for i in range(n):
        colour = names[(i + seed) % len(names)]
        path = f"{split}/{i:03d}.png"
        (folder / split).mkdir(parents=True, exist_ok=True)
        draw_image(112, 112, COLOURS[colour]).save(folder / path)
        rows.append({"image": path, "messages": [{"role": "user", "content": QUESTION},
                                                 {"role": "assistant", "content": colour}]})
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def teach_reader(world, out, steps=120, batch_size=32):
    """Stage 0 in miniature: the random LLM learns to answer QUESTION with the colour word put in the slots' place."""
    from fusion import IGNORE, TokenSpace, TokenSpaceConfig
    from backbones import Llama

    token_space = TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"), n_l=1, n_s=1))
    llm = Llama.from_hf(str(world / "llama"))
    optimizer = torch.optim.AdamW(llm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        colours = [list(COLOURS)[i] for i in torch.randint(len(COLOURS), (batch_size,), generator=generator)]
        pieces, piece_mask, targets = pretrain_llm.batch_of([pretrain_llm.layout(
            token_space, [{"content": QUESTION}, {"content": c}], [[t] for t in token_space.sp.encode(c)])
            for c in colours])  # the colour in words, a position a piece
        logits = llm(inputs_embeds=pretrain_llm.embed(llm, pieces, piece_mask))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    pretrain_llm.save_hf(llm, str(world / "llama"), str(out))
    return loss.item()


def test_train_gen_learns_to_read_the_image(synthetic_world, tmp_path, draw_image):
    reader = tmp_path / "llama-reader"
    assert teach_reader(synthetic_world, reader) < 0.1  # it reads the word: the answer's 3 tokens all but certain
    data = tmp_path / "data"
    write_split(data, "train", 64, 0, draw_image)
    write_split(data, "val", 32, 1, draw_image)  # neighbours differ in colour: a rolled image is always a wrong one
    out = tmp_path / "gen"
    # lr 1e-3 for 100 steps: at 3e-3 for 60 steps the fit was seed- and package-version-dependent (it sometimes settled
    # on a wrong colour map, loss above chance); at 1e-3 seeds 0-2 end 1.8-2.0 nats apart
    subprocess.run([sys.executable, "train_gen.py", "config/tiny.py", f"--data_dir={data}",
                    f"--clip_path={synthetic_world / 'clip'}", f"--llama_path={reader}",
                    f"--out_dir={out}", "--num_crops=0", "--n_l=2", "--n_s=1", "--max_iters=100", "--batch_size=16",
                    "--grad_accum=1", "--lr=1e-3", "--bridge_init_std=0.02", "--log_interval=20",
                    "--val_file=val.jsonl", "--eval_interval=100"],
                   cwd=ROOT, check=True, capture_output=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})

    # the validation loss train_gen.py itself logs at the end, with each batch's images rolled by one and without
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "val_loss" in r][-1]
    right, shuffled = last["val_loss"], last["val_loss_images_rolled"]
    print(f"val answer loss: {right:.3f} right images, {shuffled:.3f} shuffled")
    assert last["step"] == 100 and shuffled - right > MARGIN, (right, shuffled)
