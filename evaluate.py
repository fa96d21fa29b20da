"""
Run checkpoints over benchmarks and score their answers the way VLMEvalKit does (the rules: benchmarks.py).

    python evaluate.py --ckpt=out/ft-64 --benchmarks=MME,POPE,TextVQA_VAL --bench_dir=LMUData --out_dir=out-eval
    python evaluate.py --ckpt=out/ft-1,out/ft-8,out/ft-16 --benchmarks=POPE ...  # a sweep into one results.csv
    python evaluate.py --ckpt=out/ft-64 --drop_question=True ...                 # the VQ ablation
    python evaluate.py --ckpt=out/ft-64 --image_ablation=shuffle ...             # every row shown another's image
    python evaluate.py --ckpt=out/ft-64 --limit=100 ...                          # a quick check on 100 rows each
    python evaluate.py --ckpt=out/ft-64 --benchmarks=MYSET --kind=mcq ...        # a TSV of your own: MYSET.tsv
    torchrun --standalone --nproc_per_node=8 evaluate.py --ckpt=... ...          # rows shared out over 8 GPUs
    python evaluate.py --score_only=True --benchmarks=POPE --predictions=preds.jsonl --variant=VQQ --n_l=64 --n_s=8

Running a checkpoint (a folder holding ckpt.safetensors, or the file; stage-2/3 "gen" checkpoints only): the frozen
LLM comes from the checkpoint's llama_path, everything else from the checkpoint. The token space is the one the
checkpoint was trained with (its meta "token_space") unless --n_l, --num_crops or --drop_question say otherwise.
Decoding as the authors evaluated: greedy, at least one new token (EOS banned at the first step), stop at </s>,
the new tokens decoded without special tokens and stripped; max_new_tokens per benchmark (benchmarks.BENCHMARKS);
left-padded batches with the KV cache. Every image goes through VLMEvalKit's JPEG (quality 75) round trip first.
A row with several images (SEEDBench2) is shown its last image only, as the authors' wrapper did: the model reads
one image per question. float32 on CPU, bfloat16 on GPU unless --dtype.

Per checkpoint, <out_dir>/<variant>_nl<n_l>/ holds predictions_<benchmark>.jsonl and run.json (the settings they
were made with). A predictions line is {"index", "prediction", "prompt", "extracted", "score"}: extracted is the
answer as the scorer read it (null: unreadable), score the row's own score (absent for BLEU and CIDEr, which are
corpus metrics). Lines are appended and flushed after every batch; when a benchmark is done the file is rewritten
in the TSV's row order. Rerunning the same command resumes: predicted rows are kept (an incomplete last line is
cut off), only the rest is generated, and a benchmark that results.csv already holds for this variant, n_l, n_s,
ckpt and number of rows is not scored twice. The variant label defaults to the paper's names: VQQ (question
fused), VQ (a VQQ checkpoint run with drop_question=True), VQ-ft (a checkpoint fine-tuned and run with
drop_question=True); a checkpoint of another compressor (model.py: pool, resampler) is labelled by its name and
refuses drop_question=True; --image_ablation=shuffle appends "-shuffled".

Under torchrun the batches are dealt out to the ranks in turn (batch j to rank j % world size, each batch made
exactly as one process makes it, so the answers are the same); each rank appends to predictions_<b>.jsonl.rank<r>,
and rank 0 merges those into the predictions file (also the leftovers of an interrupted run) and scores.
"""
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from backbones import Llama
from benchmarks import benchmark_spec, check_indices, limit_rows, load_benchmark, score
from checkpoint import checkpoint_file, inference_vlm, read_gen_checkpoint
from configurator import InputError, parse_config, report_input_errors
from fusion import TokenSpace, TokenSpaceConfig, collate
from model import FusedVLMConfig
from predictions import (already_scored, append_results, claim_run_dir, merge_predictions, print_table,
                         read_prediction_records, read_predictions)
from training import Run, lock_folder

# -----------------------------------------------------------------------------
# config


@dataclass
class Config:
    ckpt: str = ""              # checkpoint folder(s) or file(s), comma-separated; score_only: only a label
    benchmarks: str = "POPE"    # names of benchmarks.BENCHMARKS, or of your own TSVs with --kind; comma-separated
    kind: str = ""              # yes_no | mcq | vqa | caption: how to prompt and score a TSV whose name is not built in
    bench_dir: str = "bench"    # where <benchmark>.tsv lives
    tsv: str = ""               # the file of a single benchmark; default <bench_dir>/<benchmark>.tsv
    out_dir: str = "out-eval"   # results.csv, and one predictions folder per checkpoint
    variant: str = ""           # the results label; default VQQ, VQ or VQ-ft (see above); score_only: "model"
    limit: int = 0              # > 0: a fixed subset of this many rows per benchmark (not the paper's number)
    # token space; None = as the checkpoint was trained (score_only: n_l and n_s are only labels)
    n_l: int | None = None
    n_s: int | None = None      # a label when running: every benchmark question is a first question (n_l)
    num_crops: int | None = None
    drop_question: bool | None = None  # True: the VQ ablation (the fused model does not see the question)
    image_ablation: str = ""    # "shuffle": every row is shown another row's image (does the model read it?)
    llama_path: str = ""        # "" = the checkpoint's (set it when the weights have moved)
    clip_path: str = ""
    # generation
    batch_size: int = 8
    jpeg_reencode: bool = True  # VLMEvalKit's JPEG q75 round trip of every image (needed to compare numbers)
    device: str = ""            # "" = cuda when there is one, else cpu (under torchrun: this rank's GPU)
    dtype: str = ""             # float32 | bfloat16 | float16; "" = bfloat16 on GPU, float32 on CPU
    # score an existing predictions file instead of running a model
    score_only: bool = False
    predictions: str = ""       # JSONL, one {"index": ..., "prediction": "..."} per line


# -----------------------------------------------------------------------------
# running checkpoints

VARIANTS = {(False, False): "VQQ", (False, True): "VQ", (True, True): "VQ-ft"}  # (drop_question trained, run)


def torch_dtype(cfg, device):
    dtype = cfg.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def run_settings(cfg, meta, model_cfg, path):
    """-> (TokenSpaceConfig, variant): the checkpoint's token space with the command line's overrides."""
    trained = meta["token_space"]
    drop_question = trained["drop_question"] if cfg.drop_question is None else cfg.drop_question
    if drop_question and model_cfg.compressor != "fused":
        raise InputError(f"{path}: drop_question=True is the fused model's VQ ablation; this checkpoint's "
                         f"compressor={model_cfg.compressor} never reads the question")
    ts_cfg = TokenSpaceConfig(clip_path=cfg.clip_path or meta["clip_path"],
                              llama_path=cfg.llama_path or meta["llama_path"], image_size=trained["image_size"],
                              num_crops=trained["num_crops"] if cfg.num_crops is None else cfg.num_crops,
                              n_l=trained["n_l"] if cfg.n_l is None else cfg.n_l,
                              n_s=trained["n_s"] if cfg.n_s is None else cfg.n_s,
                              drop_question=drop_question, max_seq_len=trained["max_seq_len"],
                              system_prompt=trained["system_prompt"],
                              chat_template=trained["chat_template"])
    if ts_cfg.n_l - 1 > model_cfg.n_queries:
        raise InputError(f"{path}: n_l={ts_cfg.n_l} needs {ts_cfg.n_l - 1} learned queries, the checkpoint has "
                         f"{model_cfg.n_queries}")
    # the paper's names label fused models; another compressor is labelled by its name (pool, resampler)
    variant = cfg.variant or (VARIANTS.get((trained["drop_question"], drop_question)) if model_cfg.compressor == "fused"
                              else model_cfg.compressor)
    if variant is None:
        raise InputError(f"{path} was trained with drop_question=True and runs with the question: name this "
                         f"combination with --variant")
    return ts_cfg, variant


def shuffle_images(rows):
    """The image ablation: every row is shown another row's image. The distinct images of the file (rows may share
    one: MME's two questions, POPE's six) are put in a fixed shuffled order and each is replaced by the next one
    (the last by the first), so no row keeps its image, rows that shared an image still share one, and a row's
    replacement depends on the file alone (the same with --limit and on any number of ranks)."""
    images = list(dict.fromkeys(tuple(row.images_b64) for row in rows))
    if len(images) < 2:
        raise InputError(f"{rows[0].source}: --image_ablation=shuffle needs at least two different images")
    random.Random(0).shuffle(images)
    shown = {image: list(images[(k + 1) % len(images)]) for k, image in enumerate(images)}
    return [dataclasses.replace(row, images_b64=shown[tuple(row.images_b64)]) for row in rows]


def greedy_answers(vlm, token_space, samples, max_new_tokens, device, dtype):
    """The decoding described at the top for one batch of samples (TokenSpace.make_sample, each ending in a
    question), left-padded -> (the answer texts, the new token ids of each). sample.py and lmms_eval_model.py
    decode with it too."""
    batch = {k: v.to(device) for k, v in collate(samples, pad_side="left").items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    answers = vlm.generate(batch, max_new_tokens=max_new_tokens, eos_token_id=token_space.eos, min_new_tokens=1)
    return [token_space.tokenizer.decode(ids).strip() for ids in answers], answers


def predict(vlm, token_space, todo, part_path, max_new_tokens, cfg, device, dtype, tag, rank, world_size):
    """Greedy answers for this rank's batches of `todo` (batch j goes to rank j % world_size), appended to
    part_path batch by batch. Returns the number of samples generated."""
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)][rank::world_size]
    mine = sum(len(chunk) for chunk in batches)
    t_start, new_tokens, done = time.time(), 0, 0
    with open(part_path, "a", encoding="utf-8") as f:
        for chunk in batches:
            t_batch = time.time()
            samples = [token_space.generation_sample(row.images(cfg.jpeg_reencode)[-1], row.prompt) for row in chunk]
            texts, answers = greedy_answers(vlm, token_space, samples, max_new_tokens, device, dtype)
            for row, text in zip(chunk, texts):
                f.write(json.dumps({"index": row.index, "prediction": text, "prompt": row.prompt},
                                   ensure_ascii=False) + "\n")
            f.flush()
            dt, tokens = time.time() - t_batch, sum(len(ids) for ids in answers)
            new_tokens, done = new_tokens + tokens, done + len(chunk)
            print(f"{tag} {done}/{mine} | {len(chunk) / dt:.2f} samples/s | {tokens / dt:.1f} new tok/s")
    if mine:
        dt = time.time() - t_start
        print(f"{tag} {mine} samples, {new_tokens} new tokens in {dt:.1f} s "
              f"({mine / dt:.2f} samples/s, {new_tokens / dt:.1f} new tok/s)")
    return mine


def benchmark_files(cfg, names):
    """{name: TSV path}, after checking that every name is a benchmark (built in, or --kind given)."""
    for name in names:
        benchmark_spec(name, cfg.kind)
    if cfg.tsv and len(names) > 1:
        raise InputError("--tsv names the file of a single benchmark; with several use --bench_dir")
    if cfg.image_ablation not in ("", "shuffle"):
        raise InputError(f"image_ablation must be shuffle or empty, got {cfg.image_ablation!r}")
    return {n: cfg.tsv or os.path.join(cfg.bench_dir, n + ".tsv") for n in names}


def load_rows(cfg, name, tsv):
    """(every row of the file, with the image ablation applied; the rows to run and score: the --limit subset)."""
    rows = load_benchmark(name, tsv, cfg.kind)
    if cfg.image_ablation == "shuffle":
        rows = shuffle_images(rows)
    return rows, limit_rows(name, rows, cfg.limit, cfg.kind)


def evaluate_checkpoints(cfg, run):
    device, rank, world_size = run.device, run.rank, run.world_size
    dtype = torch_dtype(cfg, device)
    names, ckpts = [n for n in cfg.benchmarks.split(",") if n], [c for c in cfg.ckpt.split(",") if c]
    if not ckpts:
        raise InputError("give --ckpt=DIR[,DIR2,...] (or --score_only=True)")
    if not names:
        raise InputError("give --benchmarks=NAME[,NAME2,...]")
    tsv_of = benchmark_files(cfg, names)
    missing = [p for p in list(tsv_of.values()) + [checkpoint_file(c) for c in ckpts] if not os.path.isfile(p)]
    if missing:
        raise InputError(f"not found: {missing} (benchmark TSVs go in --bench_dir as <NAME>.tsv; a checkpoint is a "
                         f"folder with ckpt.safetensors or the file)")
    results_path = os.path.join(cfg.out_dir, "results.csv")
    if rank == 0:  # one evaluation per out_dir at a time: two would interleave results.csv and the predictions
        os.makedirs(cfg.out_dir, exist_ok=True)
        lock_folder(cfg.out_dir)
    scored = already_scored(results_path)
    log = run.log
    log(f"{len(ckpts)} checkpoint(s) x {len(names)} benchmark(s) on {world_size} x {device.type} in {dtype}; "
        f"results -> {results_path}" + (f"; at most {cfg.limit} rows per benchmark (a fixed subset, whose "
                                         f"score is not the benchmark's)" if cfg.limit else ""))
    run_dirs, llm, llm_source, generated, t_start = {}, None, None, 0, time.time()
    for ckpt in ckpts:
        path = checkpoint_file(ckpt)
        weights, meta = read_gen_checkpoint(path)
        model_cfg = FusedVLMConfig.from_dict(meta["model_config"])
        ts_cfg, variant = run_settings(cfg, meta, model_cfg, path)
        variant += "-shuffled" if cfg.image_ablation == "shuffle" else ""
        run_dir = os.path.join(cfg.out_dir, f"{variant}_nl{ts_cfg.n_l}")
        if run_dir in run_dirs:
            raise InputError(f"{ckpt} and {run_dirs[run_dir]} would both write {run_dir}: evaluate them in separate "
                             f"calls with different --out_dir or --variant")
        run_dirs[run_dir] = ckpt
        if rank == 0:
            claim_run_dir(run_dir, {"ckpt": os.path.abspath(path), "variant": variant, "n_l": ts_cfg.n_l,
                                    "n_s": ts_cfg.n_s, "num_crops": ts_cfg.num_crops, "image_size": ts_cfg.image_size,
                                    "drop_question": ts_cfg.drop_question, "image_ablation": cfg.image_ablation,
                                    "jpeg_reencode": cfg.jpeg_reencode, "dtype": str(dtype).removeprefix("torch.")})
        run.barrier()
        tag = f"[{variant} n_l={ts_cfg.n_l}" + (f" rank {rank}/{world_size}]" if world_size > 1 else "]")
        vlm = token_space = None
        for name in names:
            all_rows, rows = load_rows(cfg, name, tsv_of[name])
            if (variant, name, str(ts_cfg.n_l), str(ts_cfg.n_s), ckpt, str(len(rows))) in scored:
                log(f"{tag} {name}: {len(rows)} rows of {ckpt} already in {results_path}; not redone")
                continue
            if vlm is None:  # built only when something is to be done
                log(f"{tag} {ckpt}: token space {asdict(ts_cfg)}")
                token_space = TokenSpace(ts_cfg)
                if llm_source != (ts_cfg.llama_path, model_cfg.llm):  # a sweep shares one LLM: load it once
                    llm = None  # frees the previous one first
                    llm = Llama.from_hf(ts_cfg.llama_path, dtype=dtype).to(device)
                    llm_source = (ts_cfg.llama_path, model_cfg.llm)
                vlm = inference_vlm(model_cfg, weights, llm, path, device, dtype)
            predictions_path = os.path.join(run_dir, f"predictions_{name}.jsonl")
            if rank == 0:  # an interrupted run's predictions, and its ranks' leftovers, into one file first
                merge_predictions(predictions_path, name, all_rows, cfg.kind)
            run.barrier()
            done = (read_prediction_records(predictions_path, allow_empty=True)  # empty: killed before a line
                    if os.path.exists(predictions_path) else {})
            todo = [row for row in rows if row.index not in done]
            several = sum(len(row.images_b64) > 1 for row in rows)
            log(f"{tag} {name}: {len(rows)} rows, {len(rows) - len(todo)} already in {predictions_path}, "
                f"{len(todo)} to generate" + (f"; {several} rows hold several images, each is shown its last one"
                                              if several else ""))
            part_path = predictions_path if world_size == 1 else f"{predictions_path}.rank{rank}"
            generated += predict(vlm, token_space, todo, part_path, benchmark_spec(name, cfg.kind).max_new_tokens,
                                 cfg, device, dtype, f"{tag} {name}", rank, world_size)
            run.barrier()
            if rank == 0:
                predictions = merge_predictions(predictions_path, name, all_rows, cfg.kind)
                predictions = {row.index: predictions[row.index] for row in rows}
                scores = score(name, rows, predictions, source=predictions_path, kind=cfg.kind)
                append_results(results_path, variant, name, ts_cfg.n_l, ts_cfg.n_s, scores, ckpt, len(rows))
                print_table(f"{tag} {name}", scores, len(rows))
        del weights, vlm
    print(f"done{f' (rank {rank})' if world_size > 1 else ''}: {generated} samples generated in "
          f"{time.time() - t_start:.1f} s; results in {results_path}")


def score_predictions_file(cfg):
    """--score_only: a predictions file of any model against one benchmark (its --limit subset with --limit)."""
    if not cfg.predictions:
        raise InputError("--score_only=True needs --predictions=FILE.jsonl")
    if "," in cfg.benchmarks:
        raise InputError(f"--score_only scores one benchmark, got {cfg.benchmarks!r}")
    name = cfg.benchmarks
    all_rows, rows = load_rows(cfg, name, benchmark_files(cfg, [name])[name])
    predictions = read_predictions(cfg.predictions)
    check_indices(name, all_rows, predictions, cfg.predictions)
    subset = {row.index for row in rows}  # with --limit, the predictions of the rows left out are not scored
    predictions = {index: p for index, p in predictions.items() if index in subset}
    scores = score(name, rows, predictions, source=cfg.predictions, kind=cfg.kind)
    append_results(os.path.join(cfg.out_dir, "results.csv"), cfg.variant or "model", name, cfg.n_l or 0,
                   cfg.n_s or 0, scores, cfg.ckpt, len(rows))  # unset labels written as 0
    print_table(name, scores, len(rows))


# -----------------------------------------------------------------------------


def main(argv):
    cfg, positional = parse_config(Config(), argv)
    if positional:
        raise InputError(f"evaluate.py takes no positional arguments, got {positional}")
    if cfg.batch_size <= 0 or cfg.limit < 0:  # before any model is loaded: batch_size 0 once divided by zero after it
        raise InputError(f"batch_size must be >= 1 and limit >= 0, got {cfg.batch_size} and {cfg.limit} (pass "
                         f"--batch_size=N)")
    if cfg.score_only:
        return score_predictions_file(cfg)
    run = Run(cfg.device)
    try:
        evaluate_checkpoints(cfg, run)
    finally:
        run.close(barrier=False)  # no barrier: a rank that stopped on an error would leave the others waiting
    run.end()


if __name__ == "__main__":
    report_input_errors()
    main(sys.argv[1:])
