"""Config validation that no idea edits: each field against the bounds declared beside it (Config's
`_opt(..., bounds="[0, 1)")` metadata), the torchrun checks, and the warnings about a trained policy's
provenance. Config is read by duck typing (any dataclass whose fields carry "bounds" metadata)."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Optional

from harness.control import CONTROLLABLE, lr_groups_kind, multi_control
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


def check_combinations(c, sb3_agents: tuple) -> None:
    """Settings that contradict each other or miss what they need (sb3_agents: deployed frozen, from a folder)."""
    if c.n_embd % c.n_head:
        raise UserError(f"--n_embd {c.n_embd} must be divisible by --n_head {c.n_head}")
    if c.optimizer == "schedulefree" and c.schedule != "constant":
        raise UserError("--optimizer schedulefree replaces the schedule (it warms up itself): use --schedule constant")
    if c.agent_init and not Path(c.agent_init).expanduser().exists():
        raise UserError(f"--agent_init {c.agent_init} does not exist")
    if c.agent_freeze and c.agent_learn:
        raise UserError("--agent_freeze and --agent_learn contradict each other")
    if c.agent in sb3_agents and not c.agent_init:
        raise UserError(f"--agent {c.agent} needs --agent_init DIR: a policy trained by train_agent.py --agent {c.agent}")
    if c.agent in sb3_agents and c.agent_learn:
        raise UserError(f"--agent {c.agent} is deployed frozen (stable-baselines3 learns in its own loop: "
                        f"train it further with train_agent.py); drop --agent_learn")


def check_lr_groups(c, per_group_agents: tuple) -> None:
    """--lr_groups and --layer_trust, and an agent that can set a multiplier per group (the first: none)."""
    if c.layer_trust != "none" and c.lr_groups == "global":
        raise UserError(f"--layer_trust {c.layer_trust} scales each layer's rate: it needs --lr_groups layer "
                        f"(the default with it)")
    if c.layer_trust != "none" and c.optimizer != "adamw":
        raise UserError(f"--layer_trust {c.layer_trust} reads AdamW's moments: use --optimizer adamw")
    if lr_groups_kind(c) == "layer" and c.agent not in per_group_agents:
        raise UserError(f"--agent {c.agent} sets one global multiplier: use --lr_groups global, or a per-layer "
                        f"agent ({', '.join(per_group_agents[1:])})")


def check_control(c, control_agents: tuple) -> None:
    """--control names known hyperparameters with something to multiply, and an agent that sets them all."""
    names = [n.strip() for n in c.control.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTROLLABLE]
    if unknown or not names:
        raise UserError(f"--control {c.control!r}: choose from {','.join(CONTROLLABLE)} (comma-separated)")
    if not multi_control(c):
        return
    if c.agent not in control_agents:
        raise UserError(f"--agent {c.agent} sets the learning rate only: use --control lr, or an agent that sets "
                        f"several ({', '.join(control_agents[1:])})")
    if lr_groups_kind(c) == "layer":
        raise UserError("--control with more than lr and --lr_groups layer cannot be combined: choose one")
    for name, value in (("weight_decay", c.weight_decay), ("grad_clip", c.grad_clip), ("dropout", c.dropout)):
        if name in names and value <= 0:
            raise UserError(f"--control {name}: the configured --{name} is 0, so its multiplier would do "
                            f"nothing; set --{name} above 0 (or leave it out of --control)")


def check_world(c, world: World) -> None:
    """Under torchrun the global batch is the configured one (batch_size x gradient_accumulation_steps
    sequences), shared among the ranks (World.batch_split): refused when they cannot share it evenly, unless
    --batch_grows_with_world gives every rank all of it."""
    sequences = c.batch_size * c.gradient_accumulation_steps
    if world.distributed and not c.batch_grows_with_world and sequences % world.size:
        raise UserError(f"a global batch of {sequences} sequences (--batch_size {c.batch_size} x "
                        f"--gradient_accumulation_steps {c.gradient_accumulation_steps}) cannot be shared among "
                        f"{world.size} processes: make it a multiple of {world.size}, or --batch_grows_with_world "
                        f"to give every process all of it ({world.size}x the batch)")


def world_warnings(c, world: World) -> list[str]:
    if not world.distributed or not c.batch_grows_with_world:
        return []
    return [f"--batch_grows_with_world: each of {world.size} processes takes {c.gradient_accumulation_steps} "
            f"micro-batch(es) of {c.batch_size} sequences per step, {world.size}x one process's global batch"]


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
