"""Config validation that no idea edits: each field against the bounds declared beside it (Config's
`_opt(..., bounds="[0, 1)")` metadata), the torchrun checks, and the warnings about a trained policy's
provenance. Config is read by duck typing (any dataclass whose fields carry "bounds" metadata)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from harness.distributed import World
from harness.errors import UserError


def parse_bounds(text: str) -> tuple[float, float, bool, bool]:
    """"[0, 1)" -> (0.0, 1.0, True, False): low, high, and whether each end is included."""
    low, high = (float(x) for x in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def check_bounds(f: dataclasses.Field, value) -> None:
    """One field against the interval declared beside it in Config; non-finite numbers never pass."""
    name, bounds = f.name, f.metadata["bounds"]
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not math.isfinite(value):
        raise UserError(f"--{name} must be a finite number, got {value}")
    low, high, low_in, high_in = parse_bounds(bounds)
    if value < low or value > high or (value == low and not low_in) or (value == high and not high_in):
        raise UserError(f"--{name} must be in {bounds}, got {value}")


def check_fields(c) -> None:
    """Every field of the config against its own bounds."""
    for f in dataclasses.fields(c):
        check_bounds(f, getattr(c, f.name))


def check_world(c, world: World) -> None:
    """Under torchrun the configured micro-batches are divided among the ranks: they must divide evenly."""
    accumulation = c.gradient_accumulation_steps
    if world.distributed and accumulation > world.size and accumulation % world.size:
        raise UserError(f"--gradient_accumulation_steps {accumulation} cannot be divided among {world.size} "
                        f"processes: use a multiple of {world.size}")


def world_warnings(c, world: World) -> list[str]:
    accumulation = c.gradient_accumulation_steps
    if not world.distributed or accumulation >= world.size:
        return []
    return [f"{world.size} processes and --gradient_accumulation_steps {accumulation}: each rank takes one "
            f"micro-batch per step, so a step averages {world.size} micro-batches of {c.batch_size} sequences, "
            f"{world.size / accumulation:g}x one process's batch (set it to a multiple of {world.size} to keep that)"]


def policy_warnings(c, dataset: str, policy: Optional[dict], per_layer: bool) -> list[str]:
    """A trained policy evaluated on a seed it was trained on is not a held-out result, and one trained on
    another dataset or profile is a transfer: say so. per_layer: the run has a multiplier per layer."""
    if policy is None:
        return []
    manifest, warnings = policy["manifest"], []
    overlap = sorted(set(manifest.get("seeds") or []) & set(range(c.seed_base, c.seed_base + c.seeds)))
    if overlap:
        warnings.append(f"seeds {overlap} were among the policy's training seeds: not held out")
    for key, here in (("dataset", dataset), ("profile", c.profile)):
        if manifest.get(key) not in (None, here):
            warnings.append(f"the policy was trained with {key} {manifest.get(key)}, deployed with {here}")
    trained_layers = (manifest.get("config") or {}).get("n_layer")
    if per_layer and trained_layers not in (None, c.n_layer):
        warnings.append(f"the per-layer policy was trained on {trained_layers} layers, deployed on {c.n_layer}")
    return warnings


def config_warnings(c) -> list[str]:
    """Settings that may be meant (a warmup-only study, a decay cut short) but usually are not:
    printed once and recorded in run.json."""
    warnings = []
    if c.schedule != "constant" and c.warmup_iters >= c.max_iters:
        warnings.append(f"--warmup_iters {c.warmup_iters} >= --max_iters {c.max_iters}: the rate never reaches "
                        f"--learning_rate {c.learning_rate}")
    if c.schedule == "cosine" and c.lr_decay_iters > c.max_iters:
        warnings.append(f"--lr_decay_iters {c.lr_decay_iters} > --max_iters {c.max_iters}: training stops "
                        f"before the cosine decay reaches --min_lr")
    return warnings


def check_fits(c, data) -> None:
    """A window is block_size + 1 tokens: each split must hold more (data: a loaded dataset, by duck typing)."""
    for split in ("train", "val"):
        if len(data.splits[split]) <= c.block_size + 1:
            raise UserError(f"--block_size {c.block_size} is larger than {data.name}'s {split} split "
                            f"({len(data.splits[split])} tokens)")


def check_rate_bounds(c) -> None:
    """The rate's floor, ceiling, peak and decay agree with each other (the last of validate's checks)."""
    if c.lr_floor > c.lr_ceiling:
        raise UserError(f"--lr_floor {c.lr_floor} is above --lr_ceiling {c.lr_ceiling}")
    if c.learning_rate > c.lr_ceiling:
        raise UserError(f"--learning_rate {c.learning_rate} is above --lr_ceiling {c.lr_ceiling}")
    if c.schedule in ("cosine", "wsd") and c.min_lr > c.learning_rate:
        raise UserError(f"--min_lr {c.min_lr} is above --learning_rate {c.learning_rate}: the {c.schedule} "
                        f"decay would rise; set --min_lr at or below the learning rate")
    if c.schedule == "cosine" and c.lr_decay_iters < c.warmup_iters:
        raise UserError(f"--lr_decay_iters {c.lr_decay_iters} is shorter than --warmup_iters {c.warmup_iters}: "
                        f"the rate would drop from its peak to min_lr in one step")
