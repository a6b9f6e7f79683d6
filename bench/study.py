"""The study module: what every comparison in bench/ is made of (docs/studies.md shows a study written on it).

A study is data: arms (a name, experiment.py flags, seeds, the compute charged to them), run through a cache
keyed by each run's whole resolved config plus the sha256 of any policy it deploys, then `table(pairs)`:
paired differences on shared seeds with 95% t intervals and Holm-adjusted p over every test in the table,
written by `write_summary` as summary.json and summary.md with the commit, machine, date and command.

    seeds("held_out", 5)                 # [1337, ..., 1341]; check_disjoint(...) refuses overlapping sets
    study = Study(out, ["--profile", "tiny"], "shakespeare_char")
    cosine = study.run(Arm("cosine", ["--learning_rate", 1e-3], seeds("held_out", 5)))
    write_summary(out, "Does X beat cosine?", [cosine, x], table([(x, cosine)]))
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import experiment as ex  # noqa: E402  (the project root is on the path now)
from harness import stats  # noqa: E402
from harness.cli import entry_point  # noqa: E402
from harness.files import atomic_write_bytes, sha256_file  # noqa: E402
from harness.policy_files import POLICY_MANIFEST  # noqa: E402
from harness.records import git_commit, settings_that_differ  # noqa: E402

# SPEC section 7: seed sets never overlap. Controller training (train_agent.py's --seed + episode), search and
# tuning, held-out evaluation (experiment.py's default seed_base).
SEED_BASES = {"held_out": 1337, "search": 2000, "training": 1_000_000}
# Config fields that say where a run writes or how it reports, not what it computes: left out of the cache key.
NOT_IN_KEY = {"out_dir", "title", "description", "overwrite", "notes", "plot", "resume", "debug", "download",
              "source_dir", "tensorboard"}
KEY_FILE = "study_key.json"  # in every cached run folder, written when the run has finished


def seeds(name: str, n: int, offset: int = 0) -> list[int]:
    """The n seeds of a named set, from its base + offset: seeds("search", 3) == [2000, 2001, 2002]."""
    return list(range(SEED_BASES[name] + offset, SEED_BASES[name] + offset + n))


def check_disjoint(**seed_sets: Sequence[int]) -> None:
    """Refuse (one error line) a study whose seed sets share a seed: tuning or training on an evaluation seed
    would make the held-out comparison a comparison on seen data."""
    names = list(seed_sets)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(seed_sets[a]) & set(seed_sets[b]))
            if shared:
                raise ex.UserError(f"seed sets {a} and {b} overlap on {len(shared)} seed(s) ({shared[0]}, ...): "
                                   f"use fewer seeds or another offset")


@dataclass
class Arm:
    """One row of a study: experiment.py runs of one setting over seeds, or per-seed numbers from elsewhere."""
    name: str
    flags: list = field(default_factory=list)       # experiment.py flags on top of the study's common ones
    seeds: Sequence[int] = ()
    extra_steps: int = 0                            # controller training or search charged to this arm
    values: dict = field(default_factory=dict)      # seed -> the study's metric; filled by Study.run
    run_steps: int = 0                              # optimizer steps of its own runs; filled by Study.run

    @property
    def compute_steps(self) -> int:
        """Every optimizer step this arm's result cost: its runs, plus the training or search behind it."""
        return self.run_steps + self.extra_steps


# ----------------------------------------------------------------------------------------------
# The run cache
# ----------------------------------------------------------------------------------------------

def digest(*parts) -> str:
    """A short stable name for a command's arguments: another argument, another folder."""
    return hashlib.sha256(json.dumps(list(map(str, parts))).encode()).hexdigest()[:16]


def run_argv(flags: Sequence, dataset: str, seed: int) -> list[str]:
    """experiment.py's arguments for one seed of an arm (the seed flags last, so they win)."""
    return [*map(str, flags), "--datasets", dataset, "--seeds", "1", "--seed_base", str(seed), "--notes", "off"]


def resolved_config(flags: Sequence, dataset: str, seed: int) -> ex.Config:
    """The Config experiment.py will run for these flags, resolved as it resolves them (profile, dataset)."""
    base, typed = ex.parse_args(run_argv(flags, dataset, seed))
    return ex.config_for_dataset(base, typed, ex.resolve_profile(base.profile), dataset)


def policy_sha256(agent_init: str) -> Optional[str]:
    """sha256 of what --agent_init deploys: the policy file a train_agent.py folder's manifest names, an agent
    file itself, or every agent_*.json and all_results.* of a run folder (qlearning pooling, replay)."""
    if not agent_init:
        return None
    path = Path(agent_init).expanduser()
    if path.is_file():
        return sha256_file(path)
    if (path / POLICY_MANIFEST).exists():
        policy = path / str(ex.read_json(path / POLICY_MANIFEST).get("policy_file"))
        if not policy.is_file():
            raise ex.UserError(f"--agent_init {path}: its manifest names no policy file that exists")
        return sha256_file(policy)
    files = sorted([*path.glob("agent_*.json"), *path.glob("all_results.*")])
    if not files:
        raise ex.UserError(f"--agent_init {path}: no policy, agent file or run to deploy")
    return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()


def run_key(flags: Sequence, dataset: str, seed: int) -> dict:
    """What a run's result depends on: its whole resolved config and the bytes of the policy it deploys."""
    cfg = resolved_config(flags, dataset, seed)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    return {"config": config, "policy_sha256": policy_sha256(cfg.agent_init)}


def config_defaults() -> dict:
    """Config's defaults, as a key records them (JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(ex.Config())))


def run_folder(runs: Path, flags: Sequence, dataset: str, seed: int) -> tuple[Path, dict]:
    """(folder, key) of one seed of an arm: runs/<dataset>_<seed>_<hash of the key's settings that differ from
    Config's defaults>. A changed setting or policy gives another folder; a Config field added later, at its
    default, gives the same one (so a cache outlives new features). A changed default can name the same
    folder, which `finished` then rejects: it compares every setting."""
    key = run_key(flags, dataset, seed)
    return Path(runs) / folder_name(dataset, seed, key), key


def folder_name(dataset: str, seed: int, key: dict) -> str:
    defaults = config_defaults()
    config = json.loads(json.dumps(key["config"]))
    named = {"config": {k: v for k, v in config.items() if v != defaults.get(k)},
             "policy_sha256": key["policy_sha256"]}
    return f"{dataset}_{seed}_{digest(json.dumps(named, sort_keys=True))}"


def controller_folder(root: Path, name: str, flags: Sequence) -> Path:
    """Where Study.train_controller keeps a controller trained with these train_agent.py flags (all but
    --episodes: the same training run longer continues in its folder)."""
    return Path(root) / "agents" / f"{name}_{digest(*flags)}"


def finished(folder: Path, key: dict) -> bool:
    """A folder to reuse: its run finished and it records this key (every setting and the policy; a setting
    it does not record, from a Config field added since, counts at its default)."""
    if not ((folder / "final_info.json").exists() and (folder / KEY_FILE).exists()):
        return False
    stored, key = ex.read_json(folder / KEY_FILE), json.loads(json.dumps(key))
    return stored.get("policy_sha256") == key["policy_sha256"] \
        and not settings_that_differ(stored.get("config", {}), key["config"], config_defaults())


# ----------------------------------------------------------------------------------------------
# Running a study
# ----------------------------------------------------------------------------------------------

class Study:
    """A study's folder: its log, its cached runs, and the scripts it calls (experiment.py, train_agent.py,
    sweep.py, prune.py), each a subprocess whose output goes to log.txt.

    common: experiment.py flags of every arm (e.g. the profile); data_dir: as experiment.py's, passed to every
    script (self.data); runs: the run cache (default root/runs; another study's cache reuses the runs the two
    share, which the key makes safe); jobs: an arm's seeds run this many at a time, each with the cores shared
    out as torch threads (its run.json records them; 1 thread and 2 agree to about 1e-8, not bit for bit)."""

    def __init__(self, root: Path, common: Sequence = (), dataset: str = "shakespeare_char",
                 metric: str = "full_val_loss", data_dir: str = "", runs: Optional[Path] = None, jobs: int = 1):
        self.data = ["--data_dir", str(Path(data_dir).resolve())] if data_dir else []
        self.root, self.common, self.dataset, self.metric = Path(root).resolve(), [*common, *self.data], dataset, metric
        self.runs = Path(runs).resolve() if runs else self.root / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.log, self.jobs, self.log_lock = self.root / "log.txt", max(1, jobs), threading.Lock()

    def sh(self, script: str, *args, own_log: Optional[Path] = None, threads: int = 0) -> float:
        """Run a project script to completion, its output to log.txt (own_log: to that file, named in log.txt,
        so that runs side by side do not interleave; threads: its torch threads); the seconds it took."""
        t, command = time.time(), f"$ {script} {' '.join(map(str, args))}"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        with self.log_lock, open(self.log, "a") as f:
            f.write(command + (f"\n  (output: {own_log})\n" if own_log else "\n"))
        if own_log:
            own_log.parent.mkdir(parents=True, exist_ok=True)
        with open(own_log or self.log, "a") as f:
            proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], stdout=f,
                                  stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        if proc.returncode:
            raise ex.RunFailed(f"{script} failed ({proc.returncode}); see {own_log or self.log}")
        return time.time() - t

    def side_by_side(self, work: Callable, items: Sequence) -> list:
        """[work(item) for item in items], --jobs at a time (each work waits on its own subprocess)."""
        if self.jobs == 1:
            return [work(item) for item in items]
        with ThreadPoolExecutor(self.jobs) as pool:
            return list(pool.map(work, items))

    def beside(self, name: str) -> dict:
        """sh's arguments for a script run beside others: its own log, root/logs/<name>.txt, and its share of
        the cores as torch threads (none at --jobs 1: then it has them all, and log.txt)."""
        if self.jobs == 1:
            return {}
        return {"own_log": self.root / "logs" / f"{name}.txt", "threads": max(1, (os.cpu_count() or 1) // self.jobs)}

    def run_seed(self, flags: Sequence, seed: int, beside: bool = False) -> tuple[Path, dict]:
        """(finished run folder, key) of one seed: the folder reused when its key matches, else (re-)run
        (beside: other runs, see `beside`)."""
        flags = [*self.common, *flags]
        folder, key = run_folder(self.runs, flags, self.dataset, seed)
        if not finished(folder, key):
            (folder / KEY_FILE).unlink(missing_ok=True)
            self.sh("experiment.py", "--out_dir", folder, *run_argv(flags, self.dataset, seed),
                    *(["--overwrite"] if folder.exists() else []), **(self.beside(folder.name) if beside else {}))
            ex.atomic_write_json(folder / KEY_FILE, key)
        return folder, key

    def run_seeds(self, flags: Sequence, seeds: Sequence[int]) -> list[tuple[Path, dict]]:
        """run_seed of every seed, --jobs at a time: [(finished run folder, key)] in the seeds' order."""
        return self.side_by_side(lambda seed: self.run_seed(flags, seed, beside=True), seeds)

    def run(self, arm: Arm) -> Arm:
        """Every seed of the arm (cached; --jobs at a time), its metric per seed and the optimizer steps its
        runs took."""
        found = self.run_seeds(arm.flags, arm.seeds)
        arm.values, arm.run_steps = {}, 0
        for seed, (folder, key) in zip(arm.seeds, found):
            arm.values[seed] = self.metric_of(folder)
            arm.run_steps += key["config"]["max_iters"]  # the budget: a run stopped as diverged took fewer
        return arm

    def metric_of(self, folder: Path) -> float:
        """The study's metric in a finished run folder (its dataset's first seed)."""
        return ex.read_json(folder / "final_info.json")[self.dataset]["final_info_dict"][self.metric][0]

    def run_all(self, arms: Sequence[Arm]) -> dict[str, Arm]:
        return {arm.name: self.run(arm) for arm in arms}

    def run_script(self, name: str, script: str, *args, done: str, again: Sequence = (), beside: bool = False) -> Path:
        """The output folder of a script that is not one experiment.py run (sweep.py, prune.py), keyed by its
        whole command: root/<name>_<hash>, run unless it holds `done` (another command, another folder).
        again: flags that let the script continue what an interrupted attempt left (prune.py's --resume);
        beside: other scripts (see `beside`)."""
        folder = self.root / f"{name}_{digest(script, *args, *self.data)}"
        if not (folder / done).exists():
            self.sh(script, *args, *self.data, "--out_dir", folder, *(again if folder.exists() else ()),
                    **(self.beside(folder.name) if beside else {}))
        return folder

    def train_controller(self, name: str, episodes: int, *flags) -> tuple[Path, int]:
        """(folder, optimizer steps its training took) of a controller trained by train_agent.py with these
        flags on the training seeds: a folder that holds `episodes` episodes is kept, a shorter one continued;
        other flags, another folder. The steps are charged to every arm that deploys it."""
        flags = [*flags, *self.data]
        folder = controller_folder(self.root, name, flags)
        manifest = folder / POLICY_MANIFEST
        if not manifest.exists() or ex.read_json(manifest).get("episodes_done", 0) < episodes:
            self.sh("train_agent.py", "--dataset", self.dataset, "--episodes", episodes, "--seed",
                    SEED_BASES["training"], "--out_dir", folder, *flags)
        return folder, curve_steps(folder)


def curve_steps(agent_dir: Path) -> int:
    """Optimizer steps a train_agent.py folder's controller training took (its learning curve)."""
    return sum(e["steps"] for e in ex.read_json(Path(agent_dir) / "learning_curve.json"))


# ----------------------------------------------------------------------------------------------
# Controllers trained until their learning curve is flat
# ----------------------------------------------------------------------------------------------

def train_until_flat(s: Study, episodes: int, max_episodes: int, tuned: float, name: str, *flags) -> tuple[Path, int]:
    """`episodes`, then half as many more at a time while the learning curve still falls over its last 100
    episodes (its slope's 95% interval below 0), up to max_episodes: a learner is compared once it has
    stopped improving or hit the cap, and the episodes it took are charged to it."""
    first = episodes
    while True:
        folder, steps = s.train_controller(name, episodes, *flags)
        interval = learning_curve(folder, tuned)["last_slope"]["ci95"]
        if episodes >= max_episodes or interval is None or interval[1] >= 0:
            return folder, steps
        episodes = min(max_episodes, episodes + max(8, first // 2))


def learning_curve(agent_dir: Path, tuned: float) -> dict:
    """Did a controller's training learn, and is it flat at the end? Its episodes' final losses with the luck of
    the drawn base LR taken out (residuals of a cubic in log factor; raw losses if every episode had the same
    base), and how far its rate sat from T over each episode's second half (mean |log2(lr / T)|). The slope of
    the residuals per 100 episodes over the last 100, with its 95% interval: flat if the interval holds 0."""
    import numpy as np
    curve = ex.read_json(Path(agent_dir) / "learning_curve.json")
    loss = np.array([e["final_val_loss"] for e in curve], dtype=float)
    factor = np.log([e["lr_factor"] for e in curve])
    degree = min(3, len(set(factor.tolist())) - 2)  # a cubic where there are enough distinct base LRs
    residual = loss - (np.polyval(np.polyfit(factor, loss, degree), factor) if degree >= 1 else loss.mean())
    half = [max(it for it, _ in e["lr_trajectory"]) / 2 for e in curve]
    distance = [float(np.mean([abs(math.log2(lr / tuned)) for it, lr in e["lr_trajectory"] if it >= h]))
                for e, h in zip(curve, half)]
    return {"episodes": len(curve), "residual": residual.tolist(), "distance_from_tuned": distance,
            "last_slope": stats.trend(residual, 100), "last_episodes": min(100, len(curve))}


def draw_learning_curves(curves: dict, out: Path, block: int = 8) -> None:
    """learning_curves.png: per controller, block means (one ppo update = 8 episodes) of the residual final loss
    (left) and of the second-half distance from T in octaves (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for j, (name, c) in enumerate(curves.items()):
        for ax, key in zip(axes, ("residual", "distance_from_tuned")):
            values = np.array(c[key])
            n = len(values) // block * block or len(values)
            means = values[:n].reshape(-1, min(block, n)).mean(axis=1)
            ax.plot((np.arange(len(means)) + 0.5) * min(block, n), means, "o-", ms=3, color=f"C{j}", label=name)
    axes[0].set_ylabel("final loss minus what its base LR predicts")
    axes[1].set_ylabel("|log2(lr / tuned)|, second half")
    for ax in axes:
        ax.set_xlabel("training episode")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=120)
    plt.close(fig)


def slope_text(slope: dict, unit: str = "") -> str:
    """A learning curve's slope (stats.trend) as text: '+0.012<unit> [-0.003, +0.027] (flat)', flat where its
    interval holds 0 (the caller says what it means when there is no slope)."""
    low, high = slope["ci95"]
    return (f"{slope['per_100_episodes']:+.3f}{unit} [{low:+.3f}, {high:+.3f}] "
            f"({'flat' if low <= 0 <= high else 'still moving'})")


def curve_note(name: str, c: dict) -> str:
    """One summary line for a controller's learning curve."""
    slope, d = c["last_slope"], c["distance_from_tuned"]
    k = max(1, len(d) // 4)
    trend = ("too few episodes for a slope" if slope["ci95"] is None else
             f"residual slope over the last {c['last_episodes']} episodes {slope_text(slope, ' nats per 100')}")
    return (f"{name}: {c['episodes']} episodes; {trend}; second-half distance from the tuned rate "
            f"{sum(d[:k]) / k:.2f} octaves in the first quarter of its episodes, {sum(d[-k:]) / k:.2f} in the last.")


# ----------------------------------------------------------------------------------------------
# The table and the summary
# ----------------------------------------------------------------------------------------------

def table(pairs: Sequence[tuple[Arm, Arm]]) -> list[dict]:
    """One row per (a, b): a - b paired on their shared seeds, its 95% t interval, the paired t-test's p and
    that p Holm-adjusted over every test in this table; with each arm's compute."""
    rows = []
    for a, b in pairs:
        shared = [s for s in a.values if s in b.values]
        if not shared:
            raise ValueError(f"{a.name} and {b.name} share no seed: nothing to pair")
        d = stats.paired_difference([a.values[s] for s in shared], [b.values[s] for s in shared])
        rows.append({"comparison": f"{a.name} - {b.name}", "a": a.name, "b": b.name, "n": d.n, "mean": d.mean,
                     "ci95": [d.low, d.high], "p": d.p, "p_holm": None,
                     "compute_steps": {a.name: a.compute_steps, b.name: b.compute_steps}})
    tested = [r for r in rows if r["p"] is not None]
    for row, adjusted in zip(tested, stats.holm([r["p"] for r in tested])):
        row["p_holm"] = adjusted
    return rows


def record(argv: Optional[Sequence[str]] = None) -> dict:
    """What every study and benchmark table says about itself: commit, machine, date and command."""
    import torch  # experiment.py has imported it already
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    if torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    return {"commit": git_commit(), "machine": machine, "date": ex.now_iso(),
            "command": ex.command_line(sys.argv[0], list(sys.argv[1:] if argv is None else argv))}


def arm_summary(arm: Arm) -> dict:
    mean, se = stats.mean_and_stderr(list(arm.values.values())) if arm.values else (None, None)
    return {"flags": list(map(str, arm.flags)), "seeds": list(arm.seeds), "values": arm.values, "mean": mean,
            "stderr": se, "n": len(arm.values), "run_steps": arm.run_steps, "extra_steps": arm.extra_steps,
            "compute_steps": arm.compute_steps}


def _num(value: Optional[float], spec: str) -> str:
    return "–" if value is None else format(value, spec)


def summary_markdown(question: str, rec: dict, arms: dict, rows: Sequence[dict], notes: Sequence[str]) -> str:
    lines = [f"# {question}", "", f"commit {rec['commit']}; {rec['machine']}; {rec['date']}",
             f"command: `{' '.join(map(str, rec['command']))}`", "",
             "| arm | mean ± stderr (n) | optimizer steps (runs + training/search) |", "|---|---|---|"]
    for name, a in arms.items():
        lines.append(f"| {name} | {_num(a['mean'], '.4f')} ± {_num(a['stderr'], '.4f')} ({a['n']}) | "
                     f"{a['compute_steps']:,} ({a['run_steps']:,} + {a['extra_steps']:,}) |")
    lines += ["", f"| paired difference (lower = first arm better; {len(rows)} tests) | mean | 95% CI | p | "
                  "p (Holm) |", "|---|---|---|---|---|"]
    for r in rows:
        low, high = (_num(v, "+.4f") for v in r["ci95"])
        lines.append(f"| {r['comparison']} (n={r['n']}) | {r['mean']:+.4f} | [{low}, {high}] | "
                     f"{_num(r['p'], '.3g')} | {_num(r['p_holm'], '.3g')} |")
    return "\n".join(lines + ["", *notes]).rstrip() + "\n"


def write_summary(folder: Path, question: str, arms: Sequence[Arm], rows: Sequence[dict],
                  notes: Sequence[str] = (), extra: Optional[dict] = None) -> str:
    """summary.json (everything, machine-readable) and summary.md (the tables), atomically; the markdown.
    notes: markdown lines after the tables; extra: more summary.json fields (the study's own numbers)."""
    rec = record()
    summary = {"question": question, **rec, "arms": {a.name: arm_summary(a) for a in arms},
               "comparisons": list(rows), **(extra or {})}
    ex.atomic_write_json(Path(folder) / "summary.json", summary)
    text = summary_markdown(question, rec, summary["arms"], rows, notes)
    atomic_write_bytes(Path(folder) / "summary.md", text.encode())
    return text


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, not {text!r}")
    return int(text)


def argument_parser(description: str, out: str) -> argparse.ArgumentParser:
    """A study's command line: its folder, --smoke and --data_dir; a bad flag is one `error:` line, exit 2."""
    parser = ex.OneLineArgumentParser(description=description)
    parser.add_argument("--out", default=out, help="the study's folder: runs, policies, log.txt, summary")
    parser.add_argument("--smoke", action="store_true",
                        help="every step at the smallest sizes, in about a minute: proves it runs, measures nothing")
    parser.add_argument("--data_dir", default="", help="as experiment.py --data_dir (default: the project's data/)")
    parser.add_argument("--jobs", type=at_least_one, default=1, help="an arm's runs side by side, the cores shared "
                        "out as their torch threads (controller episodes ran 1.75x as fast so on 2 cores, "
                        "docs/performance.md); the numbers agree with --jobs 1 to about 1e-8, not bit for bit")
    return parser


def main_of(work) -> int:
    """A study's entry point: work(argv); bad input is one `error:` line and exit 2 (experiment.py's rule)."""
    return entry_point(work, sys.argv[1:])
