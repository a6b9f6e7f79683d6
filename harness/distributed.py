"""The processes of one job under torchrun: `World` (rank, size, backend) and the collectives every rank calls
at the same point. One process (no torchrun) is a World of size 1 where every collective is a no-op.

A failure on any rank ends every rank, within a bounded time, with one line naming the rank that failed:
the failing rank leaves its error in torchrun's key-value store (`JobStore`) before it leaves; a rank whose
collective then breaks reads it there and reports that failure, not its own broken collective; a rank that a
collective cannot release (NCCL, a lost node) is ended by `FailureWatch`; and the process group has a
timeout, the last resort for a rank that hangs without failing.

Config is read by duck typing (cfg.device, cfg.backend, cfg.gradient_accumulation_steps,
cfg.batch_size, cfg.batch_grows_with_world); nothing here imports experiment.py.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist  # (imported by torch itself: no start-up cost)

from harness.errors import Interrupted, RunFailed, UserError

RANK_SEED_STRIDE = 1_000_003  # rank r draws its training batches and dropout from seed + r x this
TIMEOUT_ENV = "GPT_RL_COLLECTIVE_TIMEOUT_S"  # how long a collective may wait for a rank that neither works nor
DEFAULT_TIMEOUT_S = 1800  # fails: PyTorch's own default, since a node may download and prepare a dataset meanwhile
FAILURE_GRACE_S = 15.0   # after a failure is posted, how long a rank may take to end by itself


class EvaluationStopped(Interrupted):
    """A stop was agreed in the middle of an evaluation: it is left unfinished (the last checkpoint stays)."""

    def __init__(self, message: str = "stopped during an evaluation; the last checkpoint is kept: continue "
                                      "with --resume"):
        super().__init__(message)


class RankFailed(RunFailed):
    """Another rank (or this one) failed: the job ends on every rank, each on its own (no farewell barrier)."""

    def __init__(self, rank: int, error: str):
        super().__init__(f"rank {rank} failed: {error}")
        self.rank, self.error = rank, error


def describe(error: BaseException) -> str:
    """One line for an exception: its type and its first line (a gloo error carries a C++ source position)."""
    text = f"{error.strerror}: {error.filename}" if isinstance(error, OSError) and error.strerror and \
        error.filename else str(error)
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0]}"


class JobStore:
    """torchrun's key-value store, over this process's own connection: where rank 0 leaves the settings of a
    run to resume before the process group exists (a node without the run folder learns them too), and where
    a failing rank leaves its error for the others. Keys are this job attempt's (torchrun may restart it)."""

    def __init__(self, rank: int, size: int, timeout_s: float):
        if not os.environ.get("MASTER_ADDR") or not os.environ.get("MASTER_PORT", "").isdigit():
            raise UserError("WORLD_SIZE > 1 without MASTER_ADDR and MASTER_PORT: launch the job with torchrun")
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # Under torchrun the launcher hosts the store; a bare launch (env:// by hand) has rank 0 host it.
        hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        self.store = dist.TCPStore(host, port, size, is_master=hosts, timeout=timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        self.address, self.timeout_s = (host, port), timeout_s
        self.prefix = f"gpt_rl/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"

    def another_connection(self) -> "dist.TCPStore":
        return dist.TCPStore(*self.address, is_master=False, timeout=timedelta(seconds=self.timeout_s),
                             wait_for_workers=False)

    def share(self, rank: int, key: str, make: Callable[[], dict]) -> dict:
        """make() on rank 0, sent to the others (they wait for it); rank 0's UserError is raised everywhere."""
        key = self.prefix + key
        if rank == 0:
            try:
                value = {"ok": make()}
            except (UserError, RunFailed) as e:
                value = {"error": str(e), "kind": type(e).__name__}
            except Exception as e:  # noqa: BLE001 -- the others must not wait for a value that never comes
                value = {"error": f"rank 0 failed: {describe(e)}", "kind": "RunFailed"}
            self.store.set(key, json.dumps(value))
        else:
            value = json.loads(self.store.get(key))
        if "error" in value:
            raise (UserError if value["kind"] == "UserError" else RunFailed)(value["error"])
        return value["ok"]

    def post_failure(self, rank: int, error: str, store=None) -> None:
        """Leave this rank's error for the others, unless an earlier failure is there already (the first one
        is the cause; later ones are its echoes)."""
        store = store or self.store
        try:
            if store.add(self.prefix + "failures", 1) == 1:
                store.set(self.prefix + "failure", json.dumps([rank, error]))
        except Exception:  # noqa: BLE001 -- the store left with its host; the others learn it from their collectives
            pass

    def cause(self, rank: int, error: str) -> tuple[int, str]:
        """(rank, error) of the job's first failure: one posted already (this rank's error is then its echo, a
        collective broken by the failed rank's departure), else this rank's, posted now."""
        try:
            posted = self.failure()
            if posted is None:
                self.post_failure(rank, error)
                posted = self.failure()  # (another rank's, had it posted first after all)
        except Exception:  # noqa: BLE001 -- the store is gone too: this rank's own error is all there is
            posted = None
        return posted or (rank, error)

    def failure(self, store=None) -> Optional[tuple[int, str]]:
        """(rank, error) of the first failure posted, or None."""
        store, key = store or self.store, self.prefix + "failure"
        if not store.check([key]):
            return None
        rank, error = json.loads(store.get(key))
        return rank, error


class FailureWatch(threading.Thread):
    """On every rank: once a failure is posted (or the store is gone), the process has grace_s to end by
    itself; past that it is ended here (rank 0 first says which rank failed, unless it has said so already).
    A collective waiting for a rank that is gone does not always return (NCCL; a node lost with the store):
    this is what bounds the time."""

    def __init__(self, world: "World", store: JobStore, poll_s: float = 1.0, grace_s: float = FAILURE_GRACE_S):
        super().__init__(name="failure-watch", daemon=True)
        self.world, self.job_store, self.poll_s, self.grace_s = world, store, poll_s, grace_s
        self.stopped = threading.Event()

    def run(self) -> None:
        connection = None  # its own: the main thread's may be busy in the process group
        while not self.stopped.wait(self.poll_s):
            try:
                connection = connection or self.job_store.another_connection()
                failure = self.job_store.failure(connection)
            except Exception as e:  # noqa: BLE001 -- the store's host (torchrun on the first node) is gone
                failure = (None, f"the job's store at {self.job_store.address[0]} is unreachable ({describe(e)})")
            if failure is None:
                continue
            if self.stopped.wait(self.grace_s):
                return
            if self.world.is_main:
                self.end_job(failure)
            os._exit(1)

    def end_job(self, failure: tuple) -> None:
        """Rank 0, about to be ended: say which rank failed (unless said already) and let the run record it
        (World.on_abort: experiment.py marks run.json failed, which no exception handler will do now)."""
        line = f"rank {failure[0]} failed: {failure[1]}" if failure[0] is not None else failure[1]
        line += f" (rank {self.world.rank} did not end by itself within {self.grace_s:g} s)"
        if not self.world.reported:
            print(f"error: {line}", file=sys.stderr, flush=True)
        if self.world.on_abort is not None:
            try:
                self.world.on_abort(line)
            except Exception:  # noqa: BLE001 -- ending the job matters more than recording it
                pass


@dataclass
class World:
    """The processes of one job. size 1 (no torchrun, or one process): a plain run, no collective at all."""
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    backend: Optional[str] = None
    store: Optional[JobStore] = None       # torchrun's store (None in one process, or a World made by hand)
    watch: Optional[FailureWatch] = None
    reported: bool = False                 # rank 0 has printed the job's error line (the watch need not)
    on_abort: Optional[Callable[[str], None]] = None  # rank 0: record the job's end before the watch ends it

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_environment(cfg, recorded: Optional[Callable] = None) -> "World":
        """Join torchrun's process group when RANK/WORLD_SIZE say there is one (WORLD_SIZE > 1).

        recorded(cfg), for --resume: on rank 0, the {"device", "backend"} the run trained with. They decide
        the backend, whatever today's command line says, and every rank learns them before joining."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return World()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        timeout_s = collective_timeout_s()
        if recorded is None:  # (a bad flag is refused before any connection is made)
            backend = choose_backend(cfg.device, cfg.backend, local_rank)
        store = JobStore(rank, size, timeout_s)
        if recorded is not None:
            settings = store.share(rank, "resume_settings", lambda: recorded(cfg))
            backend = choose_backend(settings["device"], settings["backend"] or "auto", local_rank)
        dist.init_process_group(backend=backend, store=dist.PrefixStore(store.prefix + "pg/", store.store),
                                rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s))
        world = World(rank, local_rank, size, backend, store)
        world.watch = FailureWatch(world, store)
        world.watch.start()
        return world

    def close(self, together: bool = True) -> None:
        """Leave the process group, after every DDP model is gone. together: every rank gets here (the job ended
        well, or failed on every rank alike); they wait for each other first, since gloo aborts a rank whose peer
        has already left. Apart (a rank failed), each leaves at once, the watch still bounding how long."""
        if self.distributed and dist.is_initialized():
            # A DDP model still alive holds the group beyond destroy_process_group, and gloo then aborts the
            # process at exit ("terminate called without an active exception"): free finished runs first.
            gc.collect()
            if together:
                if self.watch is not None:
                    self.watch.stopped.set()
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001 -- a peer gone at the very end: its results are written already
                    pass
            dist.destroy_process_group()

    def batch_split(self, cfg) -> tuple[int, int]:
        """(micro-batches per optimizer step, sequences per micro-batch) on each rank. By default the global
        batch is what one process takes (batch_size x gradient_accumulation_steps sequences): the micro-batches
        divided among the ranks (nanoGPT's rule) where their count divides, else the sequences (e.g. 1 micro-batch
        of 12 on 2 ranks: 6 each; check_world refuses a global batch the ranks cannot share evenly). With
        cfg.batch_grows_with_world every rank takes all of them (size x the batch)."""
        accumulation, batch = cfg.gradient_accumulation_steps, cfg.batch_size
        if getattr(cfg, "batch_grows_with_world", False):
            return accumulation, batch
        if accumulation % self.size == 0:
            return accumulation // self.size, batch
        per_rank = batch * accumulation // self.size
        steps = next(m for m in range(-(-accumulation // self.size), per_rank + 1) if per_rank % m == 0)
        return steps, per_rank // steps

    def wrap(self, model: torch.nn.Module, device: torch.device, compile_wrapped: bool = False) -> torch.nn.Module:
        """The model in DistributedDataParallel (device_ids on CUDA only). compile_wrapped: torch.compile the
        wrapped model, so that the compiled graph breaks at DDP's gradient buckets and each bucket's all-reduce
        overlaps the rest of the backward (DDPOptimizer); a compiled model inside DDP (nanoGPT's order) gives
        DDP its gradients only when the whole compiled backward is done."""
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        return torch.compile(wrapped) if compile_wrapped else wrapped

    # --- failures: one rank's error ends every rank, named once ------------------------------------------

    @contextmanager
    def failures_shared(self):
        """Run the block. Under torchrun an exception on this rank alone (not one every rank raises alike: a
        UserError, RunFailed or Interrupted) becomes RankFailed naming the rank that failed first: this one,
        posted for the others, or another, whose departure broke this rank's collective."""
        try:
            yield
        except (UserError, RunFailed, Interrupted):
            raise
        except Exception as e:
            if not self.distributed:
                raise
            raise self.explain(e) from e

    def explain(self, error: BaseException) -> RankFailed:
        """The job's failure that error is part of: RankFailed naming the rank that failed first."""
        if isinstance(error, RankFailed):
            return error
        own = describe(error)
        return RankFailed(*(self.store.cause(self.rank, own) if self.store is not None else (self.rank, own)))

    # --- collectives: every rank calls each one at the same point, in the same order ---------------------

    def shard(self, items, stop=None, every: int = 8):
        """This rank's share of items (the rank-th, then every size-th), taken in rounds that every rank goes
        through alike, so that stop() (a collective under torchrun) is asked at the same round everywhere:
        at the first and every `every`-th, and EvaluationStopped is raised on every rank when it says so."""
        items = list(items)
        for k, first in enumerate(range(0, len(items), self.size)):
            if stop is not None and k % every == 0 and stop():
                raise EvaluationStopped()
            if first + self.rank < len(items):
                yield items[first + self.rank]

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
        on every rank (the others stay silent: see main), any other failure as RankFailed naming rank 0."""
        if not self.distributed:
            return make()
        box = [None]
        if self.is_main:
            try:
                box[0] = ("ok", make())
            except (UserError, RunFailed) as e:
                box[0] = (type(e).__name__, str(e))
            except BaseException as e:  # a bug on rank 0: let the others end instead of waiting for it
                dist.broadcast_object_list([("RankFailed", (0, describe(e)))], src=0)
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
        except Exception as e:  # noqa: BLE001 -- an OSError on one rank: every rank must hear of it here
            failure = ("RankFailed", (self.rank, describe(e)))
        failed = [f for f in self.gather(failure) if f is not None]
        if failed:
            _result_or_raise(*failed[0])
        return result


def collective_timeout_s() -> float:
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"${TIMEOUT_ENV} must be a number of seconds above 0, not {text!r}")
    return value


def choose_backend(device: str, backend: str, local_rank: int) -> str:
    """The process-group backend for device and --backend (auto: nccl on CUDA, gloo on the CPU); on CUDA
    this process is put on GPU local_rank."""
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    backend = backend if backend != "auto" else "nccl" if cuda else "gloo"
    if device == "mps":
        raise UserError("--device mps cannot train in several processes: use cuda or cpu under torchrun")
    if backend == "nccl" and not cuda:
        raise UserError("--backend nccl needs CUDA devices; use --backend gloo on the CPU")
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                            f"set torchrun's --nproc_per_node to at most that")
        torch.cuda.set_device(local_rank)
    return backend


def _result_or_raise(kind: str, value):
    if kind == "ok":
        return value
    if kind == "RankFailed":
        raise RankFailed(*value)
    raise (UserError if kind == "UserError" else RunFailed)(value)
