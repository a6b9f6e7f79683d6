"""Gradient statistics of a training run between two evaluations (what an agent observes beside the losses),
and LAMB's per-layer trust ratio.

Per step, a few small ops on the device add up the gradient norm, its square and whether it was clipped
(per LR group too, when the run has several); they are read once per evaluation (one host sync), folded into
the run's checkpointed state, and turned into the interval's statistics: gradient-norm mean and std, share
of clipped steps, and the update-to-weight ratio against a copy of the weights taken at the last evaluation.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class GradientStatistics:
    """Device-side sums since the last evaluation, for params split into LR groups by group_index."""

    def __init__(self, params: list, group_index: list[int], group_names: list[str], device: torch.device):
        self.params = params  # the order of flat_weights()
        self.param_sizes = [p.numel() for p in params]
        self.group_names = group_names
        self.layered = len(group_names) > 1
        self.param_groups_index = torch.tensor(group_index, device=device)
        self.group_grad_stats = torch.zeros(2, len(group_names), device=device)
        # Gradient-norm sum, sum of squares, clipped steps: on the device, read once per evaluation.
        self.grad_stats = torch.zeros(3, device=device)
        self.weights_at_eval: Optional[torch.Tensor] = None  # for the update-to-weight ratio

    def add(self, norm: torch.Tensor, clipped: torch.Tensor) -> None:
        self.grad_stats += torch.stack((norm, norm * norm, clipped))

    def clip_by_group(self, grad_clip: float) -> None:
        """Clip by the global norm as clip_grad_norm_ does (grad_clip 0: no clipping), and keep each group's
        gradient norm too: the per-parameter norms it needs anyway, summed by group (a few small ops per
        step, on the device). The gradients must be unscaled already."""
        norms = torch.stack(torch._foreach_norm([p.grad for p in self.params]))  # as clip_grad_norm_ computes
        total = torch.linalg.vector_norm(norms)
        if grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, grad_clip, total)
        by_group = torch.zeros_like(self.group_grad_stats[0]).index_add_(0, self.param_groups_index, norms * norms)
        self.group_grad_stats += torch.stack((by_group.sqrt(), by_group))
        self.add(total, (total > grad_clip).float() if grad_clip > 0 else torch.zeros_like(total))

    def reset(self) -> None:
        """Forget the device-side sums (a checkpoint was restored: its state holds the sums it had)."""
        self.grad_stats.zero_()
        self.group_grad_stats.zero_()

    def flush(self, state) -> None:
        """Move the device-side sums into the (checkpointed) state: one host sync."""
        sums = self.grad_stats.tolist()
        state.grad_sums = [a + b for a, b in zip(state.grad_sums, sums)]
        self.grad_stats.zero_()
        if self.layered:
            group_sums = self.group_grad_stats.tolist()
            kept = state.group_grad_sums or [[0.0] * len(self.group_names)] * 2
            state.group_grad_sums = [[a + b for a, b in zip(k, g)] for k, g in zip(kept, group_sums)]
            self.group_grad_stats.zero_()

    def interval_statistics(self, state) -> dict:
        """Gradient norms (mean, std, share clipped) of the steps since the previous evaluation and the
        relative weight change over them; then start the next interval."""
        self.flush(state)
        total, squares, clipped = state.grad_sums
        n = state.grad_steps
        stats = {}
        if n and math.isfinite(total):
            mean = total / n
            stats = {"grad_norm_mean": mean, "grad_norm_std": math.sqrt(max(squares / n - mean * mean, 0.0)),
                     "clip_fraction": clipped / n}
        weights = self.flat_weights()
        with torch.no_grad():
            if self.weights_at_eval is not None and n:
                stats["update_ratio"] = float(torch.linalg.vector_norm(weights - self.weights_at_eval)
                                              / torch.linalg.vector_norm(weights).clamp_min(1e-12))
            if self.layered:
                stats["groups"] = self.group_statistics(state, weights, n)
        self.weights_at_eval = weights
        state.grad_sums, state.grad_steps = [0.0, 0.0, 0.0], 0
        state.group_grad_sums = []
        return stats

    def group_statistics(self, state, weights: torch.Tensor, steps: int) -> list[dict]:
        """Per LR group: mean and std of its gradient norm over the interval's steps, the rms of its weights and
        their change relative to their norm: sums over slices of the flat weight copies already made."""
        def by_group(flat: torch.Tensor) -> list[float]:
            squares = torch.stack([chunk.square().sum() for chunk in flat.split(self.param_sizes)])
            return torch.zeros(len(self.group_names), device=flat.device).index_add_(
                0, self.param_groups_index, squares).tolist()
        weight_sq = by_group(weights)
        change_sq = by_group(weights - self.weights_at_eval) if self.weights_at_eval is not None and steps else None
        sums, squares = state.group_grad_sums or [[0.0] * len(self.group_names)] * 2
        sizes = torch.zeros(len(self.group_names)).index_add_(
            0, self.param_groups_index.cpu(), torch.tensor(self.param_sizes, dtype=torch.float32)).tolist()
        groups = []
        for k, name in enumerate(self.group_names):
            g = {"name": name, "weight_rms": math.sqrt(weight_sq[k] / sizes[k])}
            if steps and math.isfinite(sums[k]):
                mean = sums[k] / steps
                g.update(grad_norm_mean=mean, grad_norm_std=math.sqrt(max(squares[k] / steps - mean * mean, 0.0)))
            if change_sq is not None:
                g["update_ratio"] = math.sqrt(change_sq[k] / max(weight_sq[k], 1e-24))
            groups.append(g)
        return groups

    def flat_weights(self) -> torch.Tensor:
        """Every parameter in one float32 vector (a copy): the reference of the update-to-weight ratio."""
        return torch.cat([p.detach().flatten().float() for p in self.params])


def lamb_trust(optimizer: torch.optim.Optimizer, optimizer_groups: list, n_groups: int, trust_clip: float,
               device: torch.device) -> Optional[list[float]]:
    """LAMB's trust ratio (You et al. 2020) per layer: |w| / |u| over the layer's matrices (LAMB leaves
    norms and biases unadapted), u the Adam update direction of the step just taken,
    m_hat / (sqrt(v_hat) + eps) + weight_decay x w, read from the optimizer's state. LAMB multiplies a
    much larger base rate by the raw ratio; here the ratios are normalised to geometric mean 1 over the
    layers, so the schedule keeps its scale and the rule only redistributes it between layers, then
    clipped to [1/trust_clip, trust_clip]. optimizer_groups: (LR group, holds matrices) of each param group.
    None when no layer has an update yet (the trust stays as it was). One host sync."""
    weight_sq = torch.zeros(n_groups, device=device)
    update_sq = torch.zeros(n_groups, device=device)
    for group, (index, matrices) in zip(optimizer.param_groups, optimizer_groups):
        if not matrices:
            continue
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            step = float(state["step"])
            update = (state["exp_avg"] / (1 - beta1 ** step)
                      / ((state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt() + group["eps"])
                      + group["weight_decay"] * p.detach())
            update_sq[index] += update.float().square().sum()
            weight_sq[index] += p.detach().float().square().sum()
    adapted = update_sq > 0
    if not bool(adapted.any()):
        return None
    log_ratio = 0.5 * (weight_sq.clamp_min(1e-30).log() - update_sq.clamp_min(1e-30).log())
    log_ratio = log_ratio - log_ratio[adapted].mean()
    factor = log_ratio.exp().clamp(1 / trust_clip, trust_clip)
    return torch.where(adapted, factor, torch.ones_like(factor)).tolist()
