"""The checkpoint store of one training run: the last checkpoint and the one before it, as files or in memory.

Two are kept because a divergence detected at step j lies in the weights entering step j, which the
checkpoint saved at j holds: a rollback must go back to a checkpoint from before j, or it would replay the
same weights and batch. The last one becomes the previous one by a rename, not a rewrite, and every write
is atomic, so a kill at any moment leaves at least one whole checkpoint.

Under torchrun rank 0 alone holds the files; the other ranks ask it (World.from_main) and get the same
answers and bytes. CheckpointStore keeps the bytes; RunCheckpoints (a mixin of experiment.TrainingRun) says
what a checkpoint holds: a dict of tensors and plain data, saved with torch.save and loaded with
torch.load(weights_only=True).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

from harness.distributed import World
from harness.errors import UserError
from harness.files import atomic_write_bytes

WALL_CLOCK_FIELDS = ("elapsed", "eval_time", "agent_time", "checkpoint_time")  # kept across rollbacks


class CheckpointStore:
    """"last" and "previous": files at path and previous_path (path None: bytes in memory, for the short runs
    train_agent.py makes by the thousand); saved_at says which iteration each holds."""

    def __init__(self, path: Optional[Path], previous_path: Optional[Path], world: World):
        self.path = Path(path) if path is not None else None
        self.previous_path = Path(previous_path) if path is not None else None
        self.world = world
        self.memory: dict = {}  # "last" / "previous" -> checkpoint bytes, when path is None
        self.saved_at: dict = {}  # "last" / "previous" -> the iteration its checkpoint holds

    def has(self, key: str) -> bool:
        """Whether the "last" / "previous" checkpoint is there (rank 0 holds them: it answers for all)."""
        if self.path is None:
            return self.world.from_main(lambda: key in self.memory)
        path = self.path if key == "last" else self.previous_path
        return self.world.from_main(path.exists)

    def read(self, source) -> bytes:
        """A checkpoint's bytes, from a path or from the "last" / "previous" one (a file, or in memory)."""
        if source in ("last", "previous"):
            if self.path is None:
                return self.memory[source]
            source = self.path if source == "last" else self.previous_path
        try:
            return Path(source).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read checkpoint {source}: {e.strerror or e}; "
                            f"delete it to restart this seed") from e

    def rotate(self) -> None:
        if self.path is None:
            self.memory["previous"] = self.memory.pop("last")
        else:
            os.replace(self.path, self.previous_path)

    def before_save(self, next_it: int) -> None:
        """The last good state becomes the fallback, unless the new checkpoint is of the same iteration."""
        last = self.saved_at.get("last")
        if last is not None and last < next_it and self.has("last"):
            if self.world.is_main:
                self.rotate()
            self.saved_at["previous"] = last

    def write(self, payload: Optional[dict], next_it: int) -> None:
        """Keep the payload as the "last" checkpoint (atomically), holding iteration next_it. Under torchrun
        rank 0 alone writes (the others pass None); every rank notes the iteration."""
        if payload is not None:
            buf = io.BytesIO()
            torch.save(payload, buf)
            if self.path is None:
                self.memory["last"] = buf.getvalue()
            else:
                atomic_write_bytes(self.path, buf.getvalue())
        self.saved_at["last"] = next_it

    def load(self, source) -> tuple[dict, dict, dict]:
        """(payload, meta, this rank's RNG states) of a checkpoint: a path, or the "last" / "previous" one.
        Under torchrun rank 0 reads it and every rank loads the same bytes, each its own RNG streams."""
        data = self.world.from_main(lambda: self.read(source))
        name = source if source not in ("last", "previous") else f"{self.path or 'in memory'} ({source})"
        try:
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            meta = json.loads(payload["meta"])
            rng = payload["rank_rng"][self.world.rank] if self.world.distributed else payload
        except Exception as e:  # a truncated or foreign file: say which, do not guess
            raise UserError(f"checkpoint {name} is unreadable ({type(e).__name__}); "
                            f"delete it to restart this seed") from e
        return payload, meta, rng

    def resume(self, restore) -> Optional[dict]:
        """--resume: restore(path) the last checkpoint (or the previous one, if a kill fell between rotating and
        writing) and return what restore returns, the checkpoint's meta; None when there is no checkpoint."""
        if self.path is None:
            return None
        last_exists, previous_exists = self.world.from_main(
            lambda: [p.exists() for p in (self.path, self.previous_path)])
        if not (last_exists or previous_exists):
            return None
        meta = restore(self.path if last_exists else self.previous_path)
        next_it = meta["state"]["next_it"]
        if not last_exists:
            self.saved_at = {"previous": next_it}
        else:
            self.saved_at = {"last": next_it}
            if meta.get("previous_it") is not None and previous_exists:
                self.saved_at["previous"] = meta["previous_it"]
        return meta

    def newest_before(self, it: int) -> Optional[str]:
        """"last" or "previous": the newest checkpoint from before step `it`; None when there is none."""
        for key in ("last", "previous"):
            at = self.saved_at.get(key)
            if at is not None and at < it and self.has(key):
                return key
        return None


class RunCheckpoints:
    """What a checkpoint of a TrainingRun holds, and putting it back: the model, optimizer, scaler, RNG streams,
    its state (a dataclass, SeedState) and the controls' multipliers, kept by its CheckpointStore (`store`).
    A mixin of experiment.TrainingRun, reading the run's attributes by name."""

    def save(self, agent_state: dict) -> None:
        """Checkpoint the run (atomically; loads with torch.load(weights_only=True)), with the agent's state.

        Under torchrun every rank calls it: the model and optimizer are the same on every rank, the RNG
        streams are not, so rank 0 gathers them all and alone keeps the checkpoint."""
        t = time.perf_counter()
        self.store.before_save(self.state.next_it)
        self.stats.flush(self.state)
        rank_rng = None
        if self.world.distributed:
            rank_rng = self.world.gather({"torch_rng": self.rng_state["cpu"],
                                          "sampler_rng": self.sampler.generator.get_state(),
                                          "cuda_rng": [self.rng_state["cuda"]] if self.cuda_rng else []})
        if not self.world.is_main:
            self.store.write(None, self.state.next_it)
            return
        meta = {"state": dataclasses.asdict(self.state), "agent": agent_state, "multiplier": self.multiplier,
                "config": dataclasses.asdict(self.cfg), "previous_it": self.store.saved_at.get("previous"),
                **({"group_multipliers": self.group_multipliers, "trust": self.trust} if self.layered else {}),
                **({"hparam_multipliers": self.hparam_multipliers} if self.hparam_multipliers else {})}
        between_evaluations = self.state.next_it != self.state.last_eval_it  # (interrupted): keep the
        payload = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),  # reference
                   "scaler": self.scaler.state_dict(), "torch_rng": self.rng_state["cpu"],  # for update_ratio
                   "cuda_rng": [self.rng_state["cuda"]] if self.cuda_rng else [],
                   "sampler_rng": self.sampler.generator.get_state(), "meta": json.dumps(meta),
                   "weights_at_eval": self.stats.weights_at_eval if between_evaluations else None,
                   **({"rank_rng": rank_rng} if rank_rng else {})}
        self.store.write(payload, self.state.next_it)
        self.state.checkpoint_time += time.perf_counter() - t  # counted from the next checkpoint on

    def resume(self) -> Optional[dict]:
        """--resume: the last checkpoint (or the previous one, if a kill fell between rotating and writing).
        Returns the agent state saved with it; None when there is no checkpoint (the seed starts afresh)."""
        meta = self.store.resume(self.restore)
        return meta["agent"] if meta is not None else None

    def rollback_before(self, it: int) -> Optional[dict]:
        """Restore the newest checkpoint from before step `it`, keeping the wall time spent since (it was
        spent all the same); returns the agent state saved with it, or None when there is no such one."""
        spent = {k: getattr(self.state, k) for k in WALL_CLOCK_FIELDS}
        key = self.store.newest_before(it)
        if key is None:
            return None
        meta = self.restore(key)
        for k, v in spent.items():
            setattr(self.state, k, v)
        return meta["agent"]

    def restore(self, source) -> dict:
        """Load a checkpoint: a path, or the "last" / "previous" one; returns its meta."""
        payload, meta, rng = self.store.load(source)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scaler.load_state_dict(payload["scaler"])
        self.rng_state = {"cpu": rng["torch_rng"],
                          "cuda": rng["cuda_rng"][0] if self.cuda_rng and rng["cuda_rng"] else None}
        if self.cuda_rng and self.rng_state["cuda"] is None:
            self.rng_state["cuda"] = torch.cuda.get_rng_state()
        self.sampler.generator.set_state(rng["sampler_rng"])
        self.state = type(self.state)(**meta["state"])
        self.multiplier = meta["multiplier"] if "multiplier" in meta else meta["agent"]["multiplier"]
        if self.layered:
            self.group_multipliers, self.trust = list(meta["group_multipliers"]), list(meta["trust"])
        if self.hparam_multipliers:
            self.hparam_multipliers = dict(meta["hparam_multipliers"])
        self.set_weight_decay()  # the optimizer's state brought the saving run's: this run's config decides
        self.stats.reset()
        self.stats.weights_at_eval = payload.get("weights_at_eval")
        if self.stats.weights_at_eval is None:  # saved at an evaluation: the reference is the weights just loaded
            self.stats.weights_at_eval = self.stats.flat_weights()
        return meta
