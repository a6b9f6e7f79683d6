"""
Does a per-layer learning-rate controller beat one global multiplier, the LAMB trust-ratio rule and cosine?
The measured comparison of the README's per-layer section.

    python bench/layer_study.py --out layer_study --controller_study study   # ~45 min on a 2-core CPU; resumable

1. Train ppo with --lr_groups layer (one policy shared by the layers, each layer an agent of it) with
   train_agent.py on shakespeare_char at the tiny profile, exactly as bench/controller_study.py trained the
   global ppo: base LR drawn log-uniformly from x0.1..x10, training seeds 1,000,000 + episode.
2. Deploy it frozen on the 5 held-out seeds (1337-1341) at the profile's LR (1e-3) and at the tuned LR of
   the controller study's sweep, beside: the global ppo policy of the controller study, the LAMB trust-ratio
   heuristic (--layer_trust lamb), cosine, and the per-layer random control, all at the same LR.
3. Paired differences in full_val_loss (same seed, same base LR) with 95% t intervals: summary.json,
   summary.md, and the per-layer LR heatmaps of plot.py in figures/.
The controller study's folder (--controller_study) supplies the global ppo policy, its runs and the tuned
LR; runs already there are reused (the code reproduces them bit for bit: same seeds, same settings).
"""
import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from controller_study import BASE_LR, DATASET, PROFILE, ROOT, SWEEP, lr_flags, paired, run, sh  # noqa: E402


def reuse(source: Path, target: Path) -> None:
    """Copy a finished folder of the controller study (a run or a trained policy) if target has none."""
    if source.exists() and not target.exists():
        shutil.copytree(source, target)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="layer_study")
    parser.add_argument("--controller_study", default="study", help="bench/controller_study.py's --out folder")
    parser.add_argument("--episodes", type=int, default=120)
    args = parser.parse_args()
    out, previous = Path(args.out).resolve(), Path(args.controller_study).resolve()
    out.mkdir(exist_ok=True)
    log = out / "log.txt"
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}

    for name in ("agent_ppo", "cosine_x1", "ppo_x1", "tuned"):
        reuse(previous / name, out / {"agent_ppo": "agent_ppo_global", "ppo_x1": "ppo_global_x1",
                                      "tuned": "cosine_tuned"}.get(name, name))
    for lr in SWEEP:
        reuse(previous / f"sweep_{lr:g}", out / f"sweep_{lr:g}")
    if not (out / "agent_ppo_global" / "manifest.json").exists():
        timings["train_ppo_global_s"] = sh(
            ["train_agent.py", "--agent", "ppo", "--dataset", DATASET, "--episodes", args.episodes, "--profile",
             PROFILE, "--lr_range", "0.1,10", "--out_dir", out / "agent_ppo_global"], log)
    layer_agent = out / "agent_ppo_layer"
    if not (layer_agent / "manifest.json").exists() or \
            json.loads((layer_agent / "manifest.json").read_text()).get("episodes_done", 0) < args.episodes:
        timings["train_ppo_layer_s"] = timings.get("train_ppo_layer_s", 0) + sh(
            ["train_agent.py", "--agent", "ppo", "--lr_groups", "layer", "--dataset", DATASET, "--episodes",
             args.episodes, "--profile", PROFILE, "--lr_range", "0.1,10", "--out_dir", layer_agent], log)
        (out / "timings.json").write_text(json.dumps(timings, indent=1))

    sweep = {lr: float(np.mean(run(out / f"sweep_{lr:g}", log, *lr_flags(lr), seeds=3, seed_base=2000)))
             for lr in SWEEP}
    tuned_lr = min(sweep, key=sweep.get)
    arms = {"cosine": [], "lamb": ["--layer_trust", "lamb"],
            "random_layer": ["--agent", "random", "--lr_groups", "layer", "--agent_actions", "0.1,0.5,1,1.5,2"],
            "ppo_global": ["--agent", "ppo", "--agent_init", out / "agent_ppo_global"],
            "ppo_layer": ["--agent", "ppo", "--lr_groups", "layer", "--agent_init", layer_agent]}
    results, seconds = {}, {}
    for rate_name, lr in (("x1", BASE_LR), ("tuned", tuned_lr)):
        for arm, flags in arms.items():
            folder = out / f"{arm}_{rate_name}"
            t = time.time()
            results[f"{arm}_{rate_name}"] = run(folder, log, *lr_flags(lr), *flags)
            seconds[f"{arm}_{rate_name}"] = time.time() - t

    comparisons = {}
    for rate_name in ("x1", "tuned"):
        for a, b in (("ppo_layer", "cosine"), ("ppo_layer", "ppo_global"), ("ppo_layer", "lamb"),
                     ("ppo_layer", "random_layer"), ("lamb", "cosine"), ("ppo_global", "cosine"),
                     ("random_layer", "cosine")):
            comparisons[f"{a}_{rate_name} - {b}_{rate_name}"] = paired(results[f"{a}_{rate_name}"],
                                                                       results[f"{b}_{rate_name}"])
        for arm in ("ppo_layer", "ppo_global", "lamb"):
            comparisons[f"{arm}_{rate_name} - cosine_tuned"] = paired(results[f"{arm}_{rate_name}"],
                                                                      results["cosine_tuned"])
    manifest = json.loads((layer_agent / "manifest.json").read_text())
    summary = {"sweep_mean_full_val_loss": {f"{k:g}": v for k, v in sweep.items()}, "tuned_lr": tuned_lr,
               "full_val_loss": results, "paired_differences": comparisons, "timings": timings,
               "layer_policy": {"episodes": manifest.get("episodes_done"), "train_seconds": manifest.get("train_seconds"),
                                "episode_seconds": manifest.get("episode_seconds")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    lines = [f"tuned LR {tuned_lr:g}; per-layer ppo trained on {manifest.get('episodes_done')} episodes "
             f"({manifest.get('episode_seconds', 0):.0f} s)", "",
             "| arm | full_val_loss mean ± stderr (n=5) |", "|---|---|"]
    for arm, values in results.items():
        v = np.array(values)
        lines.append(f"| {arm} | {v.mean():.4f} ± {v.std(ddof=1) / math.sqrt(len(v)):.4f} |")
    lines += ["", "| paired difference (lower = first arm better) | mean | 95% CI | p |", "|---|---|---|---|"]
    for key, c in comparisons.items():
        lines.append(f"| {key} | {c['mean']:+.4f} | [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] | {c['p']:.3g} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    subprocess.run([sys.executable, str(ROOT / "plot.py"), *[str(out / f"{arm}_x1") for arm in arms],
                    *[str(out / f"{arm}_tuned") for arm in arms], "--out_dir", str(out / "figures")],
                   cwd=ROOT, stdout=subprocess.DEVNULL)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
