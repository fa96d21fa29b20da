"""train_gen.py and evaluate.py with today's LLMs: a Qwen2-style (q/k/v biases, tied embeddings, ChatML, no bos) and
a Llama-3.1-style (llama3 RoPE scaling, <|eot_id|>) tiny checkpoint folder with a tokenizer.json, on the synthetic
world; and the Qwen2-style LLM loaded into FSDP shards on 2 processes.

References: the family's own chat template (apply_chat_template) for the evaluation prompt, a greedy loop here over
the token space rebuilt from the checkpoint for the predictions, and the one-process run for the FSDP run's losses.
"""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

import benchmarks as bm
import evaluate as ev
from backbones import Llama
from checkpoint import load_checkpoint, trained_vlm
from fusion import TokenSpace, TokenSpaceConfig, collate
from model import FusedVLMConfig
from tiny_llms import save_llm

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--num_crops=0", "--max_iters=3", "--log_interval=1", "--lr=3e-3"]


def train_args(world, llm, out, layout):
    return [str(ROOT / "config" / "tiny.py"), f"--data_dir={world}", f"--clip_path={world}/clip", f"--llama_path={llm}",
            f"--out_dir={out}", f"--chat_template={layout}", *SETTINGS]


def losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def llm_folders(tmp_path_factory):
    folders = {}
    for layout in ("chatml", "llama-3"):
        folders[layout] = tmp_path_factory.mktemp(layout)
        save_llm(folders[layout], layout)
    return folders


@pytest.mark.parametrize("layout", ["chatml", "llama-3"])
def test_train_gen_trains_and_evaluate_evaluates_with_the_layout(synthetic_world, llm_folders, tmp_path, monkeypatch,
                                                                layout):
    world, llm, out = synthetic_world, llm_folders[layout], tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["train_gen.py", *train_args(world, llm, out, layout), "--batch_size=2",
                                      "--grad_accum=2"])
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "train_gen.py"), run_name="__main__")
    assert len(losses(out)) == 3 and all(loss == loss for loss in losses(out))
    tensors, meta = load_checkpoint(str(out))
    assert meta["token_space"]["chat_template"] == layout and meta["llama_path"] == str(llm)

    ev.main([f"--ckpt={out}", "--benchmarks=SYNTH_VQA", f"--bench_dir={world / 'bench'}", f"--out_dir={tmp_path / 'eval'}",
             "--batch_size=2"])
    [predictions_file] = (tmp_path / "eval").glob("*/predictions_SYNTH_VQA.jsonl")
    predictions = [json.loads(line) for line in predictions_file.read_text().splitlines()]
    rows = bm.load_benchmark("SYNTH_VQA", str(world / "bench" / "SYNTH_VQA.tsv"))
    assert [p["index"] for p in predictions] == [row.index for row in rows]

    # each prediction: a greedy loop over the family's own template (slots aside), decoded by its tokenizer
    space = TokenSpace(TokenSpaceConfig(clip_path=f"{world}/clip", llama_path=str(llm), **meta["token_space"]))
    vlm = trained_vlm(FusedVLMConfig.from_dict(meta["model_config"]),
                      {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                      Llama.from_hf(str(llm)), str(out)).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llm)
    for row, prediction in zip(rows, predictions):
        sample = space.generation_sample(row.images()[-1], row.prompt)
        messages = [{"role": "system", "content": meta["token_space"]["system_prompt"]},
                    {"role": "user", "content": row.prompt}]
        template = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        assert sample["input_ids"][~sample["slot_mask"]].tolist() == template
        with torch.no_grad():
            ids = vlm.generate(collate([sample], pad_side="left"), eos_token_id=space.eos, min_new_tokens=1,
                               max_new_tokens=bm.benchmark_spec("SYNTH_VQA").max_new_tokens)[0]
        assert prediction["prediction"] == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_fsdp_loads_a_qwen2_llm_into_shards(synthetic_world, llm_folders, tmp_path, monkeypatch):
    # the same 3 steps on 2 FSDP ranks (each reading only its shards of the LLM, biases and tied head included)
    # and in one process: equal losses up to float rounding
    world, llm = synthetic_world, llm_folders["chatml"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_gen.py", *train_args(world, llm, tmp_path / "fsdp", "chatml"), "--fsdp=True",
                             "--batch_size=2", "--grad_accum=1"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    monkeypatch.setattr(sys, "argv", ["train_gen.py", *train_args(world, llm, tmp_path / "one", "chatml"),
                                      "--batch_size=2", "--grad_accum=2"])
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "train_gen.py"), run_name="__main__")
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)


def test_the_llama3_recipe_is_the_papers_stage_2_with_another_llm():
    def keys(name):
        return {k: v for k, v in runpy.run_path(str(ROOT / "config" / name)).items()
                if not k.startswith("_") and type(v).__name__ != "module"}
    paper, llama3 = keys("paper_gen.py"), keys("llama3_gen.py")
    changed = {k for k in llama3 if paper.get(k) != llama3[k]}
    assert changed == {"out_dir", "llama_path", "chat_template"} and paper.keys() <= llama3.keys()
    assert llama3["chat_template"] == "llama-3"
