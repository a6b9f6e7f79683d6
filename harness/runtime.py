"""What the machine and the process decide around a run: `Runtime` (device, dtype, autocast, compile, World),
`StopRequest` (SIGTERM / Ctrl-C), `FaultInjector` (the test hook that poisons losses) and `Progress`
(a live bar on a terminal, periodic lines in a log). Config is read by duck typing."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from harness.distributed import World
from harness.errors import UserError

@dataclass
class Runtime:
    """What the machine decides: device, compute dtype, autocast context, compile, and the processes."""
    device: torch.device
    dtype: torch.dtype
    autocast: object
    compile: bool
    world: World = field(default_factory=World)

    @staticmethod
    def choose(cfg, world: Optional[World] = None) -> "Runtime":
        world = world or World()
        if cfg.device == "auto":
            name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
            if world.distributed and name == "mps":  # DDP has no MPS backend
                name = "cpu"
        else:
            name = cfg.device
            if name == "cuda" and not torch.cuda.is_available():
                raise UserError("--device cuda requested but CUDA is not available")
            if name == "mps" and not torch.backends.mps.is_available():
                raise UserError("--device mps requested but MPS is not available")
        device = torch.device(name, world.local_rank) if name == "cuda" and world.distributed else torch.device(name)
        dtype_name = cfg.dtype
        if dtype_name == "auto":
            dtype_name = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if name == "cuda" else "float32"
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype_name]
        if name == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=name, dtype=dtype)
        use_compile = cfg.compile
        if use_compile is None:
            use_compile = name == "cuda" and importlib.util.find_spec("triton") is not None
        return Runtime(device, dtype, ctx, bool(use_compile), world)


class StopRequest:
    """Set by SIGTERM / Ctrl-C; the loop checkpoints at the next step and exits cleanly.

    A second signal stops at once, unless it comes within repeat_grace_s of the first: under torchrun a
    Ctrl-C reaches each worker twice, from the terminal and forwarded by the launcher."""

    def __init__(self, repeat_grace_s: float = 0.0):
        self.signal_name: Optional[str] = None
        self.repeat_grace_s, self.first_at = repeat_grace_s, 0.0

    def __call__(self, signum, frame):
        if self.signal_name is not None:
            if time.monotonic() - self.first_at < self.repeat_grace_s:
                return
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name, self.first_at = signal.Signals(signum).name, time.monotonic()


class FaultInjector:
    """Test hooks: $GPT_RL_TEST_NAN_AT="15,40" poisons the loss at those steps; "15+" at every step >= 15.
    $GPT_RL_TEST_RAISE_AT="1:35" raises an exception on rank 1 as it begins step 35 (a crash on one rank).

    A fault behaves as a real divergence does: the same weights on the same batch give the same loss, so
    it fires again whenever its step is reached with the weights it first fired on, and not once a
    rollback has changed them."""

    def __init__(self, spec: str, raise_spec: str = "", rank: int = 0):
        self.at = {int(x) for x in spec.split(",") if x.strip() and not x.endswith("+")}
        self.from_it = min([int(x[:-1]) for x in spec.split(",") if x.endswith("+")], default=None)
        self.fired_on: dict[int, str] = {}  # step -> fingerprint of the weights it first fired on
        self.raise_at = None  # the step at which this rank raises
        if raise_spec.strip():
            try:
                raise_rank, step = (int(x) for x in raise_spec.split(":"))
            except ValueError:
                raise UserError(f"$GPT_RL_TEST_RAISE_AT must be RANK:STEP (e.g. 1:35), not {raise_spec!r}") from None
            self.raise_at = step if raise_rank == rank else None

    @staticmethod
    def from_environment(rank: int) -> "FaultInjector":
        return FaultInjector(os.environ.get("GPT_RL_TEST_NAN_AT", ""), os.environ.get("GPT_RL_TEST_RAISE_AT", ""), rank)

    def raise_if_due(self, it: int) -> None:
        if it == self.raise_at:
            raise RuntimeError(f"GPT_RL_TEST_RAISE_AT: the test failure at iter {it}")

    def poison(self, it: int, model: nn.Module) -> bool:
        if self.from_it is not None and it >= self.from_it:
            return True
        if it not in self.at:
            return False
        digest = hashlib.sha256()
        for p in model.parameters():
            digest.update(p.detach().cpu().numpy().tobytes())
        return self.fired_on.setdefault(it, digest.hexdigest()) == digest.hexdigest()


class Progress:
    """A live bar on a terminal; plain periodic lines when stderr is a file or CI log. unit and metric name what
    is counted and what is shown (a training run: iter and its loss; a search: episode and the best score)."""

    def __init__(self, label: str, total: int, start: int, interactive: bool, every_s: float = 15.0,
                 unit: str = "iter", metric: str = "loss"):
        self.label, self.total, self.start, self.every_s = label, total, start, every_s
        self.unit, self.metric = unit, metric
        self.t0 = self.last_print = time.time()
        self.bar = None
        if interactive:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=label, dynamic_ncols=True, leave=True, file=sys.stderr)

    def update(self, it: int, loss: float, lr: Optional[float] = None, force: bool = False) -> None:
        elapsed = time.time() - self.t0
        eta = elapsed / max(it - self.start, 1) * (self.total - it)
        shown = f"{self.metric} {loss:.4f}" + (f" lr {lr:.2e}" if lr is not None else "")
        if self.bar is not None:
            self.bar.n = it
            self.bar.set_postfix_str(shown, refresh=True)
        elif force or time.time() - self.last_print >= self.every_s:
            self.last_print = time.time()
            print(f"[{self.label}] {self.unit} {it}/{self.total} {shown} "
                  f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}", file=sys.stderr, flush=True)

    def write(self, line: str) -> None:
        (self.bar.write if self.bar is not None else lambda s: print(s, file=sys.stderr, flush=True))(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()



def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
