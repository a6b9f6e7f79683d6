#!/usr/bin/env python
"""Figures, comparison table and notes.txt for finished runs of experiment.py.

Usage
    python plot.py                             # every run_* folder here -> PNGs in the current directory
    python plot.py run_0 run_3 --out_dir plots # chosen run folders, in the order given
    python plot.py --labels labels.json        # {"run_0": "cosine baseline", ...} replaces the legend labels
    python plot.py --table                     # print the comparison table against run_0; draws nothing
    python plot.py --notes notes.txt           # (re)write every run's section and the table in notes.txt

Figures, for each dataset D:
    train_loss_D.png  training (minibatch) loss: mean over seeds, band = ±1 standard error
    val_loss_D.png    validation loss, same
    lr_D.png          the learning rate each seed actually used (schedule x agent multiplier), log scale
    summary.png       best validation loss per run, one panel per dataset, error bars = ±1 standard error
Standard error = std(ddof=1)/sqrt(n); with one seed there is no band and no error bar.
A dataset whose runs recorded non-standard data (final_info.json[D]["data"]), or different data, says so in
every figure title and in the table's dataset heading.
Seeds of a run may have been evaluated at different iterations: a run's mean curve uses only the iterations
that all its seeds logged. Each run keeps its own x values. A run keeps the same colour and line style in
every figure.

Which runs
    The RUN_DIR arguments in the order given (a folder that holds run_* folders stands for them), else every
    run_* folder in the current directory sorted by run number. Labels: --labels, else run.json's title, else
    its description, else the folder name. A folder without final_info.json (not finished) or with unreadable
    or incomplete JSON is skipped with one line `warning: skipping NAME: WHY` on stderr.
    The baseline for comparisons is the run named run_0, else the first run.

Exit status
    0 done; 1 no usable run folder found (nothing to draw or compare), or an output that cannot be
    written (a --notes path that is a folder, a full disk); 2 bad command line (a RUN_DIR that
    does not exist, an unreadable --labels file, an unknown option). Errors are one `error: ...` line on stderr.

Python API (experiment.py calls the notes functions when a run finishes; neither imports torch):
    update_notes(notes_path, run_dir, run_dirs=None)  run's section + comparison table; locked, atomic
    append_run_to_notes(notes_path, run_dir)          run's section only; locked, atomic
    comparison_rows(runs) -> list[dict]               the table's numbers; format_table(rows) -> str
    holm(p_values) -> list[float]                     Holm-Bonferroni adjusted p-values (harness/stats.py)
    data_check(runs, dataset) -> DataCheck            what the runs' data records say (.note(), .label())
    load_run(path) -> Run, find_run_dirs(folder) -> list[Path], mean_curve(seeds), write_plots(...)
    plot_pareto(final_info, path, title)              prune.py: loss against FLOPs, one line per method
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import math
import re
import sys
import textwrap
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import reduce
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np

from harness.stats import holm, paired_difference, stderr, welch_difference  # the project's one copy
from harness.files import atomic_write_bytes  # the project's one atomic writer (no torch)

# The four keys every final_info.json has (SPEC section 4); the Results line of notes.txt shows these first.
CONTRACT_METRICS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")
# After them on the Results line, when a run has it: the primary metric (SPEC section 5).
NOTES_METRICS = CONTRACT_METRICS + ("full_val_loss",)
PRIMARY_METRIC = "full_val_loss"


class MetricInfo(NamedTuple):
    unit: str
    higher: str                 # word for a higher value than the baseline's
    lower: str                  # word for a lower value
    # Wall-clock time or speed: runs execute one after another on a shared machine, so the same seed does not
    # pair two runs' times (bit-identical twins differ), and no test or verdict is made for them.
    timing: bool = False


# Table order: the primary metric first. The final model on the whole val (and test) split has no sampling
# noise, the sharper comparison; best_val_loss is the best of noisy sampled evaluations.
TABLE_METRICS = {
    "full_val_loss": MetricInfo("nats/char", "worse", "better"),
    "best_val_loss": MetricInfo("nats/char", "worse", "better"),
    "test_loss": MetricInfo("nats/char", "worse", "better"),
    "final_train_loss": MetricInfo("nats/char", "worse", "better"),
    "total_train_time": MetricInfo("s", "slower", "faster", timing=True),
    "avg_inference_tokens_per_second": MetricInfo("tokens/s", "faster", "slower", timing=True),
}
ALPHA = 0.05                    # family-wise error rate of the table's tests (Holm)
TIMING_VERDICT = "timing: no test (runs share a machine)"
DEFAULT_TITLE = "Reinforcement-learned learning-rate control for small GPTs"
DEFAULT_DESCRIPTION = ("A tabular Q-learning agent rescales the learning rate of a small character-level GPT after "
                       "every evaluation; each run is compared with the fixed cosine schedule of run_0 on "
                       "shakespeare_char, enwik8 and text8.")
TABLE_BEGIN = "<!-- comparison table: generated by plot.py; do not edit -->"
TABLE_END = "<!-- end comparison table -->"
RESULT_KEY = re.compile(r"^(?P<dataset>.+)_(?P<seed>\d+)_(?P<kind>train_info|val_info)$")
# Which numbers of all_results.json each figure draws: series name -> (record list, field).
SERIES = {"train": ("train_info", "loss"), "val": ("val_info", "val/loss"), "lr": ("val_info", "lr")}


class RunError(ValueError):
    """A run folder that cannot be used (not finished, unreadable or incomplete JSON)."""


class UsageError(Exception):
    """Bad command line: reported as one `error:` line, exit status 2."""


# ----------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    name: str                   # folder name, e.g. run_3
    number: Optional[int]       # 3 for run_3; None for other folder names
    title: str                  # run.json title, else its description, else the folder name
    description: str
    final: dict                 # final_info.json
    configs: dict = field(default_factory=dict)  # run.json's per-dataset configs (max_iters for the LR plot)
    policies: dict = field(default_factory=dict)  # run.json's per-dataset trained policy ({"dir", ...})
    # curves[dataset][series][seed_index] = (iterations, values), iterations sorted and unique
    curves: dict = field(default_factory=dict)


def run_number(name: str) -> Optional[int]:
    match = re.fullmatch(r"run_(\d+)", name)
    return int(match.group(1)) if match else None


def find_run_dirs(folder: Path) -> list[Path]:
    """run_* folders inside `folder`, by run number (run_2 before run_10), other names after."""
    dirs = [p for p in Path(folder).glob("run_*") if p.is_dir()]
    return sorted(dirs, key=lambda p: (run_number(p.name) is None, run_number(p.name) or 0, p.name))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise RunError(f"cannot read {path.name} ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"{path.name} is not valid JSON ({e})") from None


def _one_line(text) -> str:
    return " ".join(str(text or "").split())


def load_run(path: Path, curves: bool = True) -> Run:
    """Read and check one run folder; raise RunError saying why it cannot be used.

    Everything is checked here, up front, so that a bad folder is skipped with one clear reason instead of
    failing half-way through a figure. curves=False skips all_results.json (the table needs only final_info).
    """
    path = Path(path)
    info = _read_json(path / "run.json") if (path / "run.json").exists() else {}
    if not isinstance(info, dict):
        raise RunError("run.json is not a JSON object")
    if not (path / "final_info.json").exists():
        status = info.get("status")
        raise RunError("no final_info.json (run not finished" + (f", status {status!r})" if status else ")"))
    final = _read_json(path / "final_info.json")
    _check_final_info(final)
    title = _one_line(info.get("title")) or _one_line(info.get("description")) or path.name
    run = Run(path=path, name=path.name, number=run_number(path.name), title=title,
              description=_one_line(info.get("description")), final=final,
              configs=info.get("configs") if isinstance(info.get("configs"), dict) else {},
              policies=info.get("policy") if isinstance(info.get("policy"), dict) else {})
    if curves:
        run.curves = _read_curves(path / "all_results.json", list(final))
    return run


def _check_final_info(final) -> None:
    if not isinstance(final, dict) or not final:
        raise RunError("final_info.json has no datasets")
    for dataset, entry in final.items():
        where = f"final_info.json[{dataset!r}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("means"), dict):
            raise RunError(f"missing key 'means' in {where}")
        if not isinstance(entry["means"].get("best_val_loss_mean"), (int, float)):
            raise RunError(f"missing key 'best_val_loss_mean' in {where}['means']")
        per_seed = entry.get("final_info_dict", {})
        if not isinstance(per_seed, dict) or not all(isinstance(v, list) for v in per_seed.values()):
            raise RunError(f"{where}['final_info_dict'] is not a dict of per-seed lists")
        seeds = entry.get("seeds")
        if seeds is not None and (not isinstance(seeds, list)
                                  or any(len(v) != len(seeds) for v in per_seed.values())):
            raise RunError(f"{where}['seeds'] does not match its per-seed lists")


def _read_curves(path: Path, datasets: list[str]) -> dict:
    if not path.exists():
        raise RunError("no all_results.json")
    results = _read_json(path)
    if not isinstance(results, dict):
        raise RunError("all_results.json is not a JSON object")
    curves: dict = {}
    for key, records in results.items():
        match = RESULT_KEY.match(key)
        if not match:
            continue  # <dataset>_<seed>_final_info: the same numbers as final_info.json
        if not isinstance(records, list):
            raise RunError(f"all_results.json[{key!r}] is not a list")
        dataset, seed = match["dataset"], int(match["seed"])
        for series, (kind, column) in SERIES.items():
            if kind != match["kind"]:
                continue
            points = {}
            for record in records:
                try:
                    points[int(record["iter"])] = float(record[column])
                except (KeyError, TypeError, ValueError):
                    raise RunError(f"all_results.json[{key!r}] has an entry without a number for "
                                   f"'iter' or {column!r}") from None
            iters = np.array(sorted(points), dtype=float)
            values = np.array([points[i] for i in sorted(points)], dtype=float)
            curves.setdefault(dataset, {}).setdefault(series, {})[seed] = (iters, values)
        if match["kind"] == "train_info" and records and all(isinstance(r.get("lr"), (int, float)) for r in records):
            # Newer runs log the LR of every recorded step: the warmup and the decay as they happened.
            steps = sorted((int(r["iter"]), float(r["lr"])) for r in records)
            curves.setdefault(dataset, {}).setdefault("step_lr", {})[seed] = (
                np.array([i for i, _ in steps], dtype=float), np.array([v for _, v in steps], dtype=float))
        groups = _group_rates(records)
        if groups is not None and (match["kind"] == "train_info" or seed not in curves.get(dataset, {}).get(
                "lr_groups", {})):  # --lr_groups layer: per logged step if recorded, else per evaluation
            curves.setdefault(dataset, {}).setdefault("lr_groups", {})[seed] = groups
    for dataset in datasets:
        missing = [s for s in SERIES if not curves.get(dataset, {}).get(s)]
        if missing:
            kinds = sorted({SERIES[s][0] for s in missing})
            raise RunError(f"all_results.json has no {' or '.join(kinds)} for {dataset}")
    return curves


def _group_rates(records: list) -> Optional[tuple]:
    """(iterations, group names, rates[group, record]) from records that carry "lr_groups", else None."""
    rows = [r for r in records if isinstance(r, dict) and isinstance(r.get("lr_groups"), dict) and r["lr_groups"]]
    if not rows or len(rows) != len(records):
        return None
    names = list(rows[0]["lr_groups"])
    try:
        rates = np.array([[float(r["lr_groups"][name]) for r in rows] for name in names])
        iters = np.array([int(r["iter"]) for r in rows], dtype=float)
    except (KeyError, TypeError, ValueError):
        return None
    order = np.argsort(iters, kind="stable")
    return iters[order], names, rates[:, order]


def load_runs(paths: Iterable[Path], warn: Optional[Callable[[str], None]], curves: bool = True) -> list[Run]:
    """The usable runs among `paths`; each unusable one is reported once through `warn` (None: silently)."""
    runs = []
    for path in paths:
        try:
            runs.append(load_run(path, curves=curves))
        except RunError as e:
            if warn:
                warn(f"warning: skipping {Path(path).name}: {e}")
    return runs


def _datasets(runs: Sequence[Run]) -> list[str]:
    """Every dataset of any run, in order of first appearance."""
    return list(dict.fromkeys(d for run in runs for d in run.final))


# ----------------------------------------------------------------------------------------------
# Which data each run used
# ----------------------------------------------------------------------------------------------

@dataclass
class DataCheck:
    """What the runs' "data" records (final_info.json[dataset]["data"], newer runs) say about one dataset.

    Published results use the standard split of the full source; a run on a prefix or its own split is
    not comparable with them, and two runs on different data are not comparable with each other.
    """
    nonstandard: Optional[dict] = None                  # a record with standard_split False
    reference: Optional[str] = None                     # the first run with a record
    different: list = field(default_factory=list)       # runs whose split hashes differ from reference's
    unrecorded: list = field(default_factory=list)      # runs without a record while others have one

    def note(self) -> Optional[str]:
        """One line for the table's dataset heading; None when there is nothing to warn about."""
        parts = []
        if self.nonstandard is not None:
            parts.append(f"NON-STANDARD DATA: {_source_text(self.nonstandard)}; not comparable with published results")
        if self.different:
            parts.append(f"runs used different data: {self.reference} vs {_names(self.different)} "
                         "(the splits' sha256 differ)")
        if self.unrecorded:
            parts.append(f"data not recorded by {_names(self.unrecorded)}: not known to be standard or the same")
        return "; ".join(parts) or None

    def label(self) -> Optional[str]:
        """A few words for figure titles."""
        parts = []
        if self.nonstandard is not None:
            size = self.nonstandard.get("source_bytes")
            parts.append(f"non-standard {size / 1e6:.1f} MB source" if _is_count(size) else "non-standard data")
        if self.different:
            parts.append("runs used different data")
        if self.unrecorded:
            parts.append("data not recorded for every run")
        return "; ".join(parts) or None


def data_check(runs: Sequence[Run], dataset: str) -> DataCheck:
    records = [(run.name, run.final[dataset].get("data")) for run in runs if dataset in run.final]
    known = [(name, record) for name, record in records if isinstance(record, dict)]
    if not known:
        return DataCheck()  # runs from before the records: nothing known, nothing claimed
    reference, first = known[0]
    return DataCheck(
        nonstandard=next((r for _, r in known if r.get("standard_split") is False), None),
        reference=reference,
        different=[name for name, record in known[1:] if _hashes_differ(first, record)],
        unrecorded=[name for name, record in records if not isinstance(record, dict)])


def _hashes_differ(a: dict, b: dict) -> bool:
    """Any split both records hash (val above all) with different contents."""
    ha, hb = a.get("sha256"), b.get("sha256")
    if not isinstance(ha, dict) or not isinstance(hb, dict):
        return False
    return any(ha[split] != hb[split] for split in ha.keys() & hb.keys())


def _is_count(value) -> bool:
    """A whole number >= 0, also when JSON wrote it as 4154064.0."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0 and float(value).is_integer())


def _source_text(record: dict) -> str:
    """'4,154,064-byte source split 90/5/5' from source_bytes and the splits' token counts."""
    size = record.get("source_bytes")
    text = f"{int(size):,}-byte source" if _is_count(size) else "source of unknown size"
    splits = record.get("splits")
    if isinstance(splits, dict) and splits and all(_is_count(n) for n in splits.values()) \
            and sum(splits.values()) > 0:
        order = sorted(splits, key=lambda k: (["train", "val", "test"] + [k]).index(k))
        text += " split " + "/".join(str(round(100 * splits[k] / sum(splits.values()))) for k in order)
    return text


def _names(names: Sequence[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _dataset_title(runs: Sequence[Run], dataset: str, sep: str = " ") -> str:
    """The dataset's name in figure titles, with the data label when the data needs one."""
    label = data_check(runs, dataset).label()
    return f"{dataset}{sep}({label})" if label else dataset


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def mean_curve(seeds: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(iterations, mean, stderr or None for one seed) across seeds, each seed an (iterations, values) pair.

    Only iterations that every seed logged are used, so each point is a mean over the same n seeds.
    """
    shared = reduce(np.intersect1d, [iters for iters, _ in seeds])
    stack = np.array([values[np.searchsorted(iters, shared)] for iters, values in seeds])
    return shared, stack.mean(axis=0), stderr(stack)


@dataclass
class Sample:
    """One run's per-seed values of one metric on one dataset."""
    values: np.ndarray
    seeds: Optional[list]       # seed values, the key that pairs runs; None when final_info.json lacks them

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(self.values.mean())


def _sample(run: Run, dataset: str, metric: str) -> Optional[Sample]:
    entry = run.final.get(dataset)
    values = (entry or {}).get("final_info_dict", {}).get(metric)
    if not values or any(not isinstance(v, (int, float)) for v in values):
        return None
    return Sample(np.array(values, dtype=float), entry.get("seeds"))


def compare(base: Sample, other: Sample) -> dict:
    """Difference other - base with a 95% interval: paired over shared seeds, else Welch, else none (n = 1)."""
    shared = [s for s in other.seeds if s in base.seeds] if base.seeds and other.seeds else []
    if len(shared) >= 2:
        # The same seed means the same initialisation and data order: pairing removes that shared noise.
        by_seed_base, by_seed_other = dict(zip(base.seeds, base.values)), dict(zip(other.seeds, other.values))
        d = paired_difference([by_seed_other[s] for s in shared], [by_seed_base[s] for s in shared])
        return {"diff": d.mean, "ci_low": d.low, "ci_high": d.high, "method": "paired", "shared_seeds": d.n,
                "p_value": d.p}
    if base.n >= 2 and other.n >= 2:
        d = welch_difference(other.values, base.values)
        return {"diff": d.mean, "ci_low": d.low, "ci_high": d.high, "method": "Welch",
                "shared_seeds": len(shared), "p_value": None}
    return {"diff": other.mean - base.mean, "ci_low": None, "ci_high": None, "method": "n=1, no interval",
            "shared_seeds": len(shared), "p_value": None}


def _verdict(row: dict) -> str:
    """Directional only where the Holm-adjusted paired p is below ALPHA: many tests per table find chance effects."""
    if TABLE_METRICS[row["metric"]].timing:
        return TIMING_VERDICT
    if row["method"] == "n=1, no interval":
        return "no paired test (n=1, no interval)"
    if row["method"] != "paired":
        return "no paired test (fewer than 2 shared seeds)"
    if row["p_holm"] is None:  # no paired p: the t-test is undefined when every difference is 0
        return "identical on every shared seed" if row["ci_low"] == row["ci_high"] == 0 else "no p-value"
    if row["p_holm"] >= ALPHA:
        return "within noise after Holm" if row["p_value"] < ALPHA else "within noise"
    info = TABLE_METRICS[row["metric"]]
    return f"{info.higher} (higher)" if row["diff"] > 0 else f"{info.lower} (lower)"


def _compare_row(metric: str, base: Sample, other: Sample) -> dict:
    if TABLE_METRICS[metric].timing:
        # Seeds do not pair wall-clock times (see MetricInfo.timing): the plain difference of means, no interval.
        return {"diff": other.mean - base.mean, "method": "timing"}
    return compare(base, other)


def comparison_rows(runs: Sequence, labels: Optional[dict] = None) -> list[dict]:
    """One dict per dataset x metric x run, comparing each run with the baseline (run_0, else the first run).

    runs: Run objects or run folder paths. Keys: dataset, metric, run, label, baseline, n, mean, stderr
    (None for n = 1), seeds, diff, ci_low, ci_high (None: no interval), method ("paired", "Welch",
    "n=1, no interval", "timing", "baseline", "no baseline"), shared_seeds, p_value (paired t-test; None
    otherwise), p_holm (p_value Holm-adjusted over every row that has one; None otherwise), verdict, and
    data_note (what is wrong with the dataset's data for comparisons, see data_check; None when nothing).
    """
    runs = [r if isinstance(r, Run) else load_run(r, curves=False) for r in runs]
    if not runs:
        return []
    labels = labels or {}
    base = next((r for r in runs if r.name == "run_0"), runs[0])
    rows = []
    for dataset in _datasets(runs):
        note = data_check(runs, dataset).note()
        for metric in TABLE_METRICS:
            base_sample = _sample(base, dataset, metric)
            for run in runs:
                sample = _sample(run, dataset, metric)
                if sample is None:
                    continue
                row = {"dataset": dataset, "metric": metric, "run": run.name,
                       "label": labels.get(run.name, run.title), "baseline": base.name, "n": sample.n,
                       "mean": sample.mean, "stderr": stderr(sample.values), "seeds": sample.seeds,
                       "diff": None, "ci_low": None, "ci_high": None, "method": "baseline",
                       "shared_seeds": None, "p_value": None, "p_holm": None, "verdict": "baseline",
                       "data_note": note}
                if run is not base:
                    if base_sample is None:
                        row.update(method="no baseline", verdict=f"{base.name} has no {metric} on {dataset}")
                    else:
                        row.update(_compare_row(metric, base_sample, sample))
                rows.append(row)
    _add_holm_and_verdicts(rows)
    return rows


def _add_holm_and_verdicts(rows: list[dict]) -> None:
    """One correction over the whole table (all datasets and loss metrics), then every compared row's verdict."""
    tested = [r for r in rows if r["method"] == "paired" and r["p_value"] is not None]
    for row, adjusted in zip(tested, holm([r["p_value"] for r in tested])):
        row["p_holm"] = adjusted
    for row in rows:
        if row["method"] not in ("baseline", "no baseline"):
            row["verdict"] = _verdict(row)


# ----------------------------------------------------------------------------------------------
# The table, as text
# ----------------------------------------------------------------------------------------------

def _num(value: float, digits: int, sign: bool = False) -> str:
    """`digits` significant digits in plain notation (1950, 0.0012), never 2e+02: tables are read by people."""
    decimals = 0 if value == 0 or not math.isfinite(value) else max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:{'+' if sign else ''}.{decimals}f}"


def _mean_cell(row: dict) -> str:
    if row["stderr"] is None:
        return f"{_num(row['mean'], 5)} (n={row['n']})"
    return f"{_num(row['mean'], 5)} ± {_num(row['stderr'], 2)} (n={row['n']})"


def _diff_cell(row: dict) -> str:
    if row["method"] == "baseline":
        return "(baseline)"
    if row["method"] == "timing":
        return f"{_num(row['diff'], 3, sign=True)} (difference of means)"
    if row["diff"] is None:
        return "-"
    if row["ci_low"] is None:
        return f"{_num(row['diff'], 3, sign=True)}, n=1, no interval"
    how = f"paired, {row['shared_seeds']} seeds" if row["method"] == "paired" else row["method"]
    low, high = (_num(row[k], 3, sign=True) for k in ("ci_low", "ci_high"))
    return f"{_num(row['diff'], 3, sign=True)} [{low}, {high}] {how}"


def format_table(rows: Sequence[dict]) -> str:
    """The rows of comparison_rows as an aligned plain-text table, one block per dataset."""
    if not rows:
        return "(no finished runs to compare)"
    header = ("metric", "run", "mean ± stderr (n)", f"diff vs {rows[0]['baseline']} [95% CI]", "p", "p (Holm)",
              "verdict")
    out = _table_header(rows)
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        cells = [header]
        block = [r for r in rows if r["dataset"] == dataset]
        for r in block:
            name = f"{r['run']} {r['label']}" if r["label"] != r["run"] else r["run"]
            name = name if len(name) <= 36 else name[:35] + "…"
            p, p_holm = ("-" if r[k] is None else f"{r[k]:.3g}" for k in ("p_value", "p_holm"))
            cells.append((r["metric"], name, _mean_cell(r), _diff_cell(r), p, p_holm, r["verdict"]))
        widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
        note = block[0].get("data_note")
        out += ["", f"{dataset} ({note}):" if note else f"{dataset}:"]
        out += ["  " + "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells]
    return "\n".join(out)


def _table_header(rows: Sequence[dict]) -> list[str]:
    base = rows[0]["baseline"]
    tests = sum(r["p_holm"] is not None for r in rows)
    timing = ", ".join(m for m, info in TABLE_METRICS.items() if info.timing)
    units = ", ".join(f"{m} in {info.unit}" for m, info in TABLE_METRICS.items() if info.unit != "nats/char")
    return [
        f"Comparison with {base}. Primary metric: {PRIMARY_METRIC} (the final model on the whole val split, "
        "no sampling noise)",
        f"diff = run - {base}; 95% CI (unadjusted): paired t over the seeds both runs share, else Welch t.",
        f"p: paired t-test (raw); p (Holm): Holm-Bonferroni correction over all {tests} paired tests in this "
        "table (every dataset, loss metric and run).",
        f"Verdict: better/worse only where p (Holm) < {ALPHA}, else 'within noise' ('within noise after Holm': "
        f"raw p < {ALPHA} that does not survive the correction); Welch and n=1 rows: no paired test, no verdict.",
        f"Timing ({timing}): runs share a machine one after another, so seeds do not pair their times: "
        "difference of means only, no test.",
        f"Units: losses in nats/char, {units}."]


# ----------------------------------------------------------------------------------------------
# notes.txt
# ----------------------------------------------------------------------------------------------

@contextmanager
def _locked(notes_path: Path):
    """Exclusive lock on notes.txt.lock beside notes.txt, so two runs finishing together take turns."""
    lock_path = notes_path.with_name(notes_path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks until the other writer is done; released on close
        yield


def _rewrite_notes(notes_path: Path, edit: Callable[[list[str]], list[str]], title: str, description: str) -> None:
    """Read notes.txt (or start it with its header), apply `edit` to its lines, write it back atomically."""
    notes_path = Path(notes_path)
    with _locked(notes_path):
        text = notes_path.read_text() if notes_path.exists() else ""
        lines = text.splitlines()
        if not lines:
            lines = [f"# Title: {_one_line(title)}", f"# Experiment description: {_one_line(description)}"]
        new_text = "\n".join(edit(lines)) + "\n"
        if new_text != text:  # re-running for the same run leaves the file untouched
            atomic_write_bytes(notes_path, new_text.encode())


def run_section(run: Run) -> list[str]:
    """The run's lines in the reference format, ending with a blank line."""
    results = {dataset: {f"{k}_mean": entry["means"][f"{k}_mean"] for k in NOTES_METRICS
                         if f"{k}_mean" in entry["means"]}
               for dataset, entry in run.final.items()}
    number = run.number if run.number is not None else run.name
    return [f"## Run {number}: {run.title}", f"Results: {results!r}", *_rollback_line(run),
            f"Description: {run.description or '(no description recorded)'}", ""]


def _rollback_line(run: Run) -> list[str]:
    """The divergence guard's work, when it had any: a reader must know the numbers survived rollbacks."""
    parts = []
    for dataset, entry in run.final.items():
        rollbacks = entry.get("final_info_dict", {}).get("rollbacks", [])
        diverged = entry.get("statuses", []).count("diverged")
        if sum(rollbacks) or diverged:
            parts.append(f"{dataset}: {int(sum(rollbacks))} rollback(s) over {len(rollbacks)} seed(s), "
                         f"{diverged} seed(s) ended as diverged")
    return [f"Rollbacks: {'; '.join(parts)}"] if parts else []


def _with_section(lines: list[str], run: Run) -> list[str]:
    """Replace the run's section if present (only the lines this module writes), else insert it by run number."""
    section = run_section(run)
    header = section[0].split(":", 1)[0] + ":"  # "## Run 3:"
    lines = list(lines)
    for i, line in enumerate(lines):
        if line.startswith(header):
            j = i + 1
            while j < len(lines) and lines[j].startswith(("Results:", "Rollbacks:", "Description:")):
                j += 1
            if j < len(lines) and lines[j] == "":
                j += 1
            # Text someone added below (e.g. "Plot Descriptions:") is not ours and stays.
            return lines[:i] + section + lines[j:]
    if run.number is not None:
        for i, line in enumerate(lines):
            later = re.match(r"## Run (\d+):", line)
            if later and int(later.group(1)) > run.number:
                return lines[:i] + section + lines[i:]
    if lines and lines[-1] != "" and not lines[-1].startswith("# "):  # a blank line between sections
        lines.append("")
    return lines + section[:-1]  # the file ends with the Description line and its newline


def _with_table(lines: list[str], table: str) -> list[str]:
    """Put the one table block right after the `# ...` header, removing the previous block first."""
    if TABLE_BEGIN in lines and TABLE_END in lines[lines.index(TABLE_BEGIN):]:
        start = lines.index(TABLE_BEGIN)
        end = lines.index(TABLE_END, start) + 1
        if end < len(lines) and lines[end] == "":
            end += 1
        lines = lines[:start] + lines[end:]
    at = 0
    while at < len(lines) and lines[at].startswith("# "):
        at += 1
    return lines[:at] + [TABLE_BEGIN, *table.splitlines(), TABLE_END, ""] + lines[at:]


def append_run_to_notes(notes_path: Path, run_dir: Path, title: str = DEFAULT_TITLE,
                        description: str = DEFAULT_DESCRIPTION) -> None:
    """Add (or replace) the `## Run N:` section of run_dir in notes_path; creates the file with its header.

    title/description are used only for a new file's `# Title:` / `# Experiment description:` header.
    Raises RunError when run_dir is not a finished, readable run.
    """
    run = load_run(run_dir, curves=False)
    _rewrite_notes(notes_path, lambda lines: _with_section(lines, run), title, description)


def update_notes(notes_path: Path, run_dir: Path, run_dirs: Optional[list[Path]] = None,
                 title: str = DEFAULT_TITLE, description: str = DEFAULT_DESCRIPTION) -> None:
    """append_run_to_notes, then rewrite the comparison table, in one locked, atomic rewrite of notes.txt.

    run_dirs: the runs the table compares; default every run_* folder beside run_dir (plus run_dir).
    Unfinished or broken runs among them are left out of the table silently: they may still be training.
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, curves=False)
    here = run_dir.resolve()

    def edit(lines: list[str]) -> list[str]:
        # Runs the folder scan under the lock: the table then includes every run that finished before this write.
        dirs = list(run_dirs) if run_dirs is not None else find_run_dirs(run_dir.parent)
        if here not in {Path(d).resolve() for d in dirs}:
            dirs.append(run_dir)
        table_runs = []
        for d in dirs:
            table_runs += [run] if Path(d).resolve() == here else load_runs([d], warn=None, curves=False)
        return _with_table(_with_section(lines, run), format_table(comparison_rows(table_runs)))

    _rewrite_notes(notes_path, edit, title, description)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------

def run_colours(n: int) -> list:
    """One colour per run, by run order, used in every figure."""
    from matplotlib import colormaps
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["hsv"](i / n) for i in range(n)]


# Line style by run order, beside the colour: two runs with identical curves (a finding worth seeing,
# e.g. a control that matches the agent) stay visible as one line drawn over the other.
LINESTYLES = ("-", "--", "-.", ":", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)))


def run_linestyle(index: int):
    """Solid for the first run (the baseline); after it, broken styles, so a later run never hides one below."""
    return LINESTYLES[0] if index == 0 else LINESTYLES[1 + (index - 1) % (len(LINESTYLES) - 1)]


def _new_figure(width: float = 9.0, height: float = 5.2):
    # A bare Figure on an Agg canvas: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")  # room for titles and outside legends
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> None:
    """Write the PNG atomically: a reader (or a crash) never sees half a file."""
    png = io.BytesIO()
    fig.savefig(png, format="png", bbox_inches="tight")
    atomic_write_bytes(path, png.getvalue())


def _legend(ax, n_runs: int) -> None:
    if n_runs > 4:  # many runs: keep the legend from covering the curves
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.legend(fontsize=8)


def plot_loss(runs: Sequence[Run], labels: Sequence[str], colours: Sequence, dataset: str, series: str,
              path: Path) -> None:
    """Mean loss over seeds with a ±1 stderr band, one line per run."""
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn, curves = 0, []
    for index, (run, label, colour) in enumerate(zip(runs, labels, colours)):
        seeds = run.curves.get(dataset, {}).get(series)
        if not seeds:
            continue
        iters, mean, spread = mean_curve([seeds[s] for s in sorted(seeds)])
        marker = "o" if series == "val" else None  # evaluations are sparse: show where the points are
        ax.plot(iters, mean, color=colour, ls=run_linestyle(index), lw=1.6, marker=marker, ms=3,
                label=f"{label} (n={len(seeds)})")
        if spread is not None:
            ax.fill_between(iters, mean - spread, mean + spread, color=colour, alpha=0.2, lw=0)
        curves.append((iters, mean))
        drawn += 1
    what = {"train": "Training loss (minibatch)", "val": "Validation loss"}[series]
    zoomed = _zoom_on_later_training(ax, curves)
    ax.set_title(f"{what} on {_dataset_title(runs, dataset)}\n"
                 "mean over seeds; shaded band = ±1 standard error (none for n=1)"
                 + ("\ny axis fitted to the last 80% of training: the first drop runs off the top" if zoomed else ""))
    ax.set_xlabel("iteration")
    ax.set_ylabel(f"{what.split(' (')[0].lower()} (nats/char)")
    ax.grid(alpha=0.3)
    if drawn:
        _legend(ax, drawn)
    save_figure(fig, path)


def _zoom_on_later_training(ax, curves: list, later: float = 0.2) -> bool:
    """Fit the y axis to the points after the first `later` of training, where runs differ.

    The first few hundred steps fall from ln(vocab) ~ 4 to ~2.5 and would squeeze every difference
    that matters into a sliver of the plot. False (axis left alone) when the early points would not.
    """
    last = max((float(i[-1]) for i, _ in curves if len(i)), default=0.0)
    tail = np.concatenate([m[i >= later * last] for i, m in curves]) if curves else np.array([])
    everything = np.concatenate([m for _, m in curves]) if curves else np.array([])
    tail, everything = tail[np.isfinite(tail)], everything[np.isfinite(everything)]
    span = max(tail.max() - tail.min(), 1e-3) if len(tail) else 0.0
    if len(tail) < 2 or everything.max() - tail.max() < span:  # the rest would keep over half the height
        return False
    margin = 0.1 * span
    ax.set_ylim(tail.min() - margin, tail.max() + margin)
    return True


def plot_lr(runs: Sequence[Run], labels: Sequence[str], colours: Sequence, dataset: str, path: Path) -> None:
    """The learning rate each seed used: per logged step when recorded, else per evaluation, held until the next."""
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = 0
    for index, (run, label, colour) in enumerate(zip(runs, labels, colours)):
        seeds = run.curves.get(dataset, {}).get("lr")
        if not seeds:
            continue
        config = run.configs.get(dataset)
        end = config.get("max_iters") if isinstance(config, dict) else None
        step_lr = run.curves.get(dataset, {}).get("step_lr")
        if step_lr and all(np.all(v > 0) for _, v in step_lr.values()):
            for k, seed in enumerate(sorted(step_lr)):
                ax.plot(*step_lr[seed], color=colour, ls=run_linestyle(index), lw=1.0, alpha=0.75,
                        label=f"{label} ({len(step_lr)} seed{'s' * (len(step_lr) > 1)})" if k == 0 else None)
            drawn += 1
            continue
        for k, seed in enumerate(sorted(seeds)):
            iters, lr = seeds[seed]
            # The value set at evaluation i is used until evaluation i+1 (or the end of training). The value
            # set at the last evaluation, at max_iters, is used by no step, so it is not drawn.
            edges = np.append(iters, end) if isinstance(end, (int, float)) and end > iters[-1] else iters
            if len(edges) < 2 or np.any(lr[:len(edges) - 1] <= 0):  # a log axis cannot show 0
                continue
            ax.stairs(lr[:len(edges) - 1], edges, baseline=None, color=colour, ls=run_linestyle(index), lw=1.0,
                      alpha=0.75,
                      label=f"{label} ({len(seeds)} seed{'s' * (len(seeds) > 1)})" if k == 0 else None)
        drawn += 1
    ax.set_yscale("log")
    ax.set_title(f"Learning rate used on {_dataset_title(runs, dataset)}: base schedule × agent multiplier\n"
                 "one thin line per seed: the rate the optimizer used at each logged step")
    ax.set_xlabel("iteration")
    ax.set_ylabel("learning rate (log scale)")
    ax.grid(alpha=0.3, which="both")
    if drawn:
        _legend(ax, drawn)
    save_figure(fig, path)


def plot_summary(runs: Sequence[Run], labels: Sequence[str], colours: Sequence, datasets: Sequence[str],
                 path: Path) -> None:
    """Best validation loss per run, one panel per dataset: mean ± stderr, and each seed as a small dot."""
    fig = _new_figure(width=1.0 + 3.6 * len(datasets), height=1.8 + 0.45 * len(runs))
    axes = fig.subplots(1, len(datasets), sharey=True, squeeze=False)[0]
    positions = np.arange(len(runs))[::-1]  # first run at the top
    for ax, dataset in zip(axes, datasets):
        for y, run, colour in zip(positions, runs, colours):
            sample = _sample(run, dataset, "best_val_loss")
            if sample is None:
                if dataset in run.final:  # no per-seed list: the mean alone
                    ax.plot(run.final[dataset]["means"]["best_val_loss_mean"], y, "o", color=colour)
                continue
            ax.scatter(sample.values, np.full(sample.n, y) + 0.18, s=10, color=colour, alpha=0.6, lw=0)
            spread = stderr(sample.values)
            ax.errorbar(sample.mean, y, xerr=spread, fmt="o", color=colour, capsize=4, ms=6)
            ax.annotate(f"n={sample.n}", (sample.mean + (spread or 0), y), xytext=(5, -3),
                        textcoords="offset points", fontsize=7, color="0.3", va="top")
        # A panel is narrow: the data label below the name, one part a line.
        ax.set_title(_dataset_title(runs, dataset, sep="\n").replace("; ", "\n"), fontsize=10)
        ax.set_xlabel("best validation loss (nats/char)")
        ax.grid(alpha=0.3, axis="x")
        ax.margins(x=0.15)
    axes[0].set_yticks(positions, [textwrap.fill(label, 32) for label in labels], fontsize=8)
    axes[0].set_ylim(-0.7, len(runs) - 0.3)
    fig.suptitle("Best validation loss per run (lower is better)\n"
                 "dot with bar = mean ± 1 standard error over seeds (no bar for n=1); small dots = single seeds",
                 fontsize=10)
    save_figure(fig, path)


def plot_lr_groups(run: Run, label: str, dataset: str, path: Path) -> None:
    """--lr_groups layer: the rate of every layer (rows, input at the bottom) at every recorded iteration
    (columns), log colour scale; one panel per seed (at most 5)."""
    from matplotlib.colors import LogNorm
    seeds = run.curves[dataset]["lr_groups"]
    shown = sorted(seeds)[:5]
    config = run.configs.get(dataset)
    end = config.get("max_iters") if isinstance(config, dict) else None
    fig = _new_figure(width=9.0, height=1.6 + 0.28 * len(seeds[shown[0]][1]) * len(shown))
    axes = fig.subplots(len(shown), 1, sharex=True, squeeze=False)[:, 0]
    positive = [rates[rates > 0] for _, _, rates in (seeds[s] for s in shown)]
    low = min(float(r.min()) for r in positive if r.size) if any(r.size for r in positive) else 1e-6
    high = max(float(r.max()) for r in positive if r.size) if any(r.size for r in positive) else 1e-3
    norm = LogNorm(vmin=low, vmax=max(high, low * 1.0001))
    for ax, seed in zip(axes, shown):
        iters, names, rates = seeds[seed]
        # column k holds the rate from iteration k until the next record (the last until max_iters)
        edges = np.append(iters, end if isinstance(end, (int, float)) and end > iters[-1] else iters[-1] + 1)
        mesh = ax.pcolormesh(edges, np.arange(len(names) + 1), np.where(rates > 0, rates, np.nan), norm=norm,
                             cmap="viridis", shading="flat")
        ax.set_yticks(np.arange(len(names)) + 0.5, names, fontsize=7)
        ax.set_ylabel(f"seed {seed}", fontsize=8)
    axes[-1].set_xlabel("iteration")
    fig.colorbar(mesh, ax=list(axes), label="learning rate (log scale)")
    fig.suptitle(f"Per-layer learning rate: {label} on {_dataset_title([run], dataset)}\n"
                 "each row a layer's parameter group (input at the bottom), the rate its optimizer group used",
                 fontsize=10)
    save_figure(fig, path)


def plot_learning_curve(curve: Sequence[dict], path: Path, title: str) -> None:
    """A controller's training (train_agent.py's learning_curve.json): return and final val loss per episode,
    coloured by the episode's base-LR factor, with a moving mean."""
    from matplotlib.colors import Normalize
    fig = _new_figure(width=11.0, height=4.2)
    axes = fig.subplots(1, 2)
    episodes = [r["episode"] for r in curve]
    colour = np.log10([r.get("lr_factor", 1.0) for r in curve])
    for ax, key, name in ((axes[0], "return", "return"), (axes[1], "final_val_loss", "final val loss")):
        values = np.array([r[key] for r in curve], dtype=float)
        points = ax.scatter(episodes, values, c=colour, cmap="coolwarm", s=12, norm=Normalize(-1, 1))
        window = max(1, min(20, len(values) // 5))
        if len(values) >= window > 1:
            ax.plot(episodes[window - 1:], np.convolve(values, np.ones(window) / window, mode="valid"), "k-",
                    label=f"mean of {window}")
            ax.legend(fontsize=8)
        ax.set_xlabel("episode")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    fig.colorbar(points, ax=list(axes), label="log10 base-LR factor")
    fig.suptitle(f"{title}: learning curve ({len(curve)} episodes)")
    save_figure(fig, path)


def steps_spent_by(trials: Sequence[dict], moment: float) -> float:
    """Training steps all trials had spent at `moment` (a timestamp), each trial's steps spread evenly over
    its run from start to finish: trials that run side by side, or wait for each other (synchronous PBT),
    are charged for what they had done by then, not only once they finish."""
    total = 0.0
    for t in trials:
        start, end = (datetime.fromisoformat(t[k]).timestamp() for k in ("started", "finished"))
        total += (t.get("steps") or 0) * min(1.0, max(0.0, (moment - start) / max(end - start, 1e-9)))
    return total


def plot_best_so_far(sweep_dir: Path, path: Path) -> None:
    """sweep.py: the best full_val_loss found so far against the training steps spent by all trials when it was
    found (steps_spent_by), one curve per method found in sweep_dir/<method>/results.json."""
    fig = _new_figure(width=7.5, height=4.5)
    ax = fig.subplots()
    drawn = 0
    for results in sorted(Path(sweep_dir).glob("*/results.json")):
        summary = json.loads(results.read_text())
        trials = sorted((t for t in summary.get("trials", []) if t.get("full_val_loss") is not None
                         and t.get("started") and t.get("finished")), key=lambda t: t["finished"])
        if not trials:
            continue
        spent = [steps_spent_by(trials, datetime.fromisoformat(t["finished"]).timestamp()) for t in trials]
        best = np.minimum.accumulate([t["full_val_loss"] for t in trials])
        ax.step(spent, best, where="post", marker="o", label=f"{summary.get('method', results.parent.name)} "
                f"({len(trials)} trials)")
        drawn += 1
    ax.set_xlabel("training steps spent (all trials, cumulative)")
    ax.set_ylabel("best full_val_loss so far")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    fig.suptitle("Search: best full_val_loss (validation split, search seeds) against compute")
    save_figure(fig, path)


def plot_pareto(final_info: dict, path: Path, title: str) -> None:
    """prune.py: full_val_loss against FLOPs per token (as a fraction of the unpruned model's), one line per
    method through its targets: solid after fine-tuning, dashed before; the unpruned model as a star (hollow: it
    too fine-tuned as the pruned ones are)."""
    fig = _new_figure(width=7.5, height=4.8)
    ax = fig.subplots()
    methods = list(dict.fromkeys(e.get("method") for k, e in final_info.items() if not k.startswith("unpruned")))
    colours = run_colours(len(methods))
    for method, colour in zip(methods, colours):
        entries = sorted((e for e in final_info.values() if e.get("method") == method),
                         key=lambda e: e["means"]["flops_ratio_mean"])
        x = [e["means"]["flops_ratio_mean"] for e in entries]
        for key, style, label in (("full_val_loss", "o-", "fine-tuned"), ("full_val_loss_before", "x--", "before")):
            y = [e["means"].get(f"{key}_mean", float("nan")) for e in entries]
            ax.plot(x, y, style, color=colour, alpha=1.0 if key == "full_val_loss" else 0.5,
                    label=f"{method} ({label})")
    if "unpruned" in final_info:
        ax.plot([1.0], [final_info["unpruned"]["means"]["full_val_loss_mean"]], "k*", markersize=12,
                label="unpruned")
    if "unpruned_finetuned" in final_info:  # prune.py's like-for-like reference: nothing removed, fine-tuned alike
        ax.plot([1.0], [final_info["unpruned_finetuned"]["means"]["full_val_loss_mean"]], "k*", markersize=12,
                markerfacecolor="none", label="unpruned, fine-tuned alike")
    ax.set_xlabel("FLOPs per token / unpruned")
    ax.set_ylabel("full_val_loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{title}: loss against FLOPs")
    save_figure(fig, path)


def plot_search_curves(panels: dict, path: Path, title: str, block: int = 4) -> None:
    """prune.py's searches (rl, random_search): each scored episode's reward loss (solid: means of `block`
    episodes, one PPO update, or of whole updates making about 50 points on a long search) and the best so far
    (dashed), one panel per target, one colour per method.
    panels: panel title -> {method: [one search's scores, ...]}; several searches are averaged episode by episode."""
    fig = _new_figure(width=1.0 + 4.0 * len(panels), height=4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, methods) in zip(axes, panels.items()):
        for (method, searches), colour in zip(methods.items(), run_colours(len(methods))):
            n = min(len(s) for s in searches)
            scores = np.array([s[:n] for s in searches], dtype=float)
            size = min(n, max(block, n // 50 // block * block))
            blocks = scores.mean(axis=0)[:n // size * size].reshape(-1, size).mean(axis=1)
            ax.plot((np.arange(len(blocks)) + 0.5) * size, blocks, ".-", color=colour, label=f"{method}: episodes")
            ax.plot(np.arange(1, n + 1), np.minimum.accumulate(scores, axis=1).mean(axis=0), "--", color=colour,
                    label=f"{method}: best so far")
        ax.set_title(f"{name} ({len(searches)} search{'es' if len(searches) > 1 else ''})", fontsize=10)
        ax.set_xlabel("scored episode")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward loss (train slice, not fine-tuned)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: the searches")
    save_figure(fig, path)


def update_notes_section(notes_path: Path, header: str, body: Sequence[str]) -> None:
    """Replace (or append) a section `header` + body lines in notes.txt, locked and atomic like the runs'."""
    def edit(lines: list[str]) -> list[str]:
        lines = list(lines)
        section = [header, *body, ""]
        if header in lines:
            i = lines.index(header)
            j = i + 1
            while j < len(lines) and lines[j] and not lines[j].startswith("#"):
                j += 1
            return lines[:i] + section + lines[j + (j < len(lines) and lines[j] == ""):]
        if lines and lines[-1] != "":
            lines.append("")
        return lines + section
    _rewrite_notes(notes_path, edit, DEFAULT_TITLE, DEFAULT_DESCRIPTION)


def _policy_learning_curve(run: Run, dataset: str) -> Optional[tuple[list, str]]:
    """The learning curve of the trained policy a run deployed (its train_agent.py folder), if readable."""
    policy = run.policies.get(dataset)
    folder = Path(policy["dir"]) if isinstance(policy, dict) and isinstance(policy.get("dir"), str) else None
    if folder is None or not (folder / "learning_curve.json").exists():
        return None
    try:
        curve = json.loads((folder / "learning_curve.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(curve, list) or not curve or not all(isinstance(r, dict) and "episode" in r for r in curve):
        return None
    groups = (manifest.get("config") or {}).get("lr_groups", "global")
    return curve, f"{manifest.get('agent', 'policy')} ({groups} LR) deployed in {run.name}"


def write_plots(runs: Sequence[Run], labels: Sequence[str], out_dir: Path) -> list[Path]:
    """Every figure for `runs` (labels in the same order) into out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = run_colours(len(runs))  # assigned once, by run order: the same run has the same colour everywhere
    datasets = _datasets(runs)
    written = []
    for dataset in datasets:
        for series in ("train", "val"):
            written.append(out_dir / f"{series}_loss_{dataset}.png")
            plot_loss(runs, labels, colours, dataset, series, written[-1])
        written.append(out_dir / f"lr_{dataset}.png")
        plot_lr(runs, labels, colours, dataset, written[-1])
        for run, label in zip(runs, labels):
            if run.curves.get(dataset, {}).get("lr_groups"):
                written.append(out_dir / f"lr_groups_{run.name}_{dataset}.png")
                plot_lr_groups(run, label, dataset, written[-1])
            learned = _policy_learning_curve(run, dataset)
            if learned is not None:
                written.append(out_dir / f"learning_curve_{run.name}_{dataset}.png")
                plot_learning_curve(*learned[:1], written[-1], learned[1])
    written.append(out_dir / "summary.png")
    plot_summary(runs, labels, colours, datasets, written[-1])
    return written


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error:` line and exit 2, instead of argparse's usage dump
        raise UsageError(message)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = _Parser(description="Figures and comparison table for experiment.py run folders.",
                     epilog="Exit status: 0 done, 1 no usable run found or an output not writable, 2 bad command line.")
    parser.add_argument("run_dirs", nargs="*", type=Path, metavar="RUN_DIR",
                        help="run folders (default: every run_* folder in the current directory)")
    parser.add_argument("--out_dir", type=Path, default=Path("."), help="where the PNGs go (default: .)")
    parser.add_argument("--labels", type=Path, help='JSON file {"run_0": "label", ...} for the legends')
    parser.add_argument("--table", action="store_true", help="print the comparison table instead of plotting")
    parser.add_argument("--notes", type=Path, metavar="NOTES",
                        help="write every run's section and the comparison table into this notes file "
                             "instead of plotting")
    return parser.parse_args(argv)


def _resolve_dirs(args_dirs: Sequence[Path]) -> list[Path]:
    if not args_dirs:
        return find_run_dirs(Path("."))
    dirs = []
    for path in args_dirs:
        if not path.is_dir():
            raise UsageError(f"no such run folder: {path}")
        is_run = (path / "final_info.json").exists() or (path / "run.json").exists()
        dirs += [path] if is_run or not find_run_dirs(path) else find_run_dirs(path)
    return dirs


def _read_labels(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    try:
        labels = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read labels file {path}: {e}") from None
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise UsageError(f"labels file {path} must be a JSON object of folder name -> label")
    return labels


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = parse_args(argv)
        dirs = _resolve_dirs(args.run_dirs)
        labels = _read_labels(args.labels)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    offline = args.table or args.notes is not None  # the table and notes need no curves
    runs = load_runs(dirs, warn=lambda line: print(line, file=sys.stderr), curves=not offline)
    if not runs:
        where = ", ".join(map(str, args.run_dirs)) or f"run_* folders in {Path.cwd()}"
        print(f"error: no finished run folder found ({where})", file=sys.stderr)
        return 1
    try:
        return _write_outputs(args, runs, labels, offline)
    except OSError as e:  # a notes path that is a folder, a full disk, no permission: one line, nothing half-written
        print(f"error: cannot write {e.filename or args.notes or args.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 1


def _write_outputs(args, runs: list, labels: dict, offline: bool) -> int:
    if args.notes is not None:
        table = format_table(comparison_rows(runs, labels))

        def edit(lines: list[str]) -> list[str]:
            for run in runs:
                lines = _with_section(lines, run)
            return _with_table(lines, table)

        _rewrite_notes(args.notes, edit, DEFAULT_TITLE, DEFAULT_DESCRIPTION)
        print(f"updated {args.notes} ({len(runs)} runs)")
    if args.table:
        print(format_table(comparison_rows(runs, labels)))
    if not offline:
        # Default labels carry the folder name so a reader can find the run in notes.txt.
        shown = [labels.get(r.name) or (f"{r.name}: {r.title}" if r.title != r.name else r.name) for r in runs]
        for path in write_plots(runs, shown, args.out_dir):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
