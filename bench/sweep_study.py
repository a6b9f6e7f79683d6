"""
Search baselines against the multi-hyperparameter agent at equal compute (README: "Search baselines on Ray
Tune"). Every method gets the same number of training steps on shakespeare_char at the tiny profile:

    python bench/sweep_study.py --out sweep_study            # ~20 min on a 2-core CPU; resumable
    python bench/sweep_study.py --out sweep_study --runs 16  # a larger budget: 16 runs' worth of steps each

1. grid (2 values of each of learning_rate, weight_decay, grad_clip: 8 runs; 3 values from --runs 27),
   random (--runs draws) and PBT
   (a population of --runs) with sweep.py over the same log-scaled space, every trial on seed 2000;
2. ppo with --control lr,weight_decay,grad_clip trained by train_agent.py for --runs episodes (the same steps:
   its training is charged to its budget), seeds 1,000,000+;
3. the best configuration of each search (PBT: the settings its best member ended with) and the frozen policy
   re-run on the 5 held-out seeds 1337-1341, beside cosine at the profile's settings and the random control
   with the same action set; paired differences in full_val_loss with 95% t intervals: summary.json/.md.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from controller_study import DATASET, PROFILE, paired, run, sh  # noqa: E402

SPACE = "learning_rate=1e-4:1e-2:log,weight_decay=0.01:1:log,grad_clip=0.25:4:log"
CONTROL = "lr,weight_decay,grad_clip"


def best_flags(sweep_dir: Path) -> tuple[list, dict]:
    best = json.loads((sweep_dir / "best.json").read_text())
    hp = best["hp"]
    flags = []
    for name, value in hp.items():
        flags += [f"--{name}", value]
    if "learning_rate" in hp:  # as sweep.py ran it: min_lr at the profile's ratio (1/10 at tiny)
        flags += ["--min_lr", hp["learning_rate"] / 10]
    return flags, best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep_study")
    parser.add_argument("--runs", type=int, default=8, help="the budget: this many tiny runs' steps per method")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(exist_ok=True)
    log = out / "log.txt"
    searches = out / "searches"
    grid_points = max(2, round(args.runs ** (1 / 3)))  # 3 settings: grid_points^3 runs, about --runs
    for method, extra in (("grid", ["--grid_points", grid_points]), ("random", ["--trials", args.runs]),
                          ("pbt", ["--trials", args.runs])):
        if not (searches / method / "results.json").exists():
            sh(["sweep.py", "--method", method, "--profile", PROFILE, "--datasets", DATASET, "--space", SPACE,
                "--out_dir", searches, "--seed", 0, *extra], log)
    agent = out / "agent_ppo_control"
    if not (agent / "manifest.json").exists() or \
            json.loads((agent / "manifest.json").read_text()).get("episodes_done", 0) < args.runs:
        sh(["train_agent.py", "--agent", "ppo", "--control", CONTROL, "--dataset", DATASET, "--episodes", args.runs,
            "--profile", PROFILE, "--out_dir", agent], log)

    budget, arms, chosen = {}, {"cosine": []}, {}
    for method in ("grid", "random", "pbt"):
        results = json.loads((searches / method / "results.json").read_text())
        budget[method] = results["steps"]
        arms[method], chosen[method] = best_flags(searches / method)
    curve = json.loads((agent / "learning_curve.json").read_text())
    budget["ppo_control"] = sum(e["steps"] for e in curve)
    arms["ppo_control"] = ["--agent", "ppo", "--control", CONTROL, "--agent_init", agent]
    arms["random_control"] = ["--agent", "random", "--control", CONTROL, "--agent_actions", "0.1,0.5,1,1.5,2"]
    results = {arm: run(out / arm, log, *flags) for arm, flags in arms.items()}

    comparisons = {}
    for a in ("grid", "random", "pbt", "ppo_control", "random_control"):
        comparisons[f"{a} - cosine"] = paired(results[a], results["cosine"])
    for a, b in (("ppo_control", "grid"), ("ppo_control", "random"), ("ppo_control", "pbt"),
                 ("ppo_control", "random_control"), ("pbt", "random"), ("random", "grid")):
        comparisons[f"{a} - {b}"] = paired(results[a], results[b])
    summary = {"budget_steps": budget, "chosen": chosen, "full_val_loss": results, "paired_differences": comparisons}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| arm | training steps spent | full_val_loss mean ± stderr (n=5) |", "|---|---|---|"]
    for arm, values in results.items():
        v = np.array(values)
        lines.append(f"| {arm} | {budget.get(arm, '')} | {v.mean():.4f} ± {v.std(ddof=1) / math.sqrt(len(v)):.4f} |")
    lines += ["", "| chosen | configuration |", "|---|---|"]
    for method, best in chosen.items():
        lines.append(f"| {method} | {best['trial']}: " + ", ".join(f"{k}={v:.4g}" for k, v in best["hp"].items())
                     + f" (its search loss {best['full_val_loss']:.4f}) |")
    lines += ["", "| paired difference (lower = first arm better) | mean | 95% CI | p |", "|---|---|---|---|"]
    for key, c in comparisons.items():
        lines.append(f"| {key} | {c['mean']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p']:.3g} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
