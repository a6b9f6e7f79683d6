"""Controllers that learn across runs: each learns the best action of a synthetic task with a known answer,
and a saved policy, reloaded the way experiment.py deploys it, acts exactly as the trained one did.

The synthetic task stands in for a training run: ten decisions, each action lowers the val loss by a
known amount, one action (x1.5, not the neutral x1) lowers it most. Our own agents (reinforce,
qlearning) see it as experiment.Observation records, stable-baselines3's (ppo, dqn) as a gymnasium env
with the same observation features and reward.
"""
import json

import gymnasium as gym
import numpy as np
import pytest
import torch

import experiment as ex
from harness.observation import OBSERVATION_FEATURES, OBSERVATION_LIMIT, PolicyInputs, observation_features
from harness.policy_files import POLICY_MANIFEST
import train_agent as ta

ACTIONS = [0.1, 0.5, 1.0, 1.5, 2.0]
BEST = 3          # x1.5
DECISIONS = 10
INTERVAL = 100


def gain(action: int, rng) -> float:
    """Loss drop of one interval: the best action gains 0.03 more than the others, plus noise."""
    return (0.06 if action == BEST else 0.03) + rng.normal(0, 0.005)


def observation(k, loss, prev, first, multiplier):
    return ex.Observation(k * INTERVAL, DECISIONS * INTERVAL, loss, loss, prev_val_loss=prev, first_val_loss=first,
                          multiplier=multiplier, lr=1e-3 * multiplier, base_lr=1e-3, vocab_size=65)


def play(agent, rng, start_loss=2.5):
    """One synthetic run driven by one of experiment.py's agents (as experiment.drive drives it)."""
    agent.start_run()
    loss, prev, records = start_loss, None, []
    for k in range(DECISIONS + 1):
        record = agent.observe(observation(k, loss, prev, start_loss, agent.multiplier))
        records.append(record)
        if record["action"] is None:
            break
        prev, loss = loss, loss - gain(record["action"], rng)
    return records


class SyntheticEnv(gym.Env):
    """The same task as a gymnasium env, for stable-baselines3; `cfg` sizes the controller as a run's would."""

    def __init__(self, seed=0):
        self.cfg = ex.Config(max_iters=DECISIONS * INTERVAL, eval_interval=INTERVAL)
        self.action_space = gym.spaces.Discrete(len(ACTIONS))
        self.observation_space = gym.spaces.Box(-OBSERVATION_LIMIT, OBSERVATION_LIMIT,
                                                (len(OBSERVATION_FEATURES),), np.float32)
        self.rng = np.random.default_rng(seed)

    def obs(self):
        return observation_features(observation(self.k, self.loss, self.prev, 2.5, self.multiplier))

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k, self.loss, self.prev, self.multiplier = 0, 2.5, None, 1.0
        return self.obs(), {}

    def step(self, action):
        self.prev = self.loss
        self.loss -= gain(int(action), self.rng)
        self.multiplier = min(max(self.multiplier * ACTIONS[int(action)], 0.125), 8.0)
        self.k += 1
        return self.obs(), ex.reward_for("improvement", self.prev, self.loss), self.k >= DECISIONS, False, {}


def cfg_for(agent, **kw):
    return ex.Config(agent=agent, agent_actions=",".join(map(str, ACTIONS)), **kw)


def write_policy_folder(folder, agent, policy_file):
    ex.atomic_write_json(folder / POLICY_MANIFEST, {"agent": agent, "observation": PolicyInputs().spec(),
                                                       "actions": ACTIONS, "policy_file": policy_file})


# --- each learner learns the known best action --------------------------------------------------

def train_own_agent(agent_name, episodes, seed=0):
    cfg = cfg_for(agent_name, reward="improvement")
    agent = ex.AGENTS[agent_name](cfg, seed)
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        play(agent, rng)
    return agent


def frozen_copy(agent):
    copy = ex.AGENTS[agent.cfg.agent](ex.dataclasses.replace(agent.cfg, agent_freeze=True), seed=99)
    copy.load_state_dict(agent.state_dict())
    return copy


@pytest.mark.parametrize("agent_name,episodes", [("reinforce", 300), ("qlearning", 600)])
def test_our_agents_learn_the_best_action_of_a_synthetic_task(agent_name, episodes):
    """Budget: 300 runs of 10 decisions (reinforce), 600 (qlearning), carried across runs in one agent object."""
    greedy = frozen_copy(train_own_agent(agent_name, episodes))
    actions = [r["action"] for r in play(greedy, np.random.default_rng(7)) if r["action"] is not None]
    assert len(actions) == DECISIONS
    assert np.mean(np.array(actions) == BEST) >= 0.9, actions


def test_an_untrained_reinforce_policy_explores_every_action():
    agent = ex.AGENTS["reinforce"](cfg_for("reinforce"), 0)
    rng = np.random.default_rng(0)
    taken = {r["action"] for _ in range(5) for r in play(agent, rng)[:-1]}
    assert taken == set(range(len(ACTIONS)))


@pytest.mark.parametrize("agent_name,steps", [("ppo", 3000), ("dqn", 3000)])
def test_stable_baselines3_controllers_learn_the_best_action_of_a_synthetic_task(agent_name, steps):
    """Budget: 3,000 decisions (300 runs), with the controller sized by train_agent.sb3_controller."""
    env = SyntheticEnv()
    model = ta.sb3_controller(ta.Args(agent=agent_name, seed=0), env)
    model.learn(total_timesteps=steps)
    obs, _ = env.reset()
    actions = []
    for _ in range(DECISIONS):
        action, _ = model.predict(obs, deterministic=True)
        actions.append(int(action))
        obs, *_ = env.step(action)
    assert np.mean(np.array(actions) == BEST) >= 0.9, actions


def test_ppo_is_sized_in_evaluations_not_in_its_atari_defaults():
    env = SyntheticEnv()
    ppo = ta.sb3_controller(ta.Args(agent="ppo", episodes_per_update=2), env)
    dqn = ta.sb3_controller(ta.Args(agent="dqn"), env)
    assert ppo.n_steps == 2 * DECISIONS  # 2048 by default: it would never update in a short training
    assert dqn.target_update_interval == 2 * DECISIONS and dqn.learning_starts == 2 * DECISIONS


# --- each learner learns a rule that depends on its observation ------------------------------------
# At every decision the rate is found x4 too low or x4 too high (drawn afresh, shown in the multiplier the
# agent observes); an interval gains most when the action brings the multiplier nearest x1. So the best
# action is x2 when too low and x0.5 when too high: a policy that ignores its observation is right half the time.

DRIFTED = (0.25, 4.0)


def best_for(multiplier: float) -> int:
    return int(np.argmin([abs(np.log2(multiplier * a)) for a in ACTIONS]))


def drifted_gain(multiplier_after: float, rng) -> float:
    return 0.06 - 0.03 * abs(np.log2(multiplier_after)) + rng.normal(0, 0.005)


def play_drifted(agent, rng, start_loss=2.5):
    """One synthetic run; returns whether each decision picked the best action for its state."""
    agent.start_run()
    loss, prev, correct = start_loss, None, []
    for k in range(DECISIONS + 1):
        agent.multiplier = m = float(rng.choice(DRIFTED))  # the rate drifted: the agent finds it there
        record = agent.observe(observation(k, loss, prev, start_loss, m))
        if record["action"] is None:
            break
        correct.append(record["action"] == best_for(m))
        prev, loss = loss, loss - drifted_gain(m * ACTIONS[record["action"]], rng)
    return correct


class DriftedEnv(SyntheticEnv):
    def obs(self):
        self.multiplier = float(self.rng.choice(DRIFTED))
        return observation_features(observation(self.k, self.loss, self.prev, 2.5, self.multiplier))

    def step(self, action):
        self.prev, self.k = self.loss, self.k + 1
        self.loss -= drifted_gain(self.multiplier * ACTIONS[int(action)], self.rng)
        return self.obs(), ex.reward_for("improvement", self.prev, self.loss), self.k >= DECISIONS, False, {}


def deployed_greedy(agent):
    """The trained agent as experiment.make_agent deploys it: frozen (qlearning pools its table, epsilon 0)."""
    greedy = ex.AGENTS[agent.cfg.agent](ex.dataclasses.replace(agent.cfg, agent_freeze=True), seed=99)
    greedy.inherit([agent.state_dict()]) if agent.cfg.agent == "qlearning" else greedy.load_state_dict(agent.state_dict())
    return greedy


@pytest.mark.parametrize("agent_name,episodes", [("reinforce", 400), ("qlearning", 600)])
def test_our_agents_learn_a_rule_that_depends_on_the_observation(agent_name, episodes):
    """Budget: 400 runs of 10 decisions (reinforce: 50 updates of 8 runs), 600 (qlearning)."""
    agent = ex.AGENTS[agent_name](cfg_for(agent_name, reward="improvement"), 0)
    rng = np.random.default_rng(0)
    for _ in range(episodes):
        play_drifted(agent, rng)
    greedy = deployed_greedy(agent)
    correct = [c for k in range(20) for c in play_drifted(greedy, np.random.default_rng(100 + k))]
    assert np.mean(correct) >= 0.9, np.mean(correct)


@pytest.mark.parametrize("agent_name", ["ppo", "dqn"])
def test_stable_baselines3_controllers_learn_a_rule_that_depends_on_the_observation(agent_name):
    """Budget: 6,000 decisions (600 runs; ppo: 75 updates of 8 runs), sized by train_agent.sb3_controller."""
    env = DriftedEnv()
    model = ta.sb3_controller(ta.Args(agent=agent_name, seed=0), env)
    model.learn(total_timesteps=6000)
    correct = []
    for _ in range(20):
        obs, _ = env.reset()
        for _ in range(DECISIONS):
            action, _ = model.predict(obs, deterministic=True)
            correct.append(int(action) == best_for(env.multiplier))
            obs, *_ = env.step(action)
    assert np.mean(correct) >= 0.9, np.mean(correct)


# --- a saved policy reloads and acts identically -------------------------------------------------

def probe_observations(n=40, seed=3):
    rng = np.random.default_rng(seed)
    return [observation(int(rng.integers(DECISIONS)), 2.5 - rng.random(), 2.5 - rng.random() * 0.9, 2.5,
                        float(2.0 ** rng.integers(-3, 4))) for _ in range(n)]


@pytest.mark.parametrize("agent_name", ["ppo", "dqn"])
def test_a_saved_stable_baselines3_policy_reloads_and_acts_identically(agent_name, tmp_path):
    model = ta.sb3_controller(ta.Args(agent=agent_name, seed=1), SyntheticEnv())
    model.learn(total_timesteps=300)
    model.save(tmp_path / "policy.zip")
    write_policy_folder(tmp_path, agent_name, "policy.zip")
    deployed = ex.make_agent(cfg_for(agent_name, agent_init=str(tmp_path)), 0, "shakespeare_char", 0)
    for obs in probe_observations():
        expected, _ = model.predict(observation_features(obs), deterministic=True)
        assert deployed.observe(obs)["action"] == int(expected)


@pytest.mark.parametrize("agent_name", ["reinforce", "qlearning"])
def test_a_saved_policy_of_our_agents_reloads_and_acts_identically(agent_name, tmp_path):
    trained = train_own_agent(agent_name, 40)
    ex.atomic_write_json(tmp_path / "policy.json", trained.state_dict())
    write_policy_folder(tmp_path, agent_name, "policy.json")
    deployed = ex.make_agent(cfg_for(agent_name, agent_init=str(tmp_path)), 5, "shakespeare_char", 0)
    assert deployed.cfg.agent_freeze  # a trained policy is deployed frozen
    reference = frozen_copy(trained)
    assert [r["action"] for r in play(deployed, np.random.default_rng(1))] == \
        [r["action"] for r in play(reference, np.random.default_rng(1))]
    if agent_name == "reinforce":  # and its network is the trained one, weight for weight
        for a, b in zip(deployed.learner.policy.parameters(), trained.learner.policy.parameters()):
            assert torch.equal(a, b)


def test_a_frozen_reinforce_agent_learns_nothing_and_an_unfrozen_one_updates_once_per_batch_of_runs():
    for learn in (False, True):
        agent = ex.AGENTS["reinforce"](cfg_for("reinforce", agent_freeze=not learn, policy_batch=3), 0)
        before = [p.detach().clone() for p in agent.learner.policy.parameters()]
        rng = np.random.default_rng(0)
        for _ in range(2):
            play(agent, rng)
        assert agent.learner.updates == 0  # two runs of a batch of three: nothing yet
        play(agent, rng)
        changed = any(not torch.equal(a, b) for a, b in zip(before, agent.learner.policy.parameters()))
        assert changed == learn and agent.learner.updates == int(learn)


def test_observation_features_are_finite_bounded_and_named():
    obs = observation(3, 2.0, 2.1, 2.5, 4.0)
    features = observation_features(obs)
    assert features.dtype == np.float32 and features.shape == (len(OBSERVATION_FEATURES),)
    named = dict(zip(OBSERVATION_FEATURES, features))
    assert named["progress"] == pytest.approx(0.3)
    assert named["dlog_val_prev"] == pytest.approx(np.log(2.0 / 2.1))
    assert named["log2_multiplier"] == pytest.approx(2 / 3)
    extreme = ex.dataclasses.replace(obs, val_loss=float("nan"), grad_norm_mean=1e30, grad_norm_std=0.0,
                                     update_ratio=0.0)
    values = observation_features(extreme)
    assert np.all(np.isfinite(values)) and np.all(np.abs(values) <= OBSERVATION_LIMIT)
    json.dumps(PolicyInputs().spec())
