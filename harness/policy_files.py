"""Policy files are data, never code: agent states and train_agent.py folders, read and checked.

A stable-baselines3 `policy.zip` stores its class, spaces and schedules as cloudpickle (`":serialized:"`
entries of its `data` member), which `PPO.load` / `DQN.load` unpickle unless `custom_objects` replaces
them, and `save_replay_buffer` writes a pickle. A controller folder is what researchers share, so the
harness reads neither: `load_sb3_policy` checks the zip's members and entries first, rebuilds every
serialized entry it needs from the harness's own settings and refuses any other; the dqn replay buffer
is kept as plain arrays (`save_replay_buffer` / `load_replay_buffer`, `.npz` read with allow_pickle=False).

stable-baselines3, gymnasium and torch are imported inside the functions: importing this module is cheap.
"""
from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from harness.errors import UserError
from harness.files import atomic_write_bytes, read_json, sha256_file

POLICY_MANIFEST = "manifest.json"  # train_agent.py's output folder: what was trained, on what, how
# What stable-baselines3's save() writes into a zip; anything else is refused.
ZIP_MEMBERS = frozenset({"data", "pytorch_variables.pth", "policy.pth", "policy.optimizer.pth",
                         "_stable_baselines3_version", "system_info.txt"})
# The replay buffer's arrays (the filled part), and its two counters.
BUFFER_ARRAYS = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")


def agent_file(run_dir: Path, dataset: str, seed_index: int) -> Path:
    return Path(run_dir) / f"agent_{dataset}_{seed_index}.json"


def read_agent_state(path: Path) -> dict:
    try:
        state = json.loads(Path(path).read_text())
        if not isinstance(state, dict) or "trajectory" not in state:
            raise ValueError("not an agent state file")
        return state
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read --agent_init {path}: {getattr(e, 'strerror', None) or e}") from e


def read_agent_init(path: str, dataset: str, seed_index: Optional[int] = None) -> list[dict]:
    """--agent_init: an agent JSON file, or a run folder: its agent file for this seed (seed_index given,
    as replay needs), else the agent files of every seed of this dataset (a table learns from all)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return [read_agent_state(p)]
    if seed_index is not None:
        candidates = [agent_file(p, dataset, seed_index), agent_file(p, dataset, 0)]
        return [read_agent_state(next((c for c in candidates if c.exists()), candidates[0]))]
    files = sorted(p.glob(f"agent_{dataset}_*.json"))
    if not files:
        raise UserError(f"cannot read --agent_init {p}: it holds no agent_{dataset}_<seed>.json")
    return [read_agent_state(f) for f in files]


def read_policy_folder(agent_init: str, agent: str, observation: dict, actions: list, lr_groups: str,
                       control: str) -> Optional[dict]:
    """--agent_init DIR written by train_agent.py: its manifest, checked against this run (agent, observation
    definition, actions), plus the policy file's path and sha256. None when agent_init is not such a folder."""
    folder = Path(agent_init).expanduser() if agent_init else None
    if folder is None or not (folder / POLICY_MANIFEST).exists():
        return None
    manifest = read_json(folder / POLICY_MANIFEST)
    if not isinstance(manifest, dict) or "policy_file" not in manifest:
        raise UserError(f"{folder / POLICY_MANIFEST} is not a train_agent.py manifest")
    if manifest.get("agent") != agent:
        raise UserError(f"--agent_init {folder} holds a {manifest.get('agent')} policy, not {agent}")
    if manifest.get("observation") != observation:
        theirs = manifest.get("observation") or {}
        if ("group_features" in theirs) != ("group_features" in observation):
            raise UserError(f"--agent_init {folder} was trained with --lr_groups "
                            f"{'layer' if 'group_features' in theirs else 'global'}; "
                            f"this run has --lr_groups {lr_groups}")
        if theirs.get("control_features") != observation.get("control_features"):
            trained = (manifest.get("config") or {}).get("control", "lr")
            raise UserError(f"--agent_init {folder} was trained with --control {trained}; "
                            f"this run has --control {control}")
        raise UserError(f"--agent_init {folder} was trained on observation version {theirs.get('version')} "
                        f"({len(theirs.get('features', []))} features); this version observes "
                        f"{observation['version']} ({len(observation['features'])}): retrain it")
    if manifest.get("actions") != actions:
        raise UserError(f"--agent_init {folder} was trained with actions {manifest.get('actions')}; this run has "
                        f"{actions} (set --agent_actions {','.join(map(str, manifest.get('actions') or []))})")
    policy_file = folder / manifest["policy_file"]
    if not policy_file.exists():
        raise UserError(f"--agent_init {folder}: its policy file {manifest['policy_file']} is missing")
    return {"dir": str(folder.resolve()), "file": str(policy_file.resolve()), "sha256": sha256_file(policy_file),
            "manifest": manifest}


def policy_bounds(agent_init: str) -> Optional[tuple[float, float]]:
    """(multiplier_min, multiplier_max) a train_agent.py policy was trained with; None for any other folder
    or a manifest from before they were recorded."""
    manifest = Path(agent_init).expanduser() / POLICY_MANIFEST
    if not manifest.is_file():
        return None
    recorded = read_json(manifest)
    if not isinstance(recorded, dict) or recorded.get("multiplier_min") is None:
        return None
    return float(recorded["multiplier_min"]), float(recorded["multiplier_max"])


def with_policy_bounds(cfg, typed: dict):
    """The config with the multiplier bounds its train_agent.py policy (--agent_init) was trained with, unless
    the command typed others: then they must agree, or the run is refused (a policy used beyond its bounds is
    untested). typed: the fields the user typed."""
    bounds = policy_bounds(cfg.agent_init)
    if bounds is None:
        return cfg
    for name, trained in zip(("multiplier_min", "multiplier_max"), bounds):
        if name in typed and typed[name] != trained:
            raise UserError(f"--{name} {typed[name]:g}: the policy in {cfg.agent_init} was trained with "
                            f"{name} {trained:g}; drop the flag to use its bounds")
    return dataclasses.replace(cfg, multiplier_min=bounds[0], multiplier_max=bounds[1])


def refuse(path, why: str) -> UserError:
    return UserError(f"{path}: {why}; refused (a policy folder is read as data, never as code)")


def is_serialized(entry) -> bool:
    """stable-baselines3's own test for an entry it would unpickle (save_util.json_to_data)."""
    return isinstance(entry, dict) and ":serialized:" in entry


def checked_zip(path: Path) -> tuple[bytes, dict]:
    """The zip's bytes, read once, and its `data` entries: only stable-baselines3's own members, a JSON
    `data`, every tensor file loadable with torch.load(weights_only=True). Loading then reads these bytes."""
    import torch
    try:
        blob = Path(path).read_bytes()
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read the policy {path} ({type(e).__name__}: {e})") from e
    with archive:
        names = archive.namelist()
        unexpected = sorted(set(names) - ZIP_MEMBERS)
        if unexpected:
            raise refuse(path, f"unexpected zip member {unexpected[0]!r}")
        if "data" not in names:
            raise refuse(path, "no 'data' member")
        try:
            data = json.loads(archive.read("data"))
        except ValueError as e:
            raise refuse(path, f"its 'data' member is not JSON ({e})") from e
        for name in sorted(n for n in names if n.endswith(".pth")):
            try:
                torch.load(io.BytesIO(archive.read(name)), map_location="cpu", weights_only=True)
            except Exception as e:  # weights_only refuses any pickled object that is not plain tensors/numbers
                raise refuse(path, f"member {name!r} is not plain tensors ({type(e).__name__})") from e
    if not isinstance(data, dict):
        raise refuse(path, "its 'data' member is not a JSON object")
    return blob, data


def sb3_spaces(n_features: int, action_sizes: list[int], limit: float):
    """The observation and action spaces a policy of the harness sees: a float32 Box of features clipped to
    +-limit; one Discrete choice, or a MultiDiscrete of one choice per controlled hyperparameter."""
    from gymnasium import spaces
    observation = spaces.Box(-limit, limit, (n_features,), np.float32)
    action = spaces.Discrete(action_sizes[0]) if len(action_sizes) == 1 else spaces.MultiDiscrete(action_sizes)
    return observation, action


def rebuilt_entries(algorithm: str, data: dict, observation_space, action_space, hidden: int) -> dict:
    """Every entry of `data` that stable-baselines3 would unpickle, rebuilt from the harness's settings
    (train_agent.sb3_controller): the policy class and kwargs, the spaces, schedules as constants, buffer
    classes, and the rollout state a load resets anyway (None)."""
    from stable_baselines3.common.buffers import ReplayBuffer, RolloutBuffer
    from stable_baselines3.common.policies import ActorCriticPolicy
    from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit
    from stable_baselines3.common.utils import ConstantSchedule
    from stable_baselines3.dqn.policies import DQNPolicy
    rate = data.get("learning_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise UserError(f"its learning_rate {rate!r} is not a number")
    entries = {"observation_space": observation_space, "action_space": action_space,
               "policy_kwargs": {"net_arch": [hidden]}, "lr_schedule": ConstantSchedule(float(rate)),
               "_last_obs": None, "_last_episode_starts": None, "_last_original_obs": None,
               "ep_info_buffer": None, "ep_success_buffer": None}
    if algorithm == "ppo":  # train_agent.py keeps PPO's clip range, 0.2, and no value clipping
        return {**entries, "policy_class": ActorCriticPolicy, "rollout_buffer_class": RolloutBuffer,
                "clip_range": ConstantSchedule(0.2), "clip_range_vf": None}
    # DQN rebuilds its exploration schedule from its plain settings when loaded; train_freq is 1 step.
    return {**entries, "policy_class": DQNPolicy, "replay_buffer_class": ReplayBuffer,
            "train_freq": TrainFreq(1, TrainFrequencyUnit.STEP),
            "exploration_schedule": ConstantSchedule(float(data.get("exploration_final_eps", 0.05)))}


def load_sb3_policy(path: Path, algorithm: str, observation_space, action_space, hidden: int, env=None):
    """A PPO or DQN policy.zip, loaded without unpickling anything: refused in one line (UserError) when it
    holds another member, another pickled entry, a .pth that is not plain tensors, or weights that do not
    fit the settings. `env` given: a training to continue (its spaces must be these)."""
    import stable_baselines3
    blob, data = checked_zip(path)
    try:
        custom = rebuilt_entries(algorithm, data, observation_space, action_space, hidden)
    except UserError as e:
        raise refuse(path, str(e)) from None
    foreign = sorted(key for key, entry in data.items() if is_serialized(entry) and key not in custom)
    if foreign:
        raise refuse(path, f"its entry {foreign[0]!r} is a pickled object the harness does not rebuild")
    cls = {"ppo": stable_baselines3.PPO, "dqn": stable_baselines3.DQN}[algorithm]
    try:
        return cls.load(io.BytesIO(blob), env=env, device="cpu", custom_objects=custom)
    except Exception as e:  # weights of another size, another algorithm's file: say which
        first = str(e).splitlines()[0][:120] if str(e) else "unreadable"
        sizes = [int(n) for n in getattr(action_space, "nvec", [getattr(action_space, "n", 0)])]
        raise UserError(f"cannot load the {algorithm} policy {path} as a network of {hidden} hidden units "
                        f"observing {observation_space.shape[0]} features with actions {sizes} "
                        f"({type(e).__name__}: {first})") from e


def save_replay_buffer(buffer, path: Path) -> None:
    """The filled part of a stable-baselines3 ReplayBuffer as plain arrays (.npz), atomically."""
    filled = buffer.buffer_size if buffer.full else buffer.pos
    arrays = {name: getattr(buffer, name)[:filled] for name in BUFFER_ARRAYS}
    out = io.BytesIO()
    np.savez(out, pos=np.int64(buffer.pos), full=np.bool_(buffer.full), **arrays)
    atomic_write_bytes(path, out.getvalue())


def load_replay_buffer(buffer, path: Path) -> None:
    """Fill `buffer` from save_replay_buffer's file, read with allow_pickle=False (an object array is
    refused); every array must fit the buffer's shape and dtype."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            stored = {name: saved[name] for name in (*BUFFER_ARRAYS, "pos", "full")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise refuse(path, f"not a replay buffer of plain arrays ({type(e).__name__}: {e})") from e
    filled = len(stored["observations"])
    pos, full = int(stored["pos"]), bool(stored["full"])
    if filled > buffer.buffer_size or pos > buffer.buffer_size or filled != (buffer.buffer_size if full else pos):
        raise refuse(path, f"its {filled} transitions, position {pos} and full flag {full} do not agree")
    for name in BUFFER_ARRAYS:
        target, array = getattr(buffer, name), stored[name]
        if array.shape != (filled, *target.shape[1:]) or array.dtype != target.dtype:
            raise refuse(path, f"its {name} are {array.dtype}{list(array.shape)}, the buffer holds "
                               f"{target.dtype}{[filled, *target.shape[1:]]}")
        target[:filled] = array
    buffer.pos, buffer.full = pos, full
