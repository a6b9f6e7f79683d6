"""
What the config decides about control, as plain rules no idea about control needs to change: which
hyperparameters an agent may set (--control) and their bounds, the LR groups (--lr_groups), how a policy's
action decodes into one factor per hyperparameter, the action factors (--agent_actions), and what a policy
network is told about all this (PolicyInputs).

The config is read by duck typing; nothing here imports experiment.py or model.py (model.py reads its LR
groups from here). How the knobs are turned in a run (the schedule, Controls) stays in experiment.py.
"""
from __future__ import annotations

import math

import numpy as np

from harness.errors import UserError
from harness.observation import PolicyInputs

# --control: besides the learning rate, an agent may set weight decay, the gradient-clipping norm and dropout,
# each as configured x its own multiplier. (The rate's multiplier is the agent's `multiplier`, as ever.)
CONTROLLABLE = ("lr", "weight_decay", "grad_clip", "dropout")
CONTROL_BOUNDS = {"weight_decay": (0.125, 8.0), "grad_clip": (0.125, 8.0), "dropout": (0.25, 2.0)}
DROPOUT_MAX = 0.5  # dropout x its multiplier never goes above this


def controlled(cfg) -> list[str]:
    """The controlled hyperparameters, in CONTROLLABLE's order (which fixes the order of an action's factors)."""
    names = {n.strip() for n in cfg.control.split(",") if n.strip()}
    return [n for n in CONTROLLABLE if n in names]


def extra_controlled(cfg) -> list[str]:
    """The controlled hyperparameters besides the learning rate."""
    return [n for n in controlled(cfg) if n != "lr"]


def multi_control(cfg) -> bool:
    return controlled(cfg) != ["lr"]


def apply_control_factors(cfg, multiplier: float, hparam_multipliers: dict,
                          factors: list[float]) -> tuple[float, dict]:
    """(the LR multiplier, the other hyperparameters' multipliers) after one factor per controlled
    hyperparameter, each clipped to its bounds (the rate's: multiplier_min..multiplier_max)."""
    hparams = dict(hparam_multipliers)
    for name, factor in zip(controlled(cfg), factors):
        if name == "lr":
            multiplier = min(max(multiplier * factor, cfg.multiplier_min), cfg.multiplier_max)
        else:
            low, high = CONTROL_BOUNDS[name]
            hparams[name] = min(max(hparams[name] * factor, low), high)
    return multiplier, hparams


def control_action(cfg, action, n_actions: int) -> list[int]:
    """One action index per controlled hyperparameter, from a vector (MultiDiscrete) or from one index into
    their product (the flattened action set a Discrete-only agent such as DQN acts in)."""
    n = len(controlled(cfg))
    flat = np.asarray(action).reshape(-1)
    if flat.size == 1 and n > 1:
        return [int(a) for a in np.unravel_index(int(flat[0]), [n_actions] * n)]
    return [int(a) for a in flat]


# --lr_groups layer: one group per layer (model.py's lr_group_of says which parameters make up each; the
# tied token embedding is also the output layer: it belongs to "embedding").

def lr_groups_kind(cfg) -> str:
    return cfg.lr_groups or ("layer" if cfg.layer_trust != "none" else "global")


def lr_group_names(cfg) -> list[str]:
    """The LR groups from the input to the output; ["all"] when one multiplier drives the whole model."""
    if lr_groups_kind(cfg) != "layer":
        return ["all"]
    return ["embedding"] + [f"block{i}" for i in range(cfg.n_layer)] + ["ln_f"]


def parse_actions(text: str) -> list[float]:
    """--agent_actions "0.5,0.8,1,1.25,2" -> the factors an action multiplies the multiplier by."""
    try:
        actions = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--agent_actions must be comma-separated numbers, got {text!r}") from None
    if not actions or any(a <= 0 or not math.isfinite(a) for a in actions):
        raise UserError(f"--agent_actions must be positive factors, got {text!r}")
    return actions


def policy_inputs(cfg) -> PolicyInputs:
    """What the config decides about a policy network's inputs and outputs (harness/observation.py)."""
    return PolicyInputs(layered=lr_groups_kind(cfg) == "layer", controls=tuple(controlled(cfg)),
                        extra_controls=tuple(extra_controlled(cfg)), agent=cfg.agent)
