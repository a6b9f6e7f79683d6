"""Training throughput of one process against two (torchrun, DistributedDataParallel), side by side.

    python bench/ddp.py                       # the cpu profile on shakespeare_char, 3 rounds, ~4 min on 2 cores
    python bench/ddp.py --quick               # seconds: what CI runs so this file cannot rot
    python bench/ddp.py --json out.json --nproc 4 --gpu   # on a GPU machine: 1 GPU against 4, compiled, and 4
                                                          # with the DDP-wrapped model compiled (--compile_ddp)

Every arm trains the same global batch per optimizer step (--gradient_accumulation_steps = --nproc micro-batches
of the profile's --batch_size): one process takes them all, each of --nproc processes one, and DDP averages
their gradients.
The arms run one after another, interleaved over the rounds (A B C, A B C, ...) so a machine that speeds
up or slows down affects them alike; each arm's figure is its median round. Throughput is training tokens
per second of train_time (final_info: the training loop less evaluation), so start-up, data loading and
the process-group set-up are left out; the wall time of the whole command is reported beside it. On GPUs
(--gpu) every arm compiles, and the first steps' time is the compilation's: throughput is then the
global batch over the median time per step of the logged windows after --warmup steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import study  # bench/ is on the path as the script's folder

ROOT = study.ROOT


def arms(nproc: int, gpu: bool) -> dict:
    """name -> (processes, environment overrides, extra flags)."""
    if gpu:  # compiled, as the full profile on CUDA is: nanoGPT's order (compile, then wrap) against --compile_ddp
        return {"1 GPU": (1, {}, ["--compile"]), f"{nproc} GPUs (torchrun)": (nproc, {}, ["--compile"]),
                f"{nproc} GPUs (torchrun, --compile_ddp)": (nproc, {}, ["--compile", "--compile_ddp"])}
    return {"1 process, default threads": (1, {}, []),
            "1 process, 1 thread": (1, {"OMP_NUM_THREADS": "1"}, []),
            f"{nproc} processes x 1 thread (torchrun, gloo)": (nproc, {"OMP_NUM_THREADS": "1"}, [])}


def command(processes: int, out_dir: Path, args: argparse.Namespace, extra_flags: list) -> list[str]:
    flags = ["--out_dir", str(out_dir), "--profile", args.profile, "--datasets", "shakespeare_char", "--seeds", "1",
             "--max_iters", str(args.iters), "--lr_decay_iters", str(args.iters), "--eval_interval", str(args.iters),
             "--eval_iters", "1", "--final_eval_tokens", "0", "--inference_samples", "0", "--notes", "off",
             "--gradient_accumulation_steps", str(args.accumulation)]
    if args.data_dir:
        flags += ["--data_dir", args.data_dir]
    flags += extra_flags
    script = str(ROOT / "experiment.py")
    if processes == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script,
            *flags]


def measure(processes: int, env_extra: dict, extra_flags: list, args: argparse.Namespace, scratch: Path) -> dict:
    out_dir = Path(tempfile.mkdtemp(dir=scratch))
    t = time.time()
    proc = subprocess.run(command(processes, out_dir / "run", args, extra_flags), env={**os.environ, **env_extra},
                          capture_output=True, text=True)
    wall = time.time() - t
    if proc.returncode != 0:
        sys.exit(f"error: the {processes}-process run failed:\n{proc.stderr[-2000:]}")
    info = json.loads((out_dir / "run" / "final_info_shakespeare_char_0.json").read_text())
    record = json.loads((out_dir / "run" / "run.json").read_text())
    batch = record["distributed"]["global_batch"]["shakespeare_char"]
    tokens = batch["tokens"] * args.iters
    rate = tokens / info["train_time"]
    if args.gpu:  # compiled: the first steps are the compilation's, not the training's
        rate = steady_tokens_per_s(out_dir / "run", batch["tokens"], args.warmup)
    return {"tokens_per_s": rate, "train_time_s": info["train_time"], "wall_s": wall,
            "global_batch_tokens": batch["tokens"], "micro_steps_per_rank": batch["micro_steps_per_rank"],
            "full_val_loss": info.get("full_val_loss"), "final_train_loss": info["final_train_loss"]}


def steady_tokens_per_s(run_dir: Path, tokens_per_step: int, warmup: int) -> float:
    """The global batch over the median time per step of the logged windows from step `warmup` on."""
    results = json.loads((run_dir / "all_results.json").read_text())
    ms_per_step = [r["time"] for r in results["shakespeare_char_0_train_info"] if r["iter"] >= warmup]
    if not ms_per_step:
        sys.exit(f"error: no logged step after --warmup {warmup}: raise --iters")
    return tokens_per_step / (statistics.median(ms_per_step) / 1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke profile, 20 steps, 1 round")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--iters", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--accumulation", type=int, default=0,
                        help="micro-batches per step, divided among the ranks (default: --nproc, one per rank)")
    parser.add_argument("--gpu", action="store_true", help="GPU arms (CUDA, nccl, compiled) instead of CPU threads")
    parser.add_argument("--warmup", type=int, default=50,
                        help="with --gpu: steps left out of the throughput (the compilation's)")
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.profile, args.iters, args.rounds = "smoke", 20, 1
    args.accumulation = args.accumulation or args.nproc  # the same global batch in every arm
    chosen = arms(args.nproc, args.gpu)
    rounds: dict = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            for name, (processes, env_extra, extra_flags) in chosen.items():
                rounds[name].append(measure(processes, env_extra, extra_flags, args, Path(scratch)))
                print(f"round {r + 1}/{args.rounds} {name}: {rounds[name][-1]['tokens_per_s']:,.0f} tok/s", flush=True)
    baseline = statistics.median(m["tokens_per_s"] for m in next(iter(rounds.values())))
    report = {**study.record(argv), "profile": args.profile, "iters": args.iters, "rounds": args.rounds,
              "accumulation": args.accumulation, "cpu_count": os.cpu_count(), "arms": {}}
    print(f"\n{args.profile} profile, {args.iters} steps, global batch {args.accumulation} micro-batches, "
          f"median of {args.rounds} round(s), {os.cpu_count()} cores")
    print(f"{'arm':<48} {'tok/s':>10} {'vs first':>9} {'train s':>8} {'wall s':>7}")
    for name, ms in rounds.items():
        median = statistics.median(m["tokens_per_s"] for m in ms)
        report["arms"][name] = {"tokens_per_s": median, "ratio_vs_first": median / baseline, "runs": ms}
        train_s, wall_s = (statistics.median(m[k] for m in ms) for k in ("train_time_s", "wall_s"))
        print(f"{name:<48} {median:>10,.0f} {median / baseline:>8.2f}x {train_s:>8.1f} {wall_s:>7.1f}")
    if args.json:
        study.ex.atomic_write_json(Path(args.json), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
