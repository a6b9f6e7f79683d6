"""
Does a learned controller beat the cosine schedule? The measured comparison of the README.

    python bench/controller_study.py --out study            # ~85 min on a 2-core CPU; resumable

1. Train ppo and reinforce with train_agent.py on shakespeare_char at the tiny profile, base LR drawn
   log-uniformly from x0.1..x10 of the profile's (training seeds 1,000,000 + episode).
2. Tune the baseline: cosine at 5 learning rates x2 apart, 3 seeds (2000-2002), not the held-out seeds.
3. Deploy each policy frozen on 5 held-out seeds (1337-1341) at the profile's LR, x10 and x0.1, beside
   the cosine baseline at the same LR and the random control with the same actions; plus the tuned
   baseline on the same seeds.
4. Paired differences in full_val_loss (same seed, same base LR) with 95% t intervals: summary.json, summary.md.
Every step is a run folder or a train_agent.py folder; a finished one is kept on a re-run.
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
PROFILE, DATASET, BASE_LR, BASE_MIN_LR = "tiny", "shakespeare_char", 1e-3, 1e-4
ACTIONS = "0.1,0.5,1,1.5,2"
FACTORS = {"x1": 1.0, "x10": 10.0, "x0.1": 0.1}
SWEEP = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]


def sh(args, log):
    t = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, args))}\n")
        f.flush()
        proc = subprocess.run([sys.executable, *map(str, args)], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(map(str, args))}; see {log}")
    return time.time() - t


def run(out, log, *extra, seeds=5, seed_base=1337):
    if not (out / "final_info.json").exists():
        sh(["experiment.py", "--out_dir", out, "--profile", PROFILE, "--datasets", DATASET, "--seeds", seeds,
            "--seed_base", seed_base, "--notes", "off", *(["--overwrite"] if out.exists() else []), *extra], log)
    return json.loads((out / "final_info.json").read_text())[DATASET]["final_info_dict"]["full_val_loss"]


def lr_flags(lr):
    return ["--learning_rate", lr, "--min_lr", lr / 10]


def paired(a, b):
    d = np.array(a) - np.array(b)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)],
            "p": float(stats.ttest_rel(a, b).pvalue), "n": len(d)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="study")
    parser.add_argument("--episodes", type=int, default=120)
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(exist_ok=True)
    log = out / "log.txt"
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}

    for agent in ("reinforce", "ppo"):
        folder = out / f"agent_{agent}"
        if not (folder / "manifest.json").exists() or \
                json.loads((folder / "manifest.json").read_text()).get("episodes_done", 0) < args.episodes:
            timings[f"train_{agent}_s"] = timings.get(f"train_{agent}_s", 0) + sh(
                ["train_agent.py", "--agent", agent, "--dataset", DATASET, "--episodes", args.episodes,
                 "--profile", PROFILE, "--lr_range", "0.1,10", "--out_dir", folder], log)
            (out / "timings.json").write_text(json.dumps(timings, indent=1))

    sweep = {lr: float(np.mean(run(out / f"sweep_{lr:g}", log, *lr_flags(lr), seeds=3, seed_base=2000)))
             for lr in SWEEP}
    tuned_lr = min(sweep, key=sweep.get)

    results = {"tuned": run(out / "tuned", log, *lr_flags(tuned_lr))}
    for name, factor in FACTORS.items():
        lr = BASE_LR * factor
        results[f"cosine_{name}"] = run(out / f"cosine_{name}", log, *lr_flags(lr))
        results[f"random_{name}"] = run(out / f"random_{name}", log, *lr_flags(lr), "--agent", "random",
                                        "--agent_actions", ACTIONS)
        for agent in ("ppo", "reinforce"):
            results[f"{agent}_{name}"] = run(out / f"{agent}_{name}", log, *lr_flags(lr), "--agent", agent,
                                             "--agent_init", out / f"agent_{agent}")

    comparisons = {}
    for name in FACTORS:
        for arm in ("random", "ppo", "reinforce"):
            comparisons[f"{arm}_{name} - cosine_{name}"] = paired(results[f"{arm}_{name}"], results[f"cosine_{name}"])
            comparisons[f"{arm}_{name} - tuned"] = paired(results[f"{arm}_{name}"], results["tuned"])
        for agent in ("ppo", "reinforce"):
            comparisons[f"{agent}_{name} - random_{name}"] = paired(results[f"{agent}_{name}"], results[f"random_{name}"])
    summary = {"sweep_mean_full_val_loss": {f"{k:g}": v for k, v in sweep.items()}, "tuned_lr": tuned_lr,
               "full_val_loss": results, "paired_differences": comparisons, "timings": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| arm | full_val_loss mean ± stderr (n=5) |", "|---|---|"]
    for arm, values in results.items():
        v = np.array(values)
        lines.append(f"| {arm} | {v.mean():.4f} ± {v.std(ddof=1) / math.sqrt(len(v)):.4f} |")
    lines += ["", "| paired difference (lower = first arm better) | mean | 95% CI | p |", "|---|---|---|---|"]
    for key, c in comparisons.items():
        lines.append(f"| {key} | {c['mean']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p']:.3g} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
