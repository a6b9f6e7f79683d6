"""The processes of one job under torchrun: `World` (rank, size, backend) and the collectives every rank calls
at the same point. One process (no torchrun) is a World of size 1 where every collective is a no-op.

Config is read by duck typing (cfg.device, cfg.backend); nothing here imports experiment.py.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist  # (imported by torch itself: no start-up cost)

from harness.errors import RunFailed, UserError

RANK_SEED_STRIDE = 1_000_003  # rank r draws its training batches and dropout from seed + r x this


@dataclass
class World:
    """The processes of one job. size 1 (no torchrun, or one process): a plain run, no collective at all."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: Optional[str] = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(cfg) -> "World":
        """Join torchrun's process group when RANK/WORLD_SIZE say there is one (WORLD_SIZE > 1)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda")
        backend = cfg.backend if cfg.backend != "auto" else "nccl" if cuda else "gloo"
        if cfg.device == "mps":
            raise UserError("--device mps cannot train in several processes: use cuda or cpu under torchrun")
        if backend == "nccl" and not cuda:
            raise UserError("--backend nccl needs CUDA devices; use --backend gloo on the CPU")
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                                f"set torchrun's --nproc_per_node to at most that")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        return World(rank, local_rank, size, backend)

    def close(self, together: bool = True) -> None:
        """Leave the process group, after every DDP model is gone. together: every rank gets here (the job ended
        well, or failed on every rank alike); they wait for each other first, since gloo aborts a rank whose peer
        has already left."""
        if self.distributed and dist.is_initialized():
            # A DDP model still alive holds the group beyond destroy_process_group, and gloo then aborts the
            # process at exit ("terminate called without an active exception"): free finished runs first.
            gc.collect()
            if together:
                dist.barrier()
            dist.destroy_process_group()

    def micro_steps(self, gradient_accumulation_steps: int) -> int:
        """Micro-batches each rank takes per optimizer step: the configured ones divided among the ranks
        (nanoGPT's rule), so the global batch stays what one process would take; at least one."""
        return max(1, gradient_accumulation_steps // self.size)

    # --- collectives: every rank calls each one at the same point, in the same order ---------------------

    def comm_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place: the sum over the ranks (a no-op in one process)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean(self, value: float) -> float:
        if not self.distributed:
            return value
        return self.sum_(torch.tensor([value], dtype=torch.float64, device=self.comm_device())).item() / self.size

    def any(self, flag: bool) -> bool:
        if not self.distributed:
            return flag
        return bool(self.sum_(torch.tensor([float(flag)], device=self.comm_device())).item())

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order (on every rank)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, make):
        """make() run on rank 0 and its result sent to every rank; rank 0's UserError or RunFailed is raised
        on every rank (the others stay silent: see main)."""
        if not self.distributed:
            return make()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except (UserError, RunFailed) as e:
                box[0] = (type(e).__name__, str(e))
            except BaseException as e:  # a bug on rank 0: let the others end instead of waiting for it
                dist.broadcast_object_list([("RunFailed", f"rank 0 failed: {type(e).__name__}: {e}")], src=0)
                raise
        dist.broadcast_object_list(box, src=0)
        return _result_or_raise(*box[0])

    def everywhere(self, make):
        """make() on every rank; if it failed on any, every rank raises the first failure."""
        if not self.distributed:
            return make()
        result, failure = None, None
        try:
            result = make()
        except (UserError, RunFailed) as e:
            failure = (type(e).__name__, f"rank {self.rank}: {e}" if self.rank else str(e))
        failed = [f for f in self.gather(failure) if f is not None]
        if failed:
            _result_or_raise(*failed[0])
        return result


def _result_or_raise(kind: str, value):
    if kind == "ok":
        return value
    raise (UserError if kind == "UserError" else RunFailed)(value)
