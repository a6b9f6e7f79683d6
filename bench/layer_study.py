"""
Does a per-layer learning-rate controller beat one global multiplier, the LAMB trust-ratio rule and cosine?
The measured comparison of the README's per-layer section.

    python bench/layer_study.py --out layer_study --controller_study study   # ~45 min on a 2-core CPU; resumable
    python bench/layer_study.py --out smoke --smoke                           # about a minute, tiny sizes

1. Train ppo with --lr_groups layer (one policy shared by the layers, each layer an agent of it) with
   train_agent.py on shakespeare_char at the tiny profile, exactly as bench/controller_study.py trains the
   global ppo: base LR drawn log-uniformly from x0.1..x10, training seeds 1,000,000 + episode.
2. Deploy it frozen on the 5 held-out seeds (1337-1341) at the profile's LR (1e-3) and at the tuned LR of
   the controller study's sweep, beside: the global ppo policy of the controller study, the LAMB trust-ratio
   heuristic (--layer_trust lamb), cosine, and the per-layer random control, all at the same LR.
3. Paired differences in full_val_loss (same seed, same base LR), 95% t intervals, Holm over the table, each
   arm's compute: summary.json, summary.md, and plot.py's per-layer LR figures of each arm's first seed in figures/.
The controller study's folder (--controller_study) supplies the global ppo policy; its run cache is this
study's, so the runs the two share (the sweep, cosine and global ppo at 1e-3) are run once.
"""
import json
import subprocess
import sys
from pathlib import Path

import study
from controller_study import ACTIONS, BASE_LR, SWEEP, controller_flags, lr_flags, tune
from study import Arm, Study, seeds

QUESTION = "Does a per-layer controller beat one global multiplier, the LAMB trust-ratio rule and cosine?"
PAIRS = (("ppo_layer", "cosine"), ("ppo_layer", "ppo_global"), ("ppo_layer", "lamb"), ("ppo_layer", "random_layer"),
         ("lamb", "cosine"), ("ppo_global", "cosine"), ("random_layer", "cosine"))


def parse(argv: list[str]):
    parser = study.argument_parser(QUESTION, "layer_study")
    parser.add_argument("--controller_study", default="study", help="bench/controller_study.py's --out folder")
    parser.add_argument("--episodes", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=5, help="held-out seeds per arm")
    args = parser.parse_args(argv)
    args.profile, args.search_seeds, args.sweep = "tiny", 3, SWEEP
    if args.smoke:  # smoke profile, 2 episodes, 2 held-out seeds, 1 search seed, 2 rates
        args.profile, args.episodes, args.seeds, args.search_seeds, args.sweep = "smoke", 2, 2, 1, SWEEP[:2]
    return args


def policies(s: Study, args, previous: Path) -> dict:
    """name -> (train_agent.py folder, the optimizer steps its training took) of the global and per-layer ppo."""
    trained = controller_flags("ppo", args.profile)
    global_dir = study.controller_folder(previous, "ppo", [*trained, *s.data])
    if (global_dir / "manifest.json").exists():  # the controller study's policy, as it is (charged what it took)
        found = {"ppo_global": (global_dir, study.curve_steps(global_dir))}
    else:
        found = {"ppo_global": s.train_controller("ppo_global", args.episodes, *trained)}
    found["ppo_layer"] = s.train_controller("ppo_layer", args.episodes, *trained, "--lr_groups", "layer")
    return found


def held_out_arms(s: Study, held_out: list, tuned_lr: float, tuning: int, trained: dict) -> dict:
    """Every arm at the profile's LR (x1) and at the tuned LR (charged the sweep)."""
    kinds = {"cosine": [], "lamb": ["--layer_trust", "lamb"],
             "random_layer": ["--agent", "random", "--lr_groups", "layer", "--agent_actions", ACTIONS],
             "ppo_global": ["--agent", "ppo", "--agent_init", trained["ppo_global"][0]],
             "ppo_layer": ["--agent", "ppo", "--lr_groups", "layer", "--agent_init", trained["ppo_layer"][0]]}
    arms = []
    for rate, lr, charged in (("x1", BASE_LR, 0), ("tuned", tuned_lr, tuning)):
        arms += [Arm(f"{kind}_{rate}", [*lr_flags(lr), *flags], held_out,
                     extra_steps=charged + (trained[kind][1] if kind in trained else 0))
                 for kind, flags in kinds.items()]
    return s.run_all(arms)


def comparisons(arms: dict) -> list[tuple[Arm, Arm]]:
    pairs = [(arms[f"{a}_{rate}"], arms[f"{b}_{rate}"]) for rate in ("x1", "tuned") for a, b in PAIRS]
    # at the profile's LR also against the tuned baseline (at the tuned LR that is one of PAIRS already)
    return pairs + [(arms[f"{a}_x1"], arms["cosine_tuned"]) for a in ("ppo_layer", "ppo_global", "lamb")]


def draw(s: Study, arms: dict) -> None:
    """plot.py's figures (per-layer learning rates among them) of each arm's first held-out seed."""
    folders = {arm.name: s.run_seed(arm.flags, arm.seeds[0])[0] for arm in arms.values()}
    figures = s.root / "figures"
    figures.mkdir(exist_ok=True)
    labels = figures / "labels.json"
    labels.write_text(json.dumps({folder.name: name for name, folder in folders.items()}))
    subprocess.run([sys.executable, str(study.ROOT / "plot.py"), *map(str, dict.fromkeys(folders.values())),
                    "--labels", str(labels), "--out_dir", str(figures)], cwd=study.ROOT, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> None:
    args = parse(argv)
    previous = Path(args.controller_study).resolve()
    s = Study(args.out, ["--profile", args.profile], data_dir=args.data_dir, jobs=args.jobs,
              runs=previous / "runs" if (previous / "runs").is_dir() else None)
    held_out, search = seeds("held_out", args.seeds), seeds("search", args.search_seeds)
    study.check_disjoint(training=seeds("training", args.episodes), search=search, held_out=held_out)
    trained = policies(s, args, previous)
    tuned_lr, tuning = tune(s, args.sweep, search)
    arms = held_out_arms(s, held_out, tuned_lr, tuning, trained)
    rows = study.table(comparisons(arms))
    draw(s, arms)
    print(study.write_summary(s.root, QUESTION, list(arms.values()), rows, notes=[
        f"Tuned LR {tuned_lr:g} (the controller study's sweep on search seeds {search[0]}-{search[-1]}); the global "
        f"ppo policy from {trained['ppo_global'][0]}, the per-layer one trained on {args.episodes} episodes."],
        extra={"tuned_lr": tuned_lr, "sweep_steps": tuning,
               "training_steps": {name: steps for name, (_, steps) in trained.items()}}))


if __name__ == "__main__":
    sys.exit(study.main_of(main))
