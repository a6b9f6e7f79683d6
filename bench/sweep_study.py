"""
Search baselines against the multi-hyperparameter agent at equal compute (README: "Search baselines on Ray
Tune"). Every method gets the same number of training steps on shakespeare_char at the tiny profile:

    python bench/sweep_study.py --out sweep_study            # ~20 min on a 2-core CPU; resumable
    python bench/sweep_study.py --out sweep_study --runs 16  # a larger budget: 16 runs' worth of steps each
    python bench/sweep_study.py --out smoke --smoke          # a minute or two: every step, smoke sizes

1. grid (2 values of each of learning_rate, weight_decay, grad_clip: 8 runs; 3 values from --runs 27),
   random (--runs draws) and PBT (a population of --runs) with sweep.py over the same log-scaled space, every
   trial on search seed 2000;
2. ppo with --control lr,weight_decay,grad_clip trained by train_agent.py for --runs episodes (the same steps:
   its training is charged to its arm), training seeds 1,000,000+;
3. the best configuration of each search (PBT: the settings its best member ended with) and the frozen policy
   re-run on the 5 held-out seeds 1337-1341, beside cosine at the profile's settings and the random control
   with the same action set; paired differences in full_val_loss, 95% t intervals, Holm over the table and
   each arm's compute (its search or training charged to it): summary.json/.md.
"""
import json
import sys
from pathlib import Path

import study
from study import Arm, Study, seeds

QUESTION = "Do grid, random and PBT search beat a learned multi-hyperparameter controller at equal compute?"
SPACE = "learning_rate=1e-4:1e-2:log,weight_decay=0.01:1:log,grad_clip=0.25:4:log"
CONTROL = "lr,weight_decay,grad_clip"
METHODS = ("grid", "random", "pbt")
SEARCH_SEED = study.SEED_BASES["search"]  # sweep.py trains every trial on this seed


def parse(argv: list[str]):
    parser = study.argument_parser(QUESTION, "sweep_study")
    parser.add_argument("--runs", type=int, default=8, help="the budget: this many tiny runs' steps per method")
    parser.add_argument("--seeds", type=int, default=5, help="held-out seeds per arm")
    args = parser.parse_args(argv)
    args.profile = "tiny"
    if args.smoke:  # smoke profile, a budget of 2 runs, 2 held-out seeds
        args.profile, args.runs, args.seeds = "smoke", 2, 2
    return args


def best_flags(search: Path) -> tuple[list, dict]:
    """experiment.py flags of a search's best configuration, and its best.json."""
    best = json.loads((search / "best.json").read_text())
    flags = [item for name, value in best["hp"].items() for item in (f"--{name}", value)]
    if "learning_rate" in best["hp"]:  # as sweep.py ran it: min_lr at the profile's ratio (1/10 at tiny)
        flags += ["--min_lr", best["hp"]["learning_rate"] / 10]
    return flags, best


def search_arms(s: Study, args, held_out: list) -> tuple[list[Arm], dict]:
    """Each search run by sweep.py at the budget, its best configuration as an arm charged the search's steps."""
    grid_points = max(2, round(args.runs ** (1 / 3)))  # 3 settings: grid_points^3 runs, about --runs
    arms, chosen = [], {}
    for method, extra in zip(METHODS, (["--grid_points", grid_points], ["--trials", args.runs],
                                       ["--trials", args.runs])):
        folder = s.run_script(f"search_{method}", "sweep.py", "--method", method, "--profile", args.profile,
                              "--datasets", s.dataset, "--space", SPACE, "--seed", 0, *extra,
                              done=f"{method}/results.json") / method
        flags, chosen[method] = best_flags(folder)
        steps = json.loads((folder / "results.json").read_text())["steps"]
        arms.append(Arm(method, flags, held_out, extra_steps=steps))
    return arms, chosen


def chosen_lines(chosen: dict) -> list[str]:
    lines = ["| chosen | configuration |", "|---|---|"]
    for method, best in chosen.items():
        lines.append(f"| {method} | {best['trial']}: " + ", ".join(f"{k}={v:.4g}" for k, v in best["hp"].items())
                     + f" (its search loss {best['full_val_loss']:.4f}) |")
    return lines


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], data_dir=args.data_dir)
    held_out = seeds("held_out", args.seeds)
    study.check_disjoint(training=seeds("training", args.runs), search=[SEARCH_SEED], held_out=held_out)
    searched, chosen = search_arms(s, args, held_out)
    agent, training = s.train_controller("ppo_control", args.runs, "--agent", "ppo", "--control", CONTROL,
                                         "--profile", args.profile, "--episodes_per_update", 1)  # (as measured)
    arms = s.run_all([Arm("cosine", [], held_out), *searched,
                      Arm("ppo_control", ["--agent", "ppo", "--control", CONTROL, "--agent_init", agent], held_out,
                          extra_steps=training),
                      Arm("random_control", ["--agent", "random", "--control", CONTROL, "--agent_actions",
                                             "0.1,0.5,1,1.5,2"], held_out)])
    pairs = [(a, "cosine") for a in (*METHODS, "ppo_control", "random_control")]
    pairs += [("ppo_control", b) for b in (*METHODS, "random_control")] + [("pbt", "random"), ("random", "grid")]
    rows = study.table([(arms[a], arms[b]) for a, b in pairs])
    print(study.write_summary(s.root, QUESTION, list(arms.values()), rows, notes=chosen_lines(chosen),
                              extra={"chosen": chosen}))


if __name__ == "__main__":
    sys.exit(study.main_of(main))
