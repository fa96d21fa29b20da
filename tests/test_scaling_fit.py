"""scaling_fit.py: planted laws are recovered, the paper's file fits, bad input is named or counted, the CLI writes
its outputs. Independent references: planted parameters, scipy.stats.linregress, the raw trend of the scores."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import linregress

from configurator import InputError
from scaling_fit import (DEFAULT_CSV, fit_group, fit_mask, fit_power, fit_two_regime, group_points,
                         parse_exclude, read_results)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER_N = np.array([1, 8, 16, 32, 64, 128, 256, 384, 512, 768], dtype=float)
HEADER = "variant,benchmark,metric,n_l,n_s,score"


def write_csv(tmp_path, lines, name="results.csv"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def good_rows(variant="A", benchmark="B", ns=(1, 8, 64, 512)):
    return [f"{variant},{benchmark},Overall,{n},8,{20 * n ** 0.1:.6f}" for n in ns]


def load_paper():
    points, skipped, _ = read_results([DEFAULT_CSV], skip_bad=False)
    assert skipped == []
    return group_points(points, False, [])


def arrays(group):
    return np.array([p.n for p in group], dtype=float), np.array([p.score for p in group])


# -----------------------------------------------------------------------------
# planted laws

@pytest.mark.parametrize("c, alpha", [(40.0, -0.12), (3.0, 0.3), (1200.0, -0.05)])
def test_power_law_exact(c, alpha):
    fit_c, fit_alpha = fit_power(PAPER_N, c * PAPER_N ** -alpha)
    assert fit_c == pytest.approx(c, rel=1e-10)
    assert fit_alpha == pytest.approx(alpha, abs=1e-12)


def test_power_law_with_multiplicative_noise():
    rng = np.random.default_rng(0)
    n = np.repeat(PAPER_N, 5)  # 50 points so the planted values are pinned down
    s = 25.0 * n ** 0.08 * np.exp(rng.normal(0, 0.02, n.size))
    c, alpha = fit_power(n, s)
    assert alpha == pytest.approx(-0.08, abs=0.005)
    assert c == pytest.approx(25.0, rel=0.03)
    reference = linregress(np.log(n), np.log(s))
    assert alpha == pytest.approx(-reference.slope, abs=1e-12)
    assert fit_group(n, s)[0]["r2_log"] == pytest.approx(reference.rvalue ** 2, abs=1e-12)


@pytest.mark.parametrize("c, beta, n_b", [(30.0, 0.3, 40.0), (10.0, 0.5, 5.0), (50.0, 0.2, 200.0)])
def test_two_regime_exact(c, beta, n_b):
    s = c * (PAPER_N * (PAPER_N + n_b) / (1 + n_b)) ** (beta / 2)
    fit_c, fit_beta, fit_n_b = fit_two_regime(PAPER_N, s)
    assert fit_c == pytest.approx(c, rel=1e-6)
    assert fit_beta == pytest.approx(beta, rel=1e-6)
    assert fit_n_b == pytest.approx(n_b, rel=1e-4)


def test_two_regime_with_noise_and_aic_prefers_it():
    rng = np.random.default_rng(1)
    n = np.repeat(PAPER_N, 3)
    c, beta, n_b = 20.0, 0.4, 30.0
    s = c * (n * (n + n_b) / (1 + n_b)) ** (beta / 2) * np.exp(rng.normal(0, 0.01, n.size))
    fit_c, fit_beta, fit_n_b = fit_two_regime(n, s)
    assert fit_beta == pytest.approx(beta, rel=0.1)
    assert fit_n_b == pytest.approx(n_b, rel=0.5)
    assert fit_c == pytest.approx(c, rel=0.05)
    power, two = fit_group(n, s)
    assert (power["form"], two["form"]) == ("power", "two_regime")
    assert two["aic"] < power["aic"] - 10


def test_two_regime_limits_are_power_laws():
    # n_b -> 0 gives c n^beta: on a pure power law the fit must land there (or at the other end, n^(beta/2))
    s = 7.0 * PAPER_N ** 0.2
    c, beta, n_b = fit_two_regime(PAPER_N, s)
    s_fit = c * (PAPER_N * (PAPER_N + n_b) / (1 + n_b)) ** (beta / 2)
    np.testing.assert_allclose(s_fit, s, rtol=1e-4)


# -----------------------------------------------------------------------------
# the paper's scores

@pytest.mark.parametrize("benchmark", ["MME", "SEEDBench_IMG", "POPE", "TextVQA_VAL"])
def test_paper_scores_rise_so_alpha_negative(benchmark):
    group = load_paper()[("VQQ", benchmark, "Overall")]
    n, s = arrays(group)
    assert s[-1] > s[0]  # the raw trend, independent of any fit
    c, alpha = fit_power(n, s)
    assert alpha < 0
    assert alpha == pytest.approx(-linregress(np.log(n), np.log(s)).slope, abs=1e-12)


def test_paper_file_every_curve_fits():
    groups = load_paper()
    assert len(groups) == 36 and all(len(g) == 10 for g in groups.values())
    for group in groups.values():
        for fit in fit_group(*arrays(group)):
            assert np.isfinite([fit["c"], fit["r2_log"], fit["r2"], fit["aic"]]).all()
            assert fit["n_b"] is None or fit["n_b"] >= 0


# -----------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("bad_row, reason", [
    ("A,B,Overall,16,8,-3.5", "not a finite number >= 0"),
    ("A,B,Overall,16,8,", "missing score"),
    ("A,B,Overall,16,8,abc", "not a number"),
    ("A,B,Overall,16,8,nan", "not a finite number >= 0"),
    ("A,B,Overall,16,8,inf", "not a finite number >= 0"),
    ("A,B,Overall,2.5,8,30", "n_l '2.5' is not an integer"),
    ("A,B,Overall,0,8,30", "n_l 0 is not positive"),
    ("A,B,Overall,16,8", "5 fields"),
    (",B,Overall,16,8,30", "missing variant"),
    ("A,B,Overall,8,8,30", "already given at .*:3"),
])
def test_bad_row_names_file_and_line(tmp_path, bad_row, reason):
    path = write_csv(tmp_path, [HEADER] + good_rows(ns=(1, 8)) + [bad_row] + good_rows(ns=(64, 512)))
    with pytest.raises(InputError, match=f"{path}:4: .*{reason}"):
        read_results([path], skip_bad=False)


@pytest.mark.parametrize("header", ["variant,benchmark,metric,n_l,n_s", "variant,benchmark,metric,n,n_s,score",
                                    "benchmark,variant,metric,n_l,n_s,score", ""])
def test_bad_header(tmp_path, header):
    path = write_csv(tmp_path, [header] + good_rows())
    with pytest.raises(InputError, match=f"{path}:1: the header"):
        read_results([path], skip_bad=False)


def test_extra_columns_allowed(tmp_path):
    path = write_csv(tmp_path, [HEADER + ",note"] + [row + ",x" for row in good_rows()])
    points, skipped, _ = read_results([path], skip_bad=False)
    assert [p.n for p in points] == [1, 8, 64, 512] and skipped == []


def test_fewer_than_three_distinct_n(tmp_path):
    path = write_csv(tmp_path, [HEADER] + good_rows("A") + good_rows("C", ns=(1, 8)))
    points, _, _ = read_results([path], skip_bad=False)
    with pytest.raises(InputError, match=f"{path}:6, {path}:7: C B Overall: only 2 distinct n_l"):
        group_points(points, False, [])
    skipped = []
    groups = group_points(points, True, skipped)
    assert list(groups) == [("A", "B", "Overall")]
    assert skipped == [f"{path}:{line}: C B Overall: only 2 distinct n_l, a fit needs 3" for line in (6, 7)]


def test_skip_bad_counts_every_bad_row(tmp_path):
    bad = ["A,B,Overall,16,8,-1", "A,B,Overall,32,8,", "A,B,Overall,x,8,30"]
    path = write_csv(tmp_path, [HEADER] + good_rows()[:2] + bad + good_rows()[2:])
    points, skipped, _ = read_results([path], skip_bad=True)
    assert [p.n for p in points] == [1, 8, 64, 512]
    assert [line.split(": ")[0] for line in skipped] == [f"{path}:{i}" for i in (4, 5, 6)]



def test_metric_filter_leaves_out_diagnostics_and_breakdowns(tmp_path):
    # evaluate.py writes unparsable_rate (often 0) and category:* rows beside the scores: by default only the
    # scores are fitted and the rest is counted, never checked; named metrics are selected exactly.
    rows = good_rows() + [f"A,B,unparsable_rate,{n},8,0" for n in (1, 8, 64, 512)] + \
        [f"A,B,category:count,{n},8,{s}" for n, s in ((1, 0), (8, 5), (64, 9), (512, 12))]
    path = write_csv(tmp_path, [HEADER] + rows)
    points, skipped, left_out = read_results([path], skip_bad=False)
    assert {p.metric for p in points} == {"Overall"} and skipped == []
    assert left_out == {"unparsable_rate": 4, "category:count": 4}
    points, _, left_out = read_results([path], skip_bad=True, metrics="category:count")
    assert [(p.metric, p.n) for p in points] == [("category:count", n) for n in (1, 8, 64, 512)]
    points, _, _ = read_results([path], skip_bad=False, metrics="all")  # zeros are scores (leave_out_zeros)
    assert sum(p.score == 0 for p in points) == 5


def test_constant_scores_leave_r2_blank(tmp_path):
    # a model that always gives the same answer scores the same at every n_l: alpha 0, and no variance to explain
    path = write_csv(tmp_path, [HEADER] + [f"A,B,Overall,{n},8,67.2566" for n in (1, 8, 64, 512)])
    out = tmp_path / "out"
    assert run_cli(str(path), f"--out_dir={out}").returncode == 0
    rows = list(csv.DictReader(open(out / "fits.csv")))
    power = next(r for r in rows if r["form"] == "power")
    assert abs(float(power["alpha"])) < 1e-9 and power["r2_log"] == "" and power["r2"] == ""

# -----------------------------------------------------------------------------
# --exclude

def test_exclude_removes_exactly_the_named_points():
    assert parse_exclude("RealWorldQA:384,512; MME:1") == {"RealWorldQA": {384, 512}, "MME": {1}}
    groups = load_paper()
    masks = fit_mask(groups, parse_exclude("RealWorldQA:384,512;MME:1"))
    dropped = {(key, p.n) for key, group in groups.items() for p, used in zip(group, masks[key]) if not used}
    expected = {((v, b, "Overall"), n) for v in ("VQQ", "VQ-ft") for b, ns in (("RealWorldQA", (384, 512)),
                                                                                ("MME", (1,))) for n in ns}
    assert dropped == expected


@pytest.mark.parametrize("exclude, message", [("Nope:1", "not in the"), ("MME:3", "has no n_l \\[3\\]"),
                                              ("MME", "not BENCHMARK:N"), ("MME:a", "not an integer")])
def test_exclude_typos_are_errors(exclude, message):
    with pytest.raises(InputError, match=message):
        fit_mask(load_paper(), parse_exclude(exclude))


# -----------------------------------------------------------------------------
# the command line

def run_cli(*args):
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "scaling_fit.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_on_the_paper_file(tmp_path):
    result = run_cli(f"--out_dir={tmp_path}", "--exclude=RealWorldQA:384,512")
    assert result.returncode == 0, result.stderr
    assert "total" in result.stdout.splitlines()[-1]
    with open(tmp_path / "fits.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == "variant,benchmark,metric,form,c,alpha,beta,n_b,r2_log,r2,aic,n_points".split(",")
    rows = [dict(zip(rows[0], row)) for row in rows[1:]]
    assert len(rows) == 72
    assert {(r["form"], r["alpha"] == "", r["beta"] == "") for r in rows} == {("power", False, True),
                                                                             ("two_regime", True, False)}
    by_key = {(r["variant"], r["benchmark"], r["form"]): r for r in rows}
    # the excluded points are really left out: compare with an OLS on the 8 remaining rows of the file
    with open(DEFAULT_CSV, newline="") as f:
        kept = [(float(r["n_l"]), float(r["score"])) for r in csv.DictReader(f)
                if r["variant"] == "VQQ" and r["benchmark"] == "RealWorldQA" and r["n_l"] not in ("384", "512")]
    n, s = np.array(kept).T
    power = by_key[("VQQ", "RealWorldQA", "power")]
    assert int(power["n_points"]) == 8
    assert float(power["alpha"]) == pytest.approx(-linregress(np.log(n), np.log(s)).slope, rel=1e-6)
    assert float(by_key[("VQQ", "MME", "power")]["alpha"]) < 0
    for name in ("scaling_fit.png", "difference.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 400_000


def test_cli_bad_input_stops_or_skips(tmp_path):
    path = write_csv(tmp_path, [HEADER] + good_rows() + ["A,B,Overall,16,8,-1"] + good_rows("C", ns=(1, 8)))
    result = run_cli(path, f"--out_dir={tmp_path / 'out'}")
    assert result.returncode != 0 and f"{path}:6: score -1 is not a finite number >= 0" in result.stderr
    assert not (tmp_path / "out").exists()
    result = run_cli(path, f"--out_dir={tmp_path / 'out'}", "--skip_bad=True", "--variants=A,C")
    assert result.returncode == 0, result.stderr
    assert "skipped 3 bad rows:" in result.stdout and f"{path}:8: C B Overall: only 2" in result.stdout
    with open(tmp_path / "out" / "fits.csv", newline="") as f:
        assert [(r["variant"], r["form"]) for r in csv.DictReader(f)] == [("A", "power"), ("A", "two_regime")]
    assert (tmp_path / "out" / "scaling_fit.png").exists() and not (tmp_path / "out" / "difference.png").exists()


def test_zero_scores_are_left_out_of_the_fits_with_a_note(tmp_path):
    # curve B: one zero among 5 points, fitted on the other 4; curve Z: all zeros (an F1 of a model that never says
    # yes), drawn but not fitted; neither stops the run, and --skip_bad is not needed
    rows = good_rows(ns=(1, 8, 64, 512)) + ["A,B,Overall,2,8,0"] + [f"A,Z,Overall,{n},8,0" for n in (1, 8, 64)]
    path = write_csv(tmp_path, [HEADER] + rows)
    out = tmp_path / "out"
    result = run_cli(path, f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "A B Overall: 1 of 5 scores are 0, left out of the log-space fits\n" in result.stdout
    assert "A Z Overall: 3 of 3 scores are 0, left out of the log-space fits; not fitted (0 points left" in result.stdout
    fits = list(csv.DictReader(open(out / "fits.csv")))
    assert {(r["benchmark"], r["n_points"]) for r in fits} == {("B", "4")}
    assert (out / "scaling_fit.png").exists()


def test_a_results_file_as_evaluate_writes_it_fits_without_skip_bad(tmp_path):
    # the shape of results/tiny/results.csv (written here, so the test does not depend on that run): evaluate.py's
    # extra columns, diagnostics and per-category rows beside the scores, 4 points per curve, and one curve of zeros
    # (a variant that never gets a caption's n-grams right), which is noted and drawn, not an error
    lines = [HEADER + ",ckpt,n_samples"]
    for variant in ("VQQ", "pool"):
        for n in (1, 2, 4, 8):
            ckpt = f"out/tiny-repro/ft-{variant}-{n},150"
            vqa = 15.0 + 5 * np.log2(n)
            cider = 0.0 if variant == "pool" else 40.0 * n ** 0.3
            lines += [f"{variant},SYNTH_VQA,Overall,{n},{n},{vqa:.4f},{ckpt}",
                      f"{variant},SYNTH_VQA,unparsable_rate,{n},{n},0,{ckpt}",
                      f"{variant},SYNTH_VQA,category:cell,{n},{n},{vqa:.4f},{ckpt}",
                      f"{variant},SYNTH_CAPTION,CIDEr,{n},{n},{cider:.4f},{ckpt}",
                      f"{variant},SYNTH_CAPTION,category:row,{n},{n},{cider:.4f},{ckpt}",
                      f"{variant},SYNTH_CAPTION,category:grid,{n},{n},0,{ckpt}"]
    path = write_csv(tmp_path, lines)
    out = tmp_path / "out"
    result = run_cli(path, f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    assert ("left out 32 rows of metrics not selected (--metrics): unparsable_rate (8), category:cell (8), "
            "category:row (8), category:grid (8)\n") in result.stdout
    assert "pool SYNTH_CAPTION CIDEr: 4 of 4 scores are 0, left out of the log-space fits; not fitted" in result.stdout
    assert "16 points, 4 curves" in result.stdout and "1 curves not fitted" in result.stdout
    fits = list(csv.DictReader(open(out / "fits.csv")))
    assert {(r["variant"], r["benchmark"], r["metric"]) for r in fits} == {
        ("VQQ", "SYNTH_VQA", "Overall"), ("pool", "SYNTH_VQA", "Overall"), ("VQQ", "SYNTH_CAPTION", "CIDEr")}
    assert (out / "scaling_fit.png").exists()
