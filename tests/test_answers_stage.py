"""Tests of train_align.py --objective=answers: stage 1 as a classifier of the training file's frequent answers,
read at several n_l (n_l_mix), with the vision tower frozen, and its checkpoint as stage 2's init.

References are independent of train_align.py: the answers counted here from the JSONL and tokenized with
CLIPTokenizer, one split of each step against another, the weights of the stage-1 start and of clip_path.
"""
import collections
import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTokenizer

from checkpoint import load_checkpoint
from configurator import InputError
from fusion import collate
from test_train import argv, keeping_the_start, metrics, run

MIN_COUNT = 2
ANSWERS = ["--objective=answers", f"--answer_min_count={MIN_COUNT}", "--n_l_mix=(1, 4, 16)"]


@pytest.fixture(scope="module")
def answers_run(synthetic_world, tmp_path_factory):
    """The run's globals (start_state: the weights before the first step) and its folder."""
    out = tmp_path_factory.mktemp("answers")
    with pytest.MonkeyPatch.context() as mp:
        start = keeping_the_start(mp)
        script_globals = run("train_align.py", mp, argv(synthetic_world, out, *ANSWERS))
    return {**script_globals, "start_state": start}, out


def first_answer_classes(synthetic_world, classes):
    """Each conversation's expected targets, from the JSONL and CLIPTokenizer: its first answer's class (-1 when it is
    not one), -1 for every later turn."""
    clip = CLIPTokenizer(vocab=str(synthetic_world / "clip" / "vocab.json"),
                         merges=str(synthetic_world / "clip" / "merges.txt"))
    expected = []
    for line in (synthetic_world / "train.jsonl").read_text().splitlines():
        answers = [m["content"] for m in json.loads(line)["messages"][1::2]]
        first = tuple(clip(answers[0], add_special_tokens=False).input_ids + [clip.eos_token_id])
        expected += [classes.get(first, -1)] + [-1] * (len(answers) - 1)
    return expected


def test_the_classes_are_the_answers_seen_min_count_times(answers_run, synthetic_world):
    counts = collections.Counter()
    for line in (synthetic_world / "train.jsonl").read_text().splitlines():
        counts.update(m["content"] for m in json.loads(line)["messages"][1::2])
    frequent = {a for a, n in counts.items() if n >= MIN_COUNT}
    assert frequent and len(frequent) < len(counts)  # some answers are classes, some are not
    clip = CLIPTokenizer(vocab=str(synthetic_world / "clip" / "vocab.json"),
                         merges=str(synthetic_world / "clip" / "merges.txt"))
    rows = {tuple(clip(a, add_special_tokens=False).input_ids + [clip.eos_token_id]) for a in frequent}
    assert set(answers_run[0]["classes"]) == rows


def test_only_first_turns_are_classified(answers_run, synthetic_world):
    script_globals = answers_run[0]
    dataset, targets_of = script_globals["dataset"], script_globals["answer_targets"]
    expected = first_answer_classes(synthetic_world, script_globals["classes"])
    got = targets_of(collate([dataset[i] for i in range(len(dataset))])).tolist()
    assert got == expected and any(t >= 0 for t in got) and len(got) > len(dataset)  # some second turns


def test_the_loss_falls_and_only_the_fused_model_and_head_train(answers_run, synthetic_world):
    script_globals, out = answers_run
    model, dataset = script_globals["raw_model"], script_globals["dataset"]
    batches = [collate([dataset[i] for i in range(start, start + 4)]) for start in range(0, len(dataset), 4)]
    loss_of = script_globals["val_batch_loss"]
    trained = copy.deepcopy(model.state_dict())

    def mean_loss():
        with torch.no_grad():
            sums, counts = zip(*(loss_of(model, b) for b in batches))
        return sum(s.item() for s in sums) / sum(counts)

    after = mean_loss()
    model.load_state_dict(script_globals["start_state"])
    before = mean_loss()
    model.load_state_dict(trained)
    print(f"answer loss on the training set: {before:.3f} before, {after:.3f} after")
    assert after < before - 0.05

    saved, meta = load_checkpoint(str(out / "ckpt.safetensors"), prefix="model.")
    assert meta["stage"] == "align"
    start = script_globals["start_state"]
    vision = [k for k in start if k.startswith("vision.")]
    assert vision and all(torch.equal(saved[f"model.{k}"], start[k]) for k in vision)
    assert not torch.equal(saved["model.compressor.queries"], start["compressor.queries"])
    assert not torch.equal(saved["model.answer_head.weight"], start["answer_head.weight"])


def test_the_logged_loss_is_the_mean_cross_entropy_over_classified_turns(answers_run, synthetic_world, tmp_path,
                                                                        monkeypatch):
    """One step over all 16 conversations (8 x 2 accumulation): its loss, worked out here from the starting weights'
    logits and the targets read from the JSONL, is the mean over the classified first turns, not over answer
    tokens or micro-batches."""
    start = keeping_the_start(monkeypatch)
    script_globals = run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path, *ANSWERS, "--max_iters=1",
                                                             "--batch_size=8", "--grad_accum=2"))
    model, dataset = script_globals["raw_model"], script_globals["dataset"]
    targets = torch.tensor(first_answer_classes(synthetic_world, script_globals["classes"]))
    model.load_state_dict(start)
    batch = collate([dataset[i] for i in range(len(dataset))])
    batch["answer_class"] = torch.full((len(targets),), -1)  # the model's own loss is not what is checked here
    with torch.no_grad():
        logits, _ = model(batch)
    picked = targets >= 0
    expected = -torch.log_softmax(logits[picked], -1).gather(1, targets[picked, None]).mean()
    assert len(dataset) == 16 and 0 < picked.sum() < len(targets)
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(expected.item(), rel=1e-5)


def test_a_step_is_the_mean_over_its_classified_turns_whatever_the_split(answers_run, synthetic_world, tmp_path,
                                                                         monkeypatch):
    """The run splits each step's 4 conversations into 2 micro-batches of 2; one micro-batch of 4 must give the same
    losses at every step. Micro-batches classify different numbers of turns, so a mean per micro-batch would not."""
    run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path, *ANSWERS, "--batch_size=4", "--grad_accum=1"))
    one, two = metrics(tmp_path), metrics(answers_run[1])
    assert len(one) == len(two) > 1
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]


def test_stage_2_starts_from_its_fused_model_and_leaves_the_head(answers_run, synthetic_world, tmp_path, monkeypatch):
    start = keeping_the_start(monkeypatch)
    stage1 = Path(answers_run[1]) / "ckpt.safetensors"
    run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path, f"--init_from={stage1}", "--max_iters=1"))
    saved, _ = load_checkpoint(str(stage1), prefix="model.")
    taken = [k for k in saved if k.startswith(("model.compressor.", "model.vision."))]
    assert taken and all(torch.equal(start[k[len("model."):]], saved[k]) for k in taken)
    assert not any(k.startswith("answer_head.") for k in start)


def test_init_from_takes_a_stage_1_checkpoints_vision_tower_and_fused_model(answers_run, synthetic_world, tmp_path,
                                                                          monkeypatch):
    """The miniature runs the paper's contrastive stage 1, then the answers objective from it."""
    run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path / "contrastive", "--max_iters=2"))
    contrastive = tmp_path / "contrastive" / "ckpt.safetensors"
    start = keeping_the_start(monkeypatch)
    run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path / "answers", *ANSWERS, "--max_iters=1",
                                            f"--init_from={contrastive}"))
    saved, _ = load_checkpoint(str(contrastive), prefix="model.")
    taken = [k for k in saved if k.startswith(("model.compressor.", "model.vision."))]
    assert taken and all(torch.equal(start[k[len("model."):]], saved[k]) for k in taken)
    fresh = answers_run[0]["start_state"]["answer_head.weight"]  # the same seed draws the same fresh head
    assert torch.equal(start["answer_head.weight"], fresh)


def test_init_from_refuses_a_stage_2_checkpoint(answers_run, synthetic_world, tmp_path, monkeypatch):
    stage1 = Path(answers_run[1]) / "ckpt.safetensors"
    run("train_gen.py", monkeypatch, argv(synthetic_world, tmp_path / "gen", f"--init_from={stage1}", "--max_iters=1"))
    with pytest.raises(InputError, match="a 'gen' checkpoint; train_align.py's init_from takes a stage-1 one"):
        run("train_align.py", monkeypatch, argv(synthetic_world, tmp_path / "again", *ANSWERS,
                                                f"--init_from={tmp_path / 'gen' / 'ckpt.safetensors'}"))
