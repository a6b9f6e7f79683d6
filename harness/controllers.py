"""The neural controllers' learners: the policy network, its optimizer and the REINFORCE update.

harness.agents.ReinforceAgent is the agent (what it observes, when it decides and learns); this is what it
learns with, kept apart because no idea about control needs to touch it. Its state is JSON (tensors as
nested lists), so a trained policy is read as data.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from harness.errors import UserError


def tensors_to_json(obj):
    """A (nested) state_dict with tensors -> JSON-safe lists, exactly (float32 survives a float repr)."""
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.tolist(), "dtype": str(obj.dtype)[6:]}
    if isinstance(obj, dict):
        return {str(k): tensors_to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [tensors_to_json(v) for v in obj]
    return obj


def tensors_from_json(obj, int_keys: bool = False):
    if isinstance(obj, dict) and set(obj) == {"tensor", "dtype"}:
        return torch.tensor(obj["tensor"], dtype=getattr(torch, obj["dtype"]))
    if isinstance(obj, dict):
        return {(int(k) if int_keys and k.isdigit() else k): tensors_from_json(v, int_keys) for k, v in obj.items()}
    if isinstance(obj, list):
        return [tensors_from_json(v, int_keys) for v in obj]
    return obj


class PolicyMLP(nn.Module):
    """Observation features -> one logit per action: one hidden layer, as the seed experiment's agent."""

    def __init__(self, n_features: int, n_actions: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))

    def forward(self, x):
        return self.net(x)


class ReinforceLearner:
    """A softmax policy over the action factors and the REINFORCE update (Williams 1992).

    `learn(steps)` raises every decision's log-probability in proportion to its advantage: the discounted
    return from that decision on, minus the usual return at that iteration over earlier runs (a running
    mean; it depends on the iteration only, so it does not bias the gradient, and it removes most of the
    variance: with the improvement reward every return is roughly "loss now minus final loss", large
    early, small late). One Adam step per call. A decision over a group table (--lr_groups layer) drew its
    rows independently: its log-probability is the sum over its rows."""

    def __init__(self, n_features: int, n_actions: int, hidden: int, lr: float, gamma: float, seed: int):
        with torch.random.fork_rng(devices=[]):  # the network's init must not move anyone else's RNG
            torch.manual_seed(seed)
            self.policy = PolicyMLP(n_features, n_actions, hidden)
        self.hidden, self.gamma = hidden, gamma
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)  # action sampling: its own stream
        self.baseline: dict[str, list] = {}  # str(iter) -> [mean return, count]
        self.updates = 0

    def act(self, features: np.ndarray, sample: bool):
        """One action (features of one decision), or one per row (a group table): (action(s), probabilities)."""
        with torch.no_grad():
            probs = torch.softmax(self.policy(torch.as_tensor(features)), dim=-1)
        if sample:
            actions = torch.multinomial(probs, 1, generator=self.generator).flatten()
        else:
            actions = torch.argmax(probs, dim=-1).flatten()
        return (actions.tolist() if features.ndim == 2 else int(actions)), probs.tolist()

    def advantages(self, steps: list[dict]) -> list[float]:
        """Each decision's discounted return-to-go minus the running mean at its iteration (then updated)."""
        returns, g = [], 0.0
        for s in reversed(steps):
            g = s["reward"] + self.gamma * g
            returns.append(g)
        returns.reverse()
        advantages = []
        for s, g in zip(steps, returns):
            mean, count = self.baseline.get(str(s["iter"]), (g, 0))
            advantages.append(g - mean)
            count += 1
            self.baseline[str(s["iter"])] = [mean + max(0.1, 1.0 / count) * (g - mean), count]
        return advantages

    def learn(self, steps: list[dict]) -> None:
        """One policy-gradient step over a run's decisions ({"iter", "features", "action", "reward"})."""
        advantages = self.advantages(steps)
        features = torch.tensor([s["features"] for s in steps])  # (decisions, [groups,] features)
        actions = torch.tensor([s["action"] for s in steps])
        log_probs = torch.log_softmax(self.policy(features), dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        if log_probs.dim() == 2:  # a decision's groups drew independently: its log-probability is their sum
            log_probs = log_probs.sum(dim=1)
        loss = -(log_probs * torch.tensor(advantages, dtype=torch.float32)).sum()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1

    def state_dict(self) -> dict:
        return {"hidden": self.hidden, "policy": tensors_to_json(self.policy.state_dict()),
                "optimizer": tensors_to_json(self.optimizer.state_dict()), "baseline": self.baseline,
                "generator": self.generator.get_state().tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.load_policy(state)
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def load_policy(self, state: dict) -> None:
        """What a later run takes from a trained one: the network, its optimizer and the return baseline."""
        try:
            self.policy.load_state_dict(tensors_from_json(state["policy"]))
            self.optimizer.load_state_dict(tensors_from_json(state["optimizer"], int_keys=True))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"the reinforce policy does not fit a network with {self.hidden} hidden "
                            f"units ({type(e).__name__}); set --policy_hidden {state.get('hidden')}") from e
        self.baseline = {k: list(v) for k, v in state.get("baseline", {}).items()}
        self.updates = state.get("updates", 0)
