"""
The measured Pareto result of the README: rl against magnitude against random structured pruning of the
cpu-profile shakespeare_char model at 0.75, 0.5 and 0.3 of its FLOPs.

    python bench/prune_study.py --out prune_study                  # trains the models first; ~40 min on 2 cores
    python bench/prune_study.py --out prune_study --run run_0      # prunes an existing cpu-profile run's seeds
    python bench/prune_study.py --out smoke --smoke                # a minute or two: smoke model, 2 episodes

1. The models: one cpu-profile run on shakespeare_char per held-out seed (1337, 1338, ...; cached by
   bench/study.py), or the first --seeds seeds of an existing run (--run).
2. Each seed's model pruned by prune.py at every target by every method (one prune folder per seed, the
   same --episodes, fine-tuning and search seed for all), each pruned model fine-tuned and measured.
3. Per target and method, mean and standard error over the seeds of full_val_loss before and after
   fine-tuning, flops_ratio, params, tokens/s and search time; paired differences on full_val_loss
   (same source model), 95% t intervals, Holm over the table: summary.json, summary.md.
A finished folder is kept on a re-run; a prune folder is keyed by its whole command.
"""
import json
import sys
from pathlib import Path

import study
from study import Arm, Study, seeds, stats

QUESTION = "Which structured pruning loses least at 0.75, 0.5 and 0.3 of the FLOPs: rl, magnitude or random?"
DATASET, TARGETS, METHODS = "shakespeare_char", (0.75, 0.5, 0.3), ("rl", "magnitude", "random")
SHOWN = ("full_val_loss_before", "full_val_loss", "flops_ratio", "params", "tokens_per_second", "search_time")
BEFORE = " before fine-tuning"  # the arm of a key's full_val_loss_before


def parse(argv: list[str]):
    parser = study.argument_parser(QUESTION, "prune_study")
    parser.add_argument("--run", default="", help="an existing cpu-profile run folder (default: train one per seed)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--finetune_iters", type=int, default=200)
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the paired intervals need two source models")
    args.profile = "cpu"
    if args.smoke:  # smoke-profile source models, 2 of them, 2 rl episodes, 5 fine-tuning steps
        args.profile, args.seeds, args.episodes, args.finetune_iters = "smoke", 2, 2, 5
    return args


def sources(s: Study, args) -> dict:
    """seed -> (run folder, seed index in it) of every source model."""
    if args.run:
        run = Path(args.run).resolve()
        base = json.loads((run / "run.json").read_text())["configs"][DATASET]["seed_base"]
        return {base + i: (run, i) for i in range(args.seeds)}
    return {seed: (s.run_seed([], seed)[0], 0) for seed in seeds("held_out", args.seeds)}


def prune_all(s: Study, args, models: dict) -> dict:
    """seed -> the final_info.json of prune.py's folder for that source model."""
    found = {}
    for seed, (run, index) in models.items():
        folder = s.run_script(f"prune_{seed}", "prune.py", "--run", run, "--dataset", DATASET, "--seed", index,
                              "--flops_target", ",".join(map(str, TARGETS)), "--method", ",".join(METHODS),
                              "--episodes", args.episodes, "--finetune_iters", args.finetune_iters,
                              "--notes", "off", done="final_info.json", again=["--overwrite"])
        found[seed] = json.loads((folder / "final_info.json").read_text())
    return found


def keys() -> list[str]:
    return ["unpruned", "unpruned_finetuned"] + [f"{m}_{t:g}" for t in TARGETS for m in METHODS]


def arms_of(pruned: dict, finetune_iters: int) -> dict:
    """An arm per key after fine-tuning (charged its fine-tuning steps) and, for the pruned, before it."""
    def values(key, metric):
        return {seed: f[key]["final_info_dict"][metric][0] for seed, f in pruned.items()
                if metric in f[key]["final_info_dict"]}
    arms = {}
    for key in keys():
        steps = 0 if key == "unpruned" else finetune_iters * len(pruned)
        arms[key] = Arm(key, seeds=list(pruned), values=values(key, "full_val_loss"), run_steps=steps)
        if not key.startswith("unpruned") and values(key, "full_val_loss_before"):  # the pruned, as pruned
            arms[key + BEFORE] = Arm(key + BEFORE, seeds=list(pruned), values=values(key, "full_val_loss_before"))
    return arms


def comparisons(arms: dict) -> list[tuple[Arm, Arm]]:
    pairs = []
    for t in TARGETS:
        for a, b in (("rl", "magnitude"), ("magnitude", "random"), ("rl", "random")):
            pairs += [(arms[f"{a}_{t:g}{when}"], arms[f"{b}_{t:g}{when}"]) for when in ("", BEFORE)]
        # what pruning costs, against the source model fine-tuned the same way
        pairs += [(arms[f"{m}_{t:g}"], arms["unpruned_finetuned"]) for m in METHODS]
    return pairs


def metric_lines(pruned: dict, args) -> list[str]:
    """The Pareto table: each key's metrics, mean ± stderr over the source models."""
    lines = [f"Structured pruning of the {args.profile}-profile {DATASET} model, {len(pruned)} source models (seeds "
             f"{min(pruned)}-{max(pruned)}), rl {args.episodes} episodes, {args.finetune_iters} fine-tuning steps",
             "", "| key | full_val_loss before fine-tuning | after | FLOPs ratio | params | tokens/s | search s |",
             "|---|---|---|---|---|---|---|"]
    for key in keys():
        def cell(metric, digits=4):
            values = [f[key]["final_info_dict"][metric][0] for f in pruned.values()
                      if metric in f[key]["final_info_dict"]]
            if not values:
                return "–"
            mean, se = stats.mean_and_stderr(values)
            return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")
        lines.append(f"| {key} | {cell('full_val_loss_before')} | {cell('full_val_loss')} | {cell('flops_ratio', 3)} | "
                     f"{cell('params', 0)} | {cell('tokens_per_second', 0)} | {cell('search_time', 1)} |")
    return lines


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], DATASET, data_dir=args.data_dir)
    models = sources(s, args)
    pruned = prune_all(s, args, models)
    arms = arms_of(pruned, args.finetune_iters)
    rows = study.table(comparisons(arms))
    print(study.write_summary(s.root, QUESTION, list(arms.values()), rows, notes=metric_lines(pruned, args),
                              extra={"models": {seed: f"{run}#{i}" for seed, (run, i) in models.items()},
                                     "episodes": args.episodes, "finetune_iters": args.finetune_iters}))


if __name__ == "__main__":
    sys.exit(study.main_of(main))
