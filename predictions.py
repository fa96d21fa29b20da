"""
The files evaluate.py reads and writes, next to it: a predictions JSONL per benchmark (read strictly, rewritten
whole, merged from the ranks' part files, an interrupted last line cut off), run.json (the settings the
predictions were made with) and results.csv (one row per metric; scaling_fit.py reads it). The scoring rules
are benchmarks.py's.
"""
import csv
import glob
import json
import os

from benchmarks import index_key, row_results
from configurator import InputError

RESULTS_HEADER = ["variant", "benchmark", "metric", "n_l", "n_s", "score", "ckpt", "n_samples"]


def read_prediction_records(path, allow_empty=False):
    """JSONL, one {"index": int or str, "prediction": str, ...} per line -> {index_key: the line's object}."""
    predictions, line_of = {}, {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "index" not in record or "prediction" not in record:
                raise InputError(f"{path} line {line_no}: expected an object with 'index' and 'prediction'")
            index, prediction = record["index"], record["prediction"]
            if isinstance(index, bool) or not isinstance(index, (int, str)):
                raise InputError(f"{path} line {line_no}: index must be an integer or a string, got {index!r}")
            if not isinstance(prediction, str):
                raise InputError(f"{path} line {line_no}: prediction must be a string, got {prediction!r}")
            key = index_key(index)
            if key in predictions:
                raise InputError(f"{path} line {line_no}: index {index!r} already predicted on line {line_of[key]}")
            predictions[key], line_of[key] = record, line_no
    if not predictions and not allow_empty:
        raise InputError(f"{path}: no predictions in the file")
    return predictions


def read_predictions(path):
    """JSONL, one {"index": int or str, "prediction": str} per line -> {index_key: prediction}."""
    return {key: record["prediction"] for key, record in read_prediction_records(path).items()}


def write_predictions(path, records):
    """Writes records (dicts, in the order given) as JSONL to a temp file renamed over `path`, so an interrupted
    write leaves the old file whole."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def already_scored(results_path):
    """(variant, benchmark, n_l, n_s, ckpt, n_samples) of every block results.csv holds; n_samples tells a run on
    a --limit subset from one on the whole file."""
    if not os.path.exists(results_path) or os.path.getsize(results_path) == 0:
        return set()
    with open(results_path, newline="") as f:
        return {(r["variant"], r["benchmark"], r["n_l"], r["n_s"], r["ckpt"], r["n_samples"])
                for r in csv.DictReader(f)}


def append_results(path, variant, benchmark, n_l, n_s, scores, ckpt, n_samples):
    """Appends one row per metric to results.csv; writes the header when the file is new, checks it otherwise."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != RESULTS_HEADER:
            raise InputError(f"{path}: header {header} is not {RESULTS_HEADER}; write the results somewhere else")
        new = False
    else:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        new = True
    with open(path, "a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(RESULTS_HEADER)
        for metric, value in scores.items():
            writer.writerow([variant, benchmark, metric, n_l, n_s, f"{value:.6g}", ckpt, n_samples])


def print_table(benchmark, scores, n_samples):
    print(f"{benchmark}: {n_samples} samples")
    width = max(len(metric) for metric in scores)
    for metric, value in scores.items():
        print(f"  {metric:<{width}}  {value:10.4f}")


def claim_run_dir(run_dir, settings):
    """run.json records what the predictions in run_dir were made with; resuming them with other settings (another
    checkpoint, token space, dtype...) would mix two models in one file, so it is refused."""
    path = os.path.join(run_dir, "run.json")
    if os.path.exists(path):
        with open(path) as f:
            before = json.load(f)
        if before != settings:
            changed = {k: (before.get(k), settings.get(k)) for k in settings.keys() | before.keys()
                       if before.get(k) != settings.get(k)}
            raise InputError(f"{path}: the predictions there were made with other settings (then, now): {changed}; "
                             f"use another out_dir or --variant")
        return
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def cut_incomplete_line(path):
    """A process killed mid-write leaves a last line without its newline: cut it off (it is generated again)."""
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: cutting off an incomplete last line ({len(data) - end} bytes) left by an interrupted run")
        with open(path, "r+b") as f:
            f.truncate(end)


def merge_predictions(path, name, rows, kind):
    """Rank 0: the predictions file plus every rank's part file (of this run, or left by an interrupted one) ->
    the predictions file, in the TSV's row order with each row's extracted answer and score; the part files are
    removed. Returns {index: prediction}."""
    parts = sorted(glob.glob(glob.escape(path) + ".rank*"))
    known, records = {row.index for row in rows}, {}
    for file in ([path] if os.path.exists(path) else []) + parts:
        cut_incomplete_line(file)
        found = read_prediction_records(file, allow_empty=True)
        unknown = [index for index in found if index not in known]
        if unknown:
            raise InputError(f"{file}: predictions for indices that {rows[0].source} does not have, e.g. "
                             f"{unknown[:5]}; it was made from another file: remove it or use another out_dir")
        twice = [index for index in found if index in records]
        if twice:  # a merge interrupted between writing the predictions file and removing the parts
            print(f"{file}: {len(twice)} rows already in {path}, kept from there")
        records.update({index: record for index, record in found.items() if index not in records})
    if not records:
        return {}
    predictions = {index: record["prediction"] for index, record in records.items()}
    per_row = row_results(name, rows, predictions, kind)
    ordered = []
    for row in rows:
        if row.index in records:
            record = {k: v for k, v in records[row.index].items() if k not in ("extracted", "score")}
            ordered.append({**record, **per_row[row.index]})
    write_predictions(path, ordered)
    for file in parts:
        os.remove(file)
    return predictions
