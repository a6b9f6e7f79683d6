"""Controller-training throughput: episodes per hour of train_agent.py, one env with every thread against
several envs with one thread each (--n_envs, --threads_per_env), side by side.

    python bench/episodes_per_hour.py                    # tiny profile, ppo, 16 episodes per arm, 2 rounds
    python bench/episodes_per_hour.py --quick            # seconds: smoke profile, proves it runs
    python bench/episodes_per_hour.py --agent reinforce --episodes 8 --json out.json

The arms run one after another, interleaved over the rounds (A B, A B, ...), so a machine that speeds up or
slows down affects them alike; each arm's figure is its median round, and the table gives each arm's ratio to
the first. Each round is a fresh training folder; the wall time of the whole train_agent.py command counts
(process start, data loading and the policy updates included: what a controller training costs).
Run it alone: another timed job on the machine makes the ratio meaningless.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import study  # bench/ is on the path as the script's folder

ROOT = study.ROOT


def arms(cores: int) -> dict:
    """name -> train_agent.py flags."""
    return {f"1 env x {cores} threads": ["--n_envs", 1, "--threads_per_env", cores],
            f"{cores} envs x 1 thread": ["--n_envs", cores, "--threads_per_env", 1]}


def one_round(flags: list, args, data_dir: str) -> float:
    """Seconds of one training from scratch."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(ROOT / "train_agent.py"), "--agent", args.agent, "--profile", args.profile,
                   "--episodes", args.episodes, "--episodes_per_update", args.per_update, "--out_dir",
                   Path(tmp) / "agent", *(["--data_dir", data_dir] if data_dir else []), *flags]
        t = time.time()
        proc = subprocess.run(list(map(str, command)), capture_output=True, text=True)
        if proc.returncode:
            raise study.ex.RunFailed(f"train_agent.py failed: {proc.stderr.strip()[-500:]}")
        return time.time() - t


def main(argv: list[str]) -> None:
    parser = study.ex.OneLineArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agent", default="ppo", choices=("ppo", "dqn", "reinforce", "qlearning"))
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smoke profile, 4 episodes, 1 round")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--json", default="", help="also write the table here")
    args = parser.parse_args(argv)
    args.profile = "smoke" if args.quick else "tiny"
    if args.quick:
        args.episodes, args.rounds = 4, 1
    cores = os.cpu_count() or 1
    args.per_update = cores if args.agent == "ppo" else 8  # ppo: a multiple of --n_envs
    seconds = {name: [] for name in arms(cores)}
    for _ in range(args.rounds):
        for name, flags in arms(cores).items():
            seconds[name].append(one_round(flags, args, args.data_dir))
    first = statistics.median(next(iter(seconds.values())))
    rows = {name: {"seconds": statistics.median(s), "episodes_per_hour": args.episodes * 3600 / statistics.median(s),
                   "ratio_to_first": first / statistics.median(s), "rounds": s} for name, s in seconds.items()}
    result = {**study.record(argv), "agent": args.agent, "profile": args.profile, "episodes": args.episodes,
              "arms": rows}
    print(f"{args.agent}, {args.profile} profile, {args.episodes} episodes per round, median of {args.rounds}:")
    for name, row in rows.items():
        print(f"  {name:24s} {row['episodes_per_hour']:8.0f} episodes/hour  x{row['ratio_to_first']:.2f}")
    if args.json:
        study.ex.atomic_write_json(Path(args.json), result)


if __name__ == "__main__":
    sys.exit(study.main_of(main))
