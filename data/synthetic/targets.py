"""
The miniature's four targets, from a reproduce_tiny.sh results folder (results.csv and fits_all_metrics.csv):

    python data/synthetic/targets.py results/tiny --nl="1 2 4 8 16"

A "benchmark" here is one number per (benchmark, n_l): each benchmark's headline metric (CIDEr for captions,
Overall otherwise) and, for a benchmark whose rows hold two or more categories, each `category:<name>` row too
(a one-category benchmark's category row is its headline again and is not counted twice).

  reads its images  at the largest n_l, VQQ beats VQQ-shuffled (every row shown another row's image) by >= 20
                    points on at least two benchmarks
  finding 1         VQQ's scores and VQ-ft's scores each rise with n_l on at least two benchmarks: the fitted power
                    law (scaling_fit.py) has alpha < 0 and R^2 >= 0.8 in log space, over every swept n_l
  finding 2         at every n_l <= 4, VQQ (question fused) is above VQ-ft (question not fused); on average over those
                    n_l by >= 10 points on one benchmark and by >= 5 on a second
  beyond the paper  at every n_l <= 4, VQQ is above both question-blind compressors (pool, resampler), by >= 10
                    points on average on one benchmark; each compressor's fitted law is printed beside VQQ's
Prints the numbers, met / NOT MET per target, and "N of 4 targets met" last.
"""
import csv
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import parse_config  # noqa: E402


@dataclass
class Config:
    nl: str = "1 2 4 8 16"  # the sweep's n_l values (reproduce_tiny.sh passes its own)


IMAGE_GAP, ALPHA_R2, FEW_TOKENS = 20, 0.8, 4
FUSION_GAINS = (10, 5)  # finding 2: the best benchmark's mean gain, the second best's
BLIND_GAIN = 10
COMPRESSORS = ("pool", "resampler")


def headline_metric(benchmark):
    return "CIDEr" if "CAPTION" in benchmark else "Overall"


def read_results(folder):
    """-> {(variant, benchmark label, n_l): score}, the benchmark labels in file order, {(variant, label): fit row}."""
    with open(os.path.join(folder, "results.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    categories = {}
    for r in rows:
        if r["metric"].startswith("category:"):
            categories.setdefault(r["benchmark"], set()).add(r["metric"])

    def label(r):  # the row's benchmark label, or None for a number that is not one
        if r["metric"] == headline_metric(r["benchmark"]):
            return r["benchmark"]
        if r["metric"].startswith("category:") and len(categories[r["benchmark"]]) > 1:
            return f"{r['benchmark']} {r['metric']}"
        return None

    score, labels = {}, []
    for r in rows:
        name = label(r)
        if name is not None:
            score[(r["variant"], name, int(r["n_l"]))] = float(r["score"])
            labels += [name] if name not in labels else []
    fits = {}
    with open(os.path.join(folder, "fits_all_metrics.csv"), newline="") as f:
        for r in csv.DictReader(f):
            name = label(r) if r["form"] == "power" else None
            if name is not None:
                fits[(r["variant"], name)] = r
    return score, labels, fits


def main(folder, nl):
    score, benchmarks, fits = read_results(folder)
    largest, few = max(nl), [n for n in nl if n <= FEW_TOKENS]
    verdicts = []

    def judge(name, met, passing):
        verdicts.append(met)
        print(f"target: {name}: {'met' if met else 'NOT MET'} ({', '.join(passing) or 'no benchmark'})\n")

    def law(variant, b):  # the fitted power law's alpha and R^2 in log space (nan: not fitted, e.g. a score of 0)
        fit = fits.get((variant, b))
        return (float(fit["alpha"]), float(fit["r2_log"] or "nan")) if fit else (float("nan"),) * 2

    def curve(variant, b):
        alpha, r2 = law(variant, b)
        return " ".join(f"{score[(variant, b, n)]:.1f}" for n in nl) + f" | alpha {alpha:.3f}, R^2 {r2:.2f}"

    def mean_gain(other, b):  # VQQ - other at n_l <= FEW_TOKENS: (mean, above at every one of them)
        gains = [score[("VQQ", b, n)] - score[(other, b, n)] for n in few]
        return sum(gains) / len(gains), min(gains) > 0, gains

    print(f"reads its images, at n_l = {largest}: VQQ / VQQ-shuffled")
    gaps = {b: score[("VQQ", b, largest)] - score[("VQQ-shuffled", b, largest)] for b in benchmarks}
    for b in benchmarks:
        print(f"  {b}: {score[('VQQ', b, largest)]:.1f} / {score[('VQQ-shuffled', b, largest)]:.1f} ({gaps[b]:+.1f})")
    passing = [b for b in benchmarks if gaps[b] >= IMAGE_GAP]
    judge(f"VQQ beats VQQ-shuffled by >= {IMAGE_GAP} points on 2 benchmarks", len(passing) >= 2, passing)

    print("finding 1, the score against n_l: power-law alpha, R^2 (log space)")
    rising = {}
    for variant in ("VQQ", "VQ-ft"):
        rising[variant] = []
        for b in benchmarks:
            alpha, r2 = law(variant, b)
            print(f"  {variant} {b}: {curve(variant, b)}")
            if alpha < 0 and r2 >= ALPHA_R2:
                rising[variant].append(b)
    judge(f"alpha < 0 and R^2 >= {ALPHA_R2} on 2 benchmarks, for VQQ and for VQ-ft",
          all(len(r) >= 2 for r in rising.values()), [f"{v}: {', '.join(r) or 'none'}" for v, r in rising.items()])

    print(f"finding 2, at n_l <= {FEW_TOKENS}: VQQ - VQ-ft (points)")
    ahead = []
    for b in benchmarks:
        mean, always, gains = mean_gain("VQ-ft", b)
        print(f"  {b}: " + ", ".join(f"n_l {n}: {g:+.1f}" for n, g in zip(few, gains)) + f" | mean {mean:+.1f}")
        if always:
            ahead.append((mean, b))
    ahead.sort(reverse=True)
    met = len(ahead) >= 2 and ahead[0][0] >= FUSION_GAINS[0] and ahead[1][0] >= FUSION_GAINS[1]
    judge(f"above at every n_l <= {FEW_TOKENS}, by >= {FUSION_GAINS[0]} on average on one benchmark and >= "
          f"{FUSION_GAINS[1]} on a second", met, [f"{b} {m:+.1f}" for m, b in ahead[:2]])

    print(f"beyond the paper: the fused model (VQQ) and the question-blind {', '.join(COMPRESSORS)}")
    ahead = []
    for b in benchmarks:
        for variant in ("VQQ",) + COMPRESSORS:
            print(f"  {variant} {b}: {curve(variant, b)}")
        gains = [mean_gain(c, b) for c in COMPRESSORS]
        for c, (mean, _, g) in zip(COMPRESSORS, gains):
            print(f"  VQQ - {c} {b}: " + ", ".join(f"n_l {n}: {d:+.1f}" for n, d in zip(few, g)) + f" | mean {mean:+.1f}")
        if all(always for _, always, _ in gains):
            ahead.append((min(mean for mean, _, _ in gains), b))
    best = max(ahead, default=None)
    judge(f"above both at every n_l <= {FEW_TOKENS}, by >= {BLIND_GAIN} on average on one benchmark",
          best is not None and best[0] >= BLIND_GAIN, [f"{best[1]} {best[0]:+.1f}"] if best else [])
    print(f"{sum(verdicts)} of {len(verdicts)} targets met")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if len(positional) != 1:
        sys.exit("usage: python data/synthetic/targets.py RESULTS_FOLDER [--nl='1 2 4 ...']")
    main(positional[0], [int(n) for n in config.nl.split()])
