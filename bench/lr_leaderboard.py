"""
The learning-rate control leaderboard: does a learned controller, given a fair chance, train a GPT better than
the best simple alternative?

    python bench/lr_leaderboard.py --out L --n_envs 2 --jobs 2   # hours on a 2-core CPU; resumable, cached
    python bench/lr_leaderboard.py --out L --smoke           # about two minutes: every step, tiny sizes
    python bench/lr_leaderboard.py --profile smoke --seeds 2 --episodes 2 --out L

1. Tune: cosine at 6 rates x2 apart on 3 search seeds (2000-2002): the tuned rate T.
2. Rules: the oracle (--agent oracle --oracle_lr T) from x0.1 and x10 of T under each candidate action set and
   decision interval (RULES), on the search seeds: how far a controller that knows T can recover under them.
   The controllers act under DESIGN, chosen from these figures (docs/lr_leaderboard.md says why).
3. Train ppo, reinforce and qlearning with train_agent.py, base LR drawn from x0.1..x10 of T (--lr_center T),
   bounds [1/16, 16]; and the anchored ppo (--reward vs_reference) at x1 with bounds [0.5, 2], trained last
   (after step 5: twice the cost). Each trains --episodes (304), then on by half that while its learning curve
   still falls, up to --max_episodes (608).
4. Held-out seeds (1337...) at x0.1, x1 and x10 of T: cosine, schedule-free, the oracle, random, replay (ppo's
   actions of another seed, open loop), ppo, reinforce, qlearning; once: Prodigy, D-Adaptation, anchored ppo,
   tuned cosine. Paired differences against tuned cosine, Holm over the table, each arm's compute charged.
   The anchored ppo also against its own replay and against cosine re-tuned at quarter octaves over its reach
   (x0.5..x2 of T, the search seeds): does it beat a better constant rate, or only the coarse sweep?
5. Transfer: the shakespeare_char ppo, frozen, on enwik8 and text8 at x0.1/x1/x10 of each one's tuned rate,
   beside cosine and Prodigy there.
Writes summary.json, summary.md, leaderboard.png and learning_curves.png (each controller's training: is it
flat?) in --out: first marked interim, before the anchored ppo trains, then whole; every run is cached by
bench/study.py.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import study
from study import Arm, Study, seeds, stats

QUESTION = "Does a learned LR controller, given a fair chance, beat tuned cosine and the parameter-free optimizers?"
SWEEP = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2]
FACTORS = {"x0.1": 0.1, "x1": 1.0, "x10": 10.0}
# Candidate rules for what a controller may do: (action factors, steps between decisions at the tiny profile).
RULES = {"narrow_100": ("0.5,0.8,1,1.25,2", 100), "wide_100": ("0.25,0.5,0.8,1,1.25,2,4", 100),
         "wide_50": ("0.25,0.5,0.8,1,1.25,2,4", 50)}
DESIGN = "wide_50"
BOUNDS = ["--multiplier_min", 0.0625, "--multiplier_max", 16]  # train_agent.py's for --lr_range 0.1,10
LEARNERS = ("ppo", "reinforce", "qlearning")
TRANSFER = ("enwik8", "text8")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = study.argument_parser(QUESTION, "lr_leaderboard")
    parser.add_argument("--profile", default="tiny", choices=("tiny", "smoke"))
    parser.add_argument("--seeds", type=int, default=10, help="held-out seeds per arm (transfer: half)")
    parser.add_argument("--episodes", type=int, default=304, help="controller training episodes each (ppo: a "
                        "multiple of its 8 episodes per update)")
    parser.add_argument("--max_episodes", type=int, default=608, help="a learner whose curve still falls over its "
                        "last 100 episodes trains on, half --episodes at a time, up to this many")
    parser.add_argument("--n_envs", type=int, default=1, help="train_agent.py --n_envs for every controller "
                        "training (reinforce: the same policy as one env; qlearning: its workers' table changes "
                        "added up, docs/controllers.md)")
    args = parser.parse_args(argv)
    args.search_seeds, args.sweep, args.transfer = 3, SWEEP, TRANSFER
    if args.smoke:
        args.profile, args.seeds, args.episodes, args.search_seeds = "smoke", 2, 2, 1
    args.max_episodes = max(args.max_episodes, args.episodes) if not args.smoke else args.episodes
    if args.profile == "smoke":
        args.sweep, args.transfer = SWEEP[:2], TRANSFER[:1]
    return args


def rate_flags(lr: float) -> list:
    """A cosine schedule from lr to lr/10. A rate above experiment.py's lr_ceiling (0.1) lifts the ceiling to it,
    or x10 of a tuned rate above 1e-2 (text8's) would be refused; below it the ceiling stays, and so do the
    cached runs' keys."""
    ceiling = study.config_defaults()["lr_ceiling"]
    return ["--learning_rate", lr, "--min_lr", lr / 10, *(["--lr_ceiling", lr] if lr > ceiling else [])]


def rule_flags(rule: str, profile: str) -> list:
    """The action set and decision interval of a rule (at the smoke profile: every 10 steps, as its evaluations)."""
    actions, interval = RULES[rule]
    return ["--agent_actions", actions, "--eval_interval", interval if profile == "tiny" else 10]


def tune(s: Study, rates: list, search: list) -> tuple[float, int, dict]:
    """(the best rate of cosine on the search seeds, the sweep's optimizer steps, mean loss by rate)."""
    sweep = s.run_all([Arm(f"sweep_{lr:g}", rate_flags(lr), search) for lr in rates])
    mean = {lr: sum(a.values.values()) / len(a.values) for lr, a in zip(rates, sweep.values())}
    return min(mean, key=mean.get), sum(a.run_steps for a in sweep.values()), mean


def oracle_rules(s: Study, args, tuned: float, search: list) -> dict:
    """The oracle's final loss minus tuned cosine's, from x0.1 and x10 of the tuned rate, under each rule."""
    reference = s.run(Arm("tuned_search", rate_flags(tuned), search))
    figures = {}
    for rule in RULES:
        for name in ("x0.1", "x10"):
            start = rate_flags(tuned * FACTORS[name])
            oracle = s.run(Arm(f"oracle_{rule}_{name}", [*start, *BOUNDS, "--agent", "oracle", "--oracle_lr", tuned,
                                                         *rule_flags(rule, args.profile)], search))
            cosine = s.run(Arm(f"cosine_{name}_search", start, search))
            figures[f"{rule}_{name}"] = {
                "oracle_minus_tuned": mean_gap(oracle, reference), "cosine_minus_tuned": mean_gap(cosine, reference)}
    return figures


def mean_gap(a: Arm, b: Arm) -> float:
    return sum(a.values[k] - b.values[k] for k in a.values) / len(a.values)


def training_flags(args, tuned: float) -> tuple[list, int]:
    """(what every controller training shares, its decision interval)."""
    actions, interval = rule_flags(DESIGN, args.profile)[1::2]
    return ["--profile", args.profile, "--lr_center", tuned, "--agent_actions", actions,
            "--episodes_per_update", math.gcd(args.episodes, 8),  # batches of 8 (smoke: of what there is)
            "--n_envs", args.n_envs], interval


def train_learners(s: Study, args, tuned: float) -> dict:
    """agent -> (policy folder, optimizer steps of its training): the learners on the centred task (bounds
    [1/16, 16], train_agent.py's for x0.1..x10)."""
    common, interval = training_flags(args, tuned)
    return {agent: study.train_until_flat(s, args.episodes, args.max_episodes, tuned, agent, "--agent", agent,
                                          *common, "--lr_range", "0.1,10", "--set", f"eval_interval={interval}")
            for agent in LEARNERS}


def train_anchored(s: Study, args, tuned: float) -> tuple[Path, int]:
    """The anchored ppo: vs_reference reward, residual bounds [0.5, 2], base LR at the tuned rate; its
    reference runs (one per episode: twice a learner's cost) charged to it."""
    common, interval = training_flags(args, tuned)
    return study.train_until_flat(s, args.episodes, args.max_episodes, tuned, "anchored_ppo", "--agent", "ppo",
                                  *common, "--reward", "vs_reference",
                                  "--set", f"eval_interval={interval},multiplier_min=0.5,multiplier_max=2")


def held_out_arms(s: Study, args, held_out: list, tuned: float, tuning: int, trained: dict) -> dict:
    """Every arm of the table on the held-out seeds (see the module's docstring, step 4). Every controller acts
    within the learners' bounds [1/16, 16]."""
    rules = rule_flags(DESIGN, args.profile)
    arms = {"tuned": s.run(Arm("tuned", [*rate_flags(tuned), *rules], held_out, extra_steps=tuning))}
    for name, factor in FACTORS.items():
        base = [*rate_flags(tuned * factor), *rules]
        control = [*base, *BOUNDS]
        rows = [Arm(f"cosine_{name}", base, held_out),
                Arm(f"schedulefree_{name}", [*base, "--optimizer", "schedulefree", "--schedule", "constant"], held_out),
                Arm(f"oracle_{name}", [*control, "--agent", "oracle", "--oracle_lr", tuned], held_out,
                    extra_steps=tuning),
                Arm(f"random_{name}", [*control, "--agent", "random"], held_out)]
        rows += [Arm(f"{agent}_{name}", [*control, "--agent", agent, "--agent_init", trained[agent][0]], held_out,
                     extra_steps=trained[agent][1]) for agent in LEARNERS]
        arms.update({arm.name: s.run(arm) for arm in rows})
        arms[f"replay_{name}"] = replay_arm(s, arms[f"ppo_{name}"], held_out)
    for optimizer in ("prodigy", "dadapt_adam"):
        arms[optimizer] = s.run(Arm(optimizer, ["--optimizer", optimizer, *rules], held_out))
    return arms


def anchored_arm(s: Study, args, held_out: list, tuned: float, tuning: int, anchored: tuple[Path, int]) -> Arm:
    """The anchored ppo on the held-out seeds at x1: a residual controller on the tuned schedule."""
    return s.run(Arm("anchored_ppo_x1", [*rate_flags(tuned), *rule_flags(DESIGN, args.profile), "--agent", "ppo",
                                         "--agent_init", anchored[0]], held_out, extra_steps=anchored[1] + tuning))


def anchored_controls(s: Study, args, held_out: list, search: list, tuning: dict, anchored: Arm) -> tuple[dict, dict]:
    """(arms, the finer sweep's facts): what the anchored ppo must beat besides tuned cosine: its replay (its
    multipliers of another seed, open loop), and cosine re-tuned at quarter octaves over its whole reach,
    x0.5..x2 of T (the coarse sweep is x2 apart: a controller that only found a better constant rate would beat
    it)."""
    rates = [tuning["tuned"] * 2 ** (k / 4) for k in (-3, -2, -1, 1, 2, 3)]  # k = -4, 0, 4: the coarse sweep
    _, steps, mean = tune(s, rates, search)
    mean.update({lr: v for lr, v in tuning["sweep"].items() if tuning["tuned"] / 2 <= lr <= 2 * tuning["tuned"]})
    best = min(mean, key=mean.get)
    fine = Arm("tuned_fine", [*rate_flags(best), *rule_flags(DESIGN, args.profile)], held_out,
               extra_steps=tuning["steps"] + steps)
    return ({"tuned_fine": s.run(fine), "anchored_replay_x1": replay_arm(s, anchored, held_out)},
            {"fine_sweep": dict(sorted(mean.items())), "fine_steps": steps, "fine_tuned": best})


def replay_arm(s: Study, ppo: Arm, held_out: list) -> Arm:
    """The replay control: on each seed, the multipliers ppo's run on the next seed used, open loop."""
    arm = Arm(ppo.name.replace("ppo", "replay"), [], held_out, extra_steps=ppo.extra_steps)

    def replay(pair: tuple) -> tuple:
        seed, other = pair
        recorded, _ = s.run_seed(ppo.flags, other)
        return s.run_seed([*ppo.flags[:-4], "--agent", "replay", "--agent_init", recorded], seed, beside=True)

    pairs = list(zip(held_out, held_out[1:] + held_out[:1]))
    for (seed, _), (folder, key) in zip(pairs, s.side_by_side(replay, pairs)):
        arm.values[seed] = s.metric_of(folder)
        arm.run_steps += key["config"]["max_iters"]
    return arm


def transfer_arms(args, held_out: list, ppo: tuple[Path, int]) -> tuple[dict, dict]:
    """(arms, dataset -> its tuned rate): the shakespeare_char ppo, frozen and charged its training, on each
    other dataset at x0.1/x1/x10 of that dataset's own tuned rate."""
    arms, rates = {}, {}
    for dataset in args.transfer:
        s = Study(args.out, ["--profile", args.profile], dataset=dataset, data_dir=args.data_dir, jobs=args.jobs)
        tuned, tuning, _ = tune(s, args.sweep, seeds("search", args.search_seeds))
        rates[dataset], rules = tuned, rule_flags(DESIGN, args.profile)
        arms[f"{dataset}_tuned"] = s.run(Arm(f"{dataset}_tuned", [*rate_flags(tuned), *rules], held_out,
                                             extra_steps=tuning))
        arms[f"{dataset}_prodigy"] = s.run(Arm(f"{dataset}_prodigy", ["--optimizer", "prodigy", *rules], held_out))
        for name, factor in FACTORS.items():
            base = [*rate_flags(tuned * factor), *rules]
            arms[f"{dataset}_cosine_{name}"] = s.run(Arm(f"{dataset}_cosine_{name}", base, held_out))
            arms[f"{dataset}_ppo_{name}"] = s.run(Arm(f"{dataset}_ppo_{name}", [*base, "--agent", "ppo",
                                                                               "--agent_init", ppo[0]], held_out,
                                                      extra_steps=ppo[1]))
    return arms, rates


def comparisons(arms: dict, prefix: str = "") -> list:
    """Every arm against tuned cosine on its dataset; each learner against the random control and its rivals."""
    tuned = arms[f"{prefix}tuned"]
    pairs = [(arm, tuned) for name, arm in arms.items() if name != f"{prefix}tuned" and name.startswith(prefix)]
    if not prefix:
        for factor in FACTORS:
            pairs += [(arms[f"{agent}_{factor}"], arms[f"random_{factor}"]) for agent in LEARNERS]
            pairs += [(arms[f"ppo_{factor}"], arms["prodigy"]), (arms[f"ppo_{factor}"], arms[f"cosine_{factor}"])]
        if "tuned_fine" in arms:
            pairs += [(arms["anchored_ppo_x1"], arms[name]) for name in ("tuned_fine", "anchored_replay_x1")]
    return pairs


def draw(arms: dict, out: Path) -> None:
    """Final loss by arm and base-LR factor: one marker per arm, its mean and 95% interval over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = sorted({name.rsplit("_", 1)[0] for name in arms if name.endswith(tuple(FACTORS))})
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labelled = set()  # each group named once, where it first appears (the anchored ones only at x1)
    for k, factor in enumerate(FACTORS):
        for j, group in enumerate(groups):
            arm = arms.get(f"{group}_{factor}")
            if arm is None or not arm.values:
                continue
            values = list(arm.values.values())
            mean, interval = stats.mean_and_stderr(values)[0], stats.mean_interval(values)
            half = (interval[1] - interval[0]) / 2 if interval else 0.0
            marker = "s" if j >= 10 else "o"  # more groups than colours: the rest square
            offset = 0.7 * (j / max(1, len(groups) - 1) - 0.5)  # each factor's groups side by side
            ax.errorbar(k + offset, mean, yerr=half, fmt=marker, color=f"C{j % 10}",
                        label=None if group in labelled else group, capsize=2)
            labelled.add(group)
    for name, style in (("tuned", "--"), ("prodigy", "-."), ("dadapt_adam", ":"), ("tuned_fine", (0, (1, 3)))):
        if name in arms and arms[name].values:
            ax.axhline(sum(arms[name].values.values()) / len(arms[name].values), ls=style, color="black", lw=1,
                       label=name)
    ax.set_xticks(range(len(FACTORS)), [f"base LR {f} of tuned" for f in FACTORS])
    ax.set_ylabel("full_val_loss (held-out seeds)")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out / "leaderboard.png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    args = parse(argv)
    s = Study(args.out, ["--profile", args.profile], data_dir=args.data_dir, jobs=args.jobs)
    held_out, search = seeds("held_out", args.seeds), seeds("search", args.search_seeds)
    study.check_disjoint(training=seeds("training", args.max_episodes), search=search, held_out=held_out)
    tuned, tuning, sweep = tune(s, args.sweep, search)
    tuning_facts = {"tuned": tuned, "steps": tuning, "sweep": sweep, "search": search,
                    "rules": oracle_rules(s, args, tuned, search)}
    # The anchored ppo, the costliest training, comes last: an interrupted study has the rest of the table,
    # summarised (marked interim) before it starts.
    trained = train_learners(s, args, tuned)
    arms = held_out_arms(s, args, held_out, tuned, tuning, trained)
    transfer, tuning_facts["transfer_rates"] = transfer_arms(args, held_out[:max(2, args.seeds // 2)], trained["ppo"])
    summarise(s, args, tuning_facts, trained, arms, transfer)
    print(f"interim summary (every row but the anchored ppo's): {s.root / 'summary.md'}", flush=True)
    trained["anchored_ppo"] = train_anchored(s, args, tuned)
    arms["anchored_ppo_x1"] = anchored_arm(s, args, held_out, tuned, tuning, trained["anchored_ppo"])
    controls, fine = anchored_controls(s, args, held_out, search, tuning_facts, arms["anchored_ppo_x1"])
    arms.update(controls)
    tuning_facts.update(fine)
    print(summarise(s, args, tuning_facts, trained, arms, transfer))


def summarise(s: Study, args, tuning: dict, trained: dict, arms: dict, transfer: dict) -> str:
    """summary.json/.md, leaderboard.png and learning_curves.png of what is measured so far; the markdown.
    Interim (said in both files) until the anchored ppo is in."""
    complete = "anchored_ppo" in trained
    rows = study.table(comparisons(arms) + [p for d in args.transfer for p in comparisons(transfer, f"{d}_")])
    draw(arms, s.root)
    curves = {name: study.learning_curve(folder, tuning["tuned"]) for name, (folder, _) in trained.items()}
    study.draw_learning_curves(curves, s.root)
    return study.write_summary(
        s.root, QUESTION, [*arms.values(), *transfer.values()], rows, notes=summary_notes(tuning, curves, complete),
        extra={"complete": complete, "tuned_lr": tuning["tuned"], "transfer_tuned_lr": tuning["transfer_rates"],
               "sweep": {f"{lr:g}": v for lr, v in tuning["sweep"].items()}, "sweep_steps": tuning["steps"],
               "fine_sweep": {f"{lr:.3g}": v for lr, v in tuning.get("fine_sweep", {}).items()},
               "fine_sweep_steps": tuning.get("fine_steps"), "fine_tuned_lr": tuning.get("fine_tuned"),
               "rules": tuning["rules"], "design": DESIGN, "training_steps": {k: v[1] for k, v in trained.items()},
               "learning_curves": {k: {f: c[f] for f in ("episodes", "last_slope")} for k, c in curves.items()}})


def summary_notes(tuning: dict, curves: dict, complete: bool) -> list[str]:
    """The summary's lines after its tables: the tuning, the rules' figures, each learner's curve."""
    search = tuning["search"]
    interim = [] if complete else ["**Interim**: the anchored ppo is still to train and deploy; Holm will adjust "
                                   "over its rows too when this summary is rewritten with them."]
    return [*interim,
            f"Tuned rate {tuning['tuned']:g} (cosine on search seeds {search[0]}-{search[-1]}; mean by rate: "
            + ", ".join(f"{lr:g} {loss:.4f}" for lr, loss in tuning["sweep"].items())
            + f"); {tuning['steps']:,} steps charged to tuned and the oracle. Transfer, each dataset's own tuned "
            "rate (the same sweep and search seeds): "
            + ", ".join(f"{d} {lr:g}" for d, lr in tuning["transfer_rates"].items()) + ".",
            *([f"Re-tuned at quarter octaves over the anchored ppo's reach (x0.5..x2 of {tuning['tuned']:g}, the "
               f"same search seeds; {tuning['fine_steps']:,} more steps, charged to tuned_fine): best "
               f"{tuning['fine_tuned']:.3g}; mean by rate: "
               + ", ".join(f"{lr:.3g} {loss:.4f}" for lr, loss in tuning["fine_sweep"].items()) + "."]
              if "fine_sweep" in tuning else []),
            f"Controllers act under {DESIGN}: actions {RULES[DESIGN][0]}, a decision every {RULES[DESIGN][1]} "
            "steps (tiny). Oracle minus tuned on the search seeds, by rule: "
            + "; ".join(f"{k} {v['oracle_minus_tuned']:+.4f} (cosine {v['cosine_minus_tuned']:+.4f})"
                        for k, v in tuning["rules"].items()), "![final loss by arm](leaderboard.png)",
            *(study.curve_note(name, c) for name, c in curves.items()), "![learning curves](learning_curves.png)"]


if __name__ == "__main__":
    sys.exit(study.main_of(main))
