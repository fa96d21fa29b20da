"""The tiny reproduction: stage 0 (the LLM's sequence layout, its gate's scoring, the saved LLM against transformers, the
CLIP pairs and the saved CLIP) and reproduce_tiny.sh end to end at CI size."""
import ast
import collections
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import CLIPModel, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "data" / "synthetic"))

import pretrain_clip  # noqa: E402
import pretrain_llm  # noqa: E402
from backbones import Llama, ViT  # noqa: E402
from conftest import SYSTEM_PROMPT  # noqa: E402


@pytest.fixture(scope="module")
def world(synthetic_world):
    return synthetic_world


def hf_llama(path):
    model, info = LlamaForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key: the names are HF's
    return model.eval()


def test_pretrained_llm_loads_in_transformers_with_equal_logits(world, tmp_path, capsys):
    out = tmp_path / "llama-lm"
    pretrain_llm.main(pretrain_llm.Config(data_dir=str(world), llama_path=str(world / "llama"), out_dir=str(out),
                                          max_iters=4, batch_size=8, log_interval=2, n_eval=6))
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == (world / "llama" / "tokenizer.model").read_bytes()
    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf_llama(out)(input_ids=ids).logits
        ours = Llama.from_hf(str(out))(input_ids=ids)
        start = hf_llama(world / "llama")(input_ids=ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert (reference - start).abs().max() > 1e-2  # the saved weights are the trained ones, not the random start
    # the last line: the gate's measurement, for reproduce_tiny.sh; 6 questions, 2 per category, 4 lookups
    gate = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(gate) == {"words_scene", "compound_scene", "none_scene"}
    for scores in gate.values():
        assert set(scores) == {"cell", "row", "grid", "lookups", "all"}
        assert all(2 * scores[c] in (0, 1, 2) for c in ("cell", "row", "grid"))
        assert scores["lookups"] == pytest.approx((scores["cell"] + scores["row"]) / 2)
        assert scores["all"] == pytest.approx((scores["cell"] + scores["row"] + scores["grid"]) / 3)


LETTERS = "EFGHJKLMNPQRSTUV"
SCENE = ("red", "empty", "blue", "green") * 4  # cell i holds SCENE[i]: E red, F empty, G blue, H green, J red, ...
CAPTION = ("Please describe this image in general. Directly provide the description, do not include prefix like "
           "\"This image depicts\". ")
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def token_space(world):
    from fusion import TokenSpace, TokenSpaceConfig

    return TokenSpace(TokenSpaceConfig(clip_path=str(world / "clip"), llama_path=str(world / "llama"), n_l=1, n_s=1))


def piece(sp, word):
    """The id of a word's one piece (Llama's SentencePiece marks a word start with \u2581)."""
    i = sp.piece_to_id("\u2581" + word)
    assert i != sp.unk_id(), word  # the world's 512-piece vocabulary holds every letter and value whole
    return i


def words_form(sp, text):
    """The scene in words: one position a token."""
    return [[t] for t in sp.encode(text)]


def compound_form(sp, cells):
    """One position a cell, (letter, value): the two pieces whose embeddings are summed."""
    return [[piece(sp, letter), piece(sp, value)] for letter, value in cells]


def hand_prompt(sp, index, scene, question):
    """Stage 2's prompt of turn `index` by hand (Llama-2 chat template, each piece tokenized on its own) as
    positions of one id each, the scene's positions where the vision slots go in the first turn."""
    one = lambda text: [[t] for t in sp.encode(text)]  # noqa: E731
    head = ([[1]] + one(f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n") + scene if index == 0
            else [[1]] + one("[INST]"))
    return head + one(question) + one("[/INST]")


def test_scene_pieces_in_words_as_compound_positions_or_none(token_space):
    sp = token_space.sp
    whole = "E red F empty G blue H green J red K empty L blue M green N red P empty Q blue R green S red T empty " \
            "U blue V green"
    assert pretrain_llm.scene_pieces(token_space, SCENE, None, "words") == words_form(sp, whole)
    assert len(words_form(sp, whole)) == 32  # a letter and a value, a piece each
    everything = [(letter, SCENE[i]) for i, letter in enumerate(LETTERS)]
    assert pretrain_llm.scene_pieces(token_space, SCENE, None, "compound") == compound_form(sp, everything)
    # a subset is told in reading order, whatever the order it comes in: cells 10, 0, 5 are Q, E, K
    assert pretrain_llm.scene_pieces(token_space, SCENE, [10, 0, 5], "words") == words_form(sp, "E red K empty Q blue")
    assert pretrain_llm.scene_pieces(token_space, SCENE, [10, 0, 5], "compound") == compound_form(
        sp, [("E", "red"), ("K", "empty"), ("Q", "blue")])
    assert pretrain_llm.scene_pieces(token_space, SCENE, None, "none") == []
    assert pretrain_llm.scene_pieces(token_space, SCENE, [3], "none") == []
    assert pretrain_llm.SCENE_FORMS == ("words", "compound", "none")


def test_layout_is_stage_two_sequence_with_the_scene_in_its_slots(token_space):
    from fusion import IGNORE

    sp = token_space.sp
    messages = [{"role": "user", "content": "What colour is cell G?"}, {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "What is in row 2?"},
                {"role": "assistant", "content": "J red K empty L blue M green"}]
    scenes = {"words, whole": words_form(sp, " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, SCENE))),
              "words, subset": words_form(sp, "F empty K empty"),
              "compound, whole": compound_form(sp, zip(LETTERS, SCENE)),
              "compound, subset": compound_form(sp, [("F", "empty"), ("K", "empty")]),
              "none": []}
    lengths = {}
    for label, scene in scenes.items():
        positions, labels = [], []
        for i in range(0, len(messages), 2):
            prompt = hand_prompt(sp, i // 2, scene, messages[i]["content"])
            answer = sp.encode(messages[i + 1]["content"] + " ") + [2]
            positions += prompt + [[t] for t in answer]
            labels += [IGNORE] * len(prompt) + answer
        assert pretrain_llm.layout(token_space, messages, scene) == (positions, labels), label
        lengths[label] = len(positions)
    # one position a cell instead of two; none at all without the scene
    assert lengths["words, whole"] - lengths["compound, whole"] == 16 == lengths["compound, whole"] - lengths["none"]
    # a generation prompt: ends after [/INST], nothing to learn
    question = "What colour is cell E?" + VQA_SUFFIX
    prompt = hand_prompt(sp, 0, scenes["compound, whole"], question)
    got = pretrain_llm.layout(token_space, [{"content": question}, {"content": None}], scenes["compound, whole"])
    assert got == (prompt, [IGNORE] * len(prompt))


def test_training_examples_tell_the_scene_in_both_forms(token_space):
    import random

    from fusion import IGNORE

    sp = token_space.sp
    letters, values = {piece(sp, x) for x in LETTERS}, {piece(sp, x) for x in ("red", "green", "blue", "yellow",
                                                                                   "purple", "orange", "empty")}
    head = 1 + len(sp.encode(f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n"))  # <s> [INST] <<SYS>> ... <</SYS>>
    rng, forms = random.Random(0), collections.Counter()
    for _ in range(60):
        positions, labels = pretrain_llm.training_example(token_space, rng)
        assert len(positions) == len(labels) and all(len(p) in (1, 2) for p in positions)
        compound = [k for k, p in enumerate(positions) if len(p) == 2]
        if compound:  # one block in the first turn's slots, right after the system prompt: (letter, value) pairs
            forms["compound"] += 1
            assert compound == list(range(head, head + len(compound))) and len(compound) <= 16
            assert all(positions[k][0] in letters and positions[k][1] in values for k in compound)
            order = [LETTERS.index(sp.id_to_piece(positions[k][0])[1:]) for k in compound]
            assert order == sorted(set(order))  # reading order, each cell once
        else:
            forms["words"] += 1
            # in words the scene starts with a letter and a value, each its own position
            assert positions[head][0] in letters and positions[head + 1][0] in values
        assert all(labels[k] == IGNORE for k in range(head + max(len(compound), 2)))
        assert any(label != IGNORE for label in labels)
    assert forms["compound"] >= 15 and forms["words"] >= 15  # half each: 30 expected of 60


def test_pieces_tensor_and_embed_sum_each_positions_pieces():
    rows = [[[1], [5, 9], [6]], [[1], [7]]]
    for side in ("right", "left"):
        pieces, piece_mask, real = pretrain_llm.pieces_tensor(rows, side=side)
        second = [[1, 0], [7, 0], [0, 0]] if side == "right" else [[0, 0], [1, 0], [7, 0]]
        assert pieces.tolist() == [[[1, 0], [5, 9], [6, 0]], second]
        assert piece_mask.tolist() == [[[True, False], [True, True], [True, False]],
                                       [[p != [0, 0], False] for p in second]]
        assert real.tolist() == [[True] * 3, [True, True, False] if side == "right" else [False, True, True]]

    class Table:  # token i's embedding is (i + 1) * (1, 10, 100): id 0 is not a zero vector, so the mask must act
        embed_tokens = torch.nn.Embedding(10, 3)

    Table.embed_tokens.weight.data = torch.arange(1, 11, dtype=torch.float)[:, None] * torch.tensor([1.0, 10, 100])
    pieces, piece_mask, _ = pretrain_llm.pieces_tensor(rows, side="left")
    got = pretrain_llm.embed(Table, pieces, piece_mask)
    unit = torch.tensor([1.0, 10, 100])
    expected = torch.stack([torch.stack([2 * unit, (6 + 10) * unit, 7 * unit]),
                            torch.stack([0 * unit, 2 * unit, 8 * unit])])
    torch.testing.assert_close(got, expected)


def test_batch_of_shifts_labels_and_pads():
    from fusion import IGNORE

    pieces, piece_mask, targets = pretrain_llm.batch_of([([[1], [5, 9], [6], [2]], [IGNORE, IGNORE, 6, 2]),
                                                         ([[1], [7], [2]], [IGNORE, 7, 2])])
    assert pieces.tolist() == [[[1, 0], [5, 9], [6, 0]], [[1, 0], [7, 0], [0, 0]]]
    assert piece_mask.tolist() == [[[True, False], [True, True], [True, False]],
                                   [[True, False], [True, False], [False, False]]]
    assert targets.tolist() == [[IGNORE, 6, 2], [7, 2, IGNORE]]


class PlantedLLM:
    """Stands in for model.Llama in exact_match. Its embedding table is one-hot, so each position's summed
    embedding is the count of each id in it: generate reads every left-padded prompt back as positions (each a
    sorted tuple of ids), looks it up in `answers` (prompt -> its answers in order; an IndexError if the prompt is
    not the one built by hand) and emits what a trained LLM would (the answer's tokens with the trailing space it was
    trained on, then </s>), cut at max_new_tokens, rows padded with </s> as Llama.generate does."""

    def __init__(self, sp, questions, prompt, planted):
        self.sp, self.answers = sp, collections.defaultdict(list)
        self.embed_tokens = lambda ids: torch.nn.functional.one_hot(ids, sp.vocab_size()).float()
        for i, (scene, _, question, answer) in enumerate(questions):
            key = tuple(tuple(sorted(position)) for position in prompt(scene, question))
            self.answers[key].append(planted(i, answer))

    def generate(self, inputs_embeds, attention_mask, max_new_tokens, eos_token_id):
        rows = []
        for embeds, mask in zip(inputs_embeds, attention_mask):
            n = int(mask.sum())
            assert mask[-n:].all() and not (embeds[:-n] != 0).any()  # left-padded, the padding nothing
            counts = embeds[-n:].round().long().tolist()
            key = tuple(tuple(t for t, k in enumerate(c) for _ in range(k)) for c in counts)
            rows.append((self.sp.encode(self.answers[key].pop(0) + " ") + [eos_token_id])[:max_new_tokens])
        return torch.tensor([row + [eos_token_id] * (max(map(len, rows)) - len(row)) for row in rows])


def test_gate_questions_are_the_benchmarks_questions():
    questions = pretrain_llm.gate_questions(12, seed=0)  # cell, row, grid in rotation: 4 each
    assert [c for _, c, _, _ in questions] == ["cell", "row", "grid"] * 4
    assert len({scene for scene, *_ in questions}) == 12  # a fresh scene each
    assert pretrain_llm.gate_questions(12, seed=0) == questions and pretrain_llm.gate_questions(12, seed=1) != questions
    for scene, category, question, answer in questions:
        if category == "cell":  # SYNTH_VQA's, with the VQA prompt's suffix; answered by the value alone
            m = re.fullmatch(r"What colour is cell ([E-V])\?" + re.escape(VQA_SUFFIX), question)
            assert answer == scene[LETTERS.index(m[1])]
        elif category == "row":
            m = re.fullmatch(r"What is in row ([1-4])\?", question)
            cells = range(4 * (int(m[1]) - 1), 4 * int(m[1]))
            assert answer == " ".join(f"{LETTERS[i]} {scene[i]}" for i in cells)
        else:
            assert question == CAPTION
            assert answer == " ".join(f"{LETTERS[i]} {v}" for i, v in enumerate(scene) if v != "empty")


def test_exact_match_scores_planted_answers(token_space):
    sp = token_space.sp
    questions = pretrain_llm.gate_questions(12, seed=0)

    def prompt_in(form):
        def prompt(scene, question):
            cells = list(zip(LETTERS, scene))
            told = {"words": words_form(sp, " ".join(f"{letter} {value}" for letter, value in cells)),
                    "compound": compound_form(sp, cells), "none": []}[form]
            return hand_prompt(sp, 0, told, question)
        return prompt

    # words: right on the even-numbered questions (2 of each category's 4), a wrong answer on the others
    llm = PlantedLLM(sp, questions, prompt_in("words"), lambda i, answer: answer if i % 2 == 0 else f"not {answer}")
    scores = pretrain_llm.exact_match(llm, token_space, questions, "words", batch_size=5)
    assert scores == pytest.approx({"cell": 0.5, "row": 0.5, "grid": 0.5, "lookups": 0.5, "all": 0.5})
    # compound: right on questions 0, 3, 6, 9 (every cell one) and 1 (a row): cell 4/4, row 1/4, grid 0/4;
    # lookups (cell and row, not grid) 5/8, all 5/12
    llm = PlantedLLM(sp, questions, prompt_in("compound"),
                     lambda i, answer: answer if i in (0, 1, 3, 6, 9) else f"not {answer}")
    scores = pretrain_llm.exact_match(llm, token_space, questions, "compound", batch_size=7)
    assert scores == pytest.approx({"cell": 1.0, "row": 0.25, "grid": 0.0, "lookups": 5 / 8, "all": 5 / 12})
    llm = PlantedLLM(sp, questions, prompt_in("none"), lambda i, answer: answer)
    scores = pretrain_llm.exact_match(llm, token_space, questions, "none")
    assert scores == {"cell": 1.0, "row": 1.0, "grid": 1.0, "lookups": 1.0, "all": 1.0}
    llm = PlantedLLM(sp, questions, prompt_in("none"), lambda i, answer: "purple" if answer != "purple" else "red")
    scores = pretrain_llm.exact_match(llm, token_space, questions, "none")
    assert scores == {"cell": 0.0, "row": 0.0, "grid": 0.0, "lookups": 0.0, "all": 0.0}
    # the scene in another form than the one asked for is another prompt
    llm = PlantedLLM(sp, questions, prompt_in("words"), lambda i, answer: answer)
    with pytest.raises(IndexError):
        pretrain_llm.exact_match(llm, token_space, questions, "compound")


def test_pretrained_clip_is_an_hf_clip_our_vit_reads(world, tmp_path):
    out = tmp_path / "clip-pretrained"
    pretrain_clip.main(pretrain_clip.Config(data_dir=str(world), out_dir=str(out), max_iters=3, batch_size=8,
                                            log_interval=1))
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (world / "clip" / name).read_bytes()
    trained, info = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    start = CLIPModel.from_pretrained(world / "clip")
    pixels = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = trained.eval().vision_model(pixel_values=pixels).last_hidden_state
        before = start.eval().vision_model(pixel_values=pixels).last_hidden_state
        ours = ViT.from_hf(str(out))(pixels)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    assert (reference - before).abs().max() > 1e-3  # trained weights were saved


def test_clip_pairs_are_the_images_and_their_scenes_in_words():
    """Each global view, read back to pixels at the cell centres (14 + 28 k px), shows what its text says."""
    import random

    from fusion import CLIP_MEAN, CLIP_STD
    from prepare import BACKGROUND, COLOURS

    name_of = {rgb: name for name, rgb in COLOURS.items()} | {BACKGROUND: "empty"}
    views, texts = pretrain_clip.pairs(random.Random(0), 6, 112)
    assert views.shape == (6, 3, 112, 112) and len(texts) == 6 and len(set(texts)) == 6
    pixels = ((views * CLIP_STD + CLIP_MEAN) * 255).round().clamp(0, 255).to(torch.uint8)
    for view, text in zip(pixels, texts):
        cells = [name_of[tuple(view[:, 14 + 28 * r, 14 + 28 * c].tolist())] for r in range(4) for c in range(4)]
        assert text == " ".join(f"{letter} {value}" for letter, value in zip(LETTERS, cells))


CI_NL = (1, 2, 4)  # a fit needs 3 distinct n_l
# 60 small LLM steps: enough for it to answer in the benchmarks' formats, so some scores are positive and get fitted
CI_ENV = {"TINY_NL": " ".join(map(str, CI_NL)), "TINY_BASE_NL": "4", "TINY_TRAIN": "160", "TINY_BENCH": "8",
          "TINY_LM_STEPS": "60", "TINY_LM_BATCH": "8", "TINY_CLIP_STEPS": "2", "TINY_ALIGN_STEPS": "1",
          "TINY_ANSWER_STEPS": "1", "TINY_GEN_STEPS": "1", "TINY_FT_STEPS": "1", "TINY_GEN_BATCH": "4",
          # a seconds-long run learns nothing: the gates are measured and printed, but cannot stop it
          "TINY_GATE_LLM": "-1", "TINY_GATE_GAP": "-1000"}
VARIANTS = ("VQQ", "VQ-ft", "VQQ-shuffled", "pool", "resampler")
HEADLINE = {"SYNTH_VQA": {"Overall"},  # its one category, cell
            "SYNTH_CAPTION": {"BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "category:row", "category:grid"}}


def vqa_words(text):
    """A short answer as TextVQA compares it, simplified for one-word answers: lower case, periods dropped, other
    marks as spaces, articles left out (scorers.py's normalisation agrees on these)."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower().replace(".", "")) if w not in ("a", "an", "the")]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_reproduce_tiny_end_to_end(tmp_path):
    env = dict(os.environ, TINY_OUT=str(tmp_path / "out"), TINY_RESULTS=str(tmp_path / "results"),
               PYTHON=sys.executable, **CI_ENV)
    result = subprocess.run(["bash", "reproduce_tiny.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0
    gates = [line for line in result.stdout.splitlines() if "] GATE " in line]
    assert len(gates) == 3 and all(line.endswith("passed") for line in gates), gates
    assert (tmp_path / "results" / "targets.txt").read_text().rstrip().endswith("of 4 targets met")
    with open(tmp_path / "results" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["variant"], r["benchmark"], r["metric"], int(r["n_l"]), int(r["n_s"])) for r in rows}
    for variant in VARIANTS:
        for n in CI_NL:
            for benchmark, metrics in HEADLINE.items():
                for metric in metrics:
                    assert (variant, benchmark, metric, n, min(n, 4)) in got
    assert len(got) == len(rows)  # one row per number
    # SYNTH_VQA's Overall recomputed from the predictions file and the TSV with TextVQA's rule where all 10
    # references are the same answer: a row scores 100 when the prediction is that answer, else 0
    with open(tmp_path / "out" / "data" / "bench" / "SYNTH_VQA.tsv", newline="") as f:
        truth = {}
        for t in csv.DictReader(f, delimiter="\t"):
            references = ast.literal_eval(t["answer"])
            assert len(references) == 10 and len(set(references)) == 1
            truth[t["index"]] = references[0]
    assert len(truth) == int(CI_ENV["TINY_BENCH"])
    recomputed = 0
    for r in rows:
        if r["benchmark"] == "SYNTH_VQA" and r["metric"] == "Overall":
            (run_dir,) = (tmp_path / "out").glob(f"eval-*/{r['variant']}_nl{r['n_l']}")  # VQQ-shuffled: in VQQ's
            with open(run_dir / "predictions_SYNTH_VQA.jsonl") as f:
                predicted = {str(p["index"]): p["prediction"] for p in map(json.loads, f)}
            assert predicted.keys() == truth.keys()
            hits = [vqa_words(predicted[i]) == vqa_words(truth[i]) for i in truth]
            assert float(r["score"]) == pytest.approx(100 * sum(hits) / len(hits), abs=1e-3)
            recomputed += 1
    assert recomputed == len(VARIANTS) * len(CI_NL)
    with open(tmp_path / "results" / "fits.csv", newline="") as f:
        fits = list(csv.DictReader(f))
    fitted = {(f["variant"], f["benchmark"], f["metric"], f["form"]) for f in fits}
    assert fitted and all(int(f["n_points"]) == len(CI_NL) for f in fits)
    assert {v for v, _, _, _ in fitted} <= set(VARIANTS) and {form for *_, form in fitted} == {"power", "two_regime"}
    # a curve is fitted exactly when all its scores are positive (a log-space fit cannot take a 0)
    positive = {}
    for r in rows:
        key = (r["variant"], r["benchmark"], r["metric"])
        positive[key] = positive.get(key, True) and float(r["score"]) > 0
    headline = {key for key in positive if ":" not in key[2] and key[2] != "unparsable_rate"}
    assert {key for key in headline if positive[key]} == {(v, b, m) for v, b, m, _ in fitted}
    with open(tmp_path / "results" / "fits_all_metrics.csv", newline="") as f:
        all_fitted = {(f["variant"], f["benchmark"], f["metric"]) for f in csv.DictReader(f)}
    assert all_fitted == {key for key, ok in positive.items() if ok}
    for figure in ("scaling_fit.png", "difference.png"):
        assert (tmp_path / "results" / figure).stat().st_size > 1000
