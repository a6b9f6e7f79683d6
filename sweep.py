"""Search baselines on Ray Tune: grid search, random search and population-based training (PBT) over the
harness's training hyperparameters, every trial an ordinary harness run with its own run folder.

    python sweep.py --method random --trials 3 --profile smoke --datasets shakespeare_char --out_dir S
    python sweep.py --method pbt --trials 2 --profile smoke --datasets shakespeare_char --out_dir S
    python sweep.py --method grid --grid_points 3 --space space.toml --out_dir S
    python sweep.py ... --address auto        # on a running cluster: `ray start --head` here, then on every worker
                                              # `ray start --address HEAD_IP:6379`; S must be on storage all nodes see

The search space is data: a JSON or TOML file, or inline, NAME=LOW:HIGH[:log|:lin] separated by commas, NAME a
numeric training setting of experiment.py (default: learning_rate, weight_decay, grad_clip, warmup_iters, all on
log scales). Every trial trains seed 2000 (--set seed_base=B), clear of the evaluation seeds 1337+.

grid: --grid_points values per setting (or a setting's own "grid" list in a file), every combination once.
random: --trials configurations drawn with --seed.
pbt: --trials runs started from random configurations; at every evaluation (synchronous: all members there)
the worse half copies the better half's weights and settings, through the harness's own checkpoints, which
Ray hands to the restarted trial, and perturbs learning_rate, weight_decay and grad_clip.
A trial that dies is retried from its last checkpoint (--max_failures).

Output, in S/<method>/: trial_NNNNN/ (a run folder: final_info.json, all_results.npy, run.json, ...),
results.json and results.md (trial, configuration, full_val_loss, compute), best.json; in S/: best_so_far.png
(best full_val_loss against training steps spent, one curve per method swept into S) and a section per
method in S/notes.txt. Ray Tune is imported only here: `pip install "ray[tune]==2.60.0"`.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

import experiment as ex
from harness.cli import dataclass_parser, entry_point
from harness.files import atomic_write_json, read_json
from harness.records import environment_record

RAY_INSTALL = 'pip install "ray[tune]==2.60.0"'
METHODS = ("grid", "random", "pbt")
PBT_MUTATED = ("learning_rate", "weight_decay", "grad_clip")  # what can change mid-run; warmup only matters early
SWEEP_SEED_BASE = 2000  # every trial trains seed 2000 (+ index with --seeds): evaluation seeds 1337+ stay held out


def _arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class SweepArgs:
    method: str = _arg("random", "grid, random or pbt", METHODS)
    trials: int = _arg(0, "random: configurations; pbt: population size; grid: leave 0 (the grid decides)")
    space: str = _arg("", "search space: a .json/.toml file or NAME=LOW:HIGH[:log|:lin],... (default: learning_rate, "
                          "weight_decay, grad_clip, warmup_iters on log scales)")
    grid_points: int = _arg(2, "grid: values per setting, spaced on its scale (a file's own \"grid\" list wins)")
    profile: str = _arg("smoke", "experiment.py profile of every trial", ("tiny", "smoke", "cpu", "full"))
    datasets: str = _arg("shakespeare_char", "the dataset to tune on (one per sweep: tuned values differ by dataset)")
    seeds: int = _arg(1, "seeds per trial (grid, random; pbt: 1, a population member is one run)")
    out_dir: str = _arg("sweeps/run", "the sweep folder: S/<method>/trial_NNNNN, results, best_so_far.png")
    seed: int = _arg(0, "draws the random configurations and PBT's perturbations")
    set: str = _arg("", "experiment.py settings for every trial, e.g. max_iters=2000,eval_interval=200")
    address: str = _arg("", "a running Ray cluster (auto, or HEAD_IP:6379); default: Ray on this machine")
    cpus_per_trial: int = _arg(1, "CPUs (and torch threads) per trial: trials run side by side on the rest")
    gpus_per_trial: float = _arg(-1.0, "GPUs per trial: -1 = one each where CUDA is present, else none; 0.5 shares "
                                       "a GPU between two trials")
    max_failures: int = _arg(2, "retries of a trial that dies, each from its last checkpoint")
    data_dir: str = _arg("", "as experiment.py --data_dir")
    source_dir: str = _arg("", "as experiment.py --source_dir")
    debug: bool = _arg(False, "full tracebacks")


# ----------------------------------------------------------------------------------------------
# The search space: plain data
# ----------------------------------------------------------------------------------------------

def default_space(cfg: ex.Config) -> dict:
    """Log-scaled ranges around the profile's settings."""
    warmup_high = max(2, cfg.max_iters // 5)
    return {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
            "weight_decay": {"low": 0.01, "high": 1.0, "log": True},
            "grad_clip": {"low": 0.25, "high": 4.0, "log": True},
            "warmup_iters": {"low": max(1, cfg.max_iters // 100), "high": warmup_high, "log": True}}


def parse_space(text: str, cfg: ex.Config) -> dict:
    """{name: {"low", "high", "log", optional "grid"}} from a file or inline text; checked against Config."""
    if not text:
        space = default_space(cfg)
    elif text.endswith((".json", ".toml")):
        path = Path(text)
        try:
            raw = path.read_bytes()
            space = json.loads(raw) if text.endswith(".json") else tomllib.loads(raw.decode())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ex.UserError(f"--space {text}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    else:
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


def grid_configs(space: dict, points: int) -> list[dict]:
    """Every combination of each setting's values: its own grid, or `points` values spaced on its scale."""
    axes = []
    for name, spec in space.items():
        if "grid" in spec:
            values = spec["grid"]
        elif spec["log"]:
            values = np.geomspace(spec["low"], spec["high"], points)
        else:
            values = np.linspace(spec["low"], spec["high"], points)
        typed = list(dict.fromkeys(_typed(spec, v) for v in values))  # (ints may coincide: once each)
        axes.append([(name, v) for v in typed])
    return [dict(combo) for combo in itertools.product(*axes)]


def sample(spec: dict, rng: np.random.Generator):
    if spec["log"]:
        return _typed(spec, math.exp(rng.uniform(math.log(spec["low"]), math.log(spec["high"]))))
    return _typed(spec, rng.uniform(spec["low"], spec["high"]))


def random_configs(space: dict, trials: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{name: sample(spec, rng) for name, spec in space.items()} for _ in range(trials)]


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


def trial_record(setup: dict, folder: Path, cfg: ex.Config, hp: dict, data: ex.CharDataset, rt: ex.Runtime,
                 checkpoint) -> dict:
    """The trial's run.json: a new one in a cleared folder, or, when Ray hands a checkpoint, the trial's own
    with the restore noted, after copying the checkpoint's files into the trial folder."""
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
    record["restores"].append({"at": ex.now_iso(), "from_trial": origin["trial"], "iter": origin["iter"],
                               "val_loss": origin["val_loss"], "hp": hp,
                               "kind": "resume" if origin["trial"] == folder.name else "exploit"})
    record["configs"] = {dataset: dataclasses.asdict(cfg)}
    return record


def trainable(config: dict, setup: dict) -> None:
    """Ray Tune's function trainable. Restores Ray's checkpoint if it hands one (its own, when Ray resumes it
    after a failure or a synchronous-PBT pause; another trial's, when PBT exploits), trains through
    experiment.train_all, reports every evaluation with the
    harness checkpoint, and writes the trial's run folder."""
    from ray import tune

    import torch
    torch.set_num_threads(setup["threads"])
    trial_id = tune.get_context().get_trial_id()
    folder = Path(setup["folder"]) / f"trial_{trial_id.rsplit('_', 1)[-1]}"
    cfg = trial_config(setup, config["hp"])
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
    kill_at = setup["kill_at"]  # "ITER:MARKER": die once, there (the tests' fault injection)

    def on_evaluation(run: ex.TrainingRun) -> None:
        now = time.time()
        compute["steps"] += run.steps_taken - seen["steps"]
        compute["seconds"] += now - seen["t"]
        seen.update(steps=run.steps_taken, t=now)
        atomic_write_json(compute_path, compute)
        it, (train_loss, val_loss) = run.state.last_eval_it, run.last_eval_losses()
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(run.store.path, Path(d) / run.store.path.name)
            (Path(d) / "origin.json").write_text(json.dumps({"trial": folder.name, "iter": it, "val_loss": val_loss}))
            tune.report({"iter": it, "val_loss": val_loss, "train_loss": train_loss, "steps": compute["steps"]},
                        checkpoint=tune.Checkpoint.from_directory(d))
        if kill_at and int(kill_at.split(":")[0]) == it and not Path(kill_at.split(":", 1)[1]).exists():
            Path(kill_at.split(":", 1)[1]).write_text(folder.name)
            time.sleep(2)  # (let the driver register the checkpoint just reported)
            os._exit(1)  # a killed worker: Ray retries the trial from that checkpoint

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

def check_args(args: SweepArgs) -> tuple[ex.Config, dict, list[dict], dict]:
    """Everything that can be wrong, before Ray starts: the base config, the space, the trials' configurations."""
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if len(datasets) != 1 or datasets[0] not in ex.DATASETS:
        raise ex.UserError(f"--datasets {args.datasets!r}: one dataset per sweep, from {', '.join(ex.DATASETS)}")
    if args.trials < 0 or args.grid_points < 1 or args.seeds < 1 or args.cpus_per_trial < 1 or args.max_failures < 0:
        raise ex.UserError("--trials, --max_failures >= 0; --grid_points, --seeds, --cpus_per_trial >= 1")
    if args.method == "pbt" and args.seeds != 1:
        raise ex.UserError("--method pbt: one seed per trial (a population member is one run); re-run the best "
                           "configuration on held-out seeds afterwards")
    overrides = {"seed_base": SWEEP_SEED_BASE, **parse_settings(args.set)}
    base = ex.Config(data_dir=str(Path(args.data_dir).resolve()) if args.data_dir else "",
                     source_dir=args.source_dir, seeds=args.seeds, notes="off", inference_samples=0)
    cfg = ex.config_for_dataset(base, {**overrides, "seeds": args.seeds}, args.profile, datasets[0])
    space = parse_space(args.space, cfg)
    if args.method == "grid":
        configs = grid_configs(space, args.grid_points)
        if args.trials and args.trials != len(configs):
            raise ex.UserError(f"--method grid: the grid has {len(configs)} points; leave --trials 0 or give "
                               f"{len(configs)} (or change --grid_points / --space)")
    else:
        if args.trials < (2 if args.method == "pbt" else 1):
            raise ex.UserError(f"--method {args.method}: give --trials (at least {2 if args.method == 'pbt' else 1})")
        configs = random_configs(space, args.trials, args.seed)
    for hp in configs:  # every trial's settings must be a valid run (PBT's perturbations stay in the space)
        ex.validate(ex.config_for_dataset(base, settings(cfg, {**overrides, "seeds": args.seeds}, hp), args.profile,
                                          datasets[0]))
    return cfg, {**overrides, "seeds": args.seeds}, configs, space


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


def run_sweep(args: SweepArgs, argv: list[str]) -> dict:
    cfg, overrides, configs, space = check_args(args)
    dataset = args.datasets.strip(" ,")
    data_dir = ex.ensure_prepared(cfg, dataset).resolve().parent  # once, here: the trials only read it
    ray, tune = import_ray()
    out = Path(args.out_dir).resolve()  # Ray changes the trials' working directory: absolute paths only
    folder = out / args.method
    if (folder / "results.json").exists() or any(folder.glob("trial_*")):
        state = "a finished" if (folder / "results.json").exists() else "an unfinished"
        raise ex.UserError(f"{folder} already holds {state} {args.method} sweep; choose another --out_dir")
    folder.mkdir(parents=True, exist_ok=True)
    setup = {"base": dataclasses.asdict(dataclasses.replace(cfg, data_dir=str(data_dir))),
             "overrides": overrides, "profile": cfg.profile, "dataset": dataset, "method": args.method,
             "folder": str(folder), "threads": args.cpus_per_trial, "cwd": os.getcwd(),
             "command": ex.command_line(__file__, argv),
             "kill_at": os.environ.get("GPT_RL_TEST_SWEEP_KILL_AT", "")}  # read here: workers may predate it
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=args.address or None, include_dashboard=False, log_to_driver=args.debug,
                 configure_logging=False, **({} if args.address else {"num_cpus": os.cpu_count()}))
    random.seed(args.seed)  # PBT's perturbations draw from Python's random
    scheduler = None
    if args.method == "pbt":
        mutations = {"hp": {n: tune.loguniform(s["low"], s["high"]) if s["log"] else tune.uniform(s["low"], s["high"])
                            for n, s in space.items() if n in PBT_MUTATED}}
        scheduler = tune.schedulers.PopulationBasedTraining(
            time_attr="iter", perturbation_interval=cfg.eval_interval, hyperparam_mutations=mutations,
            quantile_fraction=0.5, resample_probability=0.25,
            synch=True)  # all members reach an evaluation, then the worse half copies: no race decides who exploits
    gpus = args.gpus_per_trial if args.gpus_per_trial >= 0 else float(ex.torch.cuda.is_available())
    # Ray hides the GPUs from a trial that asks for none: on a CUDA machine each trial asks for one by default.
    resources = {"cpu": args.cpus_per_trial, **({"gpu": gpus} if gpus else {})}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, setup=setup), resources),
        param_space={"hp": tune.grid_search(configs)},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, num_samples=1,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=args.method, storage_path=str(out / "ray"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=args.max_failures),
                                  # PBT may exploit any trial's latest checkpoint at any time: keep them all
                                  checkpoint_config=tune.CheckpointConfig(
                                      num_to_keep=None if args.method == "pbt" else 2)))
    t0 = time.time()
    try:
        tuner.fit()
    finally:
        if started_here:
            ray.shutdown()
    return summarize(args, folder, out, time.time() - t0)


def summarize(args: SweepArgs, folder: Path, out: Path, seconds: float) -> dict:
    """The table, the best configuration, best_so_far.png and the notes section, from the trials' folders."""
    import plot
    rows = []
    for trial in sorted(folder.glob("trial_*")):
        record = read_json(trial / "run.json") if (trial / "run.json").exists() else {}
        final = read_json(trial / "final_info.json") if (trial / "final_info.json").exists() else None
        dataset = (record.get("datasets") or [None])[0]
        entry = final.get(dataset) if final else None
        cfg = (record.get("configs") or {}).get(dataset, {})
        rows.append({"trial": trial.name, "status": record.get("status", "missing"),
                     "hp": {k: cfg.get(k) for k in record.get("sweep", {}).get("hp", {})},
                     "initial_hp": record.get("sweep", {}).get("hp"),
                     "full_val_loss": entry["means"].get("full_val_loss_mean") if entry else None,
                     "steps": (record.get("compute") or {}).get("steps"),
                     "seconds": (record.get("compute") or {}).get("seconds"),
                     "started": record.get("started"), "finished": record.get("finished"),
                     "exploits": sum(r["kind"] == "exploit" for r in record.get("restores", [])),
                     "resumes": sum(r["kind"] == "resume" for r in record.get("restores", []))})
    done = [r for r in rows if r["full_val_loss"] is not None]
    best = min(done, key=lambda r: r["full_val_loss"]) if done else None
    summary = {"method": args.method, "trials": rows, "best": best, "seconds": seconds,
               "steps": sum(r["steps"] or 0 for r in rows), "profile": args.profile, "dataset": args.datasets}
    atomic_write_json(folder / "results.json", summary)
    atomic_write_json(folder / "best.json", best or {})
    lines = ["| trial | configuration | full_val_loss | steps | seconds | exploits | resumes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        hp = ", ".join(f"{k}={v:.4g}" for k, v in r["hp"].items())
        loss = f"{r['full_val_loss']:.4f}" if r["full_val_loss"] is not None else r["status"]
        lines.append(f"| {r['trial']} | {hp} | {loss} | {r['steps']} | {r['seconds'] or 0:.0f} | {r['exploits']} | "
                     f"{r['resumes']} |")
    (folder / "results.md").write_text("\n".join(lines) + "\n")
    plot.plot_best_so_far(out, out / "best_so_far.png")
    plot.update_notes_section(out / "notes.txt", f"## Sweep {args.method}",
                              [f"Method: {args.method}, {len(rows)} trials, {summary['steps']} training steps, "
                               f"{seconds:.0f} s; profile {args.profile}, dataset {args.datasets}",
                               f"Best: {best['trial']} full_val_loss {best['full_val_loss']:.4f} with {best['hp']}"
                               if best else "Best: no trial finished",
                               f"Table: {folder / 'results.md'}"])
    print("\n".join(lines))
    print(f"best: {best['trial'] if best else 'none'} | {folder / 'results.json'} | {out / 'best_so_far.png'}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(SweepArgs, __doc__.split("\n\n")[0].strip())


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(lambda argv: run_sweep(SweepArgs(**vars(build_parser().parse_args(argv))), argv),
                          sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
