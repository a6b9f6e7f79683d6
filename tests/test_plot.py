"""Specification of plot.py: figures, the comparison table and notes.txt (SPEC sections 4 and 6).

Run folders here are synthetic, written with known numbers in the format experiment.py writes
(run.json, final_info.json, all_results.json), so every expected number can be worked out by hand.
"""

from __future__ import annotations

import ast
import json
import math
import multiprocessing
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plot  # noqa: E402

DATASETS = ("shakespeare_char", "text8")
SEEDS = (1337, 1338, 1339)
# Baseline per-seed values (seed 1337, 1338, 1339), the same on every dataset.
BASE = {"best_val_loss": [1.50, 1.46, 1.48], "final_train_loss": [1.20, 1.18, 1.22],
        "total_train_time": [60.0, 61.0, 62.0], "avg_inference_tokens_per_second": [600.0, 605.0, 610.0]}


def write_run(folder: Path, *, title: str = "", description: str = "", seeds=SEEDS, metrics=None,
              eval_iters=None, max_iters: int = 100, datasets=DATASETS) -> Path:
    """A finished run folder. metrics: {metric: per-seed values} (default BASE, cut to len(seeds));
    eval_iters: one list of evaluation iterations per seed (default every 20 iterations)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = metrics or {k: v[:len(seeds)] for k, v in BASE.items()}
    eval_iters = eval_iters or [list(range(0, max_iters + 1, 20))] * len(seeds)
    final, results = {}, {}
    for d, dataset in enumerate(datasets):
        means = {f"{k}_mean": float(np.mean(v)) for k, v in metrics.items()}
        stderrs = {f"{k}_stderr": float(np.std(v, ddof=1) / math.sqrt(len(v))) if len(v) > 1 else None
                   for k, v in metrics.items()}
        final[dataset] = {"means": means, "stderrs": stderrs, "final_info_dict": metrics, "seeds": list(seeds),
                          "n": len(seeds)}
        for i, seed in enumerate(seeds):
            wiggle = 0.05 * (i + 1) + 0.1 * d
            results[f"{dataset}_{i}_train_info"] = [
                {"iter": it, "loss": 1.0 + wiggle + 3.0 * math.exp(-it / 30) + 0.05 * math.sin(it + i),
                 "time": 5.0} for it in range(0, max_iters + 1, 5)]
            results[f"{dataset}_{i}_val_info"] = [
                {"iter": it, "train/loss": 1.0 + wiggle + 3.0 * math.exp(-it / 30),
                 "val/loss": 1.2 + wiggle + 3.0 * math.exp(-it / 30),
                 "lr": 1e-3 * 2.0 ** (-((k + i) % 4)), "multiplier": 1.0, "action": 0, "reward": 0.0,
                 "epsilon": 0.1, "state": [0, 0, 0]} for k, it in enumerate(eval_iters[i])]
            results[f"{dataset}_{i}_final_info"] = {k: v[i] for k, v in metrics.items()}
    config = {"max_iters": max_iters, "eval_interval": eval_iters[0][1] - eval_iters[0][0], "seeds": len(seeds)}
    run_json = {"title": title, "description": description, "profile": "smoke", "datasets": list(datasets),
                "status": "finished", "configs": {d: config for d in datasets}}
    (folder / "run.json").write_text(json.dumps(run_json))
    (folder / "final_info.json").write_text(json.dumps(final))
    (folder / "all_results.json").write_text(json.dumps(results))
    return folder


def run_plot(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "plot.py"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def shifted(values, by):
    return [v + b for v, b in zip(values, by)]


@pytest.fixture
def runs(tmp_path) -> Path:
    """run_0 baseline (3 seeds), run_1 (3 seeds), run_2 broken, run_3 (1 seed), run_4 (3 seeds evaluated at
    other iterations than the rest, and not all at the same ones)."""
    write_run(tmp_path / "run_0", title="Baseline", description="Cosine schedule, no agent.")
    write_run(tmp_path / "run_1", title="Q-learning", description="Tabular Q-learning agent.",
              metrics={"best_val_loss": [1.45, 1.44, 1.47], "final_train_loss": [1.10, 1.12, 1.11],
                       "total_train_time": [70.0, 71.5, 72.0],
                       "avg_inference_tokens_per_second": [650.0, 660.0, 655.0]})
    broken = tmp_path / "run_2"
    broken.mkdir()
    (broken / "final_info.json").write_text("{not json")
    write_run(tmp_path / "run_3", title="One seed", seeds=(1337,),
              metrics={"best_val_loss": [1.47], "final_train_loss": [1.2], "total_train_time": [60.0],
                       "avg_inference_tokens_per_second": [600.0]})
    write_run(tmp_path / "run_4", title="Other eval iterations",
              eval_iters=[[0, 25, 50, 75, 100], [0, 25, 50, 75, 100], [0, 25, 40, 50, 100]])
    return tmp_path


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def distinct_colours(pixels: np.ndarray) -> int:
    rgba = np.round(pixels * 255).astype(np.uint32) if pixels.dtype.kind == "f" else pixels.astype(np.uint32)
    packed = rgba[..., 0] << 16 | rgba[..., 1] << 8 | rgba[..., 2]  # one integer per colour: fast unique
    return len(np.unique(packed))


def table_heading(table: str, dataset: str) -> str:
    """The dataset's heading line: `D:` or, with a note about its data, `D (...):`."""
    (line,) = [x for x in table.splitlines() if x == f"{dataset}:" or x.startswith(f"{dataset} (") and x.endswith(":")]
    return line


def table_line(table: str, dataset: str, run: str, metric: str) -> str:
    block = table.split(table_heading(table, dataset) + "\n", 1)[1].split("\n\n", 1)[0]
    (line,) = [x for x in block.splitlines() if x.split()[:2] == [metric, run]]
    return line


def test_plot_writes_every_figure_and_skips_the_broken_run_with_one_warning(runs, tmp_path):
    from matplotlib.image import imread

    out = tmp_path / "plots"
    result = run_plot("--out_dir", out, cwd=runs)
    assert result.returncode == 0, result.stderr
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipping run_2: "), result.stderr
    assert "final_info.json" in warnings[0]
    expected = [f"{kind}_{d}.png" for d in DATASETS for kind in ("train_loss", "val_loss", "lr")] + ["summary.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)  # and no temporary files left behind
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), name
        assert len(data) > 10_000, name
        pixels = imread(out / name)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500, name
        assert distinct_colours(pixels) > 50, f"{name} looks empty ({distinct_colours(pixels)} colours)"


def test_mean_curve_averages_only_iterations_every_seed_logged():
    seeds = [(np.array([0.0, 25, 50, 100]), np.array([4.0, 3.0, 2.0, 1.0])),
             (np.array([0.0, 25, 40, 50, 100]), np.array([5.0, 4.0, 9.0, 3.0, 2.0])),
             (np.array([0.0, 50, 100]), np.array([6.0, 4.0, 3.0]))]
    iters, mean, spread = plot.mean_curve(seeds)
    assert iters.tolist() == [0, 50, 100]
    assert mean.tolist() == pytest.approx([5.0, 3.0, 2.0])
    # stderr = std(ddof=1) / sqrt(n): values 4,5,6 -> std 1 -> 1/sqrt(3), and so on
    assert spread.tolist() == pytest.approx([1 / math.sqrt(3)] * 3)
    one_iters, one_mean, one_spread = plot.mean_curve(seeds[:1])
    assert one_spread is None and one_mean.tolist() == [4.0, 3.0, 2.0, 1.0]



def test_loss_axes_zoom_past_the_first_drop_only_when_it_would_squeeze_the_rest():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    iters = np.arange(0, 1001, 100, dtype=float)
    falling = np.array([4.2, 2.6, 2.3, 2.1, 2.0, 1.95, 1.92, 1.9, 1.88, 1.87, 1.86])
    ax = Figure().add_subplot()
    assert plot._zoom_on_later_training(ax, [(iters, falling), (iters, falling + 0.05)])
    low, high = ax.get_ylim()
    later = np.concatenate([falling[2:], falling[2:] + 0.05])  # iterations >= 200, 20% of 1000
    assert low < later.min() and later.max() < high < 2.6  # every later point shown, the first drop cut
    flat = Figure().add_subplot()
    assert not plot._zoom_on_later_training(flat, [(iters, np.linspace(2.0, 1.9, len(iters)))])


def test_runs_keep_distinct_line_styles_so_identical_curves_stay_visible():
    styles = [plot.run_linestyle(i) for i in range(6)]
    assert styles[0] == "-"  # the baseline is the solid line
    assert "-" not in styles[1:]  # no later run draws a solid line over an earlier one
    assert len({str(s) for s in styles[1:]}) == 5


def test_a_run_with_missing_keys_is_unusable_with_a_reason(tmp_path):
    run = write_run(tmp_path / "run_0")
    (run / "final_info.json").write_text(json.dumps({"shakespeare_char": {"stderrs": {}}}))
    with pytest.raises(plot.RunError, match="means"):
        plot.load_run(run)
    run = write_run(tmp_path / "run_1")
    results = json.loads((run / "all_results.json").read_text())
    del results["text8_0_val_info"], results["text8_1_val_info"], results["text8_2_val_info"]
    (run / "all_results.json").write_text(json.dumps(results))
    with pytest.raises(plot.RunError, match="val_info for text8"):
        plot.load_run(run)
    assert plot.load_run(run, curves=False).name == "run_1"  # the table needs no curves


def test_an_unfinished_run_is_skipped_with_one_warning(tmp_path, monkeypatch, capsys):
    write_run(tmp_path / "run_0", title="Baseline")
    (tmp_path / "run_1").mkdir()
    (tmp_path / "run_1" / "run.json").write_text(json.dumps({"title": "x", "status": "running"}))
    monkeypatch.chdir(tmp_path)
    assert plot.main(["--table"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "warning: skipping run_1: no final_info.json (run not finished, status 'running')"]


# ----------------------------------------------------------------------------------------------
# Comparison numbers, by hand
# ----------------------------------------------------------------------------------------------

def row_for(rows, run, metric="best_val_loss", dataset="shakespeare_char"):
    (row,) = [r for r in rows if r["run"] == run and r["metric"] == metric and r["dataset"] == dataset]
    return row


def t975_df2() -> float:
    """Student t quantile 0.975 with 2 degrees of freedom, closed form: (2p-1)/sqrt(2p(1-p))."""
    p = 0.975
    return (2 * p - 1) / math.sqrt(2 * p * (1 - p))


def test_paired_difference_interval_and_p_value_match_the_hand_computation(runs):
    from scipy import stats

    rows = plot.comparison_rows(plot.load_runs(plot.find_run_dirs(runs), warn=None))
    base, run1 = row_for(rows, "run_0"), row_for(rows, "run_1")
    assert base["verdict"] == "baseline" and base["n"] == 3
    assert base["mean"] == pytest.approx(1.48)
    # baseline deviations from the mean are +0.02, -0.02, 0: sd = sqrt(0.0008/2) = 0.02, stderr = 0.02/sqrt(3)
    assert base["stderr"] == pytest.approx(0.02 / math.sqrt(3))
    # paired by seed: 1.45-1.50, 1.44-1.46, 1.47-1.48
    d = [-0.05, -0.02, -0.01]
    mean_d = sum(d) / 3
    sd_d = math.sqrt(sum((x - mean_d) ** 2 for x in d) / 2)
    se_d = sd_d / math.sqrt(3)
    half = t975_df2() * se_d
    assert run1["method"] == "paired" and run1["shared_seeds"] == 3
    assert run1["diff"] == pytest.approx(mean_d)
    assert (run1["ci_low"], run1["ci_high"]) == (pytest.approx(mean_d - half), pytest.approx(mean_d + half))
    t_stat = mean_d / se_d
    p_by_hand = 1 - abs(t_stat) / math.sqrt(2 + t_stat ** 2)  # two-sided, t distribution with 2 df
    assert run1["p_value"] == pytest.approx(p_by_hand)
    assert run1["p_value"] == pytest.approx(stats.ttest_rel([1.45, 1.44, 1.47], [1.50, 1.46, 1.48]).pvalue)
    assert t975_df2() == pytest.approx(stats.t.ppf(0.975, 2))
    assert run1["ci_low"] < 0 < run1["ci_high"] and run1["verdict"] == "within noise"


def test_verdicts_name_the_direction_per_metric(tmp_path):
    base = write_run(tmp_path / "run_0", datasets=("shakespeare_char",))
    # losses 0.3 higher on every seed, give or take 0.001: clearly worse, even after the Holm correction
    worse = write_run(tmp_path / "run_1", datasets=("shakespeare_char",),
                      metrics={"best_val_loss": [1.80, 1.761, 1.779], "final_train_loss": [1.501, 1.48, 1.52],
                               **{k: BASE[k] for k in ("total_train_time", "avg_inference_tokens_per_second")}})
    better = write_run(tmp_path / "run_2", datasets=("shakespeare_char",),
                       metrics={"best_val_loss": [1.20, 1.161, 1.179], "final_train_loss": [0.901, 0.88, 0.92],
                                **{k: BASE[k] for k in ("total_train_time", "avg_inference_tokens_per_second")}})
    rows = plot.comparison_rows([base, worse, better])
    for metric in ("best_val_loss", "final_train_loss"):
        assert row_for(rows, "run_1", metric)["p_holm"] < 0.05
        assert row_for(rows, "run_1", metric)["verdict"] == "worse (higher)"
        assert row_for(rows, "run_2", metric)["verdict"] == "better (lower)"


def test_runs_sharing_two_seeds_are_paired_on_those_seeds_only(tmp_path):
    base = write_run(tmp_path / "run_0")
    other = write_run(tmp_path / "run_1", seeds=(1337, 1338, 9999),
                      metrics={k: [1.40, 1.43, 1.00] for k in BASE})
    row = row_for(plot.comparison_rows([base, other]), "run_1")
    d = [1.40 - 1.50, 1.43 - 1.46]
    mean_d = sum(d) / 2
    se_d = abs(d[0] - d[1]) / math.sqrt(2) / math.sqrt(2)
    t975_df1 = math.tan(math.pi * (0.975 - 0.5))  # t with 1 df is the Cauchy distribution
    t_stat = mean_d / se_d
    assert row["method"] == "paired" and row["shared_seeds"] == 2
    assert row["diff"] == pytest.approx(mean_d)
    assert row["ci_high"] - row["diff"] == pytest.approx(t975_df1 * se_d)
    assert row["p_value"] == pytest.approx(1 - 2 / math.pi * math.atan(abs(t_stat)))


def test_runs_without_shared_seeds_get_a_welch_interval_and_no_p_value(tmp_path):
    from scipy import stats

    base = write_run(tmp_path / "run_0")
    other = write_run(tmp_path / "run_1", seeds=(2001, 2002, 2003), metrics={k: [1.30, 1.34, 1.32] for k in BASE})
    row = row_for(plot.comparison_rows([base, other]), "run_1")
    var_each = 0.0004 / 3  # both: sd 0.02 over n = 3
    se = math.sqrt(2 * var_each)
    df = (2 * var_each) ** 2 / (var_each ** 2 / 2 + var_each ** 2 / 2)  # Welch-Satterthwaite: 4
    assert df == pytest.approx(4)
    half = 2.7764451051977987 * se  # t quantile 0.975, 4 df (tables)
    assert half == pytest.approx(stats.t.ppf(0.975, 4) * se)
    assert row["method"] == "Welch" and row["p_value"] is None
    assert row["diff"] == pytest.approx(1.32 - 1.48)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(-0.16 - half), pytest.approx(-0.16 + half))
    # the interval excludes 0, but without a paired p-value there is no test to correct, so no direction
    assert row["p_holm"] is None and row["verdict"] == "no paired test (fewer than 2 shared seeds)"


def test_a_single_seed_has_no_stderr_and_no_interval(runs):
    rows = plot.comparison_rows(plot.load_runs(plot.find_run_dirs(runs), warn=None))
    row = row_for(rows, "run_3")
    assert row["n"] == 1 and row["stderr"] is None
    assert row["diff"] == pytest.approx(1.47 - 1.48)
    assert row["ci_low"] is None and row["ci_high"] is None and row["p_value"] is None
    assert row["p_holm"] is None and row["verdict"] == "no paired test (n=1, no interval)"
    table = plot.format_table(rows)
    line = table_line(table, "shakespeare_char", "run_3", "best_val_loss")
    assert "1.4700 (n=1)" in line and "n=1, no interval" in line and "±" not in line


def test_format_table_shows_mean_stderr_n_interval_and_p(runs):
    rows = plot.comparison_rows(plot.load_runs(plot.find_run_dirs(runs), warn=None))
    table = plot.format_table(rows)
    assert "shakespeare_char:" in table and "text8:" in table
    line = table_line(table, "shakespeare_char", "run_1", "best_val_loss")
    assert "1.4533 ± 0.0088 (n=3)" in line  # mean 1.45333, stderr 0.00882
    # the hand computation above: diff -0.02667, interval -0.02667 -+ 0.05171, p 0.157
    assert "-0.0267 [-0.0784, +0.0250] paired, 3 seeds" in line
    assert "0.157" in line and line.endswith("within noise")


def test_timing_metrics_show_the_difference_of_means_and_no_test(tmp_path):
    # A bit-identical twin of the baseline whose every run happened to be ~1 s quicker on the shared machine:
    # paired by seed this looks "faster" at p < 0.01, yet seeds do not pair wall-clock times.
    base = write_run(tmp_path / "run_0", datasets=("shakespeare_char",))
    twin = write_run(tmp_path / "run_1", datasets=("shakespeare_char",),
                     metrics=dict(BASE, total_train_time=[59.0, 60.1, 60.9],
                                  avg_inference_tokens_per_second=[611.0, 615.8, 621.2]))
    rows = plot.comparison_rows([base, twin])
    timing = [m for m, info in plot.TABLE_METRICS.items() if info.timing]
    assert {"total_train_time", "avg_inference_tokens_per_second"} <= set(timing)
    table = plot.format_table(rows)
    for metric, diff in (("total_train_time", -1.0), ("avg_inference_tokens_per_second", 11.0)):
        row = row_for(rows, "run_1", metric)
        assert row["diff"] == pytest.approx(diff)  # the plain difference of the two means
        assert row["ci_low"] is None and row["ci_high"] is None
        assert row["p_value"] is None and row["p_holm"] is None
        assert row["verdict"] == "timing: no test (runs share a machine)"
        line = table_line(table, "shakespeare_char", "run_1", metric)
        assert "(difference of means)" in line and "[" not in line and "faster" not in line
        assert row_for(rows, "run_0", metric)["stderr"] is not None  # mean ± stderr (n) is still shown
    # the loss rows of the twin: identical, and they are the only rows in the correction
    assert row_for(rows, "run_1")["verdict"] == "identical on every shared seed"
    assert "over all 0 paired tests" in table


def test_holm_adjusts_p_values_step_down_by_hand():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept at 0.06 (monotone)
    assert plot.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert plot.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert plot.holm([]) == []


def test_loss_verdicts_use_holm_over_every_dataset_metric_and_run(runs):
    rows = plot.comparison_rows(plot.load_runs(plot.find_run_dirs(runs), warn=None))
    # The paired tests with a p-value: run_1 x {best_val_loss, final_train_loss} x {shakespeare_char, text8}.
    # run_3 has one seed; run_4 equals the baseline (no spread in its differences, so no p-value).
    tested = [r for r in rows if r["p_holm"] is not None]
    assert sorted((r["dataset"], r["metric"], r["run"]) for r in tested) == sorted(
        (d, m, "run_1") for d in DATASETS for m in ("best_val_loss", "final_train_loss"))
    assert all("p_holm" in r for r in rows)
    train = row_for(rows, "run_1", "final_train_loss")
    val = row_for(rows, "run_1", "best_val_loss")
    # final_train_loss: d = -0.10, -0.06, -0.11 per seed, raw p 0.028 < 0.05, the smallest p of four (twice,
    # once per dataset): Holm multiplies it by 4 -> 0.11, so the unadjusted "better (lower)" does not hold
    assert train["p_value"] < 0.05 and train["ci_high"] < 0
    assert train["p_holm"] == pytest.approx(4 * train["p_value"])
    assert train["verdict"] == "within noise after Holm"
    assert val["p_holm"] == pytest.approx(max(4 * train["p_value"], 2 * val["p_value"]))
    assert val["verdict"] == "within noise"
    table = plot.format_table(rows)
    assert "Holm-Bonferroni correction over all 4 paired tests" in table
    assert "95% CI (unadjusted)" in table
    header = [x for x in table.splitlines() if x.lstrip().startswith("metric ")][0]
    assert header.split()[-4:] == ["p", "p", "(Holm)", "verdict"]
    line = table_line(table, "text8", "run_1", "final_train_loss")
    assert f"{train['p_value']:.3g}" in line and f"{train['p_holm']:.3g}" in line


def test_the_table_names_full_val_loss_as_its_primary_metric_and_shows_it_first(tmp_path):
    assert list(plot.TABLE_METRICS)[0] == "full_val_loss"
    base = write_run(tmp_path / "run_0", metrics=dict(BASE, full_val_loss=[1.49, 1.47, 1.48]))
    other = write_run(tmp_path / "run_1", metrics=dict(BASE, full_val_loss=[1.39, 1.38, 1.40]))
    rows = plot.comparison_rows([base, other])
    assert [r["metric"] for r in rows if r["dataset"] == "text8"][:2] == ["full_val_loss", "full_val_loss"]
    table = plot.format_table(rows)
    assert "Primary metric: full_val_loss (the final model on the whole val split, no sampling noise)" \
        in table.splitlines()[0]
    block = table.split("text8:\n", 1)[1].splitlines()
    assert block[1].split()[:2] == ["full_val_loss", "run_0"]


# ----------------------------------------------------------------------------------------------
# Which data the runs used
# ----------------------------------------------------------------------------------------------

def data_record(**changes) -> dict:
    """The "data" entry experiment.py writes per dataset: a 4,154,064-byte enwik8 prefix split 90/5/5."""
    record = {"source": "enwik8 (first 4154064 bytes)", "source_bytes": 4154064, "standard_split": False,
              "warning": "not the standard 100M-byte enwik8", "sha256": {"train": "a1", "val": "b2", "test": "c3"},
              "splits": {"train": 3738657, "val": 207703, "test": 207704}}
    return {**record, **changes}


def add_data(run: Path, dataset: str, record: dict) -> Path:
    final = json.loads((run / "final_info.json").read_text())
    final[dataset]["data"] = record
    (run / "final_info.json").write_text(json.dumps(final))
    return run


def test_non_standard_data_is_named_in_the_table_heading(tmp_path):
    datasets = ("shakespeare_char", "enwik8")
    standard = data_record(source="shakespeare_char", source_bytes=1115394, standard_split=True, warning=None,
                           sha256={"train": "d4", "val": "e5"}, splits={"train": 1003854, "val": 111540})
    dirs = []
    for i in range(2):
        run = write_run(tmp_path / f"run_{i}", datasets=datasets)
        dirs.append(add_data(add_data(run, "enwik8", data_record()), "shakespeare_char", standard))
    table = plot.format_table(plot.comparison_rows(dirs))
    assert table_heading(table, "enwik8") == ("enwik8 (NON-STANDARD DATA: 4,154,064-byte source split 90/5/5; "
                                              "not comparable with published results):")
    assert table_heading(table, "shakespeare_char") == "shakespeare_char:"


def test_runs_on_different_or_unrecorded_data_are_named_in_the_heading(tmp_path):
    one = ("enwik8",)
    runs = [add_data(write_run(tmp_path / "run_0", datasets=one), "enwik8", data_record()),
            add_data(write_run(tmp_path / "run_1", datasets=one), "enwik8", data_record()),
            add_data(write_run(tmp_path / "run_2", datasets=one), "enwik8",
                     data_record(sha256={"train": "a1", "val": "ff", "test": "c3"}))]
    heading = table_heading(plot.format_table(plot.comparison_rows(runs)), "enwik8")
    assert "runs used different data" in heading and "run_2" in heading and "run_1" not in heading
    assert heading.startswith("enwik8 (NON-STANDARD DATA:") and "\n" not in heading
    # the same data everywhere: no such claim
    assert "different data" not in table_heading(plot.format_table(plot.comparison_rows(runs[:2])), "enwik8")
    # a run from before the records, beside runs that record standard data: not claimed standard
    standard = data_record(standard_split=True, source_bytes=100_000_000)
    for run in runs[1:]:
        add_data(run, "enwik8", standard)
    old = write_run(tmp_path / "run_0", datasets=one)  # rewritten without a record
    heading = table_heading(plot.format_table(plot.comparison_rows([old, *runs[1:2]])), "enwik8")
    assert heading != "enwik8:" and "data not recorded by run_0" in heading
    # only old runs: nothing recorded, no label
    assert table_heading(plot.format_table(plot.comparison_rows([old])), "enwik8") == "enwik8:"


def test_figure_titles_carry_the_non_standard_data_label(tmp_path, monkeypatch):
    datasets = ("shakespeare_char", "enwik8")
    dirs = [add_data(write_run(tmp_path / f"run_{i}", datasets=datasets), "enwik8", data_record()) for i in range(2)]
    titles = {}

    def record_titles(fig, path):
        titles[Path(path).name] = " | ".join(ax.get_title() for ax in fig.axes)

    monkeypatch.setattr(plot, "save_figure", record_titles)
    plot.write_plots(plot.load_runs(dirs, warn=None), ["a", "b"], tmp_path / "plots")
    for name in ("train_loss_enwik8.png", "val_loss_enwik8.png", "lr_enwik8.png"):
        assert "enwik8 (non-standard 4.2 MB source)" in titles[name], titles[name]
    assert "enwik8\n(non-standard 4.2 MB source)" in titles["summary.png"]
    for name in ("train_loss_shakespeare_char.png", "val_loss_shakespeare_char.png", "lr_shakespeare_char.png"):
        assert "non-standard" not in titles[name] and "shakespeare_char" in titles[name]


# ----------------------------------------------------------------------------------------------
# notes.txt
# ----------------------------------------------------------------------------------------------

def test_notes_get_the_reference_format(runs):
    notes = runs / "notes.txt"
    plot.append_run_to_notes(notes, runs / "run_0")
    lines = notes.read_text().splitlines()
    assert lines[0] == f"# Title: {plot.DEFAULT_TITLE}"
    assert lines[1].startswith("# Experiment description: ")
    assert lines[2] == "## Run 0: Baseline"
    assert lines[3].startswith("Results: {'shakespeare_char': {'final_train_loss_mean': ")
    results = ast.literal_eval(lines[3][len("Results: "):])
    assert list(results) == list(DATASETS)
    assert list(results["text8"]) == [f"{k}_mean" for k in plot.CONTRACT_METRICS]
    assert results["text8"]["best_val_loss_mean"] == pytest.approx(1.48)
    assert lines[4] == "Description: Cosine schedule, no agent."


def test_the_results_line_carries_full_val_loss_after_the_contract_keys(tmp_path):
    run = write_run(tmp_path / "run_0", title="Baseline", metrics=dict(BASE, full_val_loss=[1.49, 1.47, 1.48]))
    notes = tmp_path / "notes.txt"
    plot.append_run_to_notes(notes, run)
    (line,) = [x for x in notes.read_text().splitlines() if x.startswith("Results: ")]
    results = ast.literal_eval(line[len("Results: "):])
    assert list(results["text8"]) == [f"{k}_mean" for k in plot.CONTRACT_METRICS] + ["full_val_loss_mean"]
    assert results["text8"]["full_val_loss_mean"] == pytest.approx(1.48)


def test_update_notes_replaces_a_run_section_and_keeps_one_table(runs):
    notes = runs / "notes.txt"
    for run in ("run_0", "run_1", "run_3"):
        plot.update_notes(notes, runs / run)
    write_run(runs / "run_1", title="Q-learning, rerun", description="Again.")
    plot.update_notes(notes, runs / "run_1")
    text = notes.read_text()
    assert text.count("## Run 1:") == 1 and "## Run 1: Q-learning, rerun" in text
    assert text.count(plot.TABLE_BEGIN) == 1 and text.count(plot.TABLE_END) == 1
    lines = text.splitlines()
    assert lines[2] == plot.TABLE_BEGIN  # right after the header
    # run_2 is broken and run_4 is in the folder: the table covers every usable run, sections only those added
    assert [x for x in lines if x.startswith("## Run")] == ["## Run 0: Baseline", "## Run 1: Q-learning, rerun",
                                                            "## Run 3: One seed"]
    table = text[text.index(plot.TABLE_BEGIN):text.index(plot.TABLE_END)]
    assert "run_4" in table and "run_2" not in table


def _update_notes_at_once(barrier, notes: str, run_dir: str) -> None:
    barrier.wait()  # every process starts its read-modify-write at the same moment
    plot.update_notes(Path(notes), Path(run_dir))


def test_concurrent_updates_lose_nothing_and_rerunning_is_idempotent(tmp_path):
    n = 8
    for i in range(n):
        write_run(tmp_path / f"run_{i}", title=f"Run number {i}", datasets=("shakespeare_char",))
    notes = tmp_path / "notes.txt"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(n)
    procs = [ctx.Process(target=_update_notes_at_once, args=(barrier, str(notes), str(tmp_path / f"run_{i}")))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * n
    text = notes.read_text()
    for i in range(n):
        assert text.count(f"## Run {i}: Run number {i}\n") == 1, text
    assert text.count(plot.TABLE_BEGIN) == 1 and text.count(plot.TABLE_END) == 1
    assert [x for x in text.splitlines() if x.startswith("## Run")] == [f"## Run {i}: Run number {i}"
                                                                        for i in range(n)]
    before = notes.read_bytes()
    plot.update_notes(notes, tmp_path / "run_3")
    plot.append_run_to_notes(notes, tmp_path / "run_5")
    assert notes.read_bytes() == before


def test_update_notes_keeps_text_others_added_below_a_section(runs):
    notes = runs / "notes.txt"
    plot.update_notes(notes, runs / "run_0")
    notes.write_text(notes.read_text() + "\nPlot Descriptions:\n1. A figure.\n")
    plot.update_notes(notes, runs / "run_1")
    plot.update_notes(notes, runs / "run_0")
    text = notes.read_text()
    assert text.count("Plot Descriptions:") == 1
    assert text.index("## Run 0:") < text.index("Plot Descriptions:") < text.index("## Run 1:")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def test_table_flag_prints_the_table_and_draws_nothing(runs):
    labels = runs / "labels.json"
    labels.write_text(json.dumps({"run_1": "RL agent"}))
    result = run_plot("--table", "--labels", labels, cwd=runs)
    assert result.returncode == 0, result.stderr
    assert "shakespeare_char:" in result.stdout and "diff vs run_0 [95% CI]" in result.stdout
    assert "run_1 RL agent" in result.stdout and "n=1, no interval" in result.stdout
    assert not list(runs.glob("*.png"))


def test_bad_input_is_one_error_line(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(runs)
    assert plot.main(["no_such_run"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: no such run folder: no_such_run"]
    (runs / "labels.json").write_text("{oops")
    assert plot.main(["--table", "--labels", "labels.json"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot read labels file labels.json")
    assert plot.main(["--bogus"]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert plot.main(["--table"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: no finished run folder found")



def test_an_output_that_cannot_be_written_is_one_error_line(runs, capsys):
    folder_as_notes = runs / "notes_is_a_folder"
    folder_as_notes.mkdir()
    assert plot.main(["--notes", str(folder_as_notes), str(runs / "run_0"), str(runs / "run_1")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot write") and str(folder_as_notes) in err and "\n" not in err
    assert list(folder_as_notes.iterdir()) == []


def test_notes_flag_rewrites_sections_and_table(runs, monkeypatch, capsys):
    monkeypatch.chdir(runs)
    assert plot.main(["--notes", "notes.txt"]) == 0
    assert capsys.readouterr().err.startswith("warning: skipping run_2: ")
    text = (runs / "notes.txt").read_text()
    assert [x for x in text.splitlines() if x.startswith("## Run")] == [
        "## Run 0: Baseline", "## Run 1: Q-learning", "## Run 3: One seed", "## Run 4: Other eval iterations"]
    assert text.count(plot.TABLE_BEGIN) == 1
