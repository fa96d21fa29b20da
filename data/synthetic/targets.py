"""
The miniature's three targets, from a reproduce_tiny.sh results folder (results.csv and fits.csv):

    python data/synthetic/targets.py results/tiny --nl="1 2 4 8 16 32 64"

  reads its images  at the largest n_l, VQQ beats VQQ-shuffled (every row shown another row's image) by >= 15
                    points on at least two benchmarks
  finding 1         VQQ's score rises with n_l on at least two benchmarks: fitted power-law alpha < 0 and R^2 in
                    log space >= 0.8
  finding 2         at every n_l <= 4, VQQ (question fused) beats VQ-ft (fine-tuned without it) by >= 5 points on at
                    least two benchmarks
Each benchmark is judged on its headline number (CIDEr for captions). Prints the numbers and met / NOT MET per target,
(with no target) the question-blind compressors pool and resampler beside VQQ's fused model at every n_l, with their
fitted laws, when results.csv holds them.
"""
import csv
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import parse_config  # noqa: E402


@dataclass
class Config:
    nl: str = "1 2 4 8 16 32 64"  # the sweep's n_l values


HEADLINE = {"SYNTH_YORN": "Overall", "SYNTH_MCQ": "Overall", "SYNTH_VQA": "Overall", "SYNTH_CAPTION": "CIDEr"}
IMAGE_GAP, DIFFERENCE, FEW_TOKENS, ALPHA_R2 = 15, 5, 4, 0.8
AT_LEAST = 2  # benchmarks


def main(folder, nl):
    with open(os.path.join(folder, "results.csv"), newline="") as f:
        score = {(r["variant"], r["benchmark"], int(r["n_l"])): float(r["score"]) for r in csv.DictReader(f)
                 if HEADLINE.get(r["benchmark"]) == r["metric"]}
    with open(os.path.join(folder, "fits.csv"), newline="") as f:
        fits = {(r["variant"], r["benchmark"]): r for r in csv.DictReader(f)
                if r["form"] == "power" and HEADLINE.get(r["benchmark"]) == r["metric"]}
    largest = max(nl)
    verdicts = []

    def judge(name, passing):
        verdicts.append(len(passing) >= AT_LEAST)
        print(f"{name}: {'met' if verdicts[-1] else 'NOT MET'} ({len(passing)} of {len(HEADLINE)} benchmarks: "
              f"{', '.join(passing) or 'none'})\n")

    print(f"reads its images, at n_l = {largest}: VQQ / VQQ-shuffled")
    gaps = {b: score[("VQQ", b, largest)] - score[("VQQ-shuffled", b, largest)] for b in HEADLINE}
    for b in HEADLINE:
        print(f"  {b} {HEADLINE[b]}: {score[('VQQ', b, largest)]:.1f} / {score[('VQQ-shuffled', b, largest)]:.1f} "
              f"({gaps[b]:+.1f})")
    judge(f"target: VQQ beats VQQ-shuffled by >= {IMAGE_GAP} points", [b for b in HEADLINE if gaps[b] >= IMAGE_GAP])

    def law(variant, b):  # the fitted power law's alpha and R^2 in log space (nan: not fitted)
        fit = fits.get((variant, b))
        return (float(fit["alpha"]), float(fit["r2_log"]) if fit["r2_log"] else float("nan")) if fit else (float("nan"),) * 2

    def curve(variant, b):
        alpha, r2 = law(variant, b)
        return " ".join(f"{score[(variant, b, n)]:.1f}" for n in nl) + f" | alpha {alpha:.3f}, R^2 {r2:.2f}"

    print("finding 1, VQQ against n_l: power-law alpha, R^2 (log space)")
    rising = []
    for b in HEADLINE:
        alpha, r2 = law("VQQ", b)
        print(f"  {b} {HEADLINE[b]}: {curve('VQQ', b)}")
        if alpha < 0 and r2 >= ALPHA_R2:
            rising.append(b)
    judge(f"target: alpha < 0 and R^2 >= {ALPHA_R2}", rising)

    few = [n for n in nl if n <= FEW_TOKENS]
    print(f"finding 2, at n_l <= {FEW_TOKENS}: VQQ - VQ-ft (points)")
    ahead = {b: [score[("VQQ", b, n)] - score[("VQ-ft", b, n)] for n in few] for b in HEADLINE}
    for b in HEADLINE:
        print(f"  {b} {HEADLINE[b]}: " + ", ".join(f"n_l {n}: {d:+.1f}" for n, d in zip(few, ahead[b])))
    judge(f"target: >= {DIFFERENCE} points at every n_l <= {FEW_TOKENS}",
          [b for b in HEADLINE if min(ahead[b]) >= DIFFERENCE])

    blind = [v for v in ("pool", "resampler") if (v, next(iter(HEADLINE)), largest) in score]
    if blind:
        print(f"compressors at equal n_l (no target): the fused model (VQQ) and the question-blind {', '.join(blind)}")
        for b in HEADLINE:
            for variant in ["VQQ"] + blind:
                print(f"  {b} {HEADLINE[b]} {variant}: {curve(variant, b)}")
            for variant in blind:
                print(f"  {b} {HEADLINE[b]} VQQ - {variant}: "
                      + ", ".join(f"n_l {n}: {score[('VQQ', b, n)] - score[(variant, b, n)]:+.1f}" for n in nl))
        print()
    print(f"{sum(verdicts)} of {len(verdicts)} targets met")


if __name__ == "__main__":
    config, positional = parse_config(Config(), sys.argv[1:])
    if len(positional) != 1:
        sys.exit("usage: python data/synthetic/targets.py RESULTS_FOLDER [--nl='1 2 4 ...']")
    main(positional[0], [int(n) for n in config.nl.split()])
