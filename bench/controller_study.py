"""
Does a learned controller beat the cosine schedule? The measured comparison of the README.

    python bench/controller_study.py --out study            # ~85 min on a 2-core CPU; resumable
    python bench/controller_study.py --out smoke --smoke    # about a minute: every step, tiny sizes

1. Train ppo and reinforce with train_agent.py on shakespeare_char at the tiny profile, base LR drawn
   log-uniformly from x0.1..x10 of the profile's (training seeds 1,000,000 + episode).
2. Tune the baseline: cosine at 5 learning rates x2 apart on 3 search seeds (2000-2002), not the held-out seeds.
3. Deploy each policy frozen on 5 held-out seeds (1337-1341) at the profile's LR, x10 and x0.1, beside
   the cosine baseline at the same LR and the random control with the same actions; plus the tuned
   baseline on the same seeds.
4. Paired differences in full_val_loss (same seed, same base LR), 95% t intervals, Holm over the table, each
   arm's compute (the sweep charged to the tuned arm, controller training to the policies'): summary.json/.md.
Every run is cached by bench/study.py (a changed setting or policy runs again); a finished one is kept.
"""
import argparse
import sys

import study
from study import Arm, Study, seeds

QUESTION = "Does a learned controller beat the cosine schedule (tuned and at the same LR)?"
BASE_LR = 1e-3  # the tiny profile's
ACTIONS = "0.1,0.5,1,1.5,2"
FACTORS = {"x1": 1.0, "x10": 10.0, "x0.1": 0.1}
SWEEP = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
AGENTS = ("ppo", "reinforce")


def lr_flags(lr: float) -> list:
    return ["--learning_rate", lr, "--min_lr", lr / 10]


def controller_flags(agent: str, profile: str) -> list:
    """train_agent.py flags of a controller: base LR drawn from x0.1..x10 of the profile's, to learn to correct it."""
    # As this study was measured: one episode per update, centred on the profile's default rate. That setup
    # gave the learners no fair chance (docs/lr_leaderboard.md); bench/lr_leaderboard.py is the fair study.
    return ["--agent", agent, "--profile", profile, "--lr_range", "0.1,10", "--episodes_per_update", 1]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = study.argument_parser(QUESTION, "study")
    parser.add_argument("--episodes", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=5, help="held-out seeds per arm")
    args = parser.parse_args(argv)
    args.profile, args.search_seeds, args.sweep, args.factors = "tiny", 3, SWEEP, FACTORS
    if args.smoke:  # smoke profile, 2 episodes, 2 held-out seeds, 1 search seed, 2 rates, x1 only
        args.profile, args.episodes, args.seeds, args.search_seeds = "smoke", 2, 2, 1
        args.sweep, args.factors = SWEEP[:2], {"x1": 1.0}
    return args


def tune(s: Study, rates: list, search: list) -> tuple[float, int]:
    """(the sweep's best rate, the optimizer steps the sweep took): cosine at each rate on the search seeds."""
    sweep = s.run_all([Arm(f"sweep_{lr:g}", lr_flags(lr), search) for lr in rates])
    mean = {lr: sum(a.values.values()) / len(a.values) for lr, a in zip(rates, sweep.values())}
    return min(mean, key=mean.get), sum(a.run_steps for a in sweep.values())


def held_out_arms(s: Study, args, held_out: list, tuned_lr: float, tuning: int, training: dict) -> dict:
    """The tuned baseline and, at every base LR, cosine, the random control and each frozen policy."""
    arms = [Arm("tuned", lr_flags(tuned_lr), held_out, extra_steps=tuning)]
    for name, factor in args.factors.items():
        flags = lr_flags(BASE_LR * factor)
        arms += [Arm(f"cosine_{name}", flags, held_out),
                 Arm(f"random_{name}", [*flags, "--agent", "random", "--agent_actions", ACTIONS], held_out)]
        arms += [Arm(f"{agent}_{name}", [*flags, "--agent", agent, "--agent_init", training[agent][0]],
                     held_out, extra_steps=training[agent][1]) for agent in AGENTS]
    return s.run_all(arms)


def comparisons(arms: dict, factors: dict) -> list[tuple[Arm, Arm]]:
    pairs = []
    for name in factors:
        for arm in ("random", *AGENTS):
            pairs += [(arms[f"{arm}_{name}"], arms[f"cosine_{name}"]), (arms[f"{arm}_{name}"], arms["tuned"])]
        pairs += [(arms[f"{agent}_{name}"], arms[f"random_{name}"]) for agent in AGENTS]
    return pairs


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], data_dir=args.data_dir, jobs=args.jobs)
    held_out, search = seeds("held_out", args.seeds), seeds("search", args.search_seeds)
    study.check_disjoint(training=seeds("training", args.episodes), search=search, held_out=held_out)
    training = {agent: s.train_controller(agent, args.episodes, *controller_flags(agent, args.profile))
                for agent in AGENTS}
    tuned_lr, tuning = tune(s, args.sweep, search)
    arms = held_out_arms(s, args, held_out, tuned_lr, tuning, training)
    rows = study.table(comparisons(arms, args.factors))
    print(study.write_summary(s.root, QUESTION, list(arms.values()), rows, notes=[
        f"Tuned LR {tuned_lr:g}: the best mean of cosine at {', '.join(f'{lr:g}' for lr in args.sweep)} on "
        f"search seeds {search[0]}-{search[-1]}; its {tuning:,} steps are charged to the tuned arm."],
        extra={"tuned_lr": tuned_lr, "sweep_steps": tuning,
               "training_steps": {agent: steps for agent, (_, steps) in training.items()}}))


if __name__ == "__main__":
    sys.exit(study.main_of(main))
