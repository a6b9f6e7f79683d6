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


def logging_nowhere(model):
    """A stable-baselines3 model that keeps its training statistics in memory only. Left to itself, every
    learn() without a tensorboard_log makes an empty folder /tmp/SB3-<date-time> (its logger.configure):
    one per PPO update of a training, hundreds in a study."""
    from stable_baselines3.common.logger import Logger
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


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
    """A softmax policy over the action factors, a value head, and the batched REINFORCE update with a learned
    baseline (Williams 1992; Sutton and Barto, section 13.4).

    add_episode(steps) keeps a finished run's decisions; every `batch` runs, update() takes one Adam step on
    the policy: each decision's log-probability is raised in proportion to its advantage, the discounted
    return from that decision on minus the value head's estimate of it from the same features (a baseline
    that depends on the observation, so it does not bias the gradient), normalised to mean 0 and std 1 over
    the batch; an entropy bonus (weight `entropy`) keeps the policy from collapsing early. Then the value
    head takes VALUE_STEPS Adam steps toward the batch's returns. A decision over a group table (--lr_groups
    layer) drew its rows independently: its log-probability is the sum over its rows, its value their mean.
    A step without an action (the continuation the loop forced after a rollback) counts in the returns of
    the decisions before it and is not itself learned."""

    VALUE_STEPS = 10

    def __init__(self, n_features: int, n_actions: int, hidden: int, lr: float, gamma: float, seed: int,
                 batch: int = 8, entropy: float = 0.01):
        with torch.random.fork_rng(devices=[]):  # the networks' init must not move anyone else's RNG
            torch.manual_seed(seed)
            self.policy = PolicyMLP(n_features, n_actions, hidden)
            self.value = PolicyMLP(n_features, 1, hidden)
        self.hidden, self.gamma, self.batch, self.entropy = hidden, gamma, batch, entropy
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=lr)
        self.generator = torch.Generator().manual_seed(seed)  # action sampling: its own stream
        self.pending: list[list[dict]] = []  # the runs since the last update
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

    def add_episode(self, steps: list[dict]) -> None:
        """A finished run's steps ({"iter", "features", "action", "reward"}); a full batch updates."""
        if any(s["action"] is not None for s in steps):
            self.pending.append(steps)
        if len(self.pending) >= self.batch:
            self.update()

    def returns(self, steps: list[dict]) -> list[float]:
        """Each step's discounted return-to-go."""
        out, g = [], 0.0
        for s in reversed(steps):
            g = s["reward"] + self.gamma * g
            out.append(g)
        return out[::-1]

    def update(self) -> None:
        """One policy-gradient step over the pending runs' decisions, then the value head's steps."""
        decisions = [(s, g) for steps in self.pending for s, g in zip(steps, self.returns(steps))
                     if s["action"] is not None]
        self.pending = []
        features = torch.tensor([s["features"] for s, _ in decisions])  # (decisions, [groups,] features)
        actions = torch.tensor([s["action"] for s, _ in decisions])
        returns = torch.tensor([g for _, g in decisions], dtype=torch.float32)
        with torch.no_grad():
            advantages = returns - self.values(features)
        if len(decisions) > 1:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        log_probs = torch.log_softmax(self.policy(features), dim=-1)
        chosen = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        if chosen.dim() == 2:  # a decision's groups drew independently: its log-probability is their sum
            chosen, entropy = chosen.sum(dim=1), entropy.sum(dim=1)
        loss = -(chosen * advantages).mean() - self.entropy * entropy.mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        for _ in range(self.VALUE_STEPS):
            value_loss = torch.nn.functional.mse_loss(self.values(features), returns)
            self.value_optimizer.zero_grad()
            value_loss.backward()
            self.value_optimizer.step()
        self.updates += 1

    def values(self, features: torch.Tensor) -> torch.Tensor:
        """The value head's estimate of each decision's return (a group table: the mean over its rows)."""
        v = self.value(features).squeeze(-1)
        return v.mean(dim=1) if v.dim() == 2 else v

    def state_dict(self) -> dict:
        return {"hidden": self.hidden, "policy": tensors_to_json(self.policy.state_dict()),
                "optimizer": tensors_to_json(self.optimizer.state_dict()),
                "value": tensors_to_json(self.value.state_dict()),
                "value_optimizer": tensors_to_json(self.value_optimizer.state_dict()), "pending": self.pending,
                "generator": self.generator.get_state().tolist(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.load_policy(state)
        self.pending = [list(steps) for steps in state.get("pending", [])]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def load_policy(self, state: dict) -> None:
        """What a later run takes from a trained one: the networks and their optimizers."""
        if "value" not in state:
            raise UserError("the reinforce policy predates the value baseline (an earlier version of the "
                            "learner): retrain it with train_agent.py")
        try:
            self.policy.load_state_dict(tensors_from_json(state["policy"]))
            self.optimizer.load_state_dict(tensors_from_json(state["optimizer"], int_keys=True))
            self.value.load_state_dict(tensors_from_json(state["value"]))
            self.value_optimizer.load_state_dict(tensors_from_json(state["value_optimizer"], int_keys=True))
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"the reinforce policy does not fit a network with {self.hidden} hidden "
                            f"units ({type(e).__name__}); set --policy_hidden {state.get('hidden')}") from e
        self.updates = state.get("updates", 0)
