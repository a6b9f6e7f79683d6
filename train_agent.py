"""
Train a learning-rate controller across many short training runs (episodes); deploy it frozen after.

    python train_agent.py --agent ppo --dataset shakespeare_char --episodes 100 --profile tiny \
        --lr_range 0.1,10 --out_dir agents/ppo
    python experiment.py --out_dir run_6 --profile tiny --datasets shakespeare_char \
        --agent ppo --agent_init agents/ppo

Each episode trains one GPT from scratch on a training seed (--seed + episode: a range disjoint from the
evaluation seeds 1337, 1338, ...), its base learning rate optionally drawn log-uniformly from --lr_range
(factors of the profile's), while the controller sets the multiplier at every evaluation.

Controllers:
  reinforce, qlearning   experiment.py's own agents, driven by the same control loop as a CLI run
                         (experiment.drive); their state, RNGs included, is saved after every episode.
  ppo, dqn               stable-baselines3's, driving LRControlEnv: the gymnasium environment over the
                         same experiment.TrainingRun (step = set the multiplier, train to the next evaluation).

The output folder: manifest.json (what was trained, on what, how; versions), the policy (policy.json or
policy.zip; dqn also replay_buffer.npz, plain arrays), learning_curve.json (one record per finished episode) and
learning_curve.png. Kill it and run the same command again: it continues after the last saved episode.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

import experiment as ex
import plot
from harness.cli import dataclass_parser, entry_point, option
from harness.control import apply_control_factors, control_action, multi_control
from harness.controllers import logging_nowhere
from harness.observation import OBSERVATION_LIMIT
from harness.policy_files import POLICY_MANIFEST, load_replay_buffer, load_sb3_policy, save_replay_buffer, sb3_spaces
from harness.records import environment_record, settings_that_differ
from harness.runtime import format_duration
from harness.validation import check_control, check_fits, check_lr_groups

CONTROLLERS = ("reinforce", "ppo", "dqn", "qlearning")


@dataclass
class Args:
    agent: str = option("ppo", "the controller to train", CONTROLLERS)
    dataset: str = option("shakespeare_char", "dataset every episode trains on", ex.DATASETS)
    episodes: int = option(100, "training runs to learn from (a later call with more continues the same folder)")
    profile: str = option("tiny", "experiment.py profile of each episode", ("tiny", "smoke", "cpu", "full"))
    out_dir: str = option("agents/run", "folder for the policy, manifest and learning curve")
    lr_center: float = option(0.0, "the centre of the episodes' base learning rates (default: the profile's "
                                   "learning_rate); centre it on the tuned rate, not on a default known to be off")
    lr_range: str = option("", "draw each episode's base learning rate (and min_lr) log-uniformly from LOW x centre "
                               "to HIGH x centre, e.g. 0.1,10, so the controller learns to correct a mis-set rate; the "
                               "multiplier bounds widen to reach the centre from both ends (x0.1..x10: [1/16, 16])")
    seed: int = option(1_000_000, "episode e trains seed + e (the evaluation seeds are 1337 + index: keep clear)")
    lr_groups: str = option("global", "global: one multiplier for the model; layer: one per layer, chosen by a policy "
                                      "shared across layers (reinforce, ppo)", ("global", "layer"))
    control: str = option("lr", "hyperparameters the policy sets, from lr,weight_decay,grad_clip,dropout (ppo: one "
                                "factor each, MultiDiscrete; dqn: one index into their product)")
    reward: str = option("", "default improvement (-delta val loss) for reinforce/ppo/dqn, neg_val_loss for "
                             "qlearning; vs_reference: the improvement minus the same seed's reference run's",
                         ("neg_val_loss", "improvement", "log_improvement", "vs_reference"))
    agent_actions: str = option("", "action factors; default 0.1,0.5,1,1.5,2 (qlearning: 0.5,0.8,1,1.25,2)")
    hidden: int = option(128, "hidden units of the policy / Q network (one hidden layer)")
    controller_lr: float = option(0.0, "the controller's own learning rate; 0 = its default (reinforce 1e-3, "
                                       "ppo 3e-4, dqn 1e-3; qlearning: alpha 0.1)")
    gamma: float = option(0.99, "discount (reinforce, ppo, dqn; qlearning keeps --set gamma=...)")
    episodes_per_update: int = option(8, "episodes per update: ppo (n_steps = this x decisions, one minibatch, "
                                         "advantages normalised over it) and reinforce (its batch)")
    n_envs: int = option(1, "episodes run at once, each in its own process (ppo, dqn: stable-baselines3's "
                            "SubprocVecEnv; reinforce, qlearning: worker processes)")
    threads_per_env: int = option(0, "torch threads of each episode process and of the policy updates (0: the "
                                     "cores divided among --n_envs)")
    reference_dir: str = option("", "--reward vs_reference: where the reference runs (--agent none, same seed and "
                                    "base LR) are cached and shared; default: references/ beside --out_dir")
    set: str = option("", "experiment.py settings for every episode, e.g. max_iters=2000,eval_interval=200")
    data_dir: str = option("", "as experiment.py --data_dir")
    source_dir: str = option("", "as experiment.py --source_dir")
    debug: bool = option(False, "full tracebacks")


# ----------------------------------------------------------------------------------------------
# Episodes: which run, at which learning rate
# ----------------------------------------------------------------------------------------------

def parse_lr_range(text: str) -> Optional[tuple[float, float]]:
    if not text:
        return None
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ex.UserError(f"--lr_range must be two factors LOW,HIGH, e.g. 0.1,10; got {text!r}") from None
    if not (0 < low <= high) or not math.isfinite(high):
        raise ex.UserError(f"--lr_range must satisfy 0 < LOW <= HIGH, got {text!r}")
    return low, high


def instance(args: Args, episode: int) -> tuple[int, float]:
    """Episode -> (training seed, base-LR factor); a function of the episode index, so a resumed
    training draws what the uninterrupted one would have."""
    lr_range = parse_lr_range(args.lr_range)
    if lr_range is None:
        return args.seed + episode, 1.0
    u = np.random.default_rng([args.seed, episode]).random()
    low, high = map(math.log, lr_range)
    return args.seed + episode, float(math.exp(low + u * (high - low)))


def episode_run(cfg: ex.Config, data: ex.CharDataset, rt: ex.Runtime, seed: int, lr_factor: float) -> ex.TrainingRun:
    """One episode's training run: checkpoints in memory, nothing written."""
    cfg = dataclasses.replace(cfg, seed_base=seed, learning_rate=cfg.learning_rate * lr_factor,
                              min_lr=cfg.min_lr * lr_factor)
    return ex.TrainingRun(cfg, data, 0, rt, checkpoint=None)


# What only the controller reads: a reference run (--agent none) does not depend on these.
AGENT_FIELDS = ("agent", "agent_actions", "reward", "epsilon", "epsilon_decay", "epsilon_min", "agent_lr", "gamma",
                "agent_init", "agent_freeze", "agent_sample", "oracle_lr", "agent_learn", "policy_hidden", "policy_lr",
                "policy_gamma", "policy_batch", "policy_entropy", "control")


class References:
    """--reward vs_reference: each episode's reference run (the same config, seed and base LR, --agent none),
    as its val loss by iteration. Cached in `folder` under the digest of its whole config (what a controller
    sets left out), so every episode and every training that needs one runs it once."""

    def __init__(self, cfg: ex.Config, data: ex.CharDataset, rt: ex.Runtime, folder: Path):
        self.cfg, self.data, self.rt, self.folder = cfg, data, rt, Path(folder)

    def __call__(self, seed: int, lr_factor: float) -> tuple[dict, int]:
        """(iteration -> val loss of the reference run, optimizer steps spent on it now: 0 when cached)."""
        run = episode_run(dataclasses.replace(self.cfg, agent="none"), self.data, self.rt, seed, lr_factor)
        config = {k: v for k, v in dataclasses.asdict(run.cfg).items() if k not in AGENT_FIELDS}
        file = self.folder / f"{hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]}.json"
        cached = ex.read_json(file) if file.exists() else {}
        if cached.get("config") == config:
            return {int(it): loss for it, loss in cached["val_loss"].items()}, 0
        ex.drive(run, ex.NoAgent(run.cfg, seed))
        curve = {r["iter"]: r["val/loss"] for r in run.state.val_log}
        self.folder.mkdir(parents=True, exist_ok=True)
        ex.atomic_write_json(file, {"config": config, "val_loss": {str(it): v for it, v in curve.items()}})
        return curve, run.steps_taken


def decisions_per_episode(cfg: ex.Config) -> int:
    return math.ceil(cfg.max_iters / cfg.eval_interval)  # every evaluation but the last


def episode_record(episode: int, run: ex.TrainingRun, lr_factor: float, decisions: list[dict], ret: float,
                   status: str, seconds: float, reference_steps: int = 0) -> dict:
    """One line of the learning curve; `steps` charges the episode's run and its reference run, if computed."""
    s = run.state
    return {"episode": episode, "seed": run.seed, "lr_factor": lr_factor, "base_lr": run.cfg.learning_rate,
            "return": ret, "final_val_loss": run.last_eval_losses()[1], "best_val_loss": s.best_val_loss,
            "status": status, "rollbacks": s.rollbacks, "decisions": len(decisions),
            "lr_trajectory": [[d["iter"], d["lr"]] for d in decisions],
            "multipliers": [d["multiplier"] for d in decisions], "actions": [d.get("action") for d in decisions],
            **({"group_multipliers": [d["multipliers"] for d in decisions],
                "lr_groups": [d["lr_groups"] for d in decisions]} if run.layered else {}),
            **({"hparams": [d["hparams"] for d in decisions]} if run.hparam_multipliers else {}),
            "steps": run.steps_taken + reference_steps, "reference_steps": reference_steps, "seconds": seconds,
            "train_seconds": s.elapsed - s.agent_time}


# ----------------------------------------------------------------------------------------------
# The environment
# ----------------------------------------------------------------------------------------------

class LRControlEnv(gym.Env):
    """Learning-rate control of one GPT training run as a gymnasium environment.

    reset(): a new run for the next episode's (seed, base LR), advanced to its first evaluation. The
        episodes' instances are fixed by `instance`; reset(seed=...) rewinds to the first one, so the same
        seed replays the same sequence of runs (the seed also seeds np_random, which nothing here draws from).
    step(a): multiply the LR multiplier by actions[a] (clipped to its bounds), train to the next evaluation.
    Observation: harness.observation's features (float32, clipped to +-OBSERVATION_LIMIT).
    Reward: experiment.reward_for() on the val loss. A divergence scores as a val loss at the divergence
    threshold plus divergence_penalty (below every interval that did not diverge); the run is rolled back
    to the evaluation where the action was taken, with the multiplier cut, and the agent decides again
    there; once the rollbacks are spent the episode terminates. The last evaluation terminates it too.
    No files, no printing; info carries the evaluation, and at the end "episode_record".

    --lr_groups layer: the observation is a table, one row per LR group (group_observation_features),
    and the action one factor per group (MultiDiscrete), applied to that group's multiplier. A divergence
    cuts the global multiplier, as in a CLI run. GroupsAsAgents presents it to stable-baselines3 as one
    agent per group sharing one policy.
    """

    metadata = {"render_modes": []}

    def __init__(self, cfg: ex.Config, data: ex.CharDataset, rt: ex.Runtime, instance=None, first_episode: int = 0,
                 references: Optional[References] = None, episode_stride: int = 1):
        self.cfg, self.data, self.rt, self.references = cfg, data, rt, references
        self.instance = instance or (lambda episode: (cfg.seed_base + episode, 1.0))
        self.episode_stride = episode_stride  # --n_envs N: env k of N plays episodes k, k + N, ...
        self.actions = ex.agent_actions(cfg)
        self.reward_kind = ex.reward_kind(cfg)
        self.layered = ex.lr_groups_kind(cfg) == "layer"
        self.multi = multi_control(cfg)
        self.inputs = ex.policy_inputs(cfg)
        n_groups, n_features = len(ex.lr_group_names(cfg)), self.inputs.count()
        if self.layered:  # a table; GroupsAsAgents shows stable-baselines3 one row at a time
            self.action_space = spaces.MultiDiscrete([len(self.actions)] * n_groups)
            self.observation_space = spaces.Box(-OBSERVATION_LIMIT, OBSERVATION_LIMIT, (n_groups, n_features),
                                                np.float32)
        else:  # the spaces a deployed or continued policy is loaded with (harness.policy_files)
            self.observation_space, self.action_space = sb3_spaces(
                n_features, self.inputs.action_sizes(len(self.actions)), OBSERVATION_LIMIT)
        self.first_episode = self.next_episode = first_episode
        self.run: Optional[ex.TrainingRun] = None

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            self.next_episode = self.first_episode
        self.episode = self.next_episode
        self.next_episode += self.episode_stride
        run_seed, self.lr_factor = self.instance(self.episode)
        self.run = episode_run(self.cfg, self.data, self.rt, run_seed, self.lr_factor)
        self.reference_steps = attach_reference(self.run, self.references, run_seed, self.lr_factor)
        self.t0, self.ret, self.decisions = time.time(), 0.0, []
        result = self.run.advance()  # the first evaluation, before any step
        self.run.save({})  # what a divergence rolls back to
        return self.observe(), self.info(result)

    def step(self, action):
        run, cfg = self.run, self.run.cfg
        prev_val = run.last_eval_losses()[1]
        it = run.state.last_eval_it
        if self.layered:
            action = [int(a) for a in np.asarray(action).reshape(-1)]
            run.group_multipliers = [self.clip(m * self.actions[a]) for m, a in zip(run.group_multipliers, action)]
        elif self.multi:
            action = control_action(cfg, action, len(self.actions))
            run.multiplier, run.hparam_multipliers = apply_control_factors(
                cfg, run.multiplier, run.hparam_multipliers, [self.actions[a] for a in action])
        else:
            action = int(action)
            run.multiplier = self.clip(run.multiplier * self.actions[action])
        self.decisions.append({"iter": it, "action": action, "multiplier": run.multiplier, "lr": run.lr(it),
                               **({"multipliers": list(run.group_multipliers)} if self.layered else {}),
                               **({"hparam_multipliers": dict(run.hparam_multipliers)} if self.multi else {}),
                               **run.lr_record(it)})
        result = run.advance()
        terminated, status = result.done, "finished"
        if result.diverged:
            reward = (ex.reward_for(self.reward_kind, prev_val, ex.divergence_loss(cfg, run.state.reference_loss), 0.0)
                      + cfg.divergence_penalty)
            rollbacks = run.state.rollbacks + 1
            failed_multiplier, failed_groups = run.multiplier, list(run.group_multipliers)
            failed_hparams = dict(run.hparam_multipliers)
            if run.rollback_before(result.it) is not None and rollbacks <= cfg.max_rollbacks:
                run.state.rollbacks = rollbacks
                run.multiplier = self.clip(failed_multiplier * cfg.rollback_cut)
                run.group_multipliers = failed_groups  # the decision stands; the global cut slows every group
                run.hparam_multipliers = failed_hparams
            else:
                terminated, status = True, "diverged"
                run.state.rollbacks = min(rollbacks, cfg.max_rollbacks)
        else:
            reward = ex.reward_for(self.reward_kind, prev_val, result.val_loss, ex.reference_gain(run.reference, result.it))
            run.save({})
        self.ret += reward
        info = self.info(result)
        if terminated:
            info["episode_record"] = episode_record(self.episode, run, self.lr_factor, self.decisions, self.ret,
                                                    status, time.time() - self.t0, self.reference_steps)
        return self.observe(), float(reward), terminated, False, info

    def clip(self, multiplier: float) -> float:
        return min(max(multiplier, self.cfg.multiplier_min), self.cfg.multiplier_max)

    def observe(self) -> np.ndarray:
        return self.inputs.features(self.run.observation())

    def info(self, result: ex.EvalResult) -> dict:
        return {"it": result.it, "train_loss": result.train_loss, "val_loss": result.val_loss,
                "diverged": result.diverged, "multiplier": self.run.multiplier}


class GroupsAsAgents(VecEnv):
    """A per-layer LRControlEnv as stable-baselines3 sees it: one agent per LR group, all driven by one shared
    policy (parameter sharing, as SOLAR's per-group controller). The G "environments" of this VecEnv are the
    G groups of the same training run: each observes its row of the table, chooses its group's factor and
    receives the run's reward; all end together. The policy's input is one row, so it runs on any depth."""

    def __init__(self, env: LRControlEnv):
        self.env = env
        n_groups, n_features = env.observation_space.shape
        super().__init__(n_groups, *sb3_spaces(n_features, [len(env.actions)], OBSERVATION_LIMIT))
        self.pending = None

    def reset(self):
        observation, _ = self.env.reset(seed=self._seeds[0])
        self._reset_seeds()
        return observation

    def step_async(self, actions) -> None:
        self.pending = actions

    def step_wait(self):
        observation, reward, terminated, truncated, info = self.env.step(self.pending)
        done = terminated or truncated
        infos = [dict(info)] + [{} for _ in range(self.num_envs - 1)]  # the episode is logged once
        if done:
            for i, row in enumerate(observation):
                infos[i].update(terminal_observation=row, **{"TimeLimit.truncated": truncated and not terminated})
            observation, _ = self.env.reset()
        return observation, np.full(self.num_envs, reward, np.float32), np.full(self.num_envs, done), infos

    def close(self) -> None:
        self.env.close()

    def _all(self, indices) -> int:
        return len(range(self.num_envs)[indices] if isinstance(indices, slice) else
                   range(self.num_envs) if indices is None else [indices] if isinstance(indices, int) else indices)

    def get_attr(self, attr_name, indices=None):
        return [getattr(self.env, attr_name)] * self._all(indices)

    def set_attr(self, attr_name, value, indices=None) -> None:
        setattr(self.env, attr_name, value)

    def env_method(self, method_name, *method_args, indices=None, **method_kwargs):
        return [getattr(self.env, method_name)(*method_args, **method_kwargs)] * self._all(indices)

    def env_is_wrapped(self, wrapper_class, indices=None):
        return [False] * self._all(indices)


# ----------------------------------------------------------------------------------------------
# Controllers
# ----------------------------------------------------------------------------------------------

def own_agent_episodes(args: Args, cfg: ex.Config, data, rt, out: Path, log: "Log") -> None:
    """reinforce / qlearning: one agent object carried from episode to episode, driven by experiment.drive,
    the CLI's own control loop; its whole state (table or network, optimizer, RNGs) is saved per episode.
    --n_envs N: chunks of N episodes run in worker processes from the same agent state (parallel_chunk)."""
    agent = ex.make_agent(cfg, args.seed, args.dataset, 0)
    if log.done:
        agent.load_state_dict(ex.read_agent_state(out / "policy.json"))
    save = lambda: ex.atomic_write_json(out / "policy.json", agent.state_dict())  # noqa: E731
    if args.n_envs > 1:
        with EpisodeWorkers(args, cfg, data) as workers:
            while log.done < args.episodes:
                log.episode_done(parallel_chunk(agent, workers, args, log.done), save=save)
        return
    references = references_for(args, cfg, data, rt)
    for episode in range(log.done, args.episodes):
        log.episode_done([play_episode(agent, args, cfg, data, rt, episode, references)], save=save)


def play_episode(agent, args: Args, cfg: ex.Config, data, rt, episode: int, references) -> dict:
    """One episode of an agent of ours, learning as it goes: its learning-curve record."""
    run_seed, lr_factor = instance(args, episode)
    run = episode_run(cfg, data, rt, run_seed, lr_factor)
    reference_steps = attach_reference(run, references, run_seed, lr_factor)
    agent.start_run(seed=run_seed)
    t0 = time.time()
    status = ex.drive(run, agent)
    decisions = [r for r in run.state.val_log if r.get("action") is not None]
    ret = sum(r["reward"] for r in run.state.val_log if r.get("reward") is not None)
    return episode_record(episode, run, lr_factor, decisions, ret, status, time.time() - t0, reference_steps)


class EpisodeWorkers:
    """--n_envs N worker processes for reinforce and qlearning, each with the data loaded once and its own
    torch threads; `map(agent_state, episodes)` plays each episode from that state in a worker and returns
    (record, what the episode taught: reinforce's scored steps, qlearning's table afterwards) in order."""

    def __init__(self, args: Args, cfg: ex.Config, data):
        self.args, self.cfg, self.data = args, cfg, data

    def __enter__(self):
        import concurrent.futures
        import multiprocessing
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.args.n_envs, mp_context=multiprocessing.get_context("forkserver"), initializer=start_worker,
            initargs=(self.args, self.cfg, self.data, threads_per_env(self.args)))
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(cancel_futures=True)

    def map(self, agent_state: dict, episodes: list[int]) -> list:
        return list(self.pool.map(worker_episode, [agent_state] * len(episodes), episodes))


_worker: dict = {}  # a worker process's own (args, cfg, data, rt, references), set once by start_worker


def start_worker(args: Args, cfg: ex.Config, data, threads: int) -> None:
    import torch
    torch.set_num_threads(threads)
    rt = ex.Runtime.choose(cfg)
    _worker.update(args=args, cfg=cfg, data=data, rt=rt, references=references_for(args, cfg, data, rt))


def worker_episode(agent_state: dict, episode: int) -> tuple[dict, object]:
    """In a worker: one episode from the main process's agent state. reinforce does not update here (the
    main process does, over the batch, in episode order); qlearning learns online in its copy of the table."""
    w = _worker
    agent = ex.make_agent(w["cfg"], w["args"].seed, w["args"].dataset, 0)
    agent.load_state_dict({**agent_state, "pending": []} if "pending" in agent_state else agent_state)
    if hasattr(agent, "learner"):
        agent.learner.batch = math.inf
    record = play_episode(agent, w["args"], w["cfg"], w["data"], w["rt"], episode, w["references"])
    if not hasattr(agent, "learner"):
        return record, agent.state_dict()
    return record, agent.learner.pending[-1] if agent.learner.pending else []


def parallel_chunk(agent, workers: EpisodeWorkers, args: Args, first: int) -> list[dict]:
    """The next episodes, run at once from the agent's state; then what they taught goes into the agent.
    reinforce: a chunk never crosses an update, so the result equals running the episodes one by one.
    qlearning: each worker's change to the table is added to it (as if applied to the same table)."""
    size = min(args.n_envs, args.episodes - first)
    if hasattr(agent, "learner"):
        size = min(size, agent.learner.batch - len(agent.learner.pending))
    base = agent.state_dict()
    results = workers.map(base, list(range(first, first + size)))
    if hasattr(agent, "learner"):
        for _, steps in results:
            agent.learner.add_episode(steps)
    else:
        merge_tables(agent, base, [state for _, state in results])
    return [record for record, _ in results]


def merge_tables(agent, base: dict, states: list[dict]) -> None:
    """qlearning after parallel episodes: each one's change to Q, visits, reward baseline and epsilon, added up."""
    q0, v0 = np.asarray(base["q"]), np.asarray(base["visits"])
    agent.q = q0 + sum(np.asarray(s["q"]) - q0 for s in states)
    agent.visits = v0 + sum(np.asarray(s["visits"]) - v0 for s in states)
    baseline = {k: list(v) for k, v in base["baseline"].items()}
    for state in states:
        for it, (mean, count) in state["baseline"].items():
            old_mean, old_count = base["baseline"].get(it, (mean, 0))
            merged = baseline.setdefault(it, [old_mean, old_count])
            merged[0] += mean - old_mean
            merged[1] += count - old_count
    agent.baseline = baseline
    agent.epsilon = max(agent.cfg.epsilon_min,
                        base["epsilon"] * math.prod(s["epsilon"] / max(base["epsilon"], 1e-12) for s in states))


def attach_reference(run: ex.TrainingRun, references: Optional[References], seed: int, lr_factor: float) -> int:
    """Give the run its reference curve (--reward vs_reference); the optimizer steps that took here (0 when
    cached or without references)."""
    if references is None:
        return 0
    run.reference, steps = references(seed, lr_factor)
    return steps


def references_for(args: Args, cfg: ex.Config, data, rt) -> Optional[References]:
    """The reference runs of --reward vs_reference (None for every other reward)."""
    if cfg.reward != "vs_reference":
        return None
    return References(cfg, data, rt, Path(args.reference_dir or Path(args.out_dir).parent / "references"))


def episode_env(args: Args, cfg: ex.Config, data, rt, first_episode: int, stride: int = 1,
                threads: int = 0) -> LRControlEnv:
    """The environment of one stream of episodes: first_episode, first_episode + stride, ... (rt None: chosen
    here, in the env's own process; threads: torch threads of that process)."""
    if threads:
        import torch
        torch.set_num_threads(threads)
    rt = rt or ex.Runtime.choose(cfg)
    return LRControlEnv(cfg, data, rt, instance=lambda e: instance(args, e), first_episode=first_episode,
                        references=references_for(args, cfg, data, rt), episode_stride=stride)


def training_env(args: Args, cfg: ex.Config, data, rt, first_episode: int):
    """What stable-baselines3 learns from: one LRControlEnv (per-layer: GroupsAsAgents over it), or with
    --n_envs N a SubprocVecEnv of N, env k playing episodes first + k, first + k + N, ..."""
    if args.n_envs == 1:
        env = episode_env(args, cfg, data, rt, first_episode)
        return GroupsAsAgents(env) if env.layered else env
    from stable_baselines3.common.vec_env import SubprocVecEnv
    return SubprocVecEnv([functools.partial(episode_env, args, cfg, data, None, first_episode + k, args.n_envs,
                                            threads_per_env(args)) for k in range(args.n_envs)])


def threads_per_env(args: Args) -> int:
    """Torch threads of each parallel episode's process: --threads_per_env, else the cores shared out."""
    return args.threads_per_env or max(1, (os.cpu_count() or 1) // args.n_envs)


def sb3_controller(args: Args, env, cfg: Optional[ex.Config] = None):
    """A stable-baselines3 PPO or DQN sized in evaluations, not in its defaults' Atari-scale steps:
    PPO collects n_steps (2048 by default) per environment before its first update, so n_steps =
    episodes_per_update x decisions (x the groups of GroupsAsAgents in a minibatch); DQN counts
    learning_starts and target_update_interval (10,000 by default) in env steps."""
    from stable_baselines3 import DQN, PPO
    decisions = decisions_per_episode(cfg or (env.cfg if hasattr(env, "cfg") else env.env.cfg))
    policy_kwargs = {"net_arch": [args.hidden]}
    if args.agent == "ppo":  # one minibatch of the whole rollout: SB3 normalises advantages over all of it
        n_envs = env.num_envs if isinstance(env, VecEnv) else 1
        n_steps = args.episodes_per_update // args.n_envs * decisions  # per env (GroupsAsAgents: n_envs 1)
        return PPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps * n_envs, n_epochs=10, gamma=args.gamma,
                   learning_rate=args.controller_lr or 3e-4, ent_coef=0.01, policy_kwargs=policy_kwargs,
                   seed=args.seed, device="cpu", verbose=0)
    return DQN("MlpPolicy", env, learning_rate=args.controller_lr or 1e-3, buffer_size=100_000,
               learning_starts=2 * decisions, batch_size=32, train_freq=1, gradient_steps=1, gamma=args.gamma,
               target_update_interval=2 * decisions, exploration_fraction=0.5, exploration_final_eps=0.05,
               policy_kwargs=policy_kwargs, seed=args.seed, device="cpu", verbose=0)


def sb3_episodes(args: Args, cfg: ex.Config, data, rt, out: Path, log: "Log") -> None:
    """ppo / dqn: stable-baselines3 drives LRControlEnv. Finished episodes are saved together with the
    model after the update that learned from them (PPO: at the start of the next rollout; DQN, which
    updates every step: at once), so a resumed training lacks at most the episodes since that update."""
    from stable_baselines3.common.callbacks import BaseCallback

    env = training_env(args, cfg, data, rt, log.done)
    policy, buffer = out / "policy.zip", out / REPLAY_BUFFER
    if log.done:  # continue: read as data (harness.policy_files), the spaces and width from this training
        model = load_sb3_policy(policy, args.agent, env.observation_space, env.action_space, args.hidden, env=env)
        model.set_random_seed(args.seed + log.done)
        if args.agent == "dqn" and buffer.exists():
            load_replay_buffer(model.replay_buffer, buffer)
    else:
        model = sb3_controller(args, env, cfg)
    logging_nowhere(model)

    def save():
        tmp = out / ".policy.zip.tmp.zip"
        model.save(tmp)
        os.replace(tmp, policy)
        if args.agent == "dqn":
            save_replay_buffer(model.replay_buffer, buffer)

    class EpisodeLog(BaseCallback):
        def __init__(self):
            super().__init__()
            self.pending: list[dict] = []

        def flush(self):
            if self.pending:
                log.episode_done(self.pending, save=save)
                self.pending = []

        def _on_rollout_start(self) -> None:  # PPO: right after an update
            self.flush()

        def _on_step(self) -> bool:
            if log.done >= args.episodes:
                return False
            for info in self.locals["infos"]:
                if "episode_record" in info:
                    self.pending.append(info["episode_record"])
            if args.agent == "dqn":
                self.flush()
            return log.done < args.episodes

    callback = EpisodeLog()
    decisions = decisions_per_episode(cfg)
    while log.done < args.episodes:  # each pass budgets the remaining episodes; rollbacks may need another
        per_decision = model.n_envs if isinstance(env, GroupsAsAgents) else 1  # (there a step per group)
        steps = max(decisions, args.episodes * decisions - model.num_timesteps // per_decision) * per_decision
        model.learn(total_timesteps=steps, callback=callback, reset_num_timesteps=False, progress_bar=False)
        callback.flush()


# ----------------------------------------------------------------------------------------------
# The output folder: manifest, learning curve, progress
# ----------------------------------------------------------------------------------------------

REPLAY_BUFFER = "replay_buffer.npz"  # dqn: plain arrays (harness.policy_files), never a pickle

# What must match for a second call to continue a folder (episodes may grow).
RESUME_KEYS = ("agent", "dataset", "profile", "lr_center", "lr_range", "multiplier_min", "multiplier_max", "seed", "reward", "actions", "observation", "controller",
               "config")


def manifest_for(args: Args, cfg: ex.Config, rt: ex.Runtime, argv: list[str]) -> dict:
    policy_file = "policy.zip" if args.agent in ex.SB3_AGENTS else "policy.json"
    controller = {k: getattr(args, k) for k in ("hidden", "controller_lr", "gamma", "episodes_per_update")}
    lr_range = parse_lr_range(args.lr_range)
    return {"agent": args.agent, "dataset": args.dataset, "profile": cfg.profile,
            "lr_center": cfg.learning_rate, "lr_range": list(lr_range) if lr_range else None,
            "multiplier_min": cfg.multiplier_min, "multiplier_max": cfg.multiplier_max, "n_envs": args.n_envs,
            "seed": args.seed, "reward": ex.reward_kind(cfg), "actions": ex.agent_actions(cfg),
            "observation": ex.policy_inputs(cfg).spec(), "controller": controller, "config": dataclasses.asdict(cfg),
            "policy_file": policy_file, "episodes": args.episodes, "episodes_done": 0, "seeds": [],
            "command": ex.command_line(__file__, argv), "started": ex.now_iso(), **environment_record(rt)}


def open_out_dir(out: Path, manifest: dict) -> tuple[list[dict], dict]:
    """A new folder, or the same training to continue: returns the learning curve so far and the
    folder's manifest (a continued one keeps its first start and command, and notes this one)."""
    if not (out / POLICY_MANIFEST).exists():
        if out.exists() and any(out.iterdir()):
            raise ex.UserError(f"{out} exists and holds no train_agent.py manifest: choose another --out_dir")
        out.mkdir(parents=True, exist_ok=True)
        ex.atomic_write_json(out / POLICY_MANIFEST, manifest)
        return [], manifest
    pickles = sorted(p.name for p in out.iterdir() if p.suffix in (".pkl", ".pickle"))
    if pickles:  # e.g. the replay_buffer.pkl of an earlier version: reading it could run any code
        raise ex.UserError(f"{out / pickles[0]} is a pickle, which is never loaded (it could run code): "
                           f"delete it to continue without it, or use another --out_dir")
    old = ex.read_json(out / POLICY_MANIFEST)
    # A Config field added since the training started counts at its default there: it changes nothing.
    defaults = {"config": json.loads(json.dumps(dataclasses.asdict(ex.Config())))}
    for key in RESUME_KEYS:
        theirs, ours = old.get(key), json.loads(json.dumps(manifest[key]))
        if isinstance(theirs, dict) and isinstance(ours, dict):  # name only the settings that differ
            differ = settings_that_differ(theirs, ours, defaults.get(key, {}))
            theirs, ours = {k: theirs.get(k) for k in differ}, {k: ours.get(k) for k in differ}
        if theirs != ours:
            raise ex.UserError(f"{out} holds a training with {key} {theirs}; this command asks {ours}: "
                               f"run the command that started it, or use another --out_dir")
    curve = ex.read_json(out / "learning_curve.json") if (out / "learning_curve.json").exists() else []
    if len(curve) and not (out / old["policy_file"]).exists():
        raise ex.UserError(f"{out} has a learning curve but no {old['policy_file']}: remove the folder to start over")
    if not curve:
        return curve, manifest
    return curve, {**old, "episodes": manifest["episodes"],
                   "resumed": old.get("resumed", []) + [{"at": ex.now_iso(), "command": manifest["command"]}]}


class Log:
    """The learning curve, kept on disk with the policy after every episode, and the progress display."""

    def __init__(self, args: Args, out: Path, manifest: dict, curve: list[dict]):
        self.args, self.out, self.manifest, self.curve = args, out, manifest, curve
        self.t0, self.start = time.time(), len(curve)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=args.episodes, initial=self.start, desc=f"{args.agent} episodes", unit="ep",
                            dynamic_ncols=True, file=sys.stderr)

    @property
    def done(self) -> int:
        return len(self.curve)

    def episode_done(self, records: list[dict], save) -> None:
        save()  # the policy first: a curve entry never claims what the policy file lacks
        self.curve.extend(records)
        ex.atomic_write_json(self.out / "learning_curve.json", self.curve)
        self.manifest.update(episodes_done=self.done, seeds=[r["seed"] for r in self.curve], updated=ex.now_iso(),
                             train_seconds=sum(r["train_seconds"] for r in self.curve),
                             episode_seconds=sum(r["seconds"] for r in self.curve))
        ex.atomic_write_json(self.out / POLICY_MANIFEST, self.manifest)
        plot.plot_learning_curve(self.curve, self.out / "learning_curve.png",
                                 f"{self.args.agent} ({self.args.lr_groups} LR)")
        elapsed = time.time() - self.t0
        eta = elapsed / max(self.done - self.start, 1) * (self.args.episodes - self.done)
        for r in records:
            line = (f"episode {r['episode'] + 1}/{self.args.episodes}: lr x{r['lr_factor']:.3g} return "
                    f"{r['return']:+.4f} final val {r['final_val_loss']:.4f} ({r['status']}, {r['seconds']:.1f}s) "
                    f"eta {format_duration(eta)}")
            if self.bar is not None:
                self.bar.update(1)
                self.bar.set_postfix_str(f"val {r['final_val_loss']:.3f}")
            else:
                print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    return dataclass_parser(Args, __doc__.split("\n\n")[0].strip())


def parse_args(argv: list[str]) -> Args:
    args = Args(**vars(build_parser().parse_args(argv)))
    if min(args.episodes, args.hidden, args.episodes_per_update, args.n_envs) < 1:
        raise ex.UserError("--episodes, --hidden, --episodes_per_update and --n_envs must be at least 1")
    if args.controller_lr < 0 or not 0 <= args.gamma <= 1 or args.seed < 0 or args.lr_center < 0:
        raise ex.UserError("--controller_lr and --lr_center must be >= 0, --gamma in [0, 1], --seed >= 0")
    if args.threads_per_env < 0:
        raise ex.UserError("--threads_per_env must be >= 0 (0: the cores divided among --n_envs)")
    if args.agent == "ppo" and args.episodes_per_update % args.n_envs:
        raise ex.UserError(f"--episodes_per_update {args.episodes_per_update} must be a multiple of --n_envs "
                           f"{args.n_envs}: each ppo update takes the same number of episodes from every env")
    if args.agent == "ppo" and args.episodes % args.episodes_per_update:
        raise ex.UserError(f"--episodes {args.episodes}: ppo learns from whole rollouts of --episodes_per_update "
                           f"{args.episodes_per_update}; ask for a multiple of it")
    if args.n_envs > 1 and args.lr_groups == "layer":
        raise ex.UserError("--n_envs with --lr_groups layer: the groups already act as parallel agents; use --n_envs 1")
    parse_lr_range(args.lr_range)
    return args


def episode_config(args: Args) -> ex.Config:
    """experiment.py's Config for every episode: the profile, --set on top, the controller's settings;
    no final whole-split evaluation or sampling (an episode's result is its last evaluation)."""
    overrides = {}
    for item in filter(None, (s.strip() for s in args.set.split(","))):
        name, _, value = item.partition("=")
        if name not in ex.CONFIG_FIELDS or not value or name in ex.RUN_LEVEL_FIELDS:
            raise ex.UserError(f"--set {item!r}: expected NAME=VALUE with NAME a training setting of experiment.py")
        f = ex.CONFIG_FIELDS[name]
        overrides[name] = value.lower() in ("1", "true", "yes") if f.type in ("bool", "Optional[bool]") \
            else ex.parse_value(f, value)
    base = ex.Config(data_dir=args.data_dir, source_dir=args.source_dir, agent=args.agent,
                     agent_actions=args.agent_actions, reward=args.reward, agent_learn=True, lr_groups=args.lr_groups,
                     control=args.control,
                     policy_hidden=args.hidden, policy_lr=args.controller_lr or 1e-3, policy_gamma=args.gamma,
                     policy_batch=args.episodes_per_update,
                     final_eval_tokens=0, inference_samples=0, seeds=1)
    if args.agent == "qlearning" and args.controller_lr:
        base = dataclasses.replace(base, agent_lr=args.controller_lr)
    cfg = ex.config_for_dataset(base, overrides, args.profile, args.dataset)
    cfg = centred(dataclasses.replace(cfg, seeds=1, final_eval_tokens=0, inference_samples=0), args, overrides)
    ex.validate(dataclasses.replace(cfg, agent="none"))  # (ppo/dqn need no --agent_init to be trained)
    check_lr_groups(cfg, ex.PER_GROUP_AGENTS)
    check_control(cfg, ex.CONTROL_AGENTS)
    lr_range = parse_lr_range(args.lr_range) or (1.0, 1.0)
    if cfg.learning_rate * lr_range[1] > cfg.lr_ceiling:
        raise ex.UserError(f"--lr_range {args.lr_range} reaches {cfg.learning_rate * lr_range[1]:g}, above "
                           f"lr_ceiling {cfg.lr_ceiling:g}")
    if args.seed <= cfg.seed_base + 1000 and args.seed + args.episodes > cfg.seed_base:
        raise ex.UserError(f"--seed {args.seed}: training seeds must stay clear of the evaluation seeds "
                           f"{cfg.seed_base}... (use e.g. --seed 1000000)")
    return cfg


def centred(cfg: ex.Config, args: Args, typed: dict) -> ex.Config:
    """The episodes' centre and bounds: learning_rate at --lr_center (min_lr in the profile's proportion) and,
    unless --set gives them, multiplier bounds that reach the centre from both ends of --lr_range (powers of
    two; never narrower than the profile's): x0.1..x10 -> [1/16, 16]."""
    if args.lr_center > 0 and "learning_rate" in typed:
        raise ex.UserError("--lr_center and --set learning_rate=... name the same rate: give one")
    if args.lr_center > 0:
        cfg = dataclasses.replace(cfg, learning_rate=args.lr_center,
                                  min_lr=cfg.min_lr * args.lr_center / cfg.learning_rate)
    low, high = parse_lr_range(args.lr_range) or (1.0, 1.0)
    if "multiplier_min" not in typed:
        cfg = dataclasses.replace(cfg, multiplier_min=min(cfg.multiplier_min, 2.0 ** -math.ceil(math.log2(high))))
    if "multiplier_max" not in typed:
        cfg = dataclasses.replace(cfg, multiplier_max=max(cfg.multiplier_max, 2.0 ** math.ceil(-math.log2(low))))
    return cfg


def train(args: Args, argv: list[str]) -> list[dict]:
    cfg = episode_config(args)
    # This process's episodes and every policy update (each worker of parallel episodes sets it too): with one
    # thread, one env and several then do the same arithmetic, bit for bit.
    if args.threads_per_env:
        import torch
        torch.set_num_threads(args.threads_per_env)
    rt = ex.Runtime.choose(cfg)
    ex.ensure_prepared(cfg, args.dataset)
    data = ex.load_dataset(cfg, args.dataset)
    check_fits(cfg, data)
    out = Path(args.out_dir)
    curve, manifest = open_out_dir(out, manifest_for(args, cfg, rt, argv))
    print(f"{args.agent} on {args.dataset} | profile {cfg.profile} | {decisions_per_episode(cfg)} decisions per "
          f"episode | episodes {len(curve)}/{args.episodes} done | out_dir {out}", flush=True)
    log = Log(args, out, manifest, curve)
    try:
        if args.agent in ex.SB3_AGENTS:
            sb3_episodes(args, cfg, data, rt, out, log)
        else:
            own_agent_episodes(args, cfg, data, rt, out, log)
    finally:
        log.close()
    if curve:
        share = 1 - sum(r["train_seconds"] for r in curve) / max(sum(r["seconds"] for r in curve), 1e-9)
        print(f"{len(curve)} episodes in {out}: last 10 mean final val "
              f"{np.mean([r['final_val_loss'] for r in curve[-10:]]):.4f}; controller and overhead "
              f"{100 * share:.1f}% of episode time", flush=True)
    return curve


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(lambda argv: train(parse_args(argv), argv), sys.argv[1:] if argv is None else argv,
                          "interrupted: finished episodes are saved; run the same command to continue")


if __name__ == "__main__":
    sys.exit(main())
