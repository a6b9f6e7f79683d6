"""
The measured Pareto result of the README: rl against magnitude against random structured pruning of the
cpu-profile shakespeare_char model at 0.75, 0.5 and 0.3 of its FLOPs.

    python bench/prune_study.py --out prune_study                  # trains the models first; ~40 min on 2 cores
    python bench/prune_study.py --out prune_study --run run_0      # prunes an existing cpu-profile run's seeds

1. The models: a cpu-profile run on shakespeare_char with --seeds seeds (1337, 1338, ...), or --run.
2. Each seed's model pruned by prune.py at every target by every method (one prune folder per seed, the
   same --episodes, fine-tuning and search seed for all), each pruned model fine-tuned and measured.
3. Per target and method, mean and standard error over the seeds of full_val_loss before and after
   fine-tuning, flops_ratio, params, tokens/s and search time; paired differences on full_val_loss
   (same source model) with 95% t intervals: summary.json, summary.md.
A finished folder is kept on a re-run.
"""
import argparse
import json
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from controller_study import ROOT, paired, sh  # noqa: E402  (the studies' shared runner and paired t interval)

sys.path.insert(0, str(ROOT))
import experiment as ex  # noqa: E402

DATASET, TARGETS, METHODS = "shakespeare_char", (0.75, 0.5, 0.3), ("rl", "magnitude", "random")
SHOWN = ("full_val_loss_before", "full_val_loss", "flops_ratio", "params", "tokens_per_second", "search_time")


def fmt(mean, se, digits=4) -> str:
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="prune_study")
    parser.add_argument("--run", default="", help="an existing cpu-profile run folder (default: train one)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--finetune_iters", type=int, default=200)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the paired intervals need two source models")
    out = Path(args.out).resolve()
    out.mkdir(exist_ok=True)
    log = out / "log.txt"
    timings = {}
    run = Path(args.run).resolve() if args.run else out / "run_cpu"
    if not (run / "final_info.json").exists():
        timings["train"] = sh(["experiment.py", "--out_dir", run, "--profile", "cpu", "--datasets", DATASET,
                               "--seeds", args.seeds, "--notes", "off", *(["--overwrite"] if run.exists() else [])],
                              log)
    for seed in range(args.seeds):
        folder = out / f"seed_{seed}"
        if not (folder / "final_info.json").exists():
            timings[f"prune_seed_{seed}"] = sh(
                ["prune.py", "--run", run, "--dataset", DATASET, "--seed", seed,
                 "--flops_target", ",".join(map(str, TARGETS)), "--method", ",".join(METHODS),
                 "--episodes", args.episodes, "--finetune_iters", args.finetune_iters, "--out_dir", folder,
                 "--notes", "off", *(["--overwrite"] if folder.exists() else [])], log)
    per_seed = [json.loads((out / f"seed_{s}" / "final_info.json").read_text()) for s in range(args.seeds)]

    def values(key, metric):
        return [f[key]["final_info_dict"][metric][0] for f in per_seed if metric in f[key]["final_info_dict"]]

    rows = {}
    for key in ["unpruned", "unpruned_finetuned"] + [f"{m}_{t:g}" for t in TARGETS for m in METHODS]:
        rows[key] = {metric: ex.mean_and_stderr(values(key, metric)) for metric in SHOWN if values(key, metric)}
    comparisons = {}
    for t in TARGETS:
        for a, b in (("rl", "magnitude"), ("magnitude", "random"), ("rl", "random")):
            for metric in ("full_val_loss", "full_val_loss_before"):
                comparisons[f"{a}_{t:g} - {b}_{t:g} ({metric})"] = paired(values(f"{a}_{t:g}", metric),
                                                                           values(f"{b}_{t:g}", metric))
        for m in METHODS:  # what pruning costs, against the source model fine-tuned the same way
            comparisons[f"{m}_{t:g} - unpruned_finetuned (full_val_loss)"] = paired(
                values(f"{m}_{t:g}", "full_val_loss"), values("unpruned_finetuned", "full_val_loss"))
    summary = {"run": str(run), "seeds": args.seeds, "episodes": args.episodes, "finetune_iters": args.finetune_iters,
               "rows": rows, "paired": comparisons, "timings_s": timings}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    lines = [f"Structured pruning of the cpu-profile {DATASET} model, {args.seeds} source models (seeds "
             f"1337-{1336 + args.seeds}), rl {args.episodes} episodes, {args.finetune_iters} fine-tuning steps; "
             f"mean ± stderr over the source models", "",
             "| key | full_val_loss before fine-tuning | after | FLOPs ratio | params | tokens/s | search s |",
             "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        def cell(metric, digits=4):
            return fmt(*r[metric], digits) if metric in r else "–"
        lines.append(f"| {key} | {cell('full_val_loss_before')} | {cell('full_val_loss')} | {cell('flops_ratio', 3)} | "
                     f"{cell('params', 0)} | {cell('tokens_per_second', 0)} | {cell('search_time', 1)} |")
    lines += ["", "| paired difference (same source model) | mean | 95% interval |", "|---|---|---|"]
    for name, d in comparisons.items():
        lines.append(f"| {name} | {d['mean']:+.4f} | [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
