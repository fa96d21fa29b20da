"""
Scaling laws of benchmark score S against the number of vision tokens n (= n_l, the first question's tokens).

    python scaling_fit.py                                    # the paper's scores, data/paper/scores.csv
    python scaling_fit.py results.csv --variants=VQQ,VQ-ft --exclude="RealWorldQA:384,512;MME:1"

For every (variant, benchmark, metric) two laws are fitted to ln S:
  power       S = c / n^alpha                                  OLS of ln S on ln n, the paper's method
  two_regime  S = c [n (n + n_b) / (1 + n_b)]^(beta/2)         the theory's law, bounded least squares, n_b >= 0
The two-regime law grows like n^(beta/2) while n << n_b and like n^beta once n >> n_b, i.e. its local exponent
alpha(n) runs from -beta/2 to -beta; fits.csv therefore leaves alpha blank for it (beta and n_b say it all).
Both laws are scored on the same log-space residuals (the power law is fitted there), so their AICs compare.

A score of 0 is a measurement (the F1 of a model that never answers yes), not a bad row, but ln S cannot take it:
it is left out of the fits, counted per curve, and drawn as an excluded point; a curve with fewer than 3 positive
scores is drawn, not fitted.

Writes fits.csv, scaling_fit.png and, with exactly two variants, difference.png (A minus B) to out_dir, and prints
a table. Bad input rows (a score missing, negative or not a finite number, ...) stop the run with file:line (line
1 is the header, as an editor counts), or with --skip_bad=True are skipped and listed.
"""
import csv
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from scipy.optimize import least_squares

from configurator import InputError, parse_config, report_input_errors


@dataclass
class Config:
    out_dir: str = "out/scaling_fit"
    variants: str = ""      # comma-separated, empty = all; the first two are A and B of the difference chart
    benchmarks: str = ""    # comma-separated, empty = all
    metrics: str = ""       # comma-separated; empty = the scores, without diagnostics (unparsable_rate) and
                            # per-group rows (names with ':', e.g. category:count); "all" = every metric
    exclude: str = ""       # n_l points left out of the fits, e.g. "RealWorldQA:384,512;MME:1" (all variants, metrics)
    skip_bad: bool = False  # skip and list bad rows instead of stopping at the first


DEFAULT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "paper", "scores.csv")
COLUMNS = ["variant", "benchmark", "metric", "n_l", "n_s", "score"]
FIT_COLUMNS = ["variant", "benchmark", "metric", "form", "c", "alpha", "beta", "n_b", "r2_log", "r2", "aic", "n_points"]
DPI = 90


class Point(NamedTuple):
    variant: str
    benchmark: str
    metric: str
    n: int
    score: float
    where: str  # "file:line"


# -----------------------------------------------------------------------------
# reading and checking the results CSVs

def positive_int(name, text):
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not an integer") from None
    if value <= 0:
        raise ValueError(f"{name} {value} is not positive")
    return value


def parse_row(fields, n_columns):
    """One data row -> (variant, benchmark, metric, n_l, score); ValueError says what is wrong."""
    if len(fields) != n_columns:
        raise ValueError(f"{len(fields)} fields, the header has {n_columns}")
    variant, benchmark, metric, n_l, n_s, score = (field.strip() for field in fields[:6])
    for name, value in (("variant", variant), ("benchmark", benchmark), ("metric", metric), ("score", score)):
        if not value:
            raise ValueError(f"missing {name}")
    n_l = positive_int("n_l", n_l)
    positive_int("n_s", n_s)
    try:
        value = float(score)
    except ValueError:
        raise ValueError(f"score {score!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"score {score} is not a finite number >= 0")
    return variant, benchmark, metric, n_l, value


def metric_selected(metric, wanted):
    if wanted == "all":
        return True
    if wanted:
        return metric in [name.strip() for name in wanted.split(",")]
    return metric != "unparsable_rate" and ":" not in metric


def read_results(paths, skip_bad, metrics=""):
    """All rows of all files -> (points, skipped, left_out): skipped lists 'file:line: reason' of bad rows,
    left_out counts the rows of metrics that were not selected (never checked, never fitted)."""
    points, skipped, seen, left_out = [], [], {}, {}
    for path in paths:
        if not os.path.isfile(path):
            raise InputError(f"{path}: not found (give the results CSV files evaluate.py wrote)")
        with open(path, newline="") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if header[:6] != COLUMNS:  # not skippable: without the columns no row can be read
                missing = [name for name in COLUMNS if name not in header]
                unknown = [name for name in header[:6] if name not in COLUMNS]
                raise InputError(f"{path}:1: the header must begin with {','.join(COLUMNS)} (extra columns may "
                                 f"follow); missing {missing}, unknown {unknown}, got {','.join(header)}")
            for fields in reader:
                if not fields:  # a blank line holds no data
                    continue
                where = f"{path}:{reader.line_num}"
                metric = fields[2].strip() if len(fields) > 2 else ""
                if metric and not metric_selected(metric, metrics):
                    left_out[metric] = left_out.get(metric, 0) + 1
                    continue
                try:
                    variant, benchmark, metric, n_l, score = parse_row(fields, len(header))
                    key = (variant, benchmark, metric, n_l)
                    if key in seen:
                        raise ValueError(f"{variant} {benchmark} {metric} n_l={n_l} already given at {seen[key]}")
                except ValueError as e:
                    if not skip_bad:
                        raise InputError(f"{where}: {e} (use --skip_bad=True to skip bad rows)") from None
                    skipped.append(f"{where}: {e}")
                    continue
                seen[key] = where
                points.append(Point(variant, benchmark, metric, n_l, score, where))
    return points, skipped, left_out


def names_in(points, field, wanted):
    """The distinct values of a field in order of appearance, or the wanted comma list after checking it exists."""
    present = list(dict.fromkeys(getattr(p, field) for p in points))
    if not wanted:
        return present
    chosen = [name.strip() for name in wanted.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in present]
    if unknown:
        raise InputError(f"--{field}s: {unknown} not in the data; present: {present}")
    return chosen


def group_points(points, skip_bad, skipped):
    """(variant, benchmark, metric) -> points sorted by n; a group needs 3 distinct n (two-regime has 3 parameters)."""
    groups = {}
    for p in points:
        groups.setdefault((p.variant, p.benchmark, p.metric), []).append(p)
    for key, group in list(groups.items()):
        group.sort(key=lambda p: p.n)
        if len(group) < 3:  # rows are unique per n, so len = distinct n
            problem = f"{' '.join(key)}: only {len(group)} distinct n_l, a fit needs 3"
            if not skip_bad:
                raise InputError(f"{', '.join(p.where for p in group)}: {problem} (use --skip_bad=True to skip)")
            skipped.extend(f"{p.where}: {problem}" for p in group)
            del groups[key]
    return groups


def parse_exclude(text):
    """'RealWorldQA:384,512;MME:1' -> {'RealWorldQA': {384, 512}, 'MME': {1}}."""
    excluded = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        benchmark, sep, ns = entry.partition(":")
        if not sep or not benchmark.strip() or not ns.strip():
            raise InputError(f"--exclude entry {entry!r} is not BENCHMARK:N[,N...]")
        try:
            excluded.setdefault(benchmark.strip(), set()).update(positive_int("n_l", n.strip()) for n in ns.split(","))
        except ValueError as e:
            raise InputError(f"--exclude entry {entry!r}: {e}") from None
    return excluded


def fit_mask(groups, excluded):
    """key -> bool array, True where the point is fitted. Every excluded point must exist, so typos cannot pass."""
    for benchmark, ns in excluded.items():
        present = {p.n for (_, b, _), group in groups.items() if b == benchmark for p in group}
        if not present:
            raise InputError(f"--exclude: benchmark {benchmark!r} is not in the (selected) data")
        if ns - present:
            raise InputError(f"--exclude: {benchmark} has no n_l {sorted(ns - present)}; it has {sorted(present)}")
    masks = {}
    for key, group in groups.items():
        masks[key] = np.array([p.n not in excluded.get(key[1], ()) for p in group])
        if masks[key].sum() < 3:
            raise InputError(f"--exclude leaves {' '.join(key)} with {masks[key].sum()} points, a fit needs 3")
    return masks


def leave_out_zeros(groups, masks):
    """Zero scores out of the fits (masks updated), one note per curve that has any -> the keys of the curves left
    with fewer than 3 points to fit, which are drawn but not fitted."""
    unfitted = set()
    for key, group in groups.items():
        zero = np.array([p.score == 0 for p in group])
        if not zero.any():
            continue
        masks[key] &= ~zero
        note = f"{' '.join(key)}: {zero.sum()} of {len(group)} scores are 0, left out of the log-space fits"
        if masks[key].sum() < 3:
            unfitted.add(key)
            note += f"; not fitted ({masks[key].sum()} points left, a fit needs 3)"
        print(note)
    return unfitted


# -----------------------------------------------------------------------------
# the two laws

def power_law(n, c, alpha):
    return c * n ** -alpha


def two_regime_law(n, c, beta, n_b):
    return c * (n * (n + n_b) / (1 + n_b)) ** (beta / 2)


def fit_power(n, s):
    """OLS of ln S = ln c - alpha ln n -> (c, alpha)."""
    design = np.column_stack([np.ones(len(n)), np.log(n)])
    (ln_c, slope), *_ = np.linalg.lstsq(design, np.log(s), rcond=None)
    return math.exp(ln_c), -slope


def fit_two_regime(n, s):
    """Least squares of ln S over (ln c, beta, n_b) with 0 <= n_b <= 1e4 max(n) -> (c, beta, n_b).
    For a fixed n_b the law is linear in (ln c, beta), so an exact OLS on a log grid of n_b finds the global basin
    (a multi-start that cannot miss it), and least_squares polishes n_b. n_b at the upper bound means the data
    look like one power law with alpha = -beta/2; n_b = 0 means one power law with alpha = -beta."""
    x, y = np.log(n), np.log(s)
    n_b_max = 1e4 * n.max()

    def log_bracket(n_b):  # ln of n (n + n_b) / (1 + n_b), halved: ln S = ln c + beta * log_bracket
        return 0.5 * (x + np.log(n + n_b) - np.log1p(n_b))

    def residuals(params):
        ln_c, beta, n_b = params
        return ln_c + beta * log_bracket(n_b) - y

    best_rss, best = np.inf, None
    for n_b in np.concatenate([[0.0], np.logspace(-3, np.log10(n_b_max), 241)]):
        design = np.column_stack([np.ones(len(n)), log_bracket(n_b)])
        (ln_c, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
        rss = np.sum(residuals((ln_c, beta, n_b)) ** 2)
        if rss < best_rss:
            best_rss, best = rss, np.array([ln_c, beta, n_b])
    result = least_squares(residuals, best, bounds=([-np.inf, -np.inf, 0.0], [np.inf, np.inf, n_b_max]),
                           x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12)
    if 2 * result.cost < best_rss:
        best = result.x
    ln_c, beta, n_b = best
    return math.exp(ln_c), beta, (0.0 if n_b < 1e-9 else n_b)  # trf stays strictly inside: 1e-21 means 0


def r2(observed, predicted):
    """None (a blank in fits.csv) when the scores do not vary: there is no variance to explain."""
    total = np.sum((observed - observed.mean()) ** 2)
    if total <= 1e-12 * max(1.0, float(np.sum(observed ** 2))):
        return None
    return 1 - np.sum((observed - predicted) ** 2) / total


def aic(log_residuals, n_params):
    """Gaussian AIC on ln S residuals, m ln(RSS/m) + 2k; RSS floored so an exact fit gives a finite value."""
    m = len(log_residuals)
    rss = max(np.sum(log_residuals ** 2), np.finfo(float).tiny)
    return m * math.log(rss / m) + 2 * n_params


def fit_group(n, s):
    """Both laws on one curve -> two fits.csv rows (without the key columns)."""
    c, alpha = fit_power(n, s)
    power = power_law(n, c, alpha)
    c2, beta, n_b = fit_two_regime(n, s)
    two = two_regime_law(n, c2, beta, n_b)
    return [
        dict(form="power", c=c, alpha=alpha, beta=None, n_b=None, r2_log=r2(np.log(s), np.log(power)),
             r2=r2(s, power), aic=aic(np.log(s) - np.log(power), 2), n_points=len(n)),
        dict(form="two_regime", c=c2, alpha=None, beta=beta, n_b=n_b, r2_log=r2(np.log(s), np.log(two)),
             r2=r2(s, two), aic=aic(np.log(s) - np.log(two), 3), n_points=len(n)),
    ]


# -----------------------------------------------------------------------------
# output: table, fits.csv, figures

def print_table(fits):
    head = (f"{'variant':<8} {'benchmark':<16} {'metric':<12} {'c':>9} {'alpha':>8} {'R2 log':>7} {'R2 lin':>7} "
            f"{'beta':>8} {'n_b':>9} {'AIC pow':>8} {'AIC 2reg':>8}")
    print(head)
    print("-" * len(head))
    for power, two in zip(fits[::2], fits[1::2]):
        r2_log, r2_lin = (f"{'-' if v is None else format(v, '.3f'):>7}" for v in (power["r2_log"], power["r2"]))
        print(f"{power['variant']:<8} {power['benchmark']:<16} {power['metric']:<12} {power['c']:>9.4g} "
              f"{power['alpha']:>8.4f} {r2_log} {r2_lin} {two['beta']:>8.4f} "
              f"{two['n_b']:>9.3g} {power['aic']:>8.2f} {two['aic']:>8.2f}")


def write_fits(fits, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIT_COLUMNS)
        for fit in fits:
            writer.writerow(["" if fit[col] is None else format(fit[col], ".8g") if isinstance(fit[col], float)
                             else fit[col] for col in FIT_COLUMNS])


def panel_grid(panels, title):
    ncols = min(6, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.9 * ncols, 2.3 * nrows + 0.7), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (benchmark, metric) in zip(axes.flat, panels):
        ax.set_title(benchmark if metric == "Overall" else f"{benchmark} {metric}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("log2 n_l", fontsize=7, labelpad=1)
    fig.suptitle(title, fontsize=11)
    return fig, axes.flat


def plot_fits(groups, masks, fits, variants, panels, path):
    colours = dict(zip(variants, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    by_key = {(f["variant"], f["benchmark"], f["metric"], f["form"]): f for f in fits}
    fig, axes = panel_grid(panels, "Score against log2 n_l, with fitted scaling laws")
    for ax, (benchmark, metric) in zip(axes, panels):
        for row, variant in enumerate(variants):
            key = (variant, benchmark, metric)
            if key not in groups:
                continue
            n = np.array([p.n for p in groups[key]], dtype=float)
            s = np.array([p.score for p in groups[key]])
            used, colour = masks[key], colours[variant]
            ax.scatter(np.log2(n[used]), s[used], s=14, color=colour, zorder=3)
            ax.scatter(np.log2(n[~used]), s[~used], s=14, facecolors="none", edgecolors=colour, zorder=3)
            if key + ("power",) not in by_key:  # too few positive scores to fit (leave_out_zeros)
                continue
            grid = np.geomspace(n.min(), n.max(), 100)
            power, two = by_key[key + ("power",)], by_key[key + ("two_regime",)]
            ax.plot(np.log2(grid), power_law(grid, power["c"], power["alpha"]), color=colour, lw=1.2)
            ax.plot(np.log2(grid), two_regime_law(grid, two["c"], two["beta"], two["n_b"]), color=colour, lw=1,
                    ls="--")
            ax.text(0.03, 0.93 - 0.1 * row, f"α={power['alpha']:.3f}", color=colour, fontsize=7,
                    transform=ax.transAxes, va="top")
        low, high = ax.get_ylim()
        if high - low < 1e-6 * max(1.0, abs(high)):  # flat curves: show them flat, not as rounding noise
            ax.set_ylim(low - 1, high + 1)
    handles = [Line2D([], [], color=colours[v], marker="o", ls="none", label=v) for v in variants] + [
        Line2D([], [], color="grey", label="power law c / n^α"),
        Line2D([], [], color="grey", ls="--", label="two-regime law"),
        Line2D([], [], color="grey", marker="o", mfc="none", ls="none", label="excluded from the fits")]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.96), ncol=len(handles), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_difference(groups, variant_a, variant_b, panels, path):
    """Bars of score(A) - score(B) at every n_l both variants have (excluded points too: this is data, not a fit)."""
    fig, axes = panel_grid(panels, f"{variant_a} minus {variant_b}")
    for ax, (benchmark, metric) in zip(axes, panels):
        a = {p.n: p.score for p in groups.get((variant_a, benchmark, metric), [])}
        b = {p.n: p.score for p in groups.get((variant_b, benchmark, metric), [])}
        common = sorted(set(a) & set(b))
        diff = np.array([a[n] - b[n] for n in common])
        ax.bar(np.log2(common), diff, width=0.35, color=np.where(diff >= 0, "tab:green", "tab:red"))
        ax.axhline(0, color="black", lw=0.6)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


# -----------------------------------------------------------------------------

def main(argv):
    start = time.time()
    cfg, paths = parse_config(Config(), argv)
    paths = paths or [DEFAULT_CSV]
    print(f"config: {asdict(cfg)}, inputs: {paths}")

    points, skipped, left_out = read_results(paths, cfg.skip_bad, cfg.metrics)
    if left_out:
        print(f"left out {sum(left_out.values())} rows of metrics not selected (--metrics): "
              + ", ".join(f"{m} ({k})" for m, k in left_out.items()))
    names_in(points, "metric", "" if cfg.metrics == "all" else cfg.metrics)  # named metrics must exist
    variants = names_in(points, "variant", cfg.variants)
    benchmarks = names_in(points, "benchmark", cfg.benchmarks)
    points = [p for p in points if p.variant in variants and p.benchmark in benchmarks]
    groups = group_points(points, cfg.skip_bad, skipped)
    if skipped:
        print(f"skipped {len(skipped)} bad rows:")
        print("\n".join(f"  {line}" for line in skipped))
    if not groups:
        raise InputError("no curve left to fit")
    masks = fit_mask(groups, parse_exclude(cfg.exclude))
    excluded = sum((~m).sum() for m in masks.values())
    unfitted = leave_out_zeros(groups, masks)
    print(f"{sum(map(len, groups.values()))} points, {len(groups)} curves, {excluded} points excluded from the fits "
          f"(--exclude), {sum((~m).sum() for m in masks.values()) - excluded} more with a score of 0; "
          f"{len(unfitted)} curves not fitted")
    if len(unfitted) == len(groups):
        raise InputError("no curve has 3 positive scores to fit")

    fits = []
    for key, group in groups.items():
        if key in unfitted:
            continue
        n = np.array([p.n for p in group], dtype=float)[masks[key]]
        s = np.array([p.score for p in group])[masks[key]]
        fits += [dict(variant=key[0], benchmark=key[1], metric=key[2], **fit) for fit in fit_group(n, s)]
    print_table(fits)

    os.makedirs(cfg.out_dir, exist_ok=True)
    write_fits(fits, os.path.join(cfg.out_dir, "fits.csv"))
    panels = list(dict.fromkeys((b, m) for (_, b, m) in groups))
    variants = [v for v in variants if any(key[0] == v for key in groups)]
    plot_fits(groups, masks, fits, variants, panels, os.path.join(cfg.out_dir, "scaling_fit.png"))
    written = ["fits.csv", "scaling_fit.png"]
    if len(variants) == 2:
        plot_difference(groups, *variants, panels, os.path.join(cfg.out_dir, "difference.png"))
        written.append("difference.png")
    print(f"wrote {', '.join(written)} to {cfg.out_dir}; total {time.time() - start:.2f} s")


if __name__ == "__main__":
    report_input_errors()
    main(sys.argv[1:])
