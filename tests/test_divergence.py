"""Tests of divergence.py: the statistics against hand-worked values and the unit-norm identity, the lambda fit
against a planted value, the CLI end to end against hidden states computed here with transformers, the vision
mode on a tiny FusedVLM checkpoint, and bad input named by file and line."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

from chat import LLMTokenizer
from divergence import (CSV_COLUMNS, Accumulator, Config, branch_statistics, fit_lambda, image_pair, main,
                        read_pairs, text_pair, tokenize_pair)
from backbones import LlamaConfig, ViTConfig
from checkpoint import save_checkpoint
from configurator import InputError
from model import FusedVLM, FusedVLMConfig

ROOT = Path(__file__).resolve().parent.parent
SQ = math.sqrt(0.5)


def one_pair(a, b):
    return torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)


def upsilon_of(psi_eq, psi_aa, psi_bb, psi_ab, n):
    return n * (1 - psi_eq) + n * (n - 1) * (0.5 * (psi_aa + psi_bb) - psi_ab)


# -----------------------------------------------------------------------------
# the statistics


@pytest.mark.parametrize("prenormalized", [True, False])
def test_unit_norm_states_give_d_squared_equal_two_upsilon(prenormalized):
    g = torch.Generator().manual_seed(0)
    h_a = torch.randn(3, 9, 6, generator=g, dtype=torch.float64) * 3
    h_b = torch.randn(3, 9, 6, generator=g, dtype=torch.float64) + 0.5 * h_a  # correlated branches
    if prenormalized:
        h_a, h_b = h_a / h_a.norm(dim=-1, keepdim=True), h_b / h_b.norm(dim=-1, keepdim=True)
    lengths = torch.tensor([9, 5, 1])
    s = branch_statistics(h_a, h_b, lengths, normalize=not prenormalized)
    n = torch.arange(1, 10, dtype=torch.float64)
    upsilon = upsilon_of(s["psi_eq"], torch.nan_to_num(s["psi_AA"]), torch.nan_to_num(s["psi_BB"]),
                         torch.nan_to_num(s["psi_AB"]), n)
    for p, length in enumerate(lengths.tolist()):
        torch.testing.assert_close(s["D"][p, :length] ** 2, 2 * upsilon[p, :length], rtol=1e-12, atol=1e-12)
        assert torch.isnan(s["D"][p, length:]).all()
    # over pairs: D_mean^2 + D_std^2 = mean D^2 = 2 Upsilon(pair-averaged psi), where all pairs reach n
    accumulator = Accumulator(9)
    accumulator.add(s)
    table = accumulator.table()
    np.testing.assert_allclose(table["D_mean"] ** 2 + table["D_std"] ** 2, 2 * table["upsilon"], rtol=1e-10)
    assert table["pairs"].tolist() == [3] + [2] * 4 + [1] * 4


def test_identical_branches():
    h = torch.randn(2, 6, 4, dtype=torch.float64)
    s = branch_statistics(h, h.clone(), torch.tensor([6, 6]))
    assert torch.all(s["D"] == 0)
    torch.testing.assert_close(s["psi_eq"], torch.ones(2, 6, dtype=torch.float64))
    torch.testing.assert_close(s["psi_AA"][:, 1:], s["psi_AB"][:, 1:])
    torch.testing.assert_close(s["psi_BB"][:, 1:], s["psi_AB"][:, 1:])
    accumulator = Accumulator(6)
    accumulator.add(s)
    table = accumulator.table()
    np.testing.assert_allclose(table["upsilon"], 0, atol=1e-12)
    assert np.all(np.isnan(table["n_b"]))  # (1 - psi_eq) / (psi_AA - psi_AB) = 0/0 is guarded, not inf


def test_hand_worked_three_vectors():
    # A: (1,0), (0,1), (-1,0); B: (1,0), (2,2), (0,3) -- B's norms differ: cosines ignore them, D does not
    h_a, h_b = one_pair([[1, 0], [0, 1], [-1, 0]], [[1, 0], [2, 2], [0, 3]])
    s = {k: v[0].tolist() for k, v in branch_statistics(h_a, h_b, torch.tensor([3])).items()}
    # D(1) = |0|, D(2) = |(1,1) - (3,2)| = sqrt(5), D(3) = |(0,1) - (3,5)| = 5
    assert s["D"] == pytest.approx([0, math.sqrt(5), 5])
    assert s["psi_eq"] == pytest.approx([1, (1 + SQ) / 2, (1 + SQ + 0) / 3])
    assert math.isnan(s["psi_AA"][0]) and math.isnan(s["psi_AB"][0])
    # n = 2: cos(a1,a2) = 0; cos(b1,b2) = SQ; cos(a1,b2) = SQ, cos(a2,b1) = 0
    # n = 3: AA pairs 0, -1, 0; BB pairs SQ, 0, SQ; AB off-diagonal SQ, 0, 0, 1, -1, -SQ
    assert s["psi_AA"][1:] == pytest.approx([0, -1 / 3])
    assert s["psi_BB"][1:] == pytest.approx([SQ, 2 * SQ / 3])
    assert s["psi_AB"][1:] == pytest.approx([SQ / 2, 0])
    accumulator = Accumulator(3)
    accumulator.add(branch_statistics(h_a, h_b, torch.tensor([3])))
    table = accumulator.table()
    psi_eq3, aa3, ab3 = (1 + SQ) / 3, 0.5 * (-1 / 3 + 2 * SQ / 3), 0.0
    assert table["psi_AA"][2] == pytest.approx(aa3)
    assert table["upsilon"][2] == pytest.approx(3 * (1 - psi_eq3) + 6 * (aa3 - ab3))
    assert table["n_b"][2] == pytest.approx((1 - psi_eq3) / (aa3 - ab3) - 1)
    assert table["upsilon"][0] == pytest.approx(0)  # n = 1: psi_eq = 1 and no cross term


def test_padding_past_a_pair_does_not_leak():
    g = torch.Generator().manual_seed(1)
    h_a, h_b = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    short = branch_statistics(h_a[1:, :3], h_b[1:, :3], torch.tensor([3]))
    h_a[1, 3:], h_b[1, 3:] = 1e6, -1e6  # garbage past pair 1's end
    both = branch_statistics(h_a, h_b, torch.tensor([5, 3]))
    for k in short:
        torch.testing.assert_close(both[k][1, :3], short[k][0], equal_nan=True)


def test_lambda_fit_recovers_planted_value():
    upsilon = np.linspace(1, 200, 50) ** 1.3
    x = np.sqrt(upsilon)
    noise = np.random.default_rng(0).normal(size=50)
    noise -= (noise @ x) / (x @ x) * x  # orthogonal to the regressor: least squares must return lambda exactly
    lam, r2 = fit_lambda(0.37 * x + 0.01 * noise, upsilon)
    assert lam == pytest.approx(0.37, rel=1e-12)
    assert 0.99 < r2 < 1
    assert fit_lambda(2.5 * x, upsilon) == pytest.approx((2.5, 1.0))


# -----------------------------------------------------------------------------
# the CLI on a tiny random Llama

TINY_LLAMA = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2)
PAIRS = [
    {"prefix": "What colour is the shape in row 2, column 3?", "a": "The shape is red.", "b": "There are 3 circles."},
    {"prefix": "Describe the image in detail.", "a": "A 4 by 5 grid: a red circle.", "b": "Yes"},
    {"prefix": "Is there a blue triangle?", "a": "No", "b": "Yes, a blue triangle in the image."},
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, llama_tokenizer_dir):
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    LlamaForCausalLM(HFLlamaConfig(**TINY_LLAMA)).save_pretrained(folder, safe_serialization=True)
    shutil.copy(Path(llama_tokenizer_dir) / "tokenizer.model", folder / "tokenizer.model")
    return folder


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], np.array(rows[1:], dtype=float)


def reference_table(llama_dir, pairs, layer, n_max):
    """D(n) and psi_eq(n) means over pairs, from transformers hidden states and numpy, one pair at a time."""
    sp = sentencepiece.SentencePieceProcessor(model_file=str(llama_dir / "tokenizer.model"))
    hf = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    per_n = {}
    for pair in pairs:
        prefix = [1] + sp.encode(pair["prefix"])
        a, b = sp.encode(pair["a"]), sp.encode(pair["b"])
        n = min(len(a), len(b), n_max)
        states = []
        for branch in (a, b):
            with torch.no_grad():
                out = hf(torch.tensor([prefix + branch[:n]]), output_hidden_states=True)
            states.append(out.hidden_states[layer][0, len(prefix):].double().numpy())
        diff = np.cumsum(states[0] - states[1], axis=0)
        cos = (states[0] * states[1]).sum(-1) / np.linalg.norm(states[0], axis=-1) / np.linalg.norm(states[1], axis=-1)
        for i in range(n):
            per_n.setdefault(i + 1, []).append((np.linalg.norm(diff[i]), cos[:i + 1].mean()))
    return {n: np.array(v).mean(0) for n, v in sorted(per_n.items())}, {n: len(v) for n, v in per_n.items()}


def test_cli_end_to_end_matches_transformers(tmp_path, llama_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "divergence.py"), f"--data={data}", f"--llama_path={llama_dir}",
           f"--out_dir={out}", "--device=cpu", "--dtype=float32", "--batch_size=2", "--n_max=8", "--layer=1"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg"))
    assert run.returncode == 0, run.stderr
    assert "batch 2/2" in run.stdout and "lambda =" in run.stdout
    header, table = read_csv(out / "divergence.csv")
    assert header == CSV_COLUMNS
    assert (out / "divergence.png").stat().st_size > 10_000
    expected, counts = reference_table(llama_dir, PAIRS, layer=1, n_max=8)
    col = {name: table[:, i] for i, name in enumerate(header)}
    assert col["n"].tolist() == list(expected)
    assert col["pairs"].tolist() == [counts[n] for n in expected]
    np.testing.assert_allclose(col["D_mean"], [v[0] for v in expected.values()], rtol=1e-4)
    np.testing.assert_allclose(col["psi_eq"], [v[1] for v in expected.values()], rtol=1e-4, atol=1e-6)
    lam = (col["D_mean"] @ np.sqrt(col["upsilon"])) / col["upsilon"].sum()
    np.testing.assert_allclose(col["fit"], lam * np.sqrt(col["upsilon"]), rtol=1e-6)


def test_cli_normalized_identity_and_orca_rows(tmp_path, llama_dir, capsys):
    orca = [{"system": "You are helpful.", "question": p["prefix"], "chosen": p["a"], "rejected": p["b"]} for p in PAIRS]
    data = write_jsonl(tmp_path / "orca_rlhf.jsonl", orca)
    main([f"--data={data}", f"--llama_path={llama_dir}", f"--out_dir={tmp_path}", "--device=cpu",
          "--dtype=float32", "--normalize=True"])
    assert "unit-norm identity" in capsys.readouterr().out
    header, table = read_csv(tmp_path / "divergence.csv")
    col = {name: table[:, i] for i, name in enumerate(header)}
    assert col["pairs"].min() < len(PAIRS)  # at every n both sides average over the pairs that reach n
    np.testing.assert_allclose(col["D_mean"] ** 2 + col["D_std"] ** 2, 2 * col["upsilon"], rtol=1e-5)
    assert np.all(col["D_mean"] <= np.sqrt(2 * col["upsilon"]) + 1e-6)  # Jensen


def test_orca_prefix_is_the_llama2_chat_turn(llama_tokenizer_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(Path(llama_tokenizer_dir) / "tokenizer.model"))
    row = json.dumps({"system": "Be brief.", "question": "Is there a blue triangle?", "chosen": "Yes", "rejected": "No"})
    prefix, a, b = tokenize_pair(LLMTokenizer(llama_tokenizer_dir), *text_pair(row), n_max=512, max_seq_len=4096)
    assert prefix == [1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n") + sp.encode(
        "Is there a blue triangle?") + sp.encode("[/INST]")
    assert b == sp.encode("No") and a == sp.encode("Yes")[:len(b)]  # both cut to the shorter branch
    no_system = json.dumps({"system": "", "question": "Q?", "chosen": "Yes", "rejected": "No"})
    assert tokenize_pair(LLMTokenizer(llama_tokenizer_dir), *text_pair(no_system), 512, 4096)[0] == [1] + sp.encode("[INST]") + sp.encode(
        "Q?") + sp.encode("[/INST]")


# -----------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("bad_line, reason", [
    ('{"prefix": "Q", "a": "yes", "b": ', "not valid JSON"),
    ('{"prefix": "Q", "a": "  ", "b": "no"}', "branch 'a' is empty"),
    ('{"system": "", "question": "Q", "chosen": "yes", "rejected": ""}', "branch 'rejected' is empty"),
    ('{"prefix": "Q", "a": "yes"}', "needs fields prefix, a, b"),
    ('{"prefix": "Q", "a": 3, "b": "no"}', "field 'a' must be a string"),
])
def test_bad_row_names_file_and_line(tmp_path, llama_tokenizer_dir, bad_line, reason):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], "", bad_line])  # line 2 blank, the bad row is line 3
    with pytest.raises(InputError) as e:
        main([f"--data={data}", f"--llama_path={llama_tokenizer_dir}", "--device=cpu"])
    assert f"{data}:3: " in str(e.value) and reason in str(e.value)


def test_skip_bad_counts_and_lists(tmp_path, capsys):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], "{oops", PAIRS[1], '{"prefix": "Q", "a": "", "b": "x"}'])
    pairs = read_pairs(Config(data=str(data), skip_bad=True), text_pair)
    assert [where for where, _ in pairs] == [f"{data}:1", f"{data}:3"]
    out = capsys.readouterr().out
    assert "skipped 2 bad rows" in out and f"{data}:2: not valid JSON" in out and f"{data}:4: branch 'a'" in out


def test_prefix_leaving_no_room_is_named(tmp_path, llama_tokenizer_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0]])
    with pytest.raises(InputError, match=r"pairs.jsonl:1: the prefix is \d+ tokens, max_seq_len=4"):
        main([f"--data={data}", f"--llama_path={llama_tokenizer_dir}", "--max_seq_len=4"])


# -----------------------------------------------------------------------------
# vision mode on a tiny FusedVLM checkpoint


def test_vision_mode_identical_images_do_not_diverge(tmp_path, llama_dir, clip_vocab_dir, draw_image):
    with open(Path(clip_vocab_dir) / "vocab.json") as f:
        clip_vocab = len(json.load(f))
    model_cfg = FusedVLMConfig(
        vit=ViTConfig(image_size=28, patch_size=7, width=32, layers=1, heads=4, mlp=64),
        llm=LlamaConfig(vocab_size=400, dim=32, layers=2, heads=4, kv_heads=2, mlp=64, eps=1e-5),
        fused_layers=1, fused_heads=4, fused_mlp=64, fused_vocab_size=clip_vocab, n_queries=7, bridge_init_std=0.5)
    torch.manual_seed(0)
    vlm = FusedVLM(model_cfg)
    meta = {"stage": "gen", "model_config": asdict(model_cfg), "clip_path": str(clip_vocab_dir),
            "llama_path": str(llama_dir),
            "token_space": {"image_size": 28, "num_crops": 4, "n_l": 8, "n_s": 2, "drop_question": False,
                            "max_seq_len": 256, "system_prompt": "Be brief."}}
    save_checkpoint(str(tmp_path / "ckpt.safetensors"), {"model." + k: v for k, v in vlm.trainable_state_dict().items()},
                    meta)
    for i, (w, h) in enumerate([(40, 30), (30, 50), (28, 28)]):
        draw_image(w, h, seed=i).save(tmp_path / f"{i}.png")
    rows = [{"image_a": "0.png", "image_b": "1.png", "question": "What colour is the shape?"},
            {"image_a": "2.png", "image_b": "2.png", "question": "How many circles are there?"}]
    for i, row in enumerate(rows):
        write_jsonl(tmp_path / f"pairs{i}.jsonl", [row])
    tables = [main([f"--data={tmp_path}/pairs{i}.jsonl", f"--ckpt={tmp_path}/ckpt.safetensors", "--vision=True",
                    f"--out_dir={tmp_path}/out{i}", "--n_max=6", "--device=cpu", "--dtype=float32"])[0]
              for i in range(2)]
    different, same = tables
    assert different["n"].tolist() == same["n"].tolist() == list(range(1, 7))  # n_max slots
    assert np.all(different["D_mean"] > 0) and np.all(different["psi_eq"] < 1)
    np.testing.assert_allclose(same["D_mean"], 0, atol=1e-5)
    np.testing.assert_allclose(same["psi_eq"], 1, atol=1e-6)
    assert (tmp_path / "out0" / "divergence.csv").exists() and (tmp_path / "out0" / "divergence.png").exists()


def test_vision_mode_bad_row_named(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [{"image_a": "missing.png", "image_b": "x.png", "question": "Q"}])
    with pytest.raises(InputError, match=f"pairs.jsonl:1: image not found: {tmp_path}/missing.png"):
        read_pairs(Config(data=str(data)), lambda record: image_pair(record, str(tmp_path)))
