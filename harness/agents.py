"""
What every agent shares, and the neural agents that no idea about control needs to open.

Agent is the plumbing under experiment.py's agents (NoAgent and every agent there inherit it): the
multipliers and their bounds, one per LR group (--lr_groups layer) or per controlled hyperparameter
(--control), the record each evaluation logs, the trajectory --agent replay plays back, and the state saved
with every checkpoint. The interface the training loop knows is described in experiment.py, section 5.

ReinforceAgent (trained across runs by train_agent.py, or learning online) and SB3Agent (a stable-baselines3
ppo or dqn policy, deployed frozen) act on harness/observation.py's features. What experiment.py decides for
them (the action factors, the reward) arrives as arguments; nothing here imports experiment.py.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from harness.control import (apply_control_factors, control_action, controlled, extra_controlled, lr_group_names,
                             lr_groups_kind, multi_control, policy_inputs)
from harness.controllers import ReinforceLearner
from harness.errors import UserError
from harness.observation import OBSERVATION_LIMIT
from harness.policy_files import load_sb3_policy, sb3_spaces


class Agent:
    """The multipliers an agent sets, within their bounds, and what it records. Its multiplier stays 1.

    Under --lr_groups layer an agent that acts per group (PER_GROUP) also holds group_multipliers, one per
    LR group, which it sets instead of the global multiplier (that one then only takes rollback cuts).
    Under --control with more than lr, an agent that sets several hyperparameters (MULTI_CONTROL) holds
    hparam_multipliers too, one per controlled hyperparameter besides the rate, and acts with one factor
    per controlled hyperparameter (apply_controls)."""

    PER_GROUP = False
    MULTI_CONTROL = False

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.n_groups = len(lr_group_names(cfg)) if self.PER_GROUP and lr_groups_kind(cfg) == "layer" else 0
        self.multiplier, self.trajectory = 1.0, []
        self.group_multipliers = [1.0] * self.n_groups if self.n_groups else None
        self.controls = controlled(cfg) if self.MULTI_CONTROL and multi_control(cfg) else None
        self.hparam_multipliers = {n: 1.0 for n in extra_controlled(cfg)} if self.controls else None

    def clip(self, multiplier: float) -> float:
        return min(max(multiplier, self.cfg.multiplier_min), self.cfg.multiplier_max)

    def apply(self, factors: list[float]) -> None:
        """Multiply each group's multiplier by its factor, within the bounds."""
        self.group_multipliers = [self.clip(m * f) for m, f in zip(self.group_multipliers, factors)]

    def apply_controls(self, factors: list[float]) -> None:
        """One factor per controlled hyperparameter (controlled(cfg) order), each within its bounds."""
        self.multiplier, self.hparam_multipliers = apply_control_factors(self.cfg, self.multiplier,
                                                                         self.hparam_multipliers, factors)

    def start_run(self, seed: Optional[int] = None) -> None:
        """A new run begins with this agent (train_agent.py): the multipliers start at 1 again. seed: the
        run's, to reseed what the agent draws from (a learner's exploration), so an episode's draws depend
        on the episode, not on how many ran before it in this process."""
        self.multiplier, self.trajectory = 1.0, []
        self.group_multipliers = [1.0] * self.n_groups if self.n_groups else None
        self.hparam_multipliers = {n: 1.0 for n in extra_controlled(self.cfg)} if self.controls else None

    def observe(self, obs) -> dict:
        return self.record(obs, action=None, reward=None, epsilon=None, state=None)

    def on_rollback(self, diverged_loss: float, it: int, final: bool = False) -> None:
        """The run diverged after this agent's last decision and was rolled back: take a smaller step
        (final: the rollbacks are spent and the seed ends here).

        The trajectory is corrected to the multiplier the optimizer now uses, so --agent replay plays
        back what was used, not what was chosen before the rollback."""
        if final:
            return
        self.multiplier = self.clip(self.multiplier * self.cfg.rollback_cut)
        if self.trajectory:
            self.trajectory[-1]["multiplier"] = self.multiplier

    def record(self, obs, **fields) -> dict:
        groups = {} if self.group_multipliers is None else {"multipliers": list(self.group_multipliers)}
        if self.hparam_multipliers is not None:
            groups["hparam_multipliers"] = dict(self.hparam_multipliers)
        self.trajectory.append({"iter": obs.it, "multiplier": self.multiplier, **groups})
        return {"multiplier": self.multiplier, **groups, **fields}

    def state_dict(self) -> dict:
        groups = {} if self.group_multipliers is None else {"group_multipliers": self.group_multipliers}
        if self.hparam_multipliers is not None:
            groups["hparam_multipliers"] = self.hparam_multipliers
        return {"agent": self.cfg.agent, "multiplier": self.multiplier, "trajectory": self.trajectory, **groups}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier, self.trajectory = state["multiplier"], [dict(t) for t in state["trajectory"]]
        self.group_multipliers = state.get("group_multipliers")
        if self.controls:
            self.hparam_multipliers = dict(state.get("hparam_multipliers") or self.hparam_multipliers)


class ReinforceAgent(Agent):
    """REINFORCE (Williams 1992), the policy-gradient agent of "Dynamic learning-rate adjustment using RL".

    At each evaluation the policy network maps policy_inputs(cfg).features() to a softmax over the action
    factors and one is sampled; when the run ends its decisions go to harness.controllers.ReinforceLearner,
    which updates every --policy_batch runs (advantages: return-to-go minus a learned value of the same
    observation, normalised over the batch; an entropy bonus). Frozen (a trained policy deployed): the most
    probable action (--agent_sample: sampled as in training), no update. A diverged interval scores as a
    val loss at the divergence threshold plus --divergence_penalty; the interval the loop then re-runs with
    the cut multiplier is a step without an action, whose reward still counts in the return of the decisions
    before it. --lr_groups layer: the same network picks one action per group row, and all rows share the
    run's reward.

    actions: the factors (experiment.agent_actions); reward(prev_val, val, reference_gain): an interval's
    reward (experiment.reward_for of the run's --reward), None before there is one.
    """

    PER_GROUP = True

    def __init__(self, cfg, seed: int, actions: list[float], reward: Callable[..., Optional[float]]):
        super().__init__(cfg, seed)
        self.actions, self.reward = actions, reward
        self.learner = ReinforceLearner(policy_inputs(cfg).count(), len(self.actions), cfg.policy_hidden,
                                        cfg.policy_lr, cfg.policy_gamma, seed, cfg.policy_batch, cfg.policy_entropy)
        self.start_run()

    def start_run(self, seed: Optional[int] = None) -> None:
        super().start_run(seed)
        self.prev_val = None
        self.steps: list[dict] = []  # {"iter", "features", "action", "reward"} of this run's decisions
        if seed is not None:
            self.learner.generator.manual_seed(seed)

    @property
    def learning(self) -> bool:
        return not self.cfg.agent_freeze

    def observe(self, obs) -> dict:
        reward = self.reward(self.prev_val, obs.val_loss, obs.reference_gain)
        if self.steps and self.steps[-1]["reward"] is None:
            self.steps[-1]["reward"] = reward
        self.prev_val = obs.val_loss
        if obs.it >= obs.max_iters:  # the last evaluation: no decision left; learn from the whole run
            self.end_run()
            return self.record(obs, action=None, reward=reward, epsilon=None, state=None)
        features = policy_inputs(self.cfg).features(obs)
        action, probs = self.learner.act(features, sample=self.learning or self.cfg.agent_sample)
        if self.group_multipliers is not None:
            self.apply([self.actions[a] for a in action])
        else:
            self.multiplier = self.clip(self.multiplier * self.actions[action])
        self.steps.append({"iter": obs.it, "features": features.tolist(), "action": action, "reward": None})
        return self.record(obs, action=action, reward=reward, epsilon=None, state=None,
                           probs=np.round(probs, 4).tolist() if self.n_groups else [round(p, 4) for p in probs])

    def on_rollback(self, diverged_loss: float, it: int, final: bool = False) -> None:
        super().on_rollback(diverged_loss, it, final)
        if self.steps and self.steps[-1]["reward"] is None:  # (vs_reference: no reference gain for it)
            self.steps[-1]["reward"] = self.reward(self.prev_val, diverged_loss, 0.0) + self.cfg.divergence_penalty
        if final:
            self.end_run()
        elif self.steps:  # the re-run interval: its reward lands here at the next evaluation
            self.steps.append({"iter": self.steps[-1]["iter"], "features": None, "action": None, "reward": None})

    def end_run(self) -> None:
        """Hand this run's scored steps to the learner (nothing when frozen)."""
        steps = [s for s in self.steps if s["reward"] is not None]
        self.steps = []
        if self.learning and steps:
            self.learner.add_episode(steps)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "actions": self.actions, "observation": policy_inputs(self.cfg).spec(),
                **self.learner.state_dict(), "prev_val": self.prev_val, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.check_policy(state)
        self.learner.load_state_dict(state)
        self.prev_val, self.steps = state["prev_val"], state["steps"]

    def load_policy(self, state: dict) -> None:
        """What a later run takes from a trained one: the networks and their optimizers."""
        self.check_policy(state)
        self.learner.load_policy(state)

    def check_policy(self, state: dict) -> None:
        if state.get("actions") != self.actions:
            raise UserError(f"the reinforce policy has actions {state.get('actions')}, this run {self.actions}")
        if state.get("observation") != policy_inputs(self.cfg).spec():
            raise UserError(f"the reinforce policy observes {state.get('observation')}, this run "
                            f"{policy_inputs(self.cfg).spec()}: retrain it (or match --lr_groups)")


class SB3Agent(Agent):
    """A stable-baselines3 PPO or DQN policy trained by train_agent.py, deployed frozen: at each evaluation
    the policy's most likely action on policy_inputs(cfg).features() (stable-baselines3 is imported by the
    loader). --lr_groups layer: the policy observes one group row and is applied to every row of the table, as
    train_agent.py trained it (each group an agent of one shared policy), whatever the depth.
    --control with more than lr: one factor per controlled hyperparameter (ppo: MultiDiscrete; dqn: one
    index into their product, decoded by control_action). policy: harness.policy_files.read_policy_folder's."""

    PER_GROUP = True
    MULTI_CONTROL = True

    def __init__(self, cfg, seed: int, actions: list[float], policy: dict):
        super().__init__(cfg, seed)
        self.actions = actions
        # The spaces and network width come from this run's settings and the manifest, never from the zip.
        inputs = policy_inputs(cfg)
        spaces = sb3_spaces(inputs.count(), inputs.action_sizes(len(self.actions)), OBSERVATION_LIMIT)
        hidden = (policy["manifest"].get("controller") or {}).get("hidden", cfg.policy_hidden)
        self.model = load_sb3_policy(Path(policy["file"]), cfg.agent, *spaces, hidden=hidden)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng_state = torch.get_rng_state()

    def observe(self, obs) -> dict:
        if obs.it >= obs.max_iters:
            return self.record(obs, action=None, reward=None, epsilon=None, state=None)
        with torch.random.fork_rng(devices=[]):  # --agent_sample draws from the agent's own stream
            torch.set_rng_state(self.rng_state)
            action, _ = self.model.predict(policy_inputs(self.cfg).features(obs),
                                           deterministic=not self.cfg.agent_sample)
            self.rng_state = torch.get_rng_state()
        if self.controls is not None:  # one factor per controlled hyperparameter
            action = control_action(self.cfg, action, len(self.actions))
            self.apply_controls([self.actions[a] for a in action])
        elif self.group_multipliers is not None:  # a batch of rows: one action each
            action = [int(a) for a in action]
            self.apply([self.actions[a] for a in action])
        else:
            action = int(action)
            self.multiplier = self.clip(self.multiplier * self.actions[action])
        return self.record(obs, action=action, reward=None, epsilon=None, state=None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng": self.rng_state.tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "rng" in state:
            self.rng_state = torch.tensor(state["rng"], dtype=torch.uint8)
