"""
The observation vector of the neural controllers (reinforce, ppo, dqn): the features a policy network sees after
each evaluation, as train_agent.py's environment and a deployed policy both compute them. A policy folder records
PolicyInputs.spec(); a policy trained on another definition is refused at deployment.

Plain data in, numpy out: the observation is read by duck typing (experiment.Observation's attributes), and what
the config decides arrives as a PolicyInputs (harness.control.policy_inputs builds it). Nothing here imports experiment.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# Change a feature: bump the version.
OBSERVATION_FEATURES = (
    "progress",          # it / max_iters
    "val_loss",          # val loss / log(vocab): 1 = a uniform guess, the same scale on every dataset
    "dlog_val_prev",     # log L_t - log L_{t-1}  (0 at the first evaluation)
    "dlog_val_first",    # log L_t - log L_0
    "train_val_gap",     # log L_val - log L_train (overfitting shows as > 0)
    "log2_multiplier",   # / 3: +-1 at x8 and x1/8
    "log_lr",            # log10(rate in effect) + 3: 0 at 1e-3
    "log_base_lr",       # log10(--learning_rate) + 3: how the schedule was set
    "log_grad_norm",     # log10(mean gradient norm since the previous evaluation)
    "grad_norm_cv",      # its std / mean: gradient noise
    "clip_fraction",
    "log_update_ratio",  # log10(relative weight change since the previous evaluation) + 2
)
# --lr_groups layer: a policy sees one row per LR group, the features above followed by these, and picks
# one action per row. The same network serves every row (SOLAR's shared per-group policy), so a policy
# trained on one depth runs on any other.
GROUP_FEATURES = (
    "depth",                   # the group's place from the input (0) to the output (1)
    "log_group_grad_norm",     # log10(its mean gradient norm since the previous evaluation)
    "group_grad_snr",          # log10(mean / std of that norm across the steps): steady gradients > 0
    "log_weight_rms",          # log10(rms of its weights) + 1
    "log_group_update_ratio",  # log10(|its weight change since the previous evaluation| / |its weights|) + 2
    "log2_group_multiplier",   # / 3
)
OBSERVATION_VERSION = 1
OBSERVATION_LIMIT = 10.0  # every feature is clipped to +-this (a gymnasium Box needs bounds)


@dataclass(frozen=True)
class PolicyInputs:
    """What the config decides about a policy's inputs and outputs (the defaults: one learning rate, global)."""
    layered: bool = False        # --lr_groups layer: one row per LR group, GROUP_FEATURES after the shared ones
    controls: tuple = ("lr",)    # --control: the controlled hyperparameters, in the order of an action's factors
    extra_controls: tuple = ()   # those besides lr: log2(multiplier) / 3 of each follows the features above
    agent: str = ""              # dqn acts in one Discrete space

    def control_features(self) -> list[str]:
        return [f"log2_{name}_multiplier" for name in self.extra_controls]

    def spec(self) -> dict:
        """The definition a policy folder records (its manifest's "observation")."""
        spec = {"version": OBSERVATION_VERSION, "features": list(OBSERVATION_FEATURES)}
        if self.layered:
            spec["group_features"] = list(GROUP_FEATURES)
        if self.extra_controls:
            spec["control_features"] = self.control_features()
        return spec

    def count(self) -> int:
        """Inputs of a policy network: per decision (global), or per group row (--lr_groups layer)."""
        return len(OBSERVATION_FEATURES) + (len(GROUP_FEATURES) if self.layered else 0) + len(self.extra_controls)

    def action_sizes(self, n_actions: int) -> list[int]:
        """A policy's action space as a list of choice counts: [n] for one decision (per group row, with
        --lr_groups layer); with --control, one n per controlled hyperparameter, or for dqn, which acts in a
        Discrete space only, the one product n^k (harness.control.control_action decodes it)."""
        k = len(self.controls)
        if k == 1:
            return [n_actions]
        return [n_actions ** k] if self.agent == "dqn" else [n_actions] * k

    def features(self, obs) -> np.ndarray:
        if self.layered:
            return group_observation_features(obs)
        features = observation_features(obs)
        if self.extra_controls:  # the other hyperparameters' multipliers
            own = [math.log2(obs.hparams[name]) / 3 for name in self.extra_controls]
            features = np.concatenate([features, np.array(own, dtype=np.float32)])
        return features


def _log10(x: Optional[float]) -> Optional[float]:
    return math.log10(x) if x is not None and x > 0 and math.isfinite(x) else None


def observation_features(obs) -> np.ndarray:
    """The normalised float32 vector of OBSERVATION_FEATURES; statistics not yet gathered are 0."""
    log_val = math.log(max(obs.val_loss, 1e-12))
    grad, ratio = _log10(obs.grad_norm_mean), _log10(obs.update_ratio)
    values = [
        obs.it / max(1, obs.max_iters),
        obs.val_loss / math.log(max(2, obs.vocab_size)),
        log_val - math.log(obs.prev_val_loss) if obs.prev_val_loss else 0.0,
        log_val - math.log(obs.first_val_loss) if obs.first_val_loss else 0.0,
        log_val - math.log(max(obs.train_loss, 1e-12)),
        math.log2(obs.multiplier) / 3,
        math.log10(max(obs.lr, 1e-12)) + 3,
        math.log10(obs.base_lr) + 3,
        grad if grad is not None else 0.0,
        obs.grad_norm_std / obs.grad_norm_mean if grad is not None and obs.grad_norm_std is not None else 0.0,
        obs.clip_fraction or 0.0,
        ratio + 2 if ratio is not None else 0.0,
    ]
    return np.clip(np.nan_to_num(np.array(values, dtype=np.float32)), -OBSERVATION_LIMIT, OBSERVATION_LIMIT)


def group_observation_features(obs) -> np.ndarray:
    """(groups, OBSERVATION_FEATURES + GROUP_FEATURES) float32: the shared features on every row, then the
    group's own; statistics not yet gathered are 0."""
    shared = observation_features(obs)
    rows = []
    for k, g in enumerate(obs.groups):
        grad, ratio, rms = _log10(g.get("grad_norm_mean")), _log10(g.get("update_ratio")), _log10(g.get("weight_rms"))
        std = g.get("grad_norm_std")
        snr = _log10(g["grad_norm_mean"] / max(std, 1e-12)) if grad is not None and std is not None else None
        rows.append([k / max(1, len(obs.groups) - 1), grad if grad is not None else 0.0,
                     snr if snr is not None else 0.0, rms + 1 if rms is not None else 0.0,
                     ratio + 2 if ratio is not None else 0.0, math.log2(g["multiplier"]) / 3])
    own = np.nan_to_num(np.array(rows, dtype=np.float32))
    table = np.concatenate([np.repeat(shared[None, :], len(rows), axis=0), own], axis=1)
    return np.clip(table, -OBSERVATION_LIMIT, OBSERVATION_LIMIT)
