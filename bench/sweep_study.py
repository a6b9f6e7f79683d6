"""
Search baselines against the multi-hyperparameter agent at equal compute, at two budgets (issue 26). Every arm
of a budget gets the same number of training steps on shakespeare_char at the tiny profile:

    python bench/sweep_study.py --out sweep_study            # budgets of 8 and 27 runs; resumable
    python bench/sweep_study.py --out smoke --smoke          # a few minutes: every step, smoke sizes

At each budget of R runs' worth of steps (R = 8, 27):
1. grid (sweep.py --trials R: 2x2x2 / 3x3x3 values of learning_rate, weight_decay, grad_clip), random search
   (R draws) and PBT (a population of R) over the same log-scaled space, every trial on search seed 2000;
   tuned cosine: the profile's schedule at R learning rates (sweep.py grid over learning_rate alone);
2. ppo with --control lr,weight_decay,grad_clip trained by train_agent.py for R episodes with its current
   learner, about 8 episodes per update dividing R (8: one update of 8; 27: three of 9), training seeds
   1,000,000+, its training charged to its arm;
3. on the 10 held-out seeds 1337-1346: each search's best configuration re-run (charged its search), PBT's
   best lineage replayed (--agent replay on S/pbt/best_lineage: PBT's product is a schedule), the frozen
   policy, and cosine at the profile's settings.
4. ppo given a fair chance, outside the equal-compute budgets: 8 or 27 episodes are 1 or 3 ppo updates, and the
   lr leaderboard's ppo took about 450 episodes to flatten. ppo_until_flat trains the same controller centred
   on the larger budget's tuned cosine rate (base rates drawn from x0.5..x2 of it) for --episodes, then on while
   its learning curve still falls, up to --max_episodes; deployed at that rate, charged its training and that
   tuning, and compared with every arm of the larger budget. Its curve: figures/learning_curves.png. It trains
   last: the summary is first written without it (marked interim, `complete: false`), then whole.
5. Paired differences in full_val_loss with 95% t intervals, Holm over the whole table (both budgets and
   ppo_until_flat), each arm's compute: summary.json/.md; the best-so-far curves of the three searches per
   budget: figures/best_so_far_<R>.png.

Each budget's searches share one sweep folder: an interrupted sweep is continued by running the study again
(sweep.py continues it), one started with other settings is refused; a partial sweep is never summarised.
"""
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Optional

import study
from study import Arm, Study, digest, seeds

QUESTION = ("Do grid, random and PBT search beat a learned multi-hyperparameter controller and tuned cosine at "
            "equal compute?")
SPACE = "learning_rate=1e-4:1e-2:log,weight_decay=0.01:1:log,grad_clip=0.25:4:log"
LR_SPACE = "learning_rate=1e-4:1e-2:log"
CONTROL = "lr,weight_decay,grad_clip"
SEARCHES = ("grid", "random", "pbt")
BUDGETS = (8, 27)
PPO_EPISODES_PER_UPDATE = 8  # train_agent.py's default


def parse(argv: list[str]):
    parser = study.argument_parser(QUESTION, "sweep_study")
    parser.add_argument("--seeds", type=int, default=10, help="held-out seeds per arm")
    parser.add_argument("--episodes", type=study.at_least_one, default=304,
                        help="ppo_until_flat's first training episodes (a multiple of its 8 per update)")
    parser.add_argument("--max_episodes", type=study.at_least_one, default=608,
                        help="ppo_until_flat trains on, half --episodes at a time, while its curve still falls, "
                             "up to this many")
    parser.add_argument("--n_envs", type=study.at_least_one, default=1,
                        help="train_agent.py --n_envs of ppo_until_flat's training")
    args = parser.parse_args(argv)
    args.profile, args.budgets = "tiny", BUDGETS
    if args.smoke:  # smoke profile, one budget of 2 runs, 2 held-out seeds, 2 episodes
        args.profile, args.budgets, args.seeds, args.episodes = "smoke", (2,), 2, 2
    args.max_episodes = max(args.max_episodes, args.episodes) if not args.smoke else args.episodes
    return args


def sweep(s: Study, folder: Path, method: str, runs: int, space: str, profile: str) -> Path:
    """sweep.py's folder of one search (S/<method>), run, or continued, until it is summarised."""
    if not (folder / method / "results.json").exists():
        s.sh("sweep.py", "--method", method, "--trials", runs, "--profile", profile, "--datasets", s.dataset,
             "--space", space, "--seed", 0, *s.data, "--out_dir", folder)
    return folder / method


def best_flags(search: Path) -> tuple[list, dict]:
    """experiment.py flags of a search's best configuration (PBT: its best lineage replayed), its best.json."""
    best = json.loads((search / "best.json").read_text())
    if (search / "best_lineage").is_dir():
        lineage = json.loads((search / "best_lineage" / "lineage.json").read_text())
        return [*lineage["flags"], "--agent", "replay", "--agent_init", search / "best_lineage", "--control",
                lineage["control"]], best
    flags = [item for name, value in best["hp"].items() for item in (f"--{name}", value)]
    if "learning_rate" in best["hp"]:  # as sweep.py ran it: min_lr at the profile's ratio (1/10 here)
        flags += ["--min_lr", best["hp"]["learning_rate"] / 10]
    return flags, best


def episodes_per_update(runs: int) -> int:
    """ppo's rollout at a budget of `runs` episodes: about train_agent.py's 8 (its learner since the controllers
    issue), dividing the budget so that ppo spends all of it: 8 -> 8, 27 -> 9 (three updates), 2 -> 2."""
    updates = max(1, round(runs / PPO_EPISODES_PER_UPDATE))
    while runs % updates:
        updates -= 1
    return runs // updates


def budget_arms(s: Study, args, runs: int, held_out: list) -> tuple[list[Arm], dict]:
    """The arms of one budget: each search's choice charged its search, tuned cosine, the trained ppo."""
    folder = s.root / f"searches_{runs}_{digest(args.profile, SPACE, *s.data)}"
    arms, chosen = [], {}
    for method in SEARCHES:
        search = sweep(s, folder, method, runs, SPACE, args.profile)
        flags, chosen[f"{method}_{runs}"] = best_flags(search)
        steps = json.loads((search / "results.json").read_text())["steps"]
        arms.append(Arm(f"{method}_{runs}", flags, held_out, extra_steps=steps))
    tuning = sweep(s, s.root / f"tuned_cosine_{runs}_{digest(args.profile, LR_SPACE, *s.data)}", "grid", runs,
                   LR_SPACE, args.profile)
    flags, chosen[f"tuned_cosine_{runs}"] = best_flags(tuning)
    arms.append(Arm(f"tuned_cosine_{runs}", flags, held_out,
                    extra_steps=json.loads((tuning / "results.json").read_text())["steps"]))
    agent, training = s.train_controller(f"ppo_control_{runs}", runs, "--agent", "ppo", "--control", CONTROL,
                                         "--profile", args.profile, "--episodes_per_update",
                                         episodes_per_update(runs))
    arms.append(Arm(f"ppo_{runs}", ["--agent", "ppo", "--control", CONTROL, "--agent_init", agent], held_out,
                    extra_steps=training))
    figures = s.root / "figures"
    figures.mkdir(exist_ok=True)
    shutil.copyfile(folder / "best_so_far.png", figures / f"best_so_far_{runs}.png")
    return arms, chosen


def until_flat_arm(s: Study, args, tuned: Arm, rate: float) -> tuple[Arm, dict]:
    """(ppo_until_flat, its learning curve): the equal-compute ppo's controller and flags, centred on the rate
    of the larger budget's tuned cosine, trained until flat (study.train_until_flat); deployed with that arm's
    flags (the rate, min_lr as the tuning ran it) on its seeds; that tuning's steps and its own training charged."""
    agent, training = study.train_until_flat(
        s, args.episodes, args.max_episodes, rate, "ppo_until_flat", "--agent", "ppo", "--control", CONTROL,
        "--profile", args.profile, "--lr_center", rate, "--lr_range", "0.5,2", "--n_envs", args.n_envs,
        "--episodes_per_update", math.gcd(args.episodes, PPO_EPISODES_PER_UPDATE))  # smoke: of what there is
    arm = Arm("ppo_until_flat", [*tuned.flags, "--agent", "ppo", "--control", CONTROL, "--agent_init", agent],
              tuned.seeds, extra_steps=training + tuned.extra_steps)
    return arm, study.learning_curve(agent, rate)


def pairs_of(runs: int) -> list[tuple[str, str]]:
    """One budget's comparisons: every arm against cosine, ppo against every search, every search of three
    hyperparameters against tuned cosine (the rate alone), PBT against random, random against grid."""
    named = [f"{m}_{runs}" for m in (*SEARCHES, "tuned_cosine")]
    ppo = f"ppo_{runs}"
    return [(a, "cosine") for a in (*named, ppo)] + [(ppo, a) for a in named] + \
        [(f"{m}_{runs}", f"tuned_cosine_{runs}") for m in SEARCHES] + \
        [(f"pbt_{runs}", f"random_{runs}"), (f"random_{runs}", f"grid_{runs}")]


def until_flat_pairs(runs: int) -> list[tuple[str, str]]:
    """ppo_until_flat against cosine, the equal-compute ppo and every search of the larger budget."""
    rivals = ["cosine", f"ppo_{runs}", *(f"{m}_{runs}" for m in (*SEARCHES, "tuned_cosine"))]
    return [("ppo_until_flat", a) for a in rivals]


def chosen_lines(chosen: dict) -> list[str]:
    lines = ["| chosen | configuration (its search loss on seed 2000) |", "|---|---|"]
    for name, best in chosen.items():
        what = ", ".join(f"{k}={v:.4g}" for k, v in best["hp"].items())
        if name.startswith("pbt"):
            what = f"best lineage ending with {what}"
        lines.append(f"| {name} | {best['trial']}: {what} ({best['full_val_loss']:.4f}) |")
    return lines


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], data_dir=args.data_dir, jobs=args.jobs)
    held_out = seeds("held_out", args.seeds)
    study.check_disjoint(training=seeds("training", max(args.budgets)), search=[study.SEED_BASES["search"]],
                         held_out=held_out)
    arms, chosen, pairs = [Arm("cosine", [], held_out)], {}, []
    for runs in args.budgets:
        budget, picked = budget_arms(s, args, runs, held_out)
        arms += budget
        chosen.update(picked)
        pairs += pairs_of(runs)
    ran = s.run_all(arms)
    # ppo_until_flat trains for hours: an interrupted study has every other row summarised (marked interim).
    summarise(s, ran, pairs, chosen, args.budgets, curve=None)
    print(f"interim summary (every row but ppo_until_flat's): {s.root / 'summary.md'}", flush=True)
    largest = max(args.budgets)
    tuned = ran[f"tuned_cosine_{largest}"]
    flat, curve = until_flat_arm(s, args, tuned, chosen[tuned.name]["hp"]["learning_rate"])
    ran[flat.name] = s.run(flat)
    print(summarise(s, ran, [*pairs, *until_flat_pairs(largest)], chosen, args.budgets, curve))


def summarise(s: Study, ran: dict, pairs: list, chosen: dict, budgets: tuple, curve: Optional[dict]) -> str:
    """summary.json/.md of the arms run so far: interim (complete: false) until ppo_until_flat's curve and row
    are in it; Holm over the pairs given."""
    rows = study.table([(ran[a], ran[b]) for a, b in pairs])
    notes = [*chosen_lines(chosen), "", "Best-so-far curves of the searches: figures/best_so_far_<R>.png.", ""]
    if curve is None:
        notes.append("**Interim**: ppo_until_flat is still to train and deploy; Holm will adjust over its rows too "
                     "when this summary is rewritten with them.")
    else:
        study.draw_learning_curves({"ppo_until_flat": curve}, s.root / "figures")
        notes.append(study.curve_note("ppo_until_flat", curve) + " Its curve: figures/learning_curves.png.")
    until_flat = None if curve is None else {f: curve[f] for f in ("episodes", "last_slope")}
    return study.write_summary(s.root, QUESTION, list(ran.values()), rows, notes=notes,
                               extra={"chosen": chosen, "budgets": list(budgets), "complete": curve is not None,
                                      "until_flat": until_flat})


if __name__ == "__main__":
    sys.exit(study.main_of(main))
