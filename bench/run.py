"""Speed of the harness, measured side by side with a naive reference in one process.

    python bench/run.py                 # cpu model size (and the full size when CUDA is present), ~3 min on 2 cores
    python bench/run.py --quick         # seconds: what CI runs so this file cannot rot
    python bench/run.py --json out.json

Every figure is also a ratio against a naive reference measured in the same process, on the same model:
  training   plain fp32 eager step, foreach AdamW, nanoGPT-style batches (stack of memmap slices) -- vs the
             harness's step with the settings Runtime.choose picks for this device (and candidates)
  sampling   cache-free generation (nanoGPT's loop) -- vs the harness's KV-cache generation
  MFU        model FLOPs (nanoGPT's 6N + 12·L·H·Q·T per token) over a peak measured here: a large matmul
             in the training dtype
  shares     evaluation and agent time as a fraction of a real (short) training run of the harness
  LR groups  the harness's own step (TrainingRun.step) with one LR group, a group per layer (--lr_groups layer:
             per-parameter gradient norms summed by group), and per layer with LAMB trust ratios
             (--layer_trust lamb), interleaved -- vs the one-group step
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import study  # bench/ is on the path as the script's folder; study puts the project root there too
from study import ex


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    """FLOP/s of an n x n matmul in the training dtype: the machine's practical ceiling for this model."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def flops_per_iter(model: ex.GPT, cfg: ex.Config) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N + 12·L·H·Q·T per token, times tokens per iteration."""
    L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
    per_token = 6 * model.num_params() + 12 * L * H * Q * T
    return per_token * T * cfg.batch_size * cfg.gradient_accumulation_steps


def naive_batches(data: np.ndarray, cfg: ex.Config, device: torch.device, generator: torch.Generator):
    """nanoGPT's get_batch: one slice per row, stacked."""
    while True:
        ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,), generator=generator)
        x = torch.stack([torch.from_numpy(data[i:i + cfg.block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + cfg.block_size].astype(np.int64)) for i in ix])
        yield x.to(device), y.to(device)


def harness_batches(data: np.ndarray, cfg: ex.Config, device: torch.device, seed: int):
    sampler = ex.BatchSampler(data, cfg.block_size, cfg.batch_size, device, seed)
    while True:
        yield sampler.next_batch()


class TrainingVariant:
    """One way of taking a training step (dtype, compile, fused AdamW, batch assembly), on its own model."""

    def __init__(self, cfg: ex.Config, data: np.ndarray, device: torch.device, dtype: torch.dtype,
                 compile: bool, fused: bool, batches: str):
        torch.manual_seed(0)
        self.cfg, self.device = cfg, device
        self.model = ex.GPT(ex.model_config(cfg, vocab_size=int(data.max()) + 1)).to(device)
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                           fused=fused or None, foreach=None if fused else True)
        self.ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
        self.step_model = torch.compile(self.model) if compile else self.model
        self.batches = (naive_batches(data, cfg, device, torch.Generator().manual_seed(0)) if batches == "naive"
                        else harness_batches(data, cfg, device, 0))
        self.times, self.it = [], 0
        t0 = time.perf_counter()
        self.run(2, record=False)  # warm-up; for torch.compile this is the compilation
        self.warmup_s = time.perf_counter() - t0

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y = next(self.batches)
            with self.ctx:
                _, loss = self.step_model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.it % self.cfg.log_interval == 0:
                loss.item()  # one host sync per log_interval, as the harness does
            sync(self.device)
            self.it += 1
            if record:
                self.times.append(time.perf_counter() - t0)


def time_training(cfg: ex.Config, data: np.ndarray, device: torch.device, variants: dict, rounds: int,
                  steps: int) -> dict:
    """Median ms/iter per variant, the variants interleaved round by round so drift hits all alike."""
    built = {}
    for name, spec in variants.items():
        try:
            built[name] = TrainingVariant(cfg, data, device, **spec)
        except Exception as e:  # noqa: BLE001 -- a candidate that cannot run here is a result too
            built[name] = f"failed: {type(e).__name__}: {e}"
    for _ in range(rounds):
        for v in built.values():
            if not isinstance(v, str):
                v.run(steps)
    out = {}
    for name, v in built.items():
        if isinstance(v, str):
            out[name] = {"error": v}
            continue
        ms = statistics.median(v.times) * 1000
        out[name] = {"ms_per_iter": ms, "tokens_per_s": cfg.batch_size * cfg.block_size / (ms / 1000),
                     "warmup_s": v.warmup_s, "flops_per_iter": flops_per_iter(v.model, cfg)}
    return out


def time_sampling(cfg: ex.Config, vocab: int, device: torch.device, new_tokens: int, use_cache: bool) -> float:
    torch.manual_seed(0)
    model = ex.GPT(ex.model_config(dataclasses.replace(cfg, dropout=0.0), vocab)).to(device).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    ex.generate(model, prompt, 5, 0.8, 200, torch.Generator().manual_seed(0), use_cache=use_cache)  # warm up
    sync(device)
    t0 = time.perf_counter()
    ex.generate(model, prompt, new_tokens, 0.8, 200, torch.Generator().manual_seed(0), use_cache=use_cache)
    sync(device)
    return new_tokens / (time.perf_counter() - t0)


def run_shares(profile: str, max_iters: int, data_dir: str, device: str) -> dict:
    """Evaluation and agent share of a real (short) harness run with the Q-learning agent."""
    base = ex.Config()
    cfg = ex.config_for_dataset(base, {"max_iters": max_iters, "lr_decay_iters": max_iters, "agent": "qlearning",
                                       "inference_samples": 0, "data_dir": data_dir, "device": device},
                                profile, "shakespeare_char")
    ex.ensure_prepared(cfg, "shakespeare_char", log=lambda *a: None)
    data = ex.load_dataset(cfg, "shakespeare_char")
    rt = ex.Runtime.choose(cfg)
    import tempfile
    with tempfile.TemporaryDirectory() as out:
        result = ex.train_one_seed(cfg, data, 0, rt, Path(out), False, ex.StopRequest())
    info = result["final_info"]
    total = info["total_train_time"]
    return {"profile": profile, "max_iters": max_iters, "eval_interval": cfg.eval_interval,
            "eval_share": info["eval_time"] / total, "agent_share": info["agent_time"] / total,
            "checkpoint_share": info["checkpoint_time"] / total, "total_s": total}


def time_lr_groups(size: str, data_dir: str, device: str, rounds: int, steps: int) -> dict:
    """Median ms per TrainingRun.step for each way of grouping the learning rate, interleaved round by round."""
    variants = {"one group (--lr_groups global)": {}, "a group per layer (--lr_groups layer)": {"lr_groups": "layer"},
                "per layer + LAMB trust (--layer_trust lamb)": {"layer_trust": "lamb"}}
    runs, times = {}, {}
    for name, flags in variants.items():
        cfg = ex.config_for_dataset(ex.Config(), {"data_dir": data_dir, "device": device, **flags}, size,
                                    "shakespeare_char")
        ex.ensure_prepared(cfg, "shakespeare_char", log=lambda *a: None)
        run = ex.TrainingRun(cfg, ex.load_dataset(cfg, "shakespeare_char"), 0, ex.Runtime.choose(cfg), None)
        for it in range(2):  # warm-up
            run.step(it, run.lr(it))
        runs[name], times[name] = run, []
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(steps):
                it = 2 + len(times[name])  # the step's place in the schedule
                t0 = time.perf_counter()
                run.step(it, run.lr(it))
                sync(run.rt.device)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(next(iter(times.values())))
    return {name: {"ms_per_iter": statistics.median(t) * 1000, "ratio_vs_one_group": statistics.median(t) / base,
                   "groups": len(runs[name].group_names)} for name, t in times.items()}


def training_variants(rt: ex.Runtime, device: torch.device, quick: bool) -> dict:
    """The naive reference, the harness's automatic choice and (full mode) the candidates it chooses from."""
    variants = {
        "naive: fp32 eager, foreach AdamW, stacked slices": dict(dtype=torch.float32, compile=False, fused=False,
                                                                 batches="naive"),
        f"harness ({str(rt.dtype)[6:]}, compile={rt.compile}, fused={device.type == 'cuda'})":
            dict(dtype=rt.dtype, compile=rt.compile, fused=device.type == "cuda", batches="harness"),
    }
    if not quick:
        variants["candidate: fused AdamW"] = dict(dtype=rt.dtype, compile=False, fused=True, batches="harness")
        variants["candidate: bf16 autocast"] = dict(dtype=torch.bfloat16, compile=False, fused=False,
                                                    batches="harness")
        variants["candidate: torch.compile"] = dict(dtype=rt.dtype, compile=True, fused=False, batches="harness")
        variants["candidate: torch.compile + fused AdamW"] = dict(dtype=rt.dtype, compile=True, fused=True,
                                                                  batches="harness")
    return variants


def bench_training(size: str, cfg: ex.Config, data: np.ndarray, device: torch.device, args, report: dict,
                   rows: list) -> None:
    """ms/iter, tokens/s, MFU and speed-up against the naive step of every variant at one model size."""
    rt = ex.Runtime.choose(dataclasses.replace(cfg, device=device.type))
    peak = measure_peak_flops(device, rt.dtype, 512 if args.quick else 2048, 0.2 if args.quick else 2.0)
    results = time_training(cfg, data, device, training_variants(rt, device, args.quick),
                            rounds=1 if args.quick else 6, steps=3 if args.quick else 15)
    naive_ms = next(iter(results.values())).get("ms_per_iter")
    for name, r in results.items():
        if "error" in r:
            rows.append((size, name, r["error"][:60], "", "", ""))
            continue
        r["speedup_vs_naive"] = naive_ms / r["ms_per_iter"]
        r["mfu"] = r["flops_per_iter"] / (r["ms_per_iter"] / 1000) / peak
        report["training"][f"{size}: {name}"] = r
        rows.append((size, name, f"{r['ms_per_iter']:.1f} ms/iter", f"{r['tokens_per_s']:,.0f} tok/s",
                     f"MFU {100 * r['mfu']:.1f}%", f"x{r['speedup_vs_naive']:.2f}"))
    report["training"][f"{size}: peak FLOP/s"] = peak


def bench_sampling(size: str, cfg: ex.Config, device: torch.device, quick: bool, report: dict, rows: list) -> None:
    """Cache-free against KV-cache generation, at the profile's block size (and 256)."""
    new_tokens = 20 if quick else 500
    for block in sorted({cfg.block_size, 256}) if not quick else [cfg.block_size]:
        c = dataclasses.replace(cfg, block_size=block)
        free = time_sampling(c, 65, device, new_tokens, use_cache=False)
        cached = time_sampling(c, 65, device, new_tokens, use_cache=True)
        report["sampling"][f"{size} block {block}"] = {"cache_free_tok_s": free, "kv_cache_tok_s": cached,
                                                        "speedup": cached / free, "new_tokens": new_tokens}
        rows.append((size, f"sampling {new_tokens} tokens, block {block}, batch 1",
                     f"{free:,.0f} tok/s no cache", f"{cached:,.0f} tok/s KV cache", "", f"x{cached / free:.2f}"))


def bench_run_parts(args, device: torch.device, report: dict, rows: list) -> None:
    """The LR-group step costs and the evaluation/agent/checkpoint shares of a real run."""
    lr_groups = time_lr_groups("cpu", args.data_dir, device.type, rounds=1 if args.quick else 6,
                               steps=3 if args.quick else 15)
    report["lr_groups"] = lr_groups
    for name, r in lr_groups.items():
        rows.append(("cpu", f"step, {name}, {r['groups']} groups", f"{r['ms_per_iter']:.1f} ms/iter", "", "",
                     f"x{r['ratio_vs_one_group']:.3f}"))
    shares = run_shares("smoke" if args.quick else "cpu", 30 if args.quick else 500, args.data_dir, device.type)
    report["shares"] = shares
    rows.append(("cpu" if not args.quick else "smoke", f"shares of a {shares['max_iters']}-iter run "
                 f"(eval every {shares['eval_interval']})", f"eval {100 * shares['eval_share']:.1f}%",
                 f"agent {100 * shares['agent_share']:.3f}%", f"checkpoint {100 * shares['checkpoint_share']:.2f}%",
                 ""))


def write_report(report: dict, rows: list, path: str) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(6)]
    print(f"{report['date']} | {report['machine']} | {report['commit']} | torch {report['torch']} | "
          f"{report['device']} | {report['threads']} threads" + (" | QUICK (figures meaningless)" if report["quick"]
                                                                 else ""))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ex.atomic_write_json(Path(path), report)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (CI): checks the code, not the speed")
    parser.add_argument("--json", default="bench/results.json", help="where to write the figures")
    parser.add_argument("--data_dir", default="", help="prepared data root (default: the project's data/)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # study.record(): the commit, machine, date and command every table in bench/ states
    report = {**study.record(argv), "torch": torch.__version__, "device": str(device),
              "threads": torch.get_num_threads(), "quick": args.quick, "training": {}, "sampling": {}, "shares": {}}
    if device.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name()
    data = np.random.default_rng(0).integers(0, 65, size=200_000, dtype=np.uint16)
    rows = []
    for size in ["cpu"] + (["full"] if device.type == "cuda" else []):
        cfg = ex.config_for_dataset(ex.Config(), {}, size, "shakespeare_char")
        bench_training(size, cfg, data, device, args, report, rows)
        bench_sampling(size, cfg, device, args.quick, report, rows)
    bench_run_parts(args, device, report, rows)
    write_report(report, rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
