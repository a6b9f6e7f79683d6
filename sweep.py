"""Search baselines on Ray Tune: grid search, random search and population-based training (PBT) over the
harness's training hyperparameters, every trial an ordinary harness run with its own run folder.

    python sweep.py --method random --trials 4 --profile smoke --datasets shakespeare_char --out_dir S
    python sweep.py --method pbt --trials 4 --profile smoke --datasets shakespeare_char --out_dir S
    python sweep.py --method grid --trials 8 --space space.toml --out_dir S
    python sweep.py ... --address auto        # on a running cluster: `ray start --head` here, then on every worker
                                              # `ray start --address HEAD_IP:6379`; S must be on storage all nodes see

The search space is data: a JSON or TOML file, or inline, NAME=LOW:HIGH[:log|:lin] separated by commas, NAME a
numeric training setting of experiment.py (default: learning_rate, weight_decay, grad_clip, warmup_iters, all on
log scales). Every trial trains seed 2000 (--set seed_base=B), clear of the evaluation seeds 1337+.

--trials N gives exactly N trials. grid: tune.grid_search over the most even factorisation of N into values per
setting (stated in the output; --trials 0: --grid_points values each, or a setting's own "grid" list).
random: tune.loguniform / tune.uniform with num_samples N and a search algorithm seeded with --seed.
pbt: a population of N from such draws; at every evaluation but the last (synchronous: all members there) the
worse half copies the better half's weights and settings, through the harness's own checkpoints, perturbs
learning_rate, weight_decay and grad_clip within the space, and draws a fresh batch stream. The best member
is chosen by its final model; its lineage (every setting it trained with, from which iteration, through every
exploit) is written to S/pbt/best_lineage/, which experiment.py --agent replay --agent_init plays on any seed.
A trial that dies is retried from its last checkpoint (--max_failures); one that fails for good is listed with
its error and the steps it spent. Interrupted (Ctrl-C, SIGTERM, a kill), the same command continues the sweep:
finished trials are kept, unfinished ones resume from their last checkpoint (Tuner.restore); the results are
written only once every trial has finished or failed for good.

Output, in S/<method>/: trial_NNNNN/ (a run folder: final_info.json, all_results.npy, run.json, ...),
results.json and results.md (trial, configuration, full_val_loss, compute, errors), best.json (pbt: and
best_lineage/); in S/: best_so_far.png (best full_val_loss against training steps spent, one curve per method
swept into S) and a section per method in S/notes.txt. Ray Tune is imported only here: `pip install "ray[tune]==2.60.0"`.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import itertools
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

import experiment as ex
from harness import pbt_lineage
from harness.cli import dataclass_parser, entry_point, option
from harness.files import atomic_write_bytes, atomic_write_json, read_json
from harness.records import environment_record

RAY_INSTALL = 'pip install "ray[tune]==2.60.0"'
METHODS = ("grid", "random", "pbt")
PBT_MUTATED = ("learning_rate", "weight_decay", "grad_clip")  # what can change mid-run; warmup only matters early
SWEEP_SEED_BASE = 2000  # every trial trains seed 2000 (+ index with --seeds): evaluation seeds 1337+ stay held out
SWEEP_FILE = "sweep.json"  # in S/<method>/: what the sweep was started with (a re-run must match to continue it)
SAME_SWEEP = ("method", "trials", "space", "grid_points", "profile", "datasets", "seeds", "seed", "set")


@dataclass
class SweepArgs:
    method: str = option("random", "grid, random or pbt", METHODS)
    trials: int = option(0, "exactly this many trials (pbt: the population); grid: the most even factorisation "
                            "into values per setting, 0: --grid_points each")
    space: str = option("", "search space: a .json/.toml file or NAME=LOW:HIGH[:log|:lin],... (default: learning_rate, "
                            "weight_decay, grad_clip, warmup_iters on log scales)")
    grid_points: int = option(2, "grid with --trials 0: values per setting, spaced on its scale (a file's own "
                                 "\"grid\" list wins)")
    profile: str = option("smoke", "experiment.py profile of every trial", ("tiny", "smoke", "cpu", "full"))
    datasets: str = option("shakespeare_char", "the dataset to tune on (one per sweep: tuned values differ by dataset)")
    seeds: int = option(1, "seeds per trial (grid, random; pbt: 1, a population member is one run)")
    out_dir: str = option("sweeps/run", "the sweep folder: S/<method>/trial_NNNNN, results, best_so_far.png")
    seed: int = option(0, "seeds the search algorithm (the random configurations) and PBT's perturbations")
    set: str = option("", "experiment.py settings for every trial, e.g. max_iters=2000,eval_interval=200")
    address: str = option("", "a running Ray cluster (auto, or HEAD_IP:6379); default: Ray on this machine")
    cpus_per_trial: int = option(1, "CPUs (and torch threads) per trial: trials run side by side on the rest")
    gpus_per_trial: float = option(-1.0, "GPUs per trial: -1 = one each where CUDA is present, else none; 0.5 shares "
                                         "a GPU between two trials")
    max_failures: int = option(2, "retries of a trial that dies, each from its last checkpoint")
    data_dir: str = option("", "as experiment.py --data_dir")
    source_dir: str = option("", "as experiment.py --source_dir")
    debug: bool = option(False, "full tracebacks")


@dataclass
class Plan:
    """What check_args settles before Ray starts: the trials' base config and settings, the space, how many
    trials, and for grid the values per setting."""
    cfg: ex.Config
    overrides: dict
    space: dict
    trials: int
    axes: dict = field(default_factory=dict)  # grid: setting -> its values


# ----------------------------------------------------------------------------------------------
# The search space: plain data, given to Ray Tune as its own search-space objects
# ----------------------------------------------------------------------------------------------

def default_space(cfg: ex.Config) -> dict:
    """Log-scaled ranges around the profile's settings."""
    warmup_high = max(2, cfg.max_iters // 5)
    return {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
            "weight_decay": {"low": 0.01, "high": 1.0, "log": True},
            "grad_clip": {"low": 0.25, "high": 4.0, "log": True},
            "warmup_iters": {"low": max(1, cfg.max_iters // 100), "high": warmup_high, "log": True}}


def read_space(text: str) -> dict:
    """The space as written: a .json/.toml file, or inline NAME=LOW:HIGH[:log|:lin],..."""
    if text.endswith((".json", ".toml")):
        try:
            raw = Path(text).read_bytes()
            return json.loads(raw) if text.endswith(".json") else tomllib.loads(raw.decode())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ex.UserError(f"--space {text}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    space = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, bounds = item.partition("=")
        parts = bounds.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "lin")):
            raise ex.UserError(f"--space {item!r}: expected NAME=LOW:HIGH[:log|:lin]")
        try:
            space[name.strip()] = {"low": float(parts[0]), "high": float(parts[1]),
                                   "log": len(parts) == 2 or parts[2] == "log"}
        except ValueError:
            raise ex.UserError(f"--space {item!r}: LOW and HIGH must be numbers") from None
    return space


def parse_space(text: str, cfg: ex.Config) -> dict:
    """{name: {"low", "high", "log", "int", optional "grid"}} from a file or inline text; checked against Config."""
    space = read_space(text) if text else default_space(cfg)
    if not isinstance(space, dict) or not space:
        raise ex.UserError(f"--space {text}: expected a table of settings, each with low and high")
    checked = {}
    for name, spec in space.items():
        f = ex.CONFIG_FIELDS.get(name)
        if f is None or f.type not in ("float", "int") or name in ex.RUN_LEVEL_FIELDS or name == "seeds":
            raise ex.UserError(f"--space: {name!r} is not a numeric training setting of experiment.py")
        if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
            raise ex.UserError(f"--space: {name} needs low and high")
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", True))
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (low, high)) or not low < high \
                or (log and low <= 0):
            scale = ", both > 0 on a log scale" if log else ""
            raise ex.UserError(f"--space: {name} needs finite low < high{scale}")
        grid = spec.get("grid")
        if grid is not None and (not isinstance(grid, list) or not grid or
                                 not all(isinstance(v, (int, float)) and low <= v <= high for v in grid)):
            raise ex.UserError(f"--space: {name} grid must be a list of numbers within [{low}, {high}]")
        checked[name] = {"low": low, "high": high, "log": log, "int": f.type == "int",
                         **({"grid": grid} if grid is not None else {})}
    return checked


def _typed(spec: dict, value: float):
    return int(round(value)) if spec["int"] else float(value)


def axis_values(spec: dict, points: int) -> list:
    """A setting's grid values: its own list, or `points` spaced on its scale (one point: the centre)."""
    if "grid" in spec:
        values = spec["grid"]
    elif points == 1:
        values = [math.sqrt(spec["low"] * spec["high"]) if spec["log"] else (spec["low"] + spec["high"]) / 2]
    elif spec["log"]:
        values = np.geomspace(spec["low"], spec["high"], points)
    else:
        values = np.linspace(spec["low"], spec["high"], points)
    return list(dict.fromkeys(_typed(spec, v) for v in values))  # (ints may coincide: once each)


def factorisations(n: int, k: int) -> list[tuple]:
    """Every way to write n as a product of k factors >= 1, each tuple in non-increasing order."""
    if k == 1:
        return [(n,)]
    return [(f, *rest) for f in range(n, 0, -1) if n % f == 0
            for rest in factorisations(n // f, k - 1) if not rest or rest[0] <= f]


def grid_axes(space: dict, trials: int, points: int) -> dict:
    """{setting: values} whose product has exactly `trials` points (0: `points` values each): the most even
    factorisation of `trials` over the settings without their own grid list, the larger factors first."""
    own = {n: axis_values(s, 0) for n, s in space.items() if "grid" in s}
    free = [n for n in space if n not in own]
    fixed = math.prod(len(v) for v in own.values())
    if trials and (trials % fixed or (not free and trials != fixed)):
        raise ex.UserError(f"--method grid --trials {trials}: the settings with their own grid lists give {fixed} "
                           f"combinations, which do not divide it")
    counts = [points] * len(free)
    if trials and free:  # most even: the smallest ratio of largest to smallest factor
        counts = min(factorisations(trials // fixed, len(free)), key=lambda f: (f[0] / f[-1], f))
    axes = {**{n: axis_values(space[n], c) for n, c in zip(free, counts)}, **own}
    short = [n for n, c in zip(free, counts) if len(axes[n]) < c]
    if short:
        raise ex.UserError(f"--method grid: {short[0]} has only {len(axes[short[0]])} distinct values in its range; "
                           f"ask for fewer --trials or widen it")
    return {n: axes[n] for n in space}


def grid_configs(axes: dict) -> list[dict]:
    """Every combination of the axes' values (what tune.grid_search visits), for validation before Ray starts."""
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def layout_line(axes: dict) -> str:
    counts = [len(v) for v in axes.values()]
    return (f"grid: {' x '.join(map(str, counts))} = {math.prod(counts)} points ("
            + ", ".join(f"{n} {len(v)}" for n, v in axes.items()) + ")")


def tune_domain(tune, spec: dict):
    """Ray Tune's own distribution of a setting: log- or uniformly scaled, integer where the setting is."""
    if spec["int"]:
        low, high = int(math.ceil(spec["low"])), int(math.floor(spec["high"])) + 1  # (upper bound exclusive)
        return tune.lograndint(max(1, low), high) if spec["log"] else tune.randint(low, high)
    return tune.loguniform(spec["low"], spec["high"]) if spec["log"] else tune.uniform(spec["low"], spec["high"])


def param_space(tune, method: str, plan: Plan) -> dict:
    """The Tuner's param_space: tune.grid_search per setting (grid), else Ray Tune's distributions."""
    if method == "grid":
        return {"hp": {n: tune.grid_search(v) for n, v in plan.axes.items()}}
    return {"hp": {n: tune_domain(tune, s) for n, s in plan.space.items()}}


def within_space(space: dict, config: dict) -> dict:
    """PBT's custom explore: a perturbed setting (x0.8, x1.2) is clipped back into its declared range."""
    hp = dict(config["hp"])
    for name, value in hp.items():
        spec = space.get(name)
        if spec is not None:
            hp[name] = _typed(spec, min(max(value, spec["low"]), spec["high"]))
    return {**config, "hp": hp}


def pbt_scheduler(tune, plan: Plan):
    """Synchronous PBT over learning_rate, weight_decay and grad_clip, never exploiting at the last evaluation."""
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class PBTWithoutFinalExploit(PopulationBasedTraining):
        """PBT that leaves a trial's result at or after its last iteration alone: copying a finished donor
        there would hand summarize a configuration that never trained (issue 26)."""

        def __init__(self, last_iter: int, **kwargs):
            super().__init__(**kwargs)
            self.last_iter = last_iter

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            if result.get(self._time_attr, 0) >= self.last_iter:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    mutations = {"hp": {n: tune_domain(tune, s) for n, s in plan.space.items() if n in PBT_MUTATED}}
    # Synchronous PBT copies a donor's latest checkpoint while every member waits: the last two are plenty.
    warnings.filterwarnings("ignore", message=r"Using .CheckpointConfig.num_to_keep <= 2. with PBT")
    return PBTWithoutFinalExploit(
        plan.cfg.max_iters, time_attr="iter", perturbation_interval=plan.cfg.eval_interval,
        hyperparam_mutations=mutations, quantile_fraction=0.5, resample_probability=0.25,
        custom_explore_fn=functools.partial(within_space, plan.space),
        synch=True)  # all members reach an evaluation, then the worse half copies: no race decides who exploits


# ----------------------------------------------------------------------------------------------
# One trial: an ordinary harness run, reporting to Ray Tune at every evaluation
# ----------------------------------------------------------------------------------------------

def settings(cfg: ex.Config, overrides: dict, hp: dict) -> dict:
    """A trial's settings: --set, then its hyperparameters. A searched learning_rate brings min_lr along at the
    profile's ratio (unless min_lr is searched or set itself), so the schedule keeps its shape."""
    values = {**overrides, **hp}
    if "learning_rate" in hp and "min_lr" not in values:
        values["min_lr"] = hp["learning_rate"] * cfg.min_lr / cfg.learning_rate
    return values


def trial_config(setup: dict, hp: dict) -> ex.Config:
    base = ex.Config(**setup["base"])
    return ex.config_for_dataset(base, settings(base, setup["overrides"], hp), setup["profile"], setup["dataset"])


def exploit_batch_seed(cfg: ex.Config, trial: str, exploits: int) -> int:
    """The batch stream of a trial after its n-th exploit: from its seed, trial number and n, so that a copy
    does not replay its donor's batches (the donor's checkpoint carries the donor's stream)."""
    entropy = [cfg.seed_base, int(trial.rsplit("_", 1)[-1]), exploits]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def reseed_batches(checkpoint: Path, seed: int) -> None:
    """Give a copied checkpoint a fresh training-batch stream (its "sampler_rng"), atomically."""
    payload = ex.torch.load(checkpoint, map_location="cpu", weights_only=True)
    payload["sampler_rng"] = ex.torch.Generator().manual_seed(seed).get_state()
    buf = io.BytesIO()
    ex.torch.save(payload, buf)
    atomic_write_bytes(checkpoint, buf.getvalue())


def trial_record(setup: dict, folder: Path, cfg: ex.Config, hp: dict, data: ex.CharDataset, rt: ex.Runtime,
                 checkpoint) -> dict:
    """The trial's run.json: a new one in a cleared folder, or, when Ray hands a checkpoint, the trial's own
    with the restore noted, after copying the checkpoint's files into the trial folder (an exploit's with a
    fresh batch stream)."""
    dataset = setup["dataset"]
    if checkpoint is None:
        ex.prepare_run_folder(folder, overwrite=True)
        return {"title": f"{setup['method']} trial {folder.name}", "description": f"sweep.py {setup['method']}",
                "profile": setup["profile"], "datasets": [dataset], "command": setup["command"],
                "cwd": setup["cwd"], "started": ex.now_iso(), "finished": None,
                "configs": {dataset: dataclasses.asdict(cfg)}, "data": {dataset: data.provenance},
                "warnings": {}, "sweep": {"method": setup["method"], "trial": folder.name, "hp": hp},
                "restores": [], **environment_record(rt)}
    record = read_json(folder / "run.json")
    with checkpoint.as_directory() as d:
        origin = json.loads((Path(d) / "origin.json").read_text())
        for f in Path(d).glob("ckpt_*.pt"):
            shutil.copy2(f, folder / f.name)
    # A PBT exploit (another trial's weights) or a resume (this trial's own), and the settings from here on.
    restore = {"at": ex.now_iso(), "from_trial": origin["trial"], "iter": origin["iter"],
               "val_loss": origin["val_loss"], "hp": hp,
               "kind": "resume" if origin["trial"] == folder.name else "exploit"}
    if restore["kind"] == "exploit":
        exploits = 1 + sum(r["kind"] == "exploit" for r in record["restores"])
        restore["batch_seed"] = exploit_batch_seed(cfg, folder.name, exploits)
        copied = ex.checkpoint_file(folder, dataset, 0)
        reseed_batches(copied, restore["batch_seed"])
        ex.previous_checkpoint_file(copied).unlink(missing_ok=True)  # this trial's own: no rollback goes there
    record["restores"].append(restore)
    record["configs"] = {dataset: dataclasses.asdict(cfg)}
    return record


def fault_injection(setup: dict, folder: Path, it: int) -> None:
    """The tests' faults. kill_at "ITER:MARKER": the worker dies once, at ITER (Ray retries the trial from its
    checkpoint there). fail_at "ITER:TRIAL": that trial raises at every evaluation from ITER on (fails for good)."""
    kill_at, fail_at = setup["kill_at"], setup["fail_at"]
    if kill_at and int(kill_at.split(":")[0]) == it and not Path(kill_at.split(":", 1)[1]).exists():
        Path(kill_at.split(":", 1)[1]).write_text(folder.name)
        time.sleep(2)  # (let the driver register the checkpoint just reported)
        os._exit(1)
    if fail_at and fail_at.split(":", 1)[1] == folder.name and it >= int(fail_at.split(":")[0]):
        raise RuntimeError(f"injected failure at iter {it}")


def trainable(config: dict, setup: dict) -> None:
    """Ray Tune's function trainable. Restores Ray's checkpoint if it hands one (its own, when Ray resumes it
    after a failure, a synchronous-PBT pause or an interrupted sweep; another trial's, when PBT exploits),
    trains through experiment.train_all, reports every evaluation but the last with the harness checkpoint
    (the final model's metrics travel only in the last report, which PBT never acts on), and writes the
    trial's run folder."""
    from ray import tune

    import torch
    torch.set_num_threads(setup["threads"])
    trial_id = tune.get_context().get_trial_id()
    folder = Path(setup["folder"]) / f"trial_{trial_id.rsplit('_', 1)[-1]}"
    cfg = trial_config(setup, config["hp"])
    ex.validate(cfg)  # a perturbed setting is checked as any setting is
    dataset = setup["dataset"]
    data = ex.load_dataset(cfg, dataset)
    rt = ex.Runtime.choose(cfg)
    record_path = folder / "run.json"
    checkpoint = tune.get_checkpoint()
    record = trial_record(setup, folder, cfg, config["hp"], data, rt, checkpoint)
    atomic_write_json(record_path, {**record, "status": "running"})
    compute_path = folder / "compute.json"
    compute = read_json(compute_path) if compute_path.exists() else {"steps": 0, "seconds": 0.0}
    seen = {"steps": 0, "t": time.time()}

    def on_evaluation(run: ex.TrainingRun) -> None:
        now = time.time()
        compute["steps"] += run.steps_taken - seen["steps"]
        compute["seconds"] += now - seen["t"]
        seen.update(steps=run.steps_taken, t=now)
        atomic_write_json(compute_path, compute)  # what a trial that fails for good is charged
        it, (train_loss, val_loss) = run.state.last_eval_it, run.last_eval_losses()
        if it >= cfg.max_iters:
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(run.store.path, Path(d) / run.store.path.name)
            (Path(d) / "origin.json").write_text(json.dumps({"trial": folder.name, "iter": it, "val_loss": val_loss}))
            tune.report({"iter": it, "val_loss": val_loss, "train_loss": train_loss, "steps": compute["steps"]},
                        checkpoint=tune.Checkpoint.from_directory(d))
        fault_injection(setup, folder, it)  # (after the report: a retry resumes from this checkpoint)

    final = ex.train_all({dataset: cfg}, {dataset: data}, rt, folder, False, ex.StopRequest(),
                         resume=checkpoint is not None, on_evaluation=on_evaluation)
    atomic_write_json(folder / "final_info.json", final)
    record.update(status="finished", finished=ex.now_iso(), compute=compute)
    atomic_write_json(record_path, record)
    entry = final[dataset]
    tune.report({"iter": cfg.max_iters, "val_loss": entry["means"]["final_val_loss_mean"],
                 "full_val_loss": entry["means"]["full_val_loss_mean"], "steps": compute["steps"], "done": True})


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------

def check_args(args: SweepArgs) -> Plan:
    """Everything that can be wrong, before Ray starts: the base config, the space, the trials' settings."""
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if len(datasets) != 1 or datasets[0] not in ex.DATASETS:
        raise ex.UserError(f"--datasets {args.datasets!r}: one dataset per sweep, from {', '.join(ex.DATASETS)}")
    if args.trials < 0 or args.grid_points < 1 or args.seeds < 1 or args.cpus_per_trial < 1 or args.max_failures < 0:
        raise ex.UserError("--trials, --max_failures >= 0; --grid_points, --seeds, --cpus_per_trial >= 1")
    if args.method == "pbt" and args.seeds != 1:
        raise ex.UserError("--method pbt: one seed per trial (a population member is one run); replay its "
                           "best_lineage on held-out seeds afterwards")
    overrides = {"seed_base": SWEEP_SEED_BASE, **parse_settings(args.set), "seeds": args.seeds}
    base = ex.Config(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "",
                     source_dir=args.source_dir, seeds=args.seeds, notes="off", inference_samples=0)
    cfg = ex.config_for_dataset(base, overrides, args.profile, datasets[0])
    space = parse_space(args.space, cfg)
    if args.method == "grid":
        axes = grid_axes(space, args.trials, args.grid_points)
        plan = Plan(cfg, overrides, space, math.prod(len(v) for v in axes.values()), axes)
        candidates = grid_configs(axes)
    else:
        if args.method == "pbt" and not set(space) & set(PBT_MUTATED):
            raise ex.UserError(f"--method pbt perturbs {', '.join(PBT_MUTATED)}: the space holds none of them")
        if args.trials < (2 if args.method == "pbt" else 1):
            raise ex.UserError(f"--method {args.method}: give --trials (at least {2 if args.method == 'pbt' else 1})")
        plan = Plan(cfg, overrides, space, args.trials)
        # Draws and perturbations stay within the space: its corners stand for every setting they can take.
        corners = itertools.product(*[[(n, s["low"]), (n, s["high"])] for n, s in space.items()])
        candidates = [{n: _typed(space[n], v) for n, v in corner} for corner in corners]
    for hp in candidates:
        ex.validate(ex.config_for_dataset(base, settings(cfg, overrides, hp), args.profile, datasets[0]))
    return plan


def parse_settings(text: str) -> dict:
    overrides = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, value = item.partition("=")
        if name not in ex.CONFIG_FIELDS or not value or name in ex.RUN_LEVEL_FIELDS:
            raise ex.UserError(f"--set {item!r}: expected NAME=VALUE with NAME a training setting of experiment.py")
        overrides[name] = ex.parse_value(ex.CONFIG_FIELDS[name], value)
    return overrides


def import_ray():
    # Each evaluation's checkpoint is small and wanted (PBT, retries): Ray's warning about frequent ones is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    try:
        import ray
        from ray import tune
    except ImportError:
        raise ex.UserError(f"sweep.py runs on Ray Tune, which is not installed: {RAY_INSTALL}") from None
    return ray, tune


def claim_folder(args: SweepArgs, folder: Path, restorable: bool) -> None:
    """A new sweep's folder records what it was started with; a continued one must be the same sweep. A
    finished sweep, or trials Ray cannot continue, are never overwritten."""
    started = {k: getattr(args, k) for k in SAME_SWEEP}
    if (folder / "results.json").exists():
        raise ex.UserError(f"{folder} already holds a finished {args.method} sweep; choose another --out_dir")
    if restorable and (folder / SWEEP_FILE).exists():
        before = read_json(folder / SWEEP_FILE)
        changed = [k for k in SAME_SWEEP if before.get(k) != started[k]]
        if changed:
            raise ex.UserError(f"{folder} holds an unfinished sweep started with --{changed[0]} "
                               f"{before.get(changed[0])!r}: re-run that command to continue it, or choose "
                               f"another --out_dir")
        return
    if any(folder.glob("trial_*")):
        raise ex.UserError(f"{folder} holds trials Ray Tune has no state to continue; choose another --out_dir")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / SWEEP_FILE, started)


def trial_dirname(trial) -> str:
    """Ray's folder of a trial bears the name of its run folder: trial_<its number>."""
    return f"trial_{trial.trial_id.rsplit('_', 1)[-1]}"


def make_tuner(tune, args: SweepArgs, plan: Plan, setup: dict, experiment: Path):
    """A new Tuner, or the interrupted one restored (finished trials kept, unfinished resumed from their last
    checkpoint, trials that failed for good left failed)."""
    gpus = args.gpus_per_trial if args.gpus_per_trial >= 0 else float(ex.torch.cuda.is_available())
    # Ray hides the GPUs from a trial that asks for none: on a CUDA machine each trial asks for one by default.
    resources = {"cpu": args.cpus_per_trial, **({"gpu": gpus} if gpus else {})}
    fn = tune.with_resources(tune.with_parameters(trainable, setup=setup), resources)
    if tune.Tuner.can_restore(str(experiment)):
        return tune.Tuner.restore(str(experiment), trainable=fn, resume_unfinished=True, resume_errored=False)
    from ray.tune.search.basic_variant import BasicVariantGenerator
    return tune.Tuner(
        fn, param_space=param_space(tune, args.method, plan),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", reuse_actors=False,
                                    scheduler=pbt_scheduler(tune, plan) if args.method == "pbt" else None,
                                    num_samples=1 if args.method == "grid" else plan.trials,
                                    search_alg=BasicVariantGenerator(random_state=args.seed),
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=args.method, storage_path=str(experiment.parent), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                  # synchronous PBT exploits a donor's latest checkpoint: two are plenty
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)))


def failed_trials(grid) -> dict:
    """{trial folder name: the last line of its error} of the trials that failed for good (ResultGrid.errors)."""
    failed = {}
    for result in grid:
        if result.error is not None:
            lines = [line for line in str(result.error).strip().splitlines() if line.strip()]
            failed[Path(result.path).name] = lines[-1].strip() if lines else type(result.error).__name__
    return failed


def finished_trials(folder: Path) -> list[str]:
    """The trials whose run ended and wrote its final_info.json (run.json: "finished")."""
    return [t.name for t in sorted(folder.glob("trial_*"))
            if (t / "run.json").exists() and read_json(t / "run.json").get("status") == "finished"]


def run_sweep(args: SweepArgs, argv: list[str]) -> dict:
    plan = check_args(args)
    dataset = args.datasets.strip(" ,")
    data_dir = ex.ensure_prepared(plan.cfg, dataset).resolve().parent  # once, here: the trials only read it
    ray, tune = import_ray()
    out = Path(args.out_dir).resolve()  # Ray changes the trials' working directory: absolute paths only
    folder, experiment = out / args.method, out / "ray" / args.method
    claim_folder(args, folder, tune.Tuner.can_restore(str(experiment)))
    if plan.axes:
        print(layout_line(plan.axes), flush=True)
    setup = {"base": dataclasses.asdict(dataclasses.replace(plan.cfg, data_dir=str(data_dir))),
             "overrides": plan.overrides, "profile": plan.cfg.profile, "dataset": dataset, "method": args.method,
             "folder": str(folder), "threads": args.cpus_per_trial, "cwd": os.getcwd(),
             "command": ex.command_line(__file__, argv),  # (the faults, read here: workers may predate them)
             "kill_at": os.environ.get("GPT_RL_TEST_SWEEP_KILL_AT", ""),
             "fail_at": os.environ.get("GPT_RL_TEST_SWEEP_FAIL_AT", "")}
    if not args.debug:  # our summary or one line says what happened; Tune's own advice (Tuner.restore) is ours
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
    started_here = not ray.is_initialized()
    if started_here:
        # "local": a Ray of its own, never another sweep's or study's instance that happens to run here
        ray.init(address=args.address or "local", include_dashboard=False, log_to_driver=args.debug,
                 configure_logging=False, **({} if args.address else {"num_cpus": os.cpu_count()}))
    random.seed(args.seed)  # PBT's perturbations draw from Python's random, its resampling from numpy's
    np.random.seed(args.seed)
    # SIGTERM stops the sweep as Ctrl-C does (Tune saves its state, then the trials stop): the same line, 130.
    previous = signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))
    t0 = time.time()
    try:
        grid = make_tuner(tune, args, plan, setup, experiment).fit()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if started_here:
            ray.shutdown()
    failed = failed_trials(grid)
    # Counted from the trials' own records: Ray marks the trials it stopped on an interrupt as terminated.
    unfinished = plan.trials - len(finished_trials(folder)) - len(failed)
    if unfinished > 0:
        raise ex.Interrupted(f"{unfinished} of {plan.trials} trials unfinished, nothing summarised; continue the "
                             f"sweep with the same command")
    return summarize(args, plan, folder, out, time.time() - t0, failed)


# ----------------------------------------------------------------------------------------------
# The summary: only of a sweep whose every trial finished or failed for good
# ----------------------------------------------------------------------------------------------

def trial_row(trial: Path, failed: dict) -> dict:
    """One trial's line of results.json: its settings (final ones under PBT), loss, compute, restores."""
    record = read_json(trial / "run.json") if (trial / "run.json").exists() else {}
    final = read_json(trial / "final_info.json") if (trial / "final_info.json").exists() else None
    dataset = (record.get("datasets") or [None])[0]
    entry = final.get(dataset) if final else None
    cfg = (record.get("configs") or {}).get(dataset, {})
    compute = record.get("compute") or (read_json(trial / "compute.json") if (trial / "compute.json").exists()
                                        else {})  # a failed trial is charged what it spent
    status = "failed" if trial.name in failed else record.get("status", "missing")
    return {"trial": trial.name, "status": status, "error": failed.get(trial.name),
            "hp": {k: cfg.get(k) for k in record.get("sweep", {}).get("hp", {})},
            "initial_hp": record.get("sweep", {}).get("hp"),
            "full_val_loss": entry["means"].get("full_val_loss_mean") if entry else None,
            "steps": compute.get("steps", 0), "seconds": compute.get("seconds", 0.0),
            "started": record.get("started"), "finished": record.get("finished"),
            "exploits": sum(r["kind"] == "exploit" for r in record.get("restores", [])),
            "resumes": sum(r["kind"] == "resume" for r in record.get("restores", []))}


def best_lineage(args: SweepArgs, plan: Plan, folder: Path, best: dict) -> dict:
    """PBT's product: the best member's lineage, written as S/pbt/best_lineage/ for --agent replay."""
    records = {t.name: read_json(t / "run.json") for t in folder.glob("trial_*") if (t / "run.json").exists()}
    segments = pbt_lineage.lineage(records, best["trial"])
    cfg = plan.cfg
    configured = {n: getattr(cfg, n) for n in pbt_lineage.REPLAYED}
    base = pbt_lineage.replay_base(segments, configured, cfg.multiplier_min, cfg.multiplier_max)
    exact = pbt_lineage.replay_exact(segments, base, cfg.multiplier_min, cfg.multiplier_max)
    evals = sorted({*range(0, cfg.max_iters, cfg.eval_interval), cfg.max_iters})
    flags = [f"--{n}={v}" for n, v in plan.overrides.items() if n not in ("seed_base", "seeds")]
    flags += [f"--{n}={v}" for n, v in segments[0]["hp"].items() if n not in pbt_lineage.REPLAYED]
    flags += [f"--{n}={base[n]}" for n in pbt_lineage.REPLAYED if base[n] != configured[n]]
    if base["learning_rate"] != configured["learning_rate"]:  # the schedule keeps the profile's min_lr ratio
        flags.append(f"--min_lr={base['learning_rate'] * cfg.min_lr / cfg.learning_rate}")
    target = folder / "best_lineage"
    command = ["python", "experiment.py", "--profile", args.profile, "--datasets", args.datasets, *flags,
               "--agent", "replay", "--agent_init", str(target), "--control", pbt_lineage.CONTROL]
    about = {"trial": best["trial"], "full_val_loss": best["full_val_loss"], "base": base, "flags": flags,
             "exact": exact, "control": pbt_lineage.CONTROL, "replay": " ".join(command)}
    pbt_lineage.write_lineage(target, args.datasets, segments,
                              pbt_lineage.replay_schedule(segments, base, evals), about)
    return about


def results_table(rows: list[dict]) -> list[str]:
    lines = ["| trial | configuration | full_val_loss | steps | seconds | exploits | resumes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        hp = ", ".join(f"{k}={v:.4g}" for k, v in r["hp"].items() if v is not None)
        loss = f"{r['full_val_loss']:.4f}" if r["full_val_loss"] is not None else r["status"]
        if r["error"]:
            loss += f": {r['error']}"
        lines.append(f"| {r['trial']} | {hp} | {loss} | {r['steps']} | {r['seconds']:.0f} | {r['exploits']} | "
                     f"{r['resumes']} |")
    return lines


def summarize(args: SweepArgs, plan: Plan, folder: Path, out: Path, seconds: float, failed: dict) -> dict:
    """The table, the best configuration (pbt: and its lineage), best_so_far.png and the notes section, from
    the trials' folders. results.json is written after the rest: it marks a sweep summarised."""
    import plot
    names = sorted({*(t.name for t in folder.glob("trial_*")), *failed})
    rows = [trial_row(folder / name, failed) for name in names]
    done = [r for r in rows if r["full_val_loss"] is not None]
    best = min(done, key=lambda r: r["full_val_loss"]) if done else None  # (by its final model)
    lineage = best_lineage(args, plan, folder, best) if best and args.method == "pbt" else None
    summary = {"method": args.method, "trials": rows, "best": best, "seconds": seconds,
               "steps": sum(r["steps"] for r in rows), "failed": failed, "profile": args.profile,
               "dataset": args.datasets, **({"grid": layout_line(plan.axes)} if plan.axes else {}),
               **({"best_lineage": lineage} if lineage else {})}
    lines = results_table(rows)
    atomic_write_bytes(folder / "results.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(folder / "best.json", best or {})
    atomic_write_json(folder / "results.json", summary)
    plot.plot_best_so_far(out, out / "best_so_far.png")
    plot.update_notes_section(out / "notes.txt", f"## Sweep {args.method}",
                              [f"Method: {args.method}, {len(rows)} trials ({len(failed)} failed), "
                               f"{summary['steps']} training steps; profile {args.profile}, dataset {args.datasets}",
                               f"Best: {best['trial']} full_val_loss {best['full_val_loss']:.4f} with {best['hp']}"
                               if best else "Best: no trial finished",
                               *([f"Best lineage: {lineage['replay']}"] if lineage else []),
                               f"Table: {folder / 'results.md'}"])
    print("\n".join(lines))
    for name, error in failed.items():
        print(f"failed: {name}: {error}")
    if lineage:
        print(f"best lineage ({lineage['trial']}), replay: {lineage['replay']}")
    print(f"best: {best['trial'] if best else 'none'} | {folder / 'results.json'} | {out / 'best_so_far.png'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(SweepArgs, __doc__.split("\n\n")[0].strip())


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(lambda argv: run_sweep(SweepArgs(**vars(build_parser().parse_args(argv))), argv),
                          sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
