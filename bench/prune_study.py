"""
Does the RL allocation (AMC) beat random search at equal evaluations, one global ranking and the uniform split,
once every method spends its budget, the search's compute is charged and fine-tuning is long enough to decide?
rl, random_search, global, uniform and random structured pruning of the cpu-profile shakespeare_char model at
0.75, 0.5 and 0.3 of its FLOPs, fine-tuned for 200 and 1,000 steps, with and without distillation at 0.5, and
the same architectures trained from scratch (Liu et al. 2019's control).

    python bench/prune_study.py --out prune_study --jobs 2         # trains 5 models first: hours on 2 cores
    python bench/prune_study.py --out prune_study --run run_0 --seeds 3    # an existing cpu-profile run's seeds
    python bench/prune_study.py --out smoke --smoke                # smoke models, 2 episodes: minutes

1. Source models: one cpu-profile run on shakespeare_char per held-out seed (1337, 1338, ...; cached by
   bench/study.py), or the first --seeds seeds of an existing run (--run).
2. Per source model and search seed (0 .. --search_seeds - 1): prune.py at every target by every method, once per
   --finetune_iters (the longest also trains each architecture at --distill_target from scratch, --scratch), and
   every method at --distill_target again with --distill; and at --distill_target rl with --long_episodes (1,000)
   and random_search with as many evaluations, fine-tuned for the shortest length: PPO given the episodes its
   learning curve needs to flatten, which 100 do not give it. One prune folder per command (cached: a re-run reuses
   every finished folder and continues an interrupted one with prune.py --resume, keeping the keys it finished).
   The shortest length's folders run first and are summarised at once (interim, `complete: false`): the
   longest's take hours.
   The fine-tuning rate: prune.py's default (the run's rate / 10) is not tuned, so every method at --distill_target
   is also fine-tuned for the longest length at a tuned rate (tuned_<iters> folders): the rate of --finetune_rates
   (x2 apart) with the lowest mean loss of global and uniform on a tuning model (seed 2000, never a held-out one),
   the sweep's fine-tuning steps charged to every tuned arm.
3. A source model's number for a key is its mean over the search seeds: the source model is what the comparisons
   pair on (n = source models), since its search seeds share it. Compute per arm: its own training steps
   (fine-tuning, or the whole from-scratch run) plus its search_steps (the reward's forward passes and the Taylor
   scores, in training steps of the source model), summed over every folder.
4. Paired differences on full_val_loss (same source model), 95% t intervals, Holm over every test in the table:
   summary.json, summary.md; figures/pareto_<iters>.png (loss against FLOPs, means over everything) and
   figures/search_curves.png (the searches' reward loss per episode, with the slope of PPO's over its last 100).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import study
from study import Arm, Study, seeds, stats

QUESTION = ("Which structured pruning loses least at 0.75, 0.5 and 0.3 of the FLOPs: rl, random search at equal "
            "evaluations, a global ranking, uniform or random, with budgets spent and search compute charged?")
DATASET, TARGETS = "shakespeare_char", (0.75, 0.5, 0.3)
METHODS = ("rl", "random_search", "global", "uniform", "random")
PAIRS = (("rl", "random_search"), ("rl", "global"), ("rl", "uniform"), ("global", "uniform"), ("uniform", "random"))
BEFORE = " before fine-tuning"  # the arm of a key's full_val_loss_before


def parse(argv: list[str]):
    parser = study.argument_parser(QUESTION, "prune_study")
    parser.add_argument("--run", default="", help="an existing cpu-profile run folder (default: train one per seed)")
    parser.add_argument("--seeds", type=int, default=5, help="source models")
    parser.add_argument("--search_seeds", type=int, default=2, help="prune.py --search_seed 0 .. N-1 per model")
    parser.add_argument("--episodes", type=int, default=100, help="rl episodes (random_search: as many evaluations)")
    parser.add_argument("--finetune_iters", default="200,1000", help="fine-tuning lengths, comma-separated")
    parser.add_argument("--distill", type=float, default=0.5, help="prune.py --distill ALPHA of the distilled arms")
    parser.add_argument("--distill_target", type=float, default=0.5, choices=TARGETS,
                        help="the target of the distilled, from-scratch and long-search arms")
    parser.add_argument("--long_episodes", type=int, default=1000,
                        help="rl's episodes (random_search's evaluations) in the long-search arms at the distill "
                             "target, so that PPO's learning curve can flatten (0: none)")
    parser.add_argument("--finetune_rates", default="1.25e-4,2.5e-4,5e-4,1e-3,2e-3,4e-3",
                        help="fine-tuning rates (prune.py --finetune_lr) swept on a tuning model at the longest "
                             "length; the best fine-tunes the tuned arms ('': no tuned arms)")
    args = parser.parse_args(argv)
    args.profile = "cpu"
    if args.smoke:  # smoke-profile source models, 2 of them, 2 search seeds, 2 rl episodes, a few fine-tuning steps
        args.profile, args.seeds, args.search_seeds, args.episodes, args.finetune_iters = "smoke", 2, 2, 2, "4,8"
        args.long_episodes = min(args.long_episodes, 6)
        args.finetune_rates = ",".join(args.finetune_rates.split(",")[3:5])
    try:
        args.lengths = sorted({int(n) for n in args.finetune_iters.split(",")})
        args.rates = [float(r) for r in args.finetune_rates.split(",") if r.strip()]
    except ValueError:
        parser.error(f"argument --finetune_iters or --finetune_rates: not numbers: {args.finetune_iters!r}, "
                     f"{args.finetune_rates!r}")
    if not all(0 < r < 1 for r in args.rates):
        parser.error(f"argument --finetune_rates: each must be in (0, 1), got {args.finetune_rates!r}")
    if args.seeds < 2 or args.search_seeds < 1 or min(args.lengths) < 1 or args.long_episodes < 0:
        parser.error("--seeds must be at least 2 (the paired intervals need two source models), --search_seeds "
                     "and --finetune_iters at least 1, --long_episodes at least 0")
    args.longest = max(args.lengths)  # whose plain folders hold the from-scratch control, whatever is summarised
    args.tuning = None  # the fine-tuning rate's sweep (tune_finetune_rate), once it has run
    return args


def only(args, lengths: list[int]):
    """args for the folders, arms and comparisons of these fine-tuning lengths alone (an interim summary)."""
    return argparse.Namespace(**{**vars(args), "lengths": lengths})


def sources(s: Study, args) -> dict:
    """seed -> (run folder, seed index in it) of every source model."""
    if args.run:
        run = Path(args.run).resolve()
        base = json.loads((run / "run.json").read_text())["configs"][DATASET]["seed_base"]
        return {base + i: (run, i) for i in range(args.seeds)}
    held_out = seeds("held_out", args.seeds)
    trained = s.run_seeds([], held_out)  # (--jobs at a time)
    return {seed: (folder, 0) for seed, (folder, _) in zip(held_out, trained)}


def prune_folder(s: Study, name: str, run: Path, index: int, *flags) -> Path:
    """The finished folder of one prune.py command on a source model (cached by its whole command; an interrupted
    one continued with --resume), run beside the study's other jobs."""
    return s.run_script(name, "prune.py", "--run", run, "--dataset", DATASET, "--seed", index, *flags,
                        "--notes", "off", done="final_info.json", again=["--resume"], beside=True)


def own_steps(final: dict, key: str) -> int:
    """The optimizer steps behind one key of a prune folder beyond its source model's: a pruned or fine-tuned model's
    steps_trained include its source's; a from-scratch model's are all its own."""
    trained = number(final[key], "steps_trained") or 0
    return trained if key.endswith("_scratch") else trained - number(final["unpruned"], "steps_trained")


def tune_finetune_rate(s: Study, args) -> dict:
    """The tuned arms' fine-tuning rate: global and uniform at the distill target fine-tuned for the longest
    length at each of args.rates, on a tuning model (the first search seed's: never a held-out one); the rate of
    the lowest mean loss of the two. Its steps: the sweep's fine-tunings (unpruned_finetuned's included)."""
    (run, _), = s.run_seeds([], seeds("search", 1))
    target = f"{args.distill_target:g}"

    def prune(rate: float) -> dict:
        folder = prune_folder(s, f"tune_{rate:g}", run, 0, "--method", "global,uniform", "--flops_target", target,
                              "--finetune_iters", args.longest, "--finetune_lr", rate)
        return json.loads((folder / "final_info.json").read_text())

    finals = dict(zip(args.rates, s.side_by_side(prune, args.rates)))
    loss = {rate: sum(number(f[f"{m}_{target}"], "full_val_loss") for m in ("global", "uniform")) / 2
            for rate, f in finals.items()}
    steps = sum(own_steps(f, key) for f in finals.values() for key in f if key != "unpruned")
    return {"model": str(run), "rate": min(loss, key=loss.get), "loss_by_rate": loss, "steps": steps}


def has_tuned_arms(args) -> bool:
    """Whether these args hold the tuned_<longest> folders: once the rate's sweep has run, and where the longest
    length is summarised (an interim summary has no tuned arms)."""
    return bool(args.tuning) and args.longest in args.lengths


def folders(args) -> dict:
    """Each prune folder a source model and search seed get, by name: (its methods, rl's episodes, its other
    prune.py flags). long_<iters>: rl and random_search alone at the distill target, args.long_episodes each,
    fine-tuned for the shortest length: PPO given the episodes to learn, its rival as many evaluations.
    tuned_<iters>: every method at the distill target, fine-tuned at the tuned rate (once it is known)."""
    target, first = f"{args.distill_target:g}", min(args.lengths)
    plan = {}
    for iters in args.lengths:
        scratch = ["--scratch", target] if iters == args.longest else []
        plan[f"plain_{iters}"] = (METHODS, args.episodes,
                                  ["--flops_target", ",".join(map(str, TARGETS)), "--finetune_iters", iters, *scratch])
        plan[f"distilled_{iters}"] = (METHODS, args.episodes,
                                      ["--flops_target", target, "--finetune_iters", iters, "--distill", args.distill])
        if iters == first and args.long_episodes:
            plan[f"long_{iters}"] = (METHODS[:2], args.long_episodes, ["--flops_target", target, "--finetune_iters",
                                                                       iters])
        if iters == args.longest and has_tuned_arms(args):
            plan[f"tuned_{iters}"] = (METHODS, args.episodes, ["--flops_target", target, "--finetune_iters", iters,
                                                               "--finetune_lr", args.tuning["rate"]])
    return plan


def prune_all(s: Study, args, models: dict) -> tuple[dict, dict]:
    """(folder name, source seed, search seed) -> the final_info.json of that prune folder, and -> its searches
    (run.json's: each rl and random_search key's scores)."""
    plan = [(name, what, seed, search_seed) for name, what in folders(args).items() for seed in models
            for search_seed in range(args.search_seeds)]

    def prune(job) -> tuple[dict, dict]:
        name, (methods, episodes, flags), seed, search_seed = job
        run, index = models[seed]
        folder = prune_folder(s, f"prune_{seed}_{search_seed}_{name}", run, index, "--method", ",".join(methods),
                              "--episodes", episodes, "--search_seed", search_seed, *flags)
        return (json.loads((folder / "final_info.json").read_text()),
                json.loads((folder / "run.json").read_text())["search"])

    done = dict(zip([(name, seed, search_seed) for name, _, seed, search_seed in plan], s.side_by_side(prune, plan)))
    return {job: final for job, (final, _) in done.items()}, {job: search for job, (_, search) in done.items()}


def number(entry: dict, metric: str):
    values = entry["final_info_dict"].get(metric)
    return values[0] if values else None


def arm(name: str, pruned: dict, folder: str, key: str, metric: str = "full_val_loss", charged: bool = True,
        tuning_steps: int = 0) -> Arm:
    """One key of one kind of folder: per source model the mean over its search seeds; charged: its own
    training steps (fine-tuning, or a from-scratch run) and its search steps, summed over every folder, and the
    tuning its settings came from."""
    per_model: dict = {}
    run_steps, extra_steps = 0, tuning_steps
    for (name_, seed, _), final in pruned.items():
        if name_ == folder and key in final and number(final[key], metric) is not None:
            per_model.setdefault(seed, []).append(number(final[key], metric))
            run_steps += own_steps(final, key)
            extra_steps += math.ceil(number(final[key], "search_steps") or 0)
    values = {seed: sum(v) / len(v) for seed, v in per_model.items()}
    return Arm(name, seeds=sorted(values), values=values, run_steps=run_steps if charged else 0,
               extra_steps=extra_steps if charged else 0)


def arms_of(pruned: dict, args) -> dict:
    """Every arm of the table: each key of each fine-tuning length, distilled, from scratch, before fine-tuning."""
    first, longest, t = min(args.lengths), args.longest, f"{args.distill_target:g}"
    arms = {"unpruned": arm("unpruned", pruned, f"plain_{first}", "unpruned")}
    for iters in args.lengths:
        arms[f"unpruned_finetuned @{iters}"] = arm(f"unpruned_finetuned @{iters}", pruned, f"plain_{iters}",
                                                   "unpruned_finetuned")
        for key in (f"{m}_{target:g}" for target in TARGETS for m in METHODS):
            arms[f"{key} @{iters}"] = arm(f"{key} @{iters}", pruned, f"plain_{iters}", key)
        for m in METHODS:
            name = f"{m}_{t} distilled @{iters}"
            arms[name] = arm(name, pruned, f"distilled_{iters}", f"{m}_{t}")
    for m in METHODS[:4] if longest in args.lengths else ():  # (random's architecture is uniform's: trained once)
        arms[f"{m}_{t}_scratch"] = arm(f"{m}_{t}_scratch", pruned, f"plain_{longest}", f"{m}_{t}_scratch")
    for key in (f"{m}_{target:g}" for target in TARGETS for m in METHODS):  # the allocation as chosen
        arms[key + BEFORE] = arm(key + BEFORE, pruned, f"plain_{first}", key, "full_val_loss_before", charged=False)
    if f"long_{first}" in folders(args):  # the searches given args.long_episodes
        for m in METHODS[:2]:
            for suffix, metric in ((f" @{first}", "full_val_loss"), (BEFORE, "full_val_loss_before")):
                name = f"{m}_{t} x{args.long_episodes}{suffix}"
                arms[name] = arm(name, pruned, f"long_{first}", f"{m}_{t}", metric, charged=suffix != BEFORE)
    if has_tuned_arms(args):  # fine-tuned at the tuned rate, its sweep charged to each
        for key in ("unpruned_finetuned", *(f"{m}_{t}" for m in METHODS)):
            name = f"{key} tuned @{longest}"
            arms[name] = arm(name, pruned, f"tuned_{longest}", key, tuning_steps=args.tuning["steps"])
    return arms


def comparisons(arms: dict, args) -> list[tuple[Arm, Arm]]:
    t, longest = f"{args.distill_target:g}", args.longest
    pairs = []
    for iters in args.lengths:
        pairs += [(arms[f"{a}_{target:g} @{iters}"], arms[f"{b}_{target:g} @{iters}"])
                  for target in TARGETS for a, b in PAIRS]
    pairs += [(arms[f"{a}_{target:g}{BEFORE}"], arms[f"{b}_{target:g}{BEFORE}"])
              for target in TARGETS for a, b in PAIRS[:1] + PAIRS[2:3]]
    pairs += [(arms[f"{m}_{t} distilled @{iters}"], arms[f"{m}_{t} @{iters}"])
              for iters in args.lengths for m in METHODS]
    # Liu et al. 2019: the pruned and fine-tuned model against its architecture trained as long from scratch
    pairs += [(arms[f"{m}_{t} @{longest}"], arms[f"{m}_{t}_scratch"]) for m in METHODS[:4] if longest in args.lengths]
    first, many = min(args.lengths), f"x{args.long_episodes}"
    if f"long_{first}" in folders(args):  # rl given the episodes to learn: against its rival and its shorter self
        rl, rs = f"rl_{t} {many}", f"random_search_{t} {many}"
        pairs += [(arms[f"{rl} @{first}"], arms[f"{rs} @{first}"]), (arms[rl + BEFORE], arms[rs + BEFORE]),
                  (arms[f"{rl} @{first}"], arms[f"rl_{t} @{first}"]),
                  (arms[f"{rs} @{first}"], arms[f"random_search_{t} @{first}"]),
                  (arms[f"{rl} @{first}"], arms[f"global_{t} @{first}"])]
    if has_tuned_arms(args):  # at the tuned rate: against the default's, each other, from scratch
        tuned = {m: arms[f"{m}_{t} tuned @{longest}"] for m in METHODS}
        pairs += [(tuned[m], arms[f"{m}_{t} @{longest}"]) for m in METHODS]
        pairs += [(tuned[a], tuned[b]) for a, b in PAIRS]
        pairs += [(tuned[m], arms[f"{m}_{t}_scratch"]) for m in METHODS[:4]]
    return pairs


SHOWN = (("full_val_loss_before", 4), ("full_val_loss", 4), ("flops_ratio", 3), ("params", 0),
         ("tokens_per_second", 0), ("search_evaluations", 0), ("search_steps", 1))


def present(entries: list, metric: str) -> list:
    return [number(e, metric) for e in entries if number(e, metric) is not None]


def mean_text(values: list, digits: int = 4) -> str:
    """'mean ± stderr' of values ('–' where there are none; the mean alone where there is one)."""
    if not values:
        return "–"
    mean, se = stats.mean_and_stderr(values)
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def cell(entries: list, metric: str, digits: int) -> str:
    return mean_text(present(entries, metric), digits)


def metric_lines(pruned: dict, models: dict, args) -> list[str]:
    """The Pareto tables, one per kind of folder: each key's metrics, mean ± stderr over every source model and
    search seed."""
    lines = [f"Structured pruning of the {args.profile}-profile {DATASET} model: {len(models)} source models (seeds "
             f"{min(models)}-{max(models)}) x {args.search_seeds} search seeds, rl {args.episodes} episodes and "
             f"random_search as many evaluations; distilled: prune.py --distill {args.distill}. Comparisons pair on "
             f"the source model (its search seeds averaged). search steps: the search's FLOPs in training steps of "
             f"the source model."]
    for name in folders(args):
        finals = [f for (name_, _, _), f in pruned.items() if name_ == name]
        lines += ["", f"**{name}**", "", "| key | full_val_loss before fine-tuning | after | FLOPs ratio | params | "
                  "tokens/s | search evaluations | search steps |", "|---|---|---|---|---|---|---|---|"]
        for key in finals[0]:
            entries = [f[key] for f in finals if key in f]
            lines.append(f"| {key} | " + " | ".join(cell(entries, m, d) for m, d in SHOWN) + " |")
    return lines


def pareto_figures(root: Path, pruned: dict, args) -> list[str]:
    """figures/pareto_<iters>.png: each key's mean loss against its mean FLOPs ratio, every model and seed."""
    import plot
    written = []
    for iters in args.lengths:
        finals = [f for (name, _, _), f in pruned.items() if name == f"plain_{iters}"]
        means = {}
        for key, entry in finals[0].items():
            entries = [f[key] for f in finals if key in f]
            values = {m: present(entries, m) for m in ("flops_ratio", "full_val_loss", "full_val_loss_before")}
            means[key] = {"method": entry["method"],
                          "means": {f"{m}_mean": sum(v) / len(v) for m, v in values.items() if v}}
        path = root / "figures" / f"pareto_{iters}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot.plot_pareto(means, path, f"{args.profile} model, {iters} fine-tuning steps, mean of {len(finals)}")
        written.append(str(path))
    return written


def curves_by_panel(searches: dict, args) -> dict:
    """The searches' scores by panel (target and episodes) and method, rl's greedy episode left out, so that
    each curve holds the episodes searched: the shortest length's plain folders and the long-search ones."""
    first, panels = min(args.lengths), {}
    for name, episodes, targets in ((f"plain_{first}", args.episodes, TARGETS),
                                    (f"long_{first}", args.long_episodes, (args.distill_target,))):
        for target in targets:
            for m in METHODS[:2]:
                key = f"{m}_{target:g}"
                runs = [found[key]["scores"][:episodes] for (name_, _, _), found in searches.items()
                        if name_ == name and key in found]
                if runs:
                    panels.setdefault(f"{target:g} of the FLOPs, {episodes} episodes", {})[m] = runs
    return panels


def search_notes(panels: dict) -> list[str]:
    """Did PPO's policy improve over its episodes, and has it stopped improving? Per panel and method, the
    mean reward loss per episode (over every search) early and late, the slope of that mean over the last 100
    episodes (flat where its interval holds 0) and the best found."""
    import numpy as np
    lines = ["Searches (figures/search_curves.png): reward loss per scored episode, the mean over every source "
             "model and search seed; the slope is that mean's over its last 100 episodes, per 100 episodes."]
    for panel, methods in panels.items():
        for m, runs in methods.items():
            mean, w = np.mean(runs, axis=0), max(1, min(100, len(runs[0]) // 5))
            slope = stats.trend(mean, 100)
            trend = "–" if slope["ci95"] is None else study.slope_text(slope)
            lines.append(f"- {m}, {panel} ({len(runs)} searches): {mean[:w].mean():.3f} over the first {w} episodes, "
                         f"{mean[-w:].mean():.3f} over the last {w}; slope {trend}; the best of them "
                         f"{np.mean([min(r) for r in runs]):.4f}")
    return lines


def grid_lines(arms: dict) -> list[str]:
    """The arms' full_val_loss at a glance: mean ± stderr over the source models, a row per kind of arm (its name
    without the target), a column per FLOPs target (1: nothing pruned)."""
    columns = ["1", *(f"{t:g}" for t in TARGETS)]
    grid: dict = {}
    for name, a in arms.items():
        column = next((c for c in columns[1:] if f"_{c} " in f"{name} " or f"_{c}_" in name), "1")
        row = name.replace(f"_{column}", "", 1) if column != "1" else name
        grid.setdefault(row, {})[column] = mean_text(list(a.values.values()))
    lines = ["full_val_loss by FLOPs target, mean ± stderr over the source models:", "",
             "| arm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {row} | " + " | ".join(cells.get(c, "") for c in columns) + " |" for row, cells in grid.items()]
    return lines + [""]


def tuning_notes(args) -> list[str]:
    """The fine-tuning rate's sweep, where the summary holds its tuned arms."""
    if not has_tuned_arms(args):
        return []
    losses = ", ".join(f"{rate:g}: {loss:.4f}" for rate, loss in args.tuning["loss_by_rate"].items())
    rate = args.tuning["rate"]
    at_edge = rate in (min(args.rates), max(args.rates))
    edge = " (the sweep's edge: a wider one may find a better rate)" if at_edge else ""
    return [f"Fine-tuning rate of the tuned arms: {rate:g}{edge}, the lowest mean full_val_loss of global "
            f"and uniform at {args.distill_target:g} after {args.longest} steps on the tuning model "
            f"{args.tuning['model']} ({losses}); prune.py's default is the run's rate / 10. The sweep's "
            f"{args.tuning['steps']:,} steps are charged to every tuned arm.", ""]


def summarise(s: Study, args, models: dict, pruned: dict, searches: dict) -> str:
    """summary.json/.md and the figures of args.lengths' folders; complete (not interim) when that is every length
    (the longest's folders, with the from-scratch control, take hours)."""
    import plot
    arms = arms_of(pruned, args)
    rows = study.table(comparisons(arms, args))
    figures = pareto_figures(s.root, pruned, args)
    panels = curves_by_panel(searches, args)
    if panels:
        figures.append(str(s.root / "figures" / "search_curves.png"))
        plot.plot_search_curves(panels, Path(figures[-1]), f"{args.profile} model, mean over every search")
    complete = args.longest in args.lengths
    interim = [] if complete else [f"**Interim**: only the {', '.join(map(str, args.lengths))}-step folders, Holm "
                                   f"over their tests alone; the {args.longest}-step folders are still to run.", ""]
    return study.write_summary(s.root, QUESTION, list(arms.values()), rows,
                               notes=interim + grid_lines(arms) + tuning_notes(args) + search_notes(panels) + [""]
                               + metric_lines(pruned, models, args),
                               extra={"models": {seed: f"{run}#{i}" for seed, (run, i) in models.items()},
                                      "search_seeds": list(range(args.search_seeds)), "episodes": args.episodes,
                                      "finetune_iters": args.lengths, "distill": args.distill,
                                      "distill_target": args.distill_target, "long_episodes": args.long_episodes,
                                      "figures": figures, "finetune_rate": args.tuning if complete else None,
                                      "complete": complete})


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], DATASET, data_dir=args.data_dir, jobs=args.jobs)
    models = sources(s, args)
    if len(args.lengths) > 1:
        first = only(args, args.lengths[:1])
        summarise(s, first, models, *prune_all(s, first, models))
        print(f"interim summary ({first.lengths[0]} fine-tuning steps only): {s.root / 'summary.md'}", flush=True)
    if args.rates:
        study.check_disjoint(held_out=list(models), tuning=seeds("search", 1))
        args.tuning = tune_finetune_rate(s, args)
    print(summarise(s, args, models, *prune_all(s, args, models)))


if __name__ == "__main__":
    sys.exit(study.main_of(main))
