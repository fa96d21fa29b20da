"""wandb_log=True under WANDB_MODE=offline (no network): a tiny train_gen.py run stopped half-way and resumed logs
to one wandb run exactly the records metrics.jsonl gets. The reference is wandb's own offline run files, read here
with the record format they are written in (a LevelDB log of protobuf records), not through our code."""
import json
import struct
from pathlib import Path

import pytest

from checkpoint import load_checkpoint
from test_train import argv, metrics, run

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK = 32768  # the LevelDB log's block size; a record's 7-byte header never straddles a block


def wandb_records(path):
    """Every protobuf Record of an offline run file: a ":W&B" header of 7 bytes, then LevelDB log chunks (crc32c,
    length, type: 1 full, 2 first, 3 middle, 4 last)."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # the block's tail is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_proto.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def key(item):
    return item.key or "/".join(item.nested_key)  # wandb writes some keys in the nested form


def logged(path):
    """(run ids, the history rows without wandb's own _keys, the summary at the end) of one offline run file."""
    run_ids, rows, summary = set(), [], {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.run_id:  # later run records (updates) may leave the id out
            run_ids.add(record.run.run_id)
        elif kind == "history":
            rows.append({key(item): json.loads(item.value_json) for item in record.history.item
                         if not key(item).startswith("_")})
        elif kind == "summary":
            summary.update({key(item): json.loads(item.value_json) for item in record.summary.update})
    return run_ids, rows, summary


def test_a_resumed_run_logs_what_metrics_jsonl_holds_into_one_wandb_run(synthetic_world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "gen"
    args = argv(synthetic_world, out, "--wandb_log=True", "--val_file=val.jsonl", "--max_iters=4", "--eval_interval=2",
                "--n_l=4")
    run("train_gen.py", monkeypatch, args + ["--stop_at_step=2"])
    run("train_gen.py", monkeypatch, args + ["--resume=True"])

    # one run folder per process start; the second starts after the first's file was closed
    files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"), key=lambda f: f.stat().st_mtime)
    _, meta = load_checkpoint(out)
    assert [f.name for f in files] == [f"run-{meta['wandb_run_id']}.wandb"] * 2  # wandb names the file by run id
    (first_ids, first_rows, _), (second_ids, second_rows, summary) = map(logged, files)
    assert first_ids | second_ids == {meta["wandb_run_id"]}

    records = metrics(out)
    assert {"loss", "mfu", "val_loss", "val_loss_images_rolled"} <= {k for r in records for k in r}
    assert first_rows + second_rows == records
    last_loss = [r for r in records if "loss" in r][-1]
    assert summary["step"] == records[-1]["step"] and summary["loss"] == last_loss["loss"]
