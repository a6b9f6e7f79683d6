"""
Train small character-level GPTs while an agent controls the learning rate.

    python experiment.py --out_dir run_0                 # default profile for this machine
    python experiment.py --out_dir run_1 --profile cpu --datasets shakespeare_char

What an idea edits, read top to bottom as one run meets it:
  1. Config and profiles         (one dataclass; every field is a --flag)
  2. Data                        (prepared .bin files, batches, fixed evaluation batches)
  3. Model                       (model.py, read beside this file: nanoGPT's GPT, pre-LN, tied embeddings)
  4. Learning rate and control   (base schedule x agent multiplier, clamped; Controls: the run's knobs)
  5. Agents                      (what they observe; none, random, replay, qlearning; the registry)
  6. Training one dataset/seed   (TrainingRun: the step, advanced evaluation to evaluation; drive() the loop)
  7. Sampling and inference speed
  8. The run folder              (final_info.json, all_results.npy, run.json, ...)
  9. CLI

What no idea touches lives beside it in harness/, one concern per module, never importing this file:
errors and files (the one atomic writer), records (provenance, run.json), run_folder (checkpoint names,
resume, data loading under torchrun), validation (bounds and refusals), cli, distributed (the torchrun World),
runtime (device, signals, progress), checkpoints, grad_stats, control (--control's bounds, LR groups, action
factors), agents (the agent base and the neural agents), policy_files (policy folders read as data),
observation (what a policy network sees), controllers (the reinforce learner), stats, tensorboard.

The run folder follows the AI-Scientist nanoGPT template's contract (docs/run_folder.md), so its
plot.py and perform_experiments.py read our runs unmodified.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from data import prepare_common  # the download/prepare logic shared with data/<dataset>/prepare.py
from harness.checkpoints import CheckpointStore, RunCheckpoints
from harness.cli import OneLineArgumentParser, add_config_flags, job_main, option, parse_field_value
from harness.agents import Agent, ReinforceAgent, SB3Agent
from harness.control import (DROPOUT_MAX, controlled, extra_controlled, lr_group_names, lr_groups_kind, parse_actions,
                             policy_inputs)
from harness.distributed import RANK_SEED_STRIDE, EvaluationStopped, World
from harness.errors import Interrupted, RunFailed, UserError
from harness.files import atomic_save_npy, atomic_write_json, read_json
from harness.grad_stats import GradientStatistics, lamb_trust
from harness.policy_files import (agent_file, read_agent_init, read_agent_state, read_policy_folder,
                                   with_policy_bounds)
from harness.records import (check_same_data, command_line, data_provenance, now_iso, prepare_run_folder,
                             resume_configs)
from harness.run_folder import (checkpoint_file, finished_seed, load_on_every_rank, previous_checkpoint_file,
                                record_in_notebook, remove_checkpoints, run_to_resume, start_run_record)
from harness.runtime import FaultInjector, Progress, Runtime, StopRequest
from harness.stats import mean_and_stderr
from harness.tensorboard import LiveCurves, curves_folder, installed as tensorboard_installed
from harness.validation import (check_combinations, check_control, check_fields, check_fits, check_lr_groups,
                                check_rate_bounds, check_world, config_warnings, policy_warnings, world_warnings)
from model import GPT, CausalSelfAttention, GPTConfig, lr_group_of, model_file, save_model

PROJECT_ROOT = Path(__file__).resolve().parent
DATASETS = ("shakespeare_char", "enwik8", "text8")
SOURCE_DIR_ENV = "GPT_RL_DATA_SOURCE"  # folder with offline copies of the raw datasets



# ----------------------------------------------------------------------------------------------
# 1. Config and profiles
# ----------------------------------------------------------------------------------------------

@dataclass
class Config:
    # --- the run ---
    out_dir: str = option("run_0", "run folder to write (relative to the current directory)")
    profile: str = option("auto", "settings bundle; auto = full with CUDA, else cpu",
                          ("auto", "full", "cpu", "tiny", "smoke"))
    datasets: str = option(",".join(DATASETS), "comma-separated datasets to train on")
    seeds: int = option(1, "seeds per dataset (seed = seed_base + index); profile-dependent", bounds="[1, inf)")
    seed_base: int = option(1337, "seed of the first seed index", bounds="[0, inf)")
    title: str = option("", "short title of the run (notes.txt)")
    description: str = option("", "what this run does differently (recorded in run.json)")
    data_dir: str = option("", "folder holding <dataset>/ with prepared data; default <project>/data")
    source_dir: str = option("", f"folder with offline raw copies (else ${SOURCE_DIR_ENV}); used to prepare missing "
                               "data")
    allow_nonstandard_data: bool = option(False, "accept a source named as the standard enwik8/text8 file that is not "
                                                 "its standard size (it is split 90/5/5 in proportion and labelled)")
    overwrite: bool = option(False, "replace the results of a finished run folder")
    download: bool = option(True, "download missing datasets (--no-download: fail with the command to run instead)")
    notes: str = option("", "lab notebook this run's section and the comparison table go to "
                            "(default: notes.txt beside the run folder; 'off' to skip)")
    plot: bool = option(False, "regenerate the plots of every run_* beside the run folder when the run ends")
    # --- model (nanoGPT names) ---
    n_layer: int = option(6, "transformer blocks", bounds="[1, inf)")
    n_head: int = option(6, "attention heads", bounds="[1, inf)")
    n_embd: int = option(384, "embedding width", bounds="[1, inf)")
    block_size: int = option(256, "context length in tokens", bounds="[1, inf)")
    dropout: float = option(0.2, "dropout probability", bounds="[0, 1)")
    bias: bool = option(False, "biases in Linear and LayerNorm layers")
    # --- optimisation ---
    batch_size: int = option(64, "sequences per micro-batch", bounds="[1, inf)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step", bounds="[1, inf)")
    batch_grows_with_world: bool = option(False, "under torchrun every process takes all the micro-batches: the "
                                                 "global batch grows with the processes (else they share them)")
    max_iters: int = option(5000, "optimizer steps", bounds="[1, inf)")
    learning_rate: float = option(1e-3, "peak learning rate of the base schedule", bounds="(0, inf)")
    min_lr: float = option(1e-4, "final learning rate of the cosine/wsd decay (refused above learning_rate)",
                           bounds="[0, inf)")
    warmup_iters: int = option(100, "linear warmup steps (a warning, recorded in run.json, if >= max_iters)",
                               bounds="[0, inf)")
    lr_decay_iters: int = option(5000, "step at which the cosine schedule reaches min_lr (refused below "
                                       "warmup_iters; a warning if above max_iters)", bounds="[0, inf)")
    weight_decay: float = option(0.1, "AdamW weight decay on >=2-D weights", bounds="[0, inf)")
    beta1: float = option(0.9, "AdamW beta1", bounds="[0, 1)")
    beta2: float = option(0.99, "AdamW beta2", bounds="[0, 1)")
    grad_clip: float = option(1.0, "clip gradient norm to this (0 = off)", bounds="[0, inf)")
    # --- learning-rate control (SPEC section 5) ---
    optimizer: str = option("adamw", "adamw; schedulefree (schedule-free AdamW; use with --schedule constant); prodigy "
                                     "or dadapt_adam (estimate the step size: --learning_rate then defaults to 1.0, "
                                     "their documented lr, min_lr 0.1 and lr_ceiling 10, the schedule on top)",
                            ("adamw", "schedulefree", "prodigy", "dadapt_adam"))
    schedule: str = option("cosine", "base learning-rate schedule", ("cosine", "constant", "step", "wsd"))
    step_gamma: float = option(0.1, "step schedule: factor applied every step_interval steps", bounds="(0, 1]")
    step_interval: int = option(1000, "step schedule: steps between factors", bounds="[1, inf)")
    step_epochs: float = option(0.0, "step schedule: interval in epochs of the train split (overrides step_interval)",
                                bounds="[0, inf)")
    wsd_decay_frac: float = option(0.2, "wsd schedule: final fraction of max_iters decaying linearly to min_lr",
                                   bounds="[0, 1]")
    agent: str = option("none", "who sets the learning-rate multiplier after each evaluation (reinforce, ppo, dqn: "
                                "policies trained by train_agent.py, loaded with --agent_init DIR)",
                        lambda: (*AGENTS, *SB3_AGENTS))  # the registry (section 5), read when the flags are
    agent_actions: str = option("", "the agent's action factors on the multiplier; default "
                                    "0.5,0.8,1,1.25,2 (qlearning, random), 0.1,0.5,1,1.5,2 (reinforce, ppo, dqn)")
    reward: str = option("", "reward: -L, L_prev - L, or log L_prev - log L (L: val loss); default neg_val_loss "
                             "(qlearning, learned relative to its usual value at that iteration), improvement "
                             "(reinforce, ppo, dqn); vs_reference: L_prev - L minus the same seed's reference run's "
                             "(train_agent.py runs the references)",
                         ("neg_val_loss", "improvement", "log_improvement", "vs_reference"))
    epsilon: float = option(0.1, "qlearning: exploration probability", bounds="[0, 1]")
    epsilon_decay: float = option(1.0, "qlearning: epsilon is multiplied by this after each decision", bounds="[0, 1]")
    epsilon_min: float = option(0.01, "qlearning: epsilon never decays below this", bounds="[0, 1]")
    agent_lr: float = option(0.1, "qlearning: step size alpha of the TD update", bounds="(0, 1]")
    gamma: float = option(0.9, "qlearning: discount", bounds="[0, 1]")
    agent_init: str = option("", "qlearning: start from this agent file, or pool the tables of every seed of this "
                                 "run folder (epsilon continues from it); replay: the run to replay")
    agent_freeze: bool = option(False, "qlearning: act greedily from the table (no exploration) and never update it")
    agent_sample: bool = option(False, "a trained policy deployed frozen samples its actions as in training "
                                       "(reinforce, ppo, dqn); default: the most probable action")
    oracle_lr: float = option(0.0, "oracle: the peak rate it steers --learning_rate x multiplier toward, with the "
                                   "agent's own actions at each decision (the ceiling of knowing the tuned rate)",
                              bounds="[0, inf)")
    agent_learn: Optional[bool] = option(None, "keep learning online (qlearning, reinforce); default: a policy trained "
                                               "by train_agent.py (--agent_init DIR) is deployed frozen, else learn")
    policy_hidden: int = option(128, "reinforce: hidden units of the policy network (one hidden layer)",
                                bounds="[1, inf)")
    policy_lr: float = option(1e-3, "reinforce: Adam learning rate of the policy network", bounds="(0, inf)")
    policy_gamma: float = option(0.99, "reinforce: discount of the return", bounds="[0, 1]")
    policy_batch: int = option(8, "reinforce: episodes (runs) per policy-gradient update; advantages are normalised "
                                  "over the batch", bounds="[1, inf)")
    policy_entropy: float = option(0.01, "reinforce: weight of the entropy bonus in the policy loss", bounds="[0, inf)")
    multiplier_min: float = option(0.125, "lower bound of the agent's learning-rate multiplier", bounds="(0, 1]")
    multiplier_max: float = option(8.0, "upper bound of the agent's learning-rate multiplier", bounds="[1, inf)")
    lr_groups: str = option("", "who gets a multiplier: global (one for the whole model) or layer (the embeddings, "
                                "each block and the final norm: their own parameter groups, each rate clamp(base x "
                                "multiplier x its own)); default global, layer with --layer_trust", ("global", "layer"))
    layer_trust: str = option("none", "lamb: every step, each layer's rate is scaled by its LAMB trust ratio |w| / "
                                      "|Adam update| over its matrices, normalised to geometric mean 1 over the layers "
                                      "(a per-layer redistribution of the same schedule), clipped to "
                                      "[1/trust_clip, trust_clip]", ("none", "lamb"))
    trust_clip: float = option(10.0, "--layer_trust: bound of a layer's trust factor", bounds="[1, inf)")
    control: str = option("lr", "hyperparameters the agent sets, from lr,weight_decay,grad_clip,dropout: each its own "
                                "multiplier on the configured value (lr: multiplier_min..max; the others: "
                                "CONTROL_BOUNDS), the action one factor per hyperparameter")
    lr_floor: float = option(0.0, "the learning rate never goes below this", bounds="[0, inf)")
    lr_ceiling: float = option(0.1, "the learning rate never goes above this", bounds="(0, inf)")
    # --- reliability ---
    resume: bool = option(False, "continue an interrupted run folder from its checkpoints (its config is reused)")
    max_rollbacks: int = option(3, "divergence guard: rollbacks allowed per seed before it ends as 'diverged'",
                                bounds="[0, inf)")
    divergence_factor: float = option(2.0, "divergence guard: a loss above this x the first evaluation's train loss "
                                           "(or not finite) rolls back (0 = only non-finite)", bounds="[0, inf)")
    rollback_cut: float = option(0.5, "divergence guard: the multiplier is multiplied by this on a rollback",
                                 bounds="(0, 1]")
    divergence_penalty: float = option(-5.0, "divergence guard: added to the reward of a diverged interval, which "
                                             "scores as a val loss at the divergence threshold", bounds="(-inf, 0]")
    # --- evaluation and logging ---
    eval_interval: int = option(250, "steps between evaluations (the agent acts after each)", bounds="[1, inf)")
    eval_iters: int = option(200, "batches per split in each evaluation", bounds="[1, inf)")
    log_interval: int = option(10, "steps between training-loss records", bounds="[1, inf)")
    tensorboard: bool = option(False, "also write the records as live curves for TensorBoard (losses, rates, "
                                      "multipliers, the agent's action and reward) to "
                                      "<out_dir>/tensorboard/<dataset>_<seed>/; needs the tensorboard package")
    final_eval_tokens: int = option(1_000_000, "after training, the final model's loss over the first N tokens of "
                                               "the val (and test) split, read in consecutive windows: "
                                               "full_val_loss / test_loss without sampling noise (0 = skip)",
                                    bounds="[0, inf)")
    # --- inference-speed measurement (as the reference experiment) ---
    inference_samples: int = option(10, "samples generated to measure inference speed (0 = skip)", bounds="[0, inf)")
    inference_new_tokens: int = option(500, "new tokens per sample", bounds="[1, inf)")
    kv_cache: bool = option(True, "sample with the KV cache (same tokens, faster); --no-kv_cache re-runs the "
                                  "context for every token, as the reference experiment measures")
    temperature: float = option(0.8, "sampling temperature", bounds="(0, inf)")
    top_k: int = option(200, "sample among the top_k most likely tokens (0 = all)", bounds="[0, inf)")
    # --- system ---
    device: str = option("auto", "where to train", ("auto", "cuda", "mps", "cpu"))
    dtype: str = option("auto", "compute dtype; auto = bfloat16/float16 on CUDA, float32 elsewhere",
                        ("auto", "float32", "bfloat16", "float16"))
    compile: Optional[bool] = option(None, "torch.compile the model; default: only on CUDA with Triton")
    compile_ddp: bool = option(False, "with --compile under torchrun: compile the DDP-wrapped model, so the gradients' "
                                      "all-reduce overlaps the backward (else nanoGPT's order: compile, then wrap)")
    backend: str = option("auto", "process-group backend under torchrun (several processes); auto = nccl on CUDA, "
                                  "gloo on the CPU", ("auto", "nccl", "gloo"))
    debug: bool = option(False, "show full tracebacks for errors")


# Profiles override Config defaults; "*" applies to every dataset, a dataset key on top of it.
PROFILES: dict[str, dict[str, dict]] = {
    # The AI-Scientist nanoGPT template's configuration (a GPU job).
    "full": {
        "*": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, bias=False,
                  learning_rate=1e-3, min_lr=1e-4, max_iters=5000, lr_decay_iters=5000, warmup_iters=100,
                  eval_interval=250, eval_iters=200, log_interval=10, seeds=3),
        "enwik8": dict(batch_size=32, learning_rate=5e-4, min_lr=5e-5, max_iters=100000, lr_decay_iters=100000,
                       warmup_iters=200, eval_interval=1000, log_interval=100, seeds=1),
        "text8": dict(batch_size=32, learning_rate=5e-4, min_lr=5e-5, max_iters=100000, lr_decay_iters=100000,
                      warmup_iters=200, eval_interval=1000, log_interval=100, seeds=1),
    },
    # nanoGPT's README CPU line (val ~1.88 on shakespeare_char): minutes per seed on a laptop.
    "cpu": {
        "*": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, bias=False,
                  learning_rate=1e-3, min_lr=1e-4, max_iters=2000, lr_decay_iters=2000, warmup_iters=100,
                  eval_interval=250, eval_iters=20, log_interval=10, seeds=3),
        "enwik8": dict(seeds=1),
        "text8": dict(seeds=1),
    },
    # An episode for training a controller across many runs (train_agent.py): ~12 s on a 2-core CPU,
    # 10 decisions. Small, but its loss keeps falling for the whole run, so the rate matters.
    "tiny": {
        "*": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=16, dropout=0.0, bias=False,
                  learning_rate=1e-3, min_lr=1e-4, max_iters=1000, lr_decay_iters=1000, warmup_iters=50,
                  eval_interval=100, eval_iters=8, log_interval=10, seeds=5,
                  inference_samples=2, inference_new_tokens=100, final_eval_tokens=100_000),
    },
    # Seconds in total: exercises every code path, learns nothing worth reporting.
    "smoke": {
        "*": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0, bias=False,
                  learning_rate=1e-3, min_lr=1e-4, max_iters=30, lr_decay_iters=30, warmup_iters=5,
                  eval_interval=10, eval_iters=2, log_interval=5, seeds=1,
                  inference_samples=2, inference_new_tokens=16, final_eval_tokens=4096),
    },
}


CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def resolve_profile(requested: str) -> str:
    if requested != "auto":
        return requested
    return "full" if torch.cuda.is_available() else "cpu"


def config_for_dataset(base: Config, cli_overrides: dict, profile: str, dataset: str) -> Config:
    """Config defaults < profile["*"] < profile[dataset] < what the user typed."""
    values = dict(PROFILES[profile].get("*", {}))
    values.update(PROFILES[profile].get(dataset, {}))
    for name, value in cli_overrides.items():  # a per-dataset value applies only to its dataset
        if not isinstance(value, dict):
            values[name] = value
        elif dataset in value:
            values[name] = value[dataset]
    values["profile"] = profile
    if values.get("optimizer", base.optimizer) in PARAMETER_FREE:  # their lr scales the step size they estimate
        values.update({k: v for k, v in PARAMETER_FREE_RATES.items() if k not in cli_overrides})
    cfg = dataclasses.replace(base, **values)
    if cfg.agent_init and cfg.agent != "replay":  # a train_agent.py policy acts within the bounds it learned in
        cfg = with_policy_bounds(cfg, cli_overrides)
    # The agent's defaults, written into the config so run.json says what was used.
    actions = cfg.agent_actions or DEFAULT_ACTIONS.get(cfg.agent, TABLE_ACTIONS)
    return dataclasses.replace(cfg, agent_actions=actions, reward=reward_kind(cfg), lr_groups=lr_groups_kind(cfg))


PARAMETER_FREE = ("prodigy", "dadapt_adam")
PARAMETER_FREE_RATES = {"learning_rate": 1.0, "min_lr": 0.1, "lr_ceiling": 10.0}  # unless typed


POLICY_AGENTS = ("reinforce", "ppo", "dqn")  # act on harness/observation.py's features; train_agent.py trains
SB3_AGENTS = ("ppo", "dqn")                 # stable-baselines3 policies: deployed frozen
# Action factors unless --agent_actions says otherwise: the policy networks get a wider set; every other agent
# (a new one too) the table's.
DEFAULT_ACTIONS = {"reinforce": "0.1,0.5,1,1.5,2", "ppo": "0.1,0.5,1,1.5,2", "dqn": "0.1,0.5,1,1.5,2",
                   "oracle": "0.1,0.5,1,1.5,2"}  # the oracle: the learners' actions, so it shows their ceiling
TABLE_ACTIONS = "0.5,0.8,1,1.25,2"


def reward_kind(cfg: Config) -> str:
    return cfg.reward or ("improvement" if cfg.agent in POLICY_AGENTS else "neg_val_loss")


# ----------------------------------------------------------------------------------------------
# 2. Data
# ----------------------------------------------------------------------------------------------

@dataclass
class CharDataset:
    name: str
    splits: dict  # split name -> np.ndarray of uint16 token ids, read into memory once
    itos: list
    meta: dict
    provenance: dict = field(default_factory=dict)  # source, standard split or not, sha256 per split

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        stoi = self.meta["stoi"]
        missing = sorted(set(text) - set(stoi))
        if missing:
            raise UserError(f"prompt has characters not in the {self.name} vocabulary: {missing!r}")
        return [stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos[i] for i in ids)


def dataset_dir(cfg: Config, dataset: str) -> Path:
    root = Path(cfg.data_dir).expanduser() if cfg.data_dir else PROJECT_ROOT / "data"
    return (root / dataset).resolve()


def ensure_prepared(cfg: Config, dataset: str, log=print) -> Path:
    """Prepare missing data: from an offline copy if one is configured, else by downloading it."""
    prep = prepare_common
    out = dataset_dir(cfg, dataset)
    if (out / "meta.json").exists():  # written last by prepare: data is there (load_dataset checks it)
        return out
    out.mkdir(parents=True, exist_ok=True)
    source_dir = cfg.source_dir or os.environ.get(SOURCE_DIR_ENV, "")
    source = prep.find_local_source(dataset, Path(source_dir).expanduser()) if source_dir else None
    if source is not None:
        log(f"[data] preparing {dataset} from {source}")
    else:
        looked = f" (no copy in {source_dir})" if source_dir else ""
        if not cfg.download:
            raise UserError(f"{dataset} is not prepared in {out}{looked} and --no-download is set; run: "
                            f"python data/{dataset}/prepare.py --source FILE (or set {SOURCE_DIR_ENV}=DIR)")
        log(f"[data] {dataset} is not prepared in {out}{looked}: downloading it")
    try:
        prep.prepare(dataset, out, source=source, log=log, allow_nonstandard=cfg.allow_nonstandard_data)
    except prep.PrepareError as e:
        if source is not None:  # prepare.py's flag has this name here
            message = str(e).replace("--allow_nonstandard", "--allow_nonstandard_data")
            raise UserError(f"preparing {dataset} from {source} failed: {message}") from e
        raise RunFailed(f"{e} -- offline? run: python data/{dataset}/prepare.py --source FILE "
                        f"(or set {SOURCE_DIR_ENV}=DIR with offline copies)") from e
    return out


def load_dataset(cfg: Config, dataset: str) -> CharDataset:
    """Read meta.json (never the pickle) and the .bin splits, checking each against the other."""
    folder = dataset_dir(cfg, dataset)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        itos = [meta["itos"][str(i)] for i in range(meta["vocab_size"])]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{folder}/meta.json is missing or corrupt ({e}); re-run data/{dataset}/prepare.py") from e
    if len(meta.get("stoi", {})) != meta["vocab_size"] or sorted(meta["stoi"].values()) != list(range(len(itos))):
        raise UserError(f"{folder}/meta.json is inconsistent: vocab_size {meta['vocab_size']} but "
                        f"{len(meta.get('stoi', {}))} stoi entries; re-run data/{dataset}/prepare.py")
    splits = {}
    for split, n_tokens in meta["splits"].items():
        path = folder / f"{split}.bin"
        size = path.stat().st_size if path.exists() else -1
        if size != 2 * n_tokens:
            raise UserError(f"{path} has {size} bytes, meta.json expects {2 * n_tokens} "
                            f"(uint16); re-run data/{dataset}/prepare.py")
        splits[split] = np.fromfile(path, dtype=np.uint16)
        if n_tokens and int(splits[split].max()) >= len(itos):
            raise UserError(f"{path} holds token id {int(splits[split].max())}, outside the vocabulary of "
                            f"{len(itos)}; re-run data/{dataset}/prepare.py")
    return CharDataset(dataset, splits, itos, meta, data_provenance(folder, meta, splits))


def windows_at(data: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device):
    """(x, y): the block_size tokens from each start, and the same shifted by one (the targets)."""
    windows = torch.from_numpy(data[starts[:, None] + np.arange(block_size + 1)].astype(np.int64))
    x, y = windows[:, :-1], windows[:, 1:]
    if device.type == "cuda":  # pinned + non_blocking: the copy overlaps the previous step
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class BatchSampler:
    """Random (x, y) windows from one split, drawn from its own generator so runs repeat exactly."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, device: torch.device, seed: int):
        if len(data) <= block_size + 1:
            raise UserError(f"block_size {block_size} does not fit a split of {len(data)} tokens")
        self.data, self.block_size, self.batch_size, self.device = data, block_size, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def draw_starts(self) -> np.ndarray:
        return torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator).numpy()

    def batch_at(self, starts: np.ndarray):
        return windows_at(self.data, starts, self.block_size, self.device)

    def next_batch(self):
        return self.batch_at(self.draw_starts())


# 3. The model is nanoGPT's, in model.py beside this file (GPT, its optimizer's parameter groups, model files).

# ----------------------------------------------------------------------------------------------
# 4. Learning rate: lr = clamp(base_schedule(iter) * multiplier, lr_floor, lr_ceiling)
# ----------------------------------------------------------------------------------------------

def base_lr(cfg: Config, it: int) -> float:
    """The base schedule at step `it`. Warmup starts above 0 (nanoGPT once had lr = 0 at step 0)."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "step":  # x step_gamma every step_interval steps after warmup
        return cfg.learning_rate * cfg.step_gamma ** ((it - cfg.warmup_iters) // cfg.step_interval)
    if cfg.schedule == "wsd":  # warmup, stable, then linear decay to min_lr over the last wsd_decay_frac
        decay_start = cfg.max_iters - int(round(cfg.wsd_decay_frac * cfg.max_iters))
        if it < decay_start:
            return cfg.learning_rate
        progress = (it - decay_start) / max(1, cfg.max_iters - decay_start)
        return cfg.learning_rate + min(progress, 1.0) * (cfg.min_lr - cfg.learning_rate)
    if it >= cfg.lr_decay_iters:  # cosine
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def controlled_lr(cfg: Config, it: int, multiplier: float) -> float:
    return min(max(base_lr(cfg, it) * multiplier, cfg.lr_floor), cfg.lr_ceiling)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# --lr_groups layer: lr_g = clamp(base_schedule(iter) x multiplier x multiplier_g x trust_g), one g per layer
# (harness/control.py's lr_group_names; model.py's lr_group_of says which parameters make up each g).
# --control: besides the rate, weight decay, the clipping norm and dropout, each as configured x its own
# multiplier, within harness/control.py's CONTROL_BOUNDS (the rate's multiplier is the agent's, as ever).

def hparam_values(cfg: Config, lr: float, multipliers: dict) -> dict:
    """The value of every controlled hyperparameter given the rate and the others' multipliers."""
    values = {"lr": lr, "weight_decay": cfg.weight_decay * multipliers.get("weight_decay", 1.0),
              "grad_clip": cfg.grad_clip * multipliers.get("grad_clip", 1.0),
              "dropout": min(cfg.dropout * multipliers.get("dropout", 1.0), DROPOUT_MAX)}
    return {n: values[n] for n in controlled(cfg)}


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout of the model (the nn.Dropout modules and attention's dropout_p) to p."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        elif isinstance(module, CausalSelfAttention):
            module.dropout = p


def optimizer_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-free AdamW evaluates at the averaged weights: switch before evaluating and back after."""
    if hasattr(optimizer, "train") and hasattr(optimizer, "eval"):
        optimizer.train() if training else optimizer.eval()


class Controls:
    """The knobs of a training run, turned between steps: the rate multiplier (`multiplier`, the agent's),
    with --lr_groups layer each group's own multiplier and LAMB trust factor, and with --control the other
    hyperparameters' multipliers. TrainingRun is one; it holds cfg, optimizer and model."""

    def init_controls(self, cfg: Config, optimizer: torch.optim.Optimizer) -> None:
        self.multiplier = 1.0
        # --lr_groups layer: each group's own multiplier (set by a per-group agent) and trust factor (LAMB).
        self.group_names = lr_group_names(cfg)
        self.layered = len(self.group_names) > 1
        self.group_multipliers = [1.0] * len(self.group_names)
        self.trust = [1.0] * len(self.group_names)
        self.optimizer_groups = [(self.group_names.index(g.get("lr_group", "all")), g.get("matrices", True))
                                 for g in optimizer.param_groups]  # (LR group, holds matrices)
        # --control: the other controlled hyperparameters' multipliers (the rate's is `multiplier`).
        self.hparam_multipliers = {name: 1.0 for name in extra_controlled(cfg)}

    def lr(self, it: int) -> float:
        return controlled_lr(self.cfg, it, self.multiplier)

    def group_lrs(self, it: int) -> list[float]:
        """Each LR group's rate at step `it`: clamp(base x multiplier x its multiplier x its trust)."""
        base = base_lr(self.cfg, it) * self.multiplier
        return [min(max(base * m * t, self.cfg.lr_floor), self.cfg.lr_ceiling)
                for m, t in zip(self.group_multipliers, self.trust)]

    def lr_record(self, it: int) -> dict:
        """The per-group rates of step `it` for the logs (nothing with one group: "lr" says it all), and with
        --control the value of every controlled hyperparameter at that step."""
        record = {"lr_groups": dict(zip(self.group_names, self.group_lrs(it)))} if self.layered else {}
        if self.hparam_multipliers:
            record["hparams"] = hparam_values(self.cfg, self.lr(it), self.hparam_multipliers)
        return record

    def grad_clip(self) -> float:
        return self.cfg.grad_clip * self.hparam_multipliers.get("grad_clip", 1.0)

    def set_weight_decay(self) -> None:
        """Weight decay of the matrices' param groups: configured x its multiplier (none on the others)."""
        decay = self.cfg.weight_decay * self.hparam_multipliers.get("weight_decay", 1.0)
        for group, (_, matrices) in zip(self.optimizer.param_groups, self.optimizer_groups):
            group["weight_decay"] = decay if matrices else 0.0

    def apply_hparams(self) -> None:
        """The controlled weight decay and dropout, for the next step."""
        if "weight_decay" in self.hparam_multipliers:
            self.set_weight_decay()
        if "dropout" in self.hparam_multipliers:
            set_dropout(self.model, hparam_values(self.cfg, 0.0, self.hparam_multipliers)["dropout"])

    def apply_controls(self, it: int, lr: float) -> None:
        """Step `it`'s rate lr (each group at its own, when layered) and controlled hyperparameters."""
        if self.layered:
            rates = self.group_lrs(it)
            for group, (index, _) in zip(self.optimizer.param_groups, self.optimizer_groups):
                group["lr"] = rates[index]
        else:
            set_lr(self.optimizer, lr)
        if self.hparam_multipliers:
            self.apply_hparams()


# ----------------------------------------------------------------------------------------------
# 5. Agents: after each evaluation, observe its numbers and set the next multiplier
# ----------------------------------------------------------------------------------------------
# The interface, all the training loop knows of an agent:
#   agent.multiplier                  the factor applied to the base schedule until the next decision
#   agent.observe(Observation) -> dict  called after every evaluation; updates multiplier; returns the
#                                     fields logged with that evaluation (state, action, reward, ...)
#   agent.on_rollback(loss, it)       the interval after the last decision diverged and was undone;
#                                     the multiplier is cut (the loop writes what the optimizer now uses)
#   agent.state_dict() / load_state_dict(d)   JSON-safe, saved as agent_<dataset>_<seed>.json
#   agent.start_run()                 a new run begins (an agent trained across runs keeps what it learned)

@dataclass
class Observation:
    """What an agent sees at an evaluation: its losses, the history it needs, and training statistics
    gathered since the previous evaluation at no extra forward or backward pass."""
    it: int
    max_iters: int
    train_loss: float
    val_loss: float
    prev_val_loss: Optional[float] = None   # the previous evaluation's (None at the first)
    first_val_loss: Optional[float] = None
    multiplier: float = 1.0                 # in effect until this decision
    lr: float = 1e-3                        # base_schedule(it) x multiplier, clamped: the rate in effect now
    base_lr: float = 1e-3                   # the schedule's peak (--learning_rate)
    vocab_size: int = 256
    grad_norm_mean: Optional[float] = None  # of the steps since the previous evaluation (before clipping)
    grad_norm_std: Optional[float] = None
    clip_fraction: Optional[float] = None   # share of those steps whose gradient was clipped
    update_ratio: Optional[float] = None    # |w_now - w_prev_eval| / |w_now| over all parameters
    groups: Optional[list] = None           # --lr_groups layer: per LR group, input to output, a dict of its
    # name, grad_norm_mean/grad_norm_std (since the previous evaluation), weight_rms, update_ratio,
    # multiplier (its own, in effect until this decision) and lr (its rate now)
    hparams: Optional[dict] = None          # --control: each controlled hyperparameter besides lr -> its
    # multiplier, in effect until this decision
    reference_gain: Optional[float] = None  # --reward vs_reference: the reference run's val-loss drop over the
    # interval that just ended (train_agent.py runs the reference; None without one)


# The features a policy network sees are harness/observation.py's (train_agent.py's environment observes the
# same vector); harness/control.py's policy_inputs(cfg) tells it what the config decides about them.

def agent_actions(cfg: Config) -> list[float]:
    return parse_actions(cfg.agent_actions or DEFAULT_ACTIONS.get(cfg.agent, TABLE_ACTIONS))


def reward_for(kind: str, prev_val: Optional[float], val: float,
               reference_gain: Optional[float] = None) -> Optional[float]:
    """The reward of the interval that ended with val loss `val` (None: not defined yet, first evaluation).

    neg_val_loss:    -L_t                      (lower loss, higher reward)
    improvement:     L_{t-1} - L_t             (how much the interval gained)
    log_improvement: log L_{t-1} - log L_t     (the same, scale-free: comparable across datasets)
    vs_reference:    L_{t-1} - L_t - (R_{t-1} - R_t), R the same seed's reference run (--agent none) at the
                     same evaluations (reference_gain): over a run the rewards add up to R_T - L_T, what the
                     controller gained over the plain schedule, with the luck of the seed and base LR cancelled
    Each is monotone decreasing in L_t, so a higher loss never scores better.
    """
    if kind == "neg_val_loss":
        return -val
    if prev_val is None or (kind == "vs_reference" and reference_gain is None):
        return None
    if kind == "improvement":
        return prev_val - val
    if kind == "vs_reference":
        return prev_val - val - reference_gain
    return math.log(prev_val) - math.log(val)


def reference_gain(reference: Optional[dict], it: int) -> Optional[float]:
    """--reward vs_reference: the reference run's val-loss drop from the evaluation before `it` to `it`
    (reference: iteration -> its val loss, TrainingRun.reference, set by train_agent.py); None without one."""
    earlier = [i for i in reference if i < it] if reference else []
    if not earlier or it not in reference:
        return None
    return reference[max(earlier)] - reference[it]


def divergence_loss(cfg: Config, reference: Optional[float]) -> float:
    """The val loss a diverged interval counts as: the divergence threshold, which every interval that did
    not diverge stays below. Without a threshold (--divergence_factor 0), twice the first train loss: then
    a finite loss above that is no divergence and can score lower (only non-finite losses roll back).
    Before the first evaluation has set that yardstick no decision has been made, so nothing is scored;
    10 nats stands in."""
    reference = reference if reference is not None and math.isfinite(reference) else 10.0
    return (cfg.divergence_factor if cfg.divergence_factor > 0 else 2.0) * reference


class NoAgent(Agent):
    """The baseline: the multiplier stays 1, so the run is the plain base schedule. Every agent inherits it;
    the plumbing (multipliers per group or hyperparameter, bounds, records, saved state) is harness.agents.Agent."""


class RandomAgent(NoAgent):
    """Control: multiplies by a uniformly random action factor after each evaluation (--lr_groups layer:
    an independent draw for every group; --control: for every controlled hyperparameter)."""

    PER_GROUP = True
    MULTI_CONTROL = True

    def __init__(self, cfg: Config, seed: int):
        super().__init__(cfg, seed)
        self.actions = agent_actions(cfg)
        self.rng = np.random.default_rng(seed)

    def observe(self, obs: Observation) -> dict:
        if self.controls is not None:
            actions = [int(a) for a in self.rng.integers(len(self.actions), size=len(self.controls))]
            self.apply_controls([self.actions[a] for a in actions])
            return self.record(obs, action=actions, reward=None, epsilon=None, state=None)
        if self.group_multipliers is not None:
            actions = [int(a) for a in self.rng.integers(len(self.actions), size=self.n_groups)]
            self.apply([self.actions[a] for a in actions])
            return self.record(obs, action=actions, reward=None, epsilon=None, state=None)
        action = int(self.rng.integers(len(self.actions)))
        self.multiplier = self.clip(self.multiplier * self.actions[action])
        return self.record(obs, action=action, reward=None, epsilon=None, state=None)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.rng.bit_generator.state = state["rng"]


class ReplayAgent(NoAgent):
    """Control: plays back the multipliers an earlier run used, open loop (--agent_init that run)."""

    PER_GROUP = True
    MULTI_CONTROL = True

    def __init__(self, cfg: Config, seed: int, recorded: dict):
        super().__init__(cfg, seed)
        self.plan = {step["iter"]: step["multiplier"] for step in recorded["trajectory"]}
        self.hparam_plan = {step["iter"]: step.get("hparam_multipliers") for step in recorded["trajectory"]}
        recorded_controls = {tuple(sorted(h)) if h else () for h in self.hparam_plan.values()}
        if recorded_controls != {tuple(sorted(self.hparam_multipliers or {}))}:
            raise UserError(f"replay: the recorded run controlled {sorted(recorded_controls)[0] or ('lr',)} "
                            f"besides lr, this run {tuple(extra_controlled(cfg))}: use the same --control")
        self.group_plan = {step["iter"]: step.get("multipliers") for step in recorded["trajectory"]}
        lengths = {len(m) if m else 0 for m in self.group_plan.values()}
        if lengths != {self.n_groups}:
            raise UserError(f"replay: the recorded run set {max(lengths)} group multipliers, this run has "
                            f"{self.n_groups} (use the same --lr_groups and --n_layer)")

    def observe(self, obs: Observation) -> dict:
        if obs.it not in self.plan:
            raise UserError(f"replay: the recorded run has no decision at iteration {obs.it} "
                            f"(its evaluations were at {sorted(self.plan)[:5]}...); use the same eval_interval")
        self.multiplier = self.clip(self.plan[obs.it])
        if self.group_multipliers is not None:
            self.group_multipliers = [self.clip(m) for m in self.group_plan[obs.it]]
        if self.hparam_multipliers is not None:
            self.hparam_multipliers = dict(self.hparam_plan[obs.it])
        return self.record(obs, action=None, reward=None, epsilon=None, state=None)


class OracleAgent(NoAgent):
    """The ceiling of knowing the tuned rate: at each decision, the action factor that brings the peak rate
    (--learning_rate x multiplier) nearest --oracle_lr in log distance, within the bounds. It has the
    learners' actions and decision points, so it shows what those can reach, not what any schedule can."""

    def __init__(self, cfg: Config, seed: int):
        super().__init__(cfg, seed)
        self.actions = agent_actions(cfg)
        self.target = math.log(cfg.oracle_lr / cfg.learning_rate) if cfg.oracle_lr > 0 else 0.0

    def observe(self, obs: Observation) -> dict:
        if obs.it >= obs.max_iters:
            return self.record(obs, action=None, reward=None, epsilon=None, state=None)
        distance = [abs(math.log(self.clip(self.multiplier * a)) - self.target) for a in self.actions]
        action = int(np.argmin(distance))  # (ties, at a bound: the first; they give the same multiplier)
        self.multiplier = self.clip(self.multiplier * self.actions[action])
        return self.record(obs, action=action, reward=None, epsilon=None, state=None)


class QLearningAgent(NoAgent):
    """Tabular Q-learning over a small state space that recurs within and across runs.

    State = (trend of val loss since the last evaluation, multiplier below/at/above 1, third of training):
    45 states, so a table carried across runs (--agent_init) sees each of them again and again.
    Action = a factor applied to the multiplier.

    Values are learned on advantages: the reward minus its running mean at the same evaluation iteration
    (over every run this table has seen). Raw rewards are all about -2 (neg_val_loss), so a value table
    starting at 0 would rank every untried action above every tried one and the greedy choice would be
    the least-tried action. Measured against the usual outcome at that point of training, 0 means
    "as good as usual": an untried action is neither favoured nor punished, and a better action is
    positive after one visit. The baseline depends on the iteration only, the same for every action,
    so it does not change which action is best.

    Update (one-step TD): Q[s,a] += alpha * (A + gamma * max_a' Q[s',a'] - Q[s,a]); the last evaluation
    is terminal. A divergence is an ordinary (non-terminal) transition back to the restored state, with
    the reward of a loss at the divergence threshold: the worst outcome under every reward option.
    """

    TREND_EDGES = (-0.01, 0.001, 0.01)  # relative change: worse | flat | improving | improving fast
    MULT_BUCKETS = 3                     # multiplier below 1/sqrt(2), around 1, above sqrt(2)

    def __init__(self, cfg: Config, seed: int):
        super().__init__(cfg, seed)
        self.actions = agent_actions(cfg)
        shape = (1 + len(self.TREND_EDGES) + 1, self.MULT_BUCKETS, 3, len(self.actions))
        self.q = np.zeros(shape)
        self.visits = np.zeros(shape, dtype=np.int64)
        self.baseline: dict[str, list] = {}  # str(iter) -> [mean reward, count]
        # Separate streams: whether to explore (and where) is drawn at every decision, so epsilon
        # alone decides which decisions explore; ties among the greedy actions draw from their own.
        self.explore_rng = np.random.default_rng([seed, 1])
        self.tie_rng = np.random.default_rng([seed, 2])
        self.epsilon = 0.0 if cfg.agent_freeze else cfg.epsilon
        self.neutral = int(np.argmin([abs(math.log(a)) for a in self.actions]))  # the factor closest to x1
        self.prev_val, self.prev_state, self.prev_action = None, None, None

    def start_run(self, seed: Optional[int] = None) -> None:
        super().start_run(seed)
        self.prev_val, self.prev_state, self.prev_action = None, None, None
        if seed is not None:  # train_agent.py: each episode its own streams (parallel episodes draw apart)
            self.explore_rng, self.tie_rng = np.random.default_rng([seed, 1]), np.random.default_rng([seed, 2])

    def multiplier_bucket(self, multiplier: float) -> int:
        half = self.MULT_BUCKETS // 2
        return int(np.clip(round(math.log2(multiplier)), -half, half)) + half

    def discretise(self, obs: Observation) -> tuple:
        if self.prev_val is None:
            trend = 0  # first evaluation: no trend yet
        else:
            change = (self.prev_val - obs.val_loss) / max(abs(self.prev_val), 1e-12)
            trend = 1 + int(np.searchsorted(self.TREND_EDGES, change, side="right"))
        third = min(2, 3 * obs.it // max(1, obs.max_iters))
        return trend, self.multiplier_bucket(self.multiplier), third

    def advantage(self, reward: float, it: int, learn: bool) -> float:
        """reward minus the usual reward at this iteration (0 the first time), then update the usual reward.

        Like the values, it averages its first 1/alpha rewards, then follows recent ones with step alpha:
        "usual" means usual for the current policy, not for the early, mostly random one."""
        mean, count = self.baseline.get(str(it), (reward, 0))
        if learn:
            count += 1
            self.baseline[str(it)] = [mean + max(self.cfg.agent_lr, 1.0 / count) * (reward - mean), count]
        return reward - mean

    def td_update(self, advantage: float, state: Optional[tuple], terminal: bool) -> None:
        sa = self.prev_state + (self.prev_action,)
        target = advantage if terminal else advantage + self.cfg.gamma * self.q[state].max()
        self.visits[sa] += 1
        # The first visits average their targets (step 1/n), so no weight stays on the arbitrary initial 0;
        # from n = 1/alpha on, the constant step alpha tracks a changing target.
        self.q[sa] += max(self.cfg.agent_lr, 1.0 / self.visits[sa]) * (target - self.q[sa])

    def choose(self, state: tuple) -> tuple[int, bool]:
        """epsilon-greedy; greedy ties go to the neutral action x1 when it is among them."""
        explore = self.explore_rng.random() < self.epsilon
        random_action = int(self.explore_rng.integers(len(self.actions)))  # drawn either way: same stream position
        if explore:
            return random_action, True
        values = self.q[state]
        best = np.flatnonzero(values == values.max())
        if self.neutral in best:
            return self.neutral, False
        return int(self.tie_rng.choice(best)), False

    def observe(self, obs: Observation) -> dict:
        learn = not self.cfg.agent_freeze
        state = self.discretise(obs)
        reward = reward_for(reward_kind(self.cfg), self.prev_val, obs.val_loss, obs.reference_gain)
        advantage = None if reward is None else self.advantage(reward, obs.it, learn)
        terminal = obs.it >= obs.max_iters
        if learn and self.prev_action is not None and advantage is not None:
            self.td_update(advantage, state, terminal)
        action, explored, epsilon = None, None, self.epsilon
        if not terminal:
            action, explored = self.choose(state)
            self.multiplier = self.clip(self.multiplier * self.actions[action])
            if learn:
                self.epsilon = max(self.cfg.epsilon_min, self.epsilon * self.cfg.epsilon_decay)
        self.prev_val, self.prev_state, self.prev_action = obs.val_loss, state, action
        return self.record(obs, action=action, reward=reward, advantage=advantage, epsilon=epsilon,
                           explored=explored, state=list(state))

    def on_rollback(self, diverged_loss: float, it: int, final: bool = False) -> None:
        """The last action led to divergence: learn it as a transition to the restored state with the cut
        multiplier (training goes on, so the episode does not end; final: it does), then take no credit
        for the forced cut.

        The interval scores as if its val loss were `diverged_loss` (the divergence threshold, above every
        loss that did not diverge), plus --divergence_penalty, against the usual reward at `it`, the
        evaluation the interval would have reached: below every outcome that did not diverge."""
        super().on_rollback(diverged_loss, it, final)
        if self.prev_action is None or self.prev_state is None:
            return
        restored = (self.prev_state[0], self.multiplier_bucket(self.multiplier), self.prev_state[2])
        if not self.cfg.agent_freeze:
            reward = reward_for(reward_kind(self.cfg), self.prev_val, diverged_loss, 0.0) + self.cfg.divergence_penalty
            # The usual reward there (never updated with divergences); unseen yet: an interval that changed nothing.
            usual = self.baseline[str(it)][0] if str(it) in self.baseline else \
                reward_for(reward_kind(self.cfg), self.prev_val, self.prev_val, 0.0)
            self.td_update(reward - usual, restored, terminal=final)
        self.prev_state, self.prev_action = restored, None  # the forced cut is not the agent's action

    def state_dict(self) -> dict:
        return {**super().state_dict(), "actions": self.actions, "q": self.q.tolist(),
                "visits": self.visits.tolist(), "baseline": self.baseline,
                "explore_rng": self.explore_rng.bit_generator.state, "tie_rng": self.tie_rng.bit_generator.state,
                "epsilon": self.epsilon, "prev_val": self.prev_val,
                "prev_state": self.prev_state and list(self.prev_state), "prev_action": self.prev_action}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.load_table(state)
        self.explore_rng.bit_generator.state = state["explore_rng"]
        self.tie_rng.bit_generator.state = state["tie_rng"]
        self.epsilon, self.prev_val, self.prev_action = state["epsilon"], state["prev_val"], state["prev_action"]
        self.prev_state = tuple(state["prev_state"]) if state["prev_state"] is not None else None

    def load_table(self, state: dict) -> None:
        """What a later run inherits from an earlier one: the Q-table, visit counts and reward baseline."""
        if "q" not in state or "visits" not in state:
            raise UserError(f"--agent_init holds no Q-table (it was saved by agent {state.get('agent')!r})")
        if state.get("actions") != self.actions:
            raise UserError(f"--agent_init has actions {state.get('actions')}, this run {self.actions}")
        q, visits = np.asarray(state["q"], dtype=np.float64), np.asarray(state["visits"], dtype=np.int64)
        if q.shape != self.q.shape or visits.shape != self.q.shape or "baseline" not in state:
            raise UserError(f"--agent_init holds a Q-table of shape {q.shape} without this version's reward "
                            f"baseline; expected shape {self.q.shape} (retrain it with this version)")
        self.q, self.visits = q, visits
        self.baseline = {k: list(v) for k, v in state["baseline"].items()}

    def inherit(self, states: list[dict]) -> None:
        """--agent_init RUN: the experience of every seed of the earlier run, pooled.

        Q-values are averaged weighted by visits (an entry no seed visited stays 0), visits summed, the
        reward baselines pooled by count; exploration goes on from where the earlier run left it."""
        tables = []
        for state in states:
            self.load_table(state)
            tables.append((self.q, self.visits, self.baseline))
        visits = sum(v for _, v, _ in tables)
        weighted = sum(q * v for q, v, _ in tables)
        self.q = np.divide(weighted, visits, out=np.zeros_like(weighted), where=visits > 0)
        self.visits = visits
        pooled: dict[str, list] = {}
        for _, _, baseline in tables:
            for it, (mean, count) in baseline.items():
                old_mean, old_count = pooled.get(it, (0.0, 0))
                total = old_count + count
                pooled[it] = [(old_mean * old_count + mean * count) / max(total, 1), total]
        self.baseline = pooled
        if not self.cfg.agent_freeze:
            self.epsilon = max(self.cfg.epsilon_min, min(s.get("epsilon", self.cfg.epsilon) for s in states))


def reinforce_agent(cfg: Config, seed: int) -> ReinforceAgent:
    """The policy-gradient agent (harness/agents.py), with this file's action factors and reward."""
    return ReinforceAgent(cfg, seed, agent_actions(cfg), functools.partial(reward_for, reward_kind(cfg)))


# reinforce and the stable-baselines3 agents (SB3Agent) are harness/agents.py's: they act on a policy network.
AGENTS = {"none": NoAgent, "random": RandomAgent, "replay": ReplayAgent, "oracle": OracleAgent,
          "qlearning": QLearningAgent, "reinforce": reinforce_agent}


def trained_policy(cfg: Config) -> Optional[dict]:
    """--agent_init DIR written by train_agent.py, checked against this run (harness.policy_files)."""
    return read_policy_folder(cfg.agent_init, cfg.agent, policy_inputs(cfg).spec(), agent_actions(cfg),
                              lr_groups=lr_groups_kind(cfg), control=cfg.control)


def frozen(cfg: Config, trained: bool) -> bool:
    """A policy trained across runs is deployed frozen unless --agent_learn; otherwise agents learn
    unless --agent_freeze."""
    if cfg.agent_learn is not None:
        return not cfg.agent_learn
    return cfg.agent_freeze or trained


def make_agent(cfg: Config, seed: int, dataset: str, seed_index: int):
    if cfg.agent == "replay":
        if not cfg.agent_init:
            raise UserError("--agent replay needs --agent_init RUN_DIR (or an agent_<dataset>_<seed>.json)")
        return ReplayAgent(cfg, seed, read_agent_init(cfg.agent_init, dataset, seed_index)[0])
    policy = trained_policy(cfg)
    cfg = dataclasses.replace(cfg, agent_freeze=frozen(cfg, policy is not None))
    if cfg.agent in SB3_AGENTS:
        if policy is None:
            raise UserError(f"--agent {cfg.agent} needs --agent_init DIR: a policy trained by "
                            f"train_agent.py --agent {cfg.agent}")
        if not cfg.agent_freeze:
            raise UserError(f"--agent {cfg.agent} is deployed frozen (stable-baselines3 learns in its own loop: "
                            f"train it further with train_agent.py)")
        return SB3Agent(cfg, seed, agent_actions(cfg), policy)
    agent = AGENTS[cfg.agent](cfg, seed)
    if policy is not None:
        state = read_agent_state(Path(policy["file"]))
        if isinstance(agent, ReinforceAgent):
            agent.load_policy(state)
        else:
            agent.inherit([state])
    elif cfg.agent_init:
        if not isinstance(agent, QLearningAgent):
            raise UserError(f"--agent_init for --agent {cfg.agent} must be a folder written by train_agent.py "
                            f"(qlearning also takes an earlier run folder; replay, the run to replay)")
        agent.inherit(read_agent_init(cfg.agent_init, dataset))
    return agent


# ----------------------------------------------------------------------------------------------
# 6. Training one dataset and seed
# ----------------------------------------------------------------------------------------------

# Several processes (torchrun): every rank trains the same model on its own batches and PyTorch's
# DistributedDataParallel averages their gradients. DDP synchronises gradients, not optimizer settings,
# so whatever steers training is decided once and shared: the agent decides on rank 0 and its multipliers
# reach every rank before its next step; evaluations are sharded and summed, so every rank sees the same
# losses and takes the same rollbacks; a stop request is agreed at logged steps. Rank 0 alone writes files.

@torch.no_grad()
def estimate_loss(model: nn.Module, samplers: dict, eval_starts: dict, rt: Runtime, stop=None) -> dict:
    """Mean loss over the run's fixed evaluation batches, per split (one host sync per split). Under torchrun
    rank r evaluates batches r, r + size, ... and the sums are added up: every rank gets the same means.
    stop(), asked between batches, ends it early, returning None (a SIGTERM cannot wait for a long one)."""
    world = rt.world
    model.eval()
    out = {}
    try:
        for split, starts_list in eval_starts.items():
            total = torch.zeros((), device=rt.device)
            for starts in world.shard(starts_list, stop):
                x, y = samplers[split].batch_at(starts)
                with rt.autocast:
                    _, loss = model(x, y)
                total += loss.float()
            out[split] = (world.sum_(total) / len(starts_list)).item()
    except EvaluationStopped:
        return None
    finally:
        model.train()
    return out


def final_eval_windows(n_tokens: int, cfg: Config) -> int:
    """Consecutive block_size windows the final evaluation reads from a split: final_eval_tokens at most."""
    return max(0, (min(n_tokens, cfg.final_eval_tokens + 1) - 1) // cfg.block_size)


@torch.no_grad()
def split_loss(model: nn.Module, tokens: np.ndarray, cfg: Config, rt: Runtime, stop=None) -> float:
    """Mean loss over the first windows of a split, read in consecutive block_size windows.

    The quantity estimate_loss samples (every window position counts equally), read once instead of
    sampled: no noise from which batches were drawn, so runs compare on the same text. Tokens that do
    not fill a last window are left out. stop(): as in estimate_loss.
    """
    model.eval()
    world = rt.world  # under torchrun each rank reads every size-th batch of windows; the sums are added up
    n_windows, block = final_eval_windows(len(tokens), cfg), cfg.block_size
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    for first in world.shard(range(0, n_windows, cfg.batch_size), stop):
        starts = np.arange(first, min(first + cfg.batch_size, n_windows)) * block
        x, y = windows_at(tokens, starts, block, rt.device)
        with rt.autocast:
            _, loss = model(x, y)
        total += loss.double() * len(starts)
    model.train()
    return (world.sum_(total) / n_windows).item()


def final_evaluation(model: nn.Module, data: CharDataset, cfg: Config, rt: Runtime, stop=None) -> dict:
    """full_val_loss (and test_loss where the dataset has a test split) of the final model; {} when off."""
    val_windows = final_eval_windows(len(data.splits["val"]), cfg)
    if val_windows == 0:  # final_eval_tokens 0 (off) or shorter than one window
        return {}
    t = time.time()
    out = {"full_val_loss": split_loss(model, data.splits["val"], cfg, rt, stop),
           "full_val_tokens": val_windows * cfg.block_size}
    if final_eval_windows(len(data.splits.get("test", ())), cfg):
        out["test_loss"] = split_loss(model, data.splits["test"], cfg, rt, stop)
    out["final_eval_time"] = time.time() - t
    return out


@dataclass
class SeedState:
    """Everything about one seed's training that is not a tensor; saved in every checkpoint."""
    next_it: int = 0               # the next optimizer step to take
    last_eval_it: int = -1         # the last evaluated iteration (its agent decision is made)
    train_log: list = field(default_factory=list)
    val_log: list = field(default_factory=list)
    best_val_loss: Optional[float] = None
    best_val_iter: int = 0
    last_logged_loss: Optional[float] = None
    reference_loss: Optional[float] = None  # first evaluation's train loss: the divergence yardstick
    last_eval_losses: Optional[list] = None  # [train, val] of the last evaluation
    rollbacks: int = 0
    first_val_loss: Optional[float] = None
    prev_val_loss: Optional[float] = None   # the evaluation before the last one
    grad_sums: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # since the last evaluation: sum of
    grad_steps: int = 0                    # gradient norms, of their squares, clipped steps; steps taken
    interval: dict = field(default_factory=dict)  # those statistics as of the last evaluation (Observation fields)
    group_grad_sums: list = field(default_factory=list)  # --lr_groups layer: per group, sum of gradient norms
    # and of their squares since the last evaluation ([sums, squares])
    elapsed: float = 0.0           # training-loop seconds spent before this process (resume)
    eval_time: float = 0.0
    agent_time: float = 0.0
    checkpoint_time: float = 0.0


def model_config(cfg: Config, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                     n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)


def is_diverged(loss: float, reference: Optional[float], factor: float) -> bool:
    return not math.isfinite(loss) or (reference is not None and factor > 0 and loss > factor * reference)


@dataclass
class EvalResult:
    """What TrainingRun.advance() stopped at: the next evaluation, or why it stopped short of it."""
    it: int
    train_loss: Optional[float] = None   # mean loss over the run's fixed evaluation batches
    val_loss: Optional[float] = None
    diverged: Optional[str] = None       # what diverged, e.g. "train loss nan at iter 12": call rollback_before
    interrupted: bool = False            # stop() asked for it before step `it`
    done: bool = False                   # the final evaluation (it == max_iters)


class TrainingRun(Controls, RunCheckpoints):
    """One dataset and seed's training, advanced by a caller from evaluation to evaluation.

    The caller sets `multiplier` (the only knob: lr = clamp(base_schedule(it) x multiplier)), calls
    advance(), and decides what follows: an agent's decision, a checkpoint, a rollback, stopping. No agent,
    signal handler or progress bar lives in here; on_log(it, loss, lr) hears every logged step.

    Its parts: the step and advance() (here, in nanoGPT's order), the knobs (Controls), checkpoints
    (RunCheckpoints: the last two, so a rollback can go back to before a divergence; checkpoint=None keeps
    them in memory, for train_agent.py's short runs by the thousand) and the gradient statistics
    (harness.grad_stats: what an agent observes beside the losses).
    model=None builds a fresh GPT from cfg; a given model (e.g. a pruned one) is trained as it is.

    The run draws from its own torch RNG stream (initialisation, dropout), swapped in around its work:
    a caller's RNG (a policy sampling actions, another run) neither moves it nor is moved by it.
    """

    def __init__(self, cfg: Config, data: CharDataset, seed_index: int, rt: Runtime, checkpoint: Optional[Path],
                 on_log=None, model: Optional[GPT] = None):
        self.cfg, self.data, self.rt = cfg, data, rt
        self.seed = cfg.seed_base + seed_index
        self.cuda_rng = rt.device.type == "cuda"
        self.world = rt.world
        previous = previous_checkpoint_file(Path(checkpoint)) if checkpoint is not None else None
        self.store = CheckpointStore(checkpoint, previous, self.world)  # checkpoint None: kept in memory
        rank_seed = self.seed + RANK_SEED_STRIDE * self.world.rank  # rank 0: the single-process streams
        with self.own_rng(initial_seed=self.seed):  # model=: train that one instead (prune.py's fine-tuning)
            self.model = (model if model is not None else GPT(model_config(cfg, data.vocab_size))).to(rt.device)
            if self.world.rank:  # the same initial weights everywhere, each rank's own dropout masks
                torch.manual_seed(rank_seed)
        self.optimizer = self.model.make_optimizer(cfg, rt.device)
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.dtype == torch.float16)
        self.compile_time, self.step_model = 0.0, self.model
        compile_wrapped = rt.compile and cfg.compile_ddp and self.world.distributed
        if rt.compile and not compile_wrapped:
            t = time.time()
            self.step_model = torch.compile(self.model)
            self.compile_time = time.time() - t  # the lazy compile itself lands in the first steps' time
        self.eval_model = self.step_model  # evaluation runs outside DDP: no gradient hooks, no collectives
        self.micro_steps, micro_batch = self.world.batch_split(cfg)  # (under torchrun: this rank's share)
        if self.world.distributed:  # nanoGPT's order: compile, then wrap (DDP also sends rank 0's weights out);
            self.step_model = self.world.wrap(self.step_model, rt.device, compile_wrapped)  # or --compile_ddp
        self.rank_lrs: list = []  # under torchrun: this process's optimizer rates at each logged step it took
        # Separate generators: training batches (each rank its own stream), and the fixed evaluation batches
        # drawn once per run, so every evaluation (and every agent reward) compares the model on the same text.
        self.sampler = BatchSampler(data.splits["train"], cfg.block_size, micro_batch, rt.device, rank_seed)
        self.eval_samplers = {split: BatchSampler(data.splits[split], cfg.block_size, cfg.batch_size, rt.device,
                                                  self.seed + 7919 + k) for k, split in enumerate(("train", "val"))}
        self.eval_starts = {split: [s.draw_starts() for _ in range(cfg.eval_iters)]
                            for split, s in self.eval_samplers.items()}
        self.state = SeedState()
        self.init_controls(cfg, self.optimizer)
        group_of = {id(p): lr_group_of(name) for name, p in self.model.named_parameters()} if self.layered else {}
        params = list(self.model.parameters())
        self.stats = GradientStatistics(params, [self.group_names.index(group_of.get(id(p), "all")) for p in params],
                                        self.group_names, rt.device)
        self.steps_taken = 0  # optimizer steps this object has run (rollbacks and restores included): compute
        self.reference: Optional[dict] = None  # --reward vs_reference: iteration -> the reference run's val loss
        self.on_log = on_log or (lambda it, loss, lr: None)
        self.faults = FaultInjector.from_environment(self.world.rank)
        optimizer_mode(self.optimizer, training=True)

    @contextmanager
    def own_rng(self, initial_seed: Optional[int] = None):
        """Run the block on this run's torch RNG stream (seeded with initial_seed the first time)."""
        devices = [torch.cuda.current_device()] if self.cuda_rng else []
        with torch.random.fork_rng(devices=devices):
            if initial_seed is not None:
                torch.manual_seed(initial_seed)
            else:
                torch.set_rng_state(self.rng_state["cpu"])
                if devices:
                    torch.cuda.set_rng_state(self.rng_state["cuda"])
            try:
                yield
            finally:
                self.rng_state = {"cpu": torch.get_rng_state(),
                                  "cuda": torch.cuda.get_rng_state() if devices else None}

    # --- training -----------------------------------------------------------------------------

    def advance(self, stop=lambda: False) -> EvalResult:
        """Train up to the next evaluation and evaluate there (at once, if the run stands on an evaluation
        iteration it has not evaluated). A divergence, or stop() before a step, returns early."""
        cfg, s = self.cfg, self.state
        if s.last_eval_it >= cfg.max_iters:  # finished (e.g. resumed from the final checkpoint): nothing to train
            return EvalResult(s.last_eval_it, *self.last_eval_losses(), done=True)
        with self.own_rng():
            return self._advance(stop)

    def _advance(self, stop) -> EvalResult:
        cfg, s = self.cfg, self.state
        it, t_start = s.next_it, time.time()
        t_window, window_iters = t_start, 0
        try:
            while True:
                if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and s.last_eval_it < it:
                    return self.evaluate(it, stop)
                logged = it % cfg.log_interval == 0 or it == cfg.max_iters - 1
                if self.stop_agreed(stop, logged):
                    s.next_it = it
                    return EvalResult(it, interrupted=True)
                lr = self.lr(it)
                rates = self.lr_record(it) if logged else {}  # (before the step: LAMB moves the trust)
                loss = self.step(it, lr)
                window_iters += 1
                if logged:
                    lossf = loss.item()  # the only host sync of the step, once per log_interval
                    if self.world.distributed:  # the ranks' mean, so that all of them see the same divergence
                        lossf = self.world.mean(lossf)
                        self.rank_lrs.append({"iter": it, "lr": [g["lr"] for g in self.optimizer.param_groups]})
                    if is_diverged(lossf, s.reference_loss, cfg.divergence_factor):
                        return EvalResult(it, diverged=f"train loss {lossf:.4g} at iter {it}")
                    now = time.time()
                    s.train_log.append({"iter": it, "loss": lossf, "lr": lr, **rates,
                                        "time": (now - t_window) * 1000 / window_iters})
                    s.last_logged_loss = lossf
                    t_window, window_iters = now, 0
                    self.on_log(it + 1, lossf, lr)
                it += 1
        finally:
            s.elapsed += time.time() - t_start

    def stop_agreed(self, stop, logged: bool) -> bool:
        """stop() before a step. Under torchrun the ranks must stop at the same step, and agreeing costs a
        collective: they ask at logged steps only (a signal waits at most log_interval steps)."""
        if not self.world.distributed:
            return stop()
        return logged and self.world.any(stop())

    def step(self, it: int, lr: float) -> torch.Tensor:
        """One optimizer step at rate lr (each group at its own, when layered); returns the last micro-batch's
        loss (on the device, not synced)."""
        cfg = self.cfg
        self.faults.raise_if_due(it)
        self.apply_controls(it, lr)
        loss = self.accumulate_gradients(it)
        if self.layered:  # clipped by the global norm, each group's norm kept too
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            self.stats.clip_by_group(self.grad_clip() if cfg.grad_clip > 0 else 0.0)
        elif cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip = self.grad_clip()
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.stats.add(norm, (norm > clip).float())
        elif not self.scaler.is_enabled():  # (with a float16 scaler and no clipping the grads are scaled: skipped)
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            self.stats.add(norm, torch.zeros_like(norm))
        self.state.grad_steps += 1
        self.steps_taken += 1
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.layer_trust == "lamb":  # LAMB's trust per layer, used from the next step on (one step stale)
            self.trust = lamb_trust(self.optimizer, self.optimizer_groups, len(self.group_names), cfg.trust_clip,
                                    self.rt.device) or self.trust
        return loss

    def accumulate_gradients(self, it: int) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; the gradients are their mean (under torchrun,
        DDP's mean over every rank's, exchanged in the last micro-step's backward only)."""
        rt = self.rt
        for k in range(self.micro_steps):
            x, y = self.sampler.next_batch()
            last = k == self.micro_steps - 1
            with self.step_model.no_sync() if self.world.distributed and not last else nullcontext():
                with rt.autocast:
                    _, loss = self.step_model(x, y)
                if self.faults.poison(it, self.model):
                    loss = loss * float("nan")
                self.scaler.scale(loss / self.micro_steps).backward()
        return loss

    def evaluate(self, it: int, stop=lambda: False) -> EvalResult:
        cfg, s = self.cfg, self.state
        t = time.time()
        optimizer_mode(self.optimizer, training=False)
        losses = estimate_loss(self.eval_model, self.eval_samplers, self.eval_starts, self.rt,
                               lambda: self.stop_agreed(stop, True))
        optimizer_mode(self.optimizer, training=True)
        s.eval_time += time.time() - t
        if losses is None:  # stopped inside it: checkpointed as the step before it, a resumed run evaluates `it`
            s.next_it = it
            return EvalResult(it, interrupted=True)
        if is_diverged(losses["val"], s.reference_loss, cfg.divergence_factor):
            return EvalResult(it, losses["train"], losses["val"], diverged=f"val loss {losses['val']:.4g} at iter {it}")
        s.reference_loss = s.reference_loss or losses["train"]
        if s.best_val_loss is None or losses["val"] < s.best_val_loss:
            s.best_val_loss, s.best_val_iter = losses["val"], it
        s.prev_val_loss = s.last_eval_losses[1] if s.last_eval_losses else None
        s.first_val_loss = s.first_val_loss or losses["val"]
        s.last_eval_it = s.next_it = it
        s.last_eval_losses = [losses["train"], losses["val"]]
        s.interval = self.stats.interval_statistics(s)
        return EvalResult(it, losses["train"], losses["val"], done=it == cfg.max_iters)

    def observation(self) -> Observation:
        """What an agent sees at the last evaluation, with the multiplier now in effect."""
        s, cfg = self.state, self.cfg
        train_loss, val_loss = self.last_eval_losses()
        interval = dict(s.interval)
        if self.layered:  # each group's statistics with the multiplier and rate now in effect
            rates = self.group_lrs(s.last_eval_it)
            stats = interval.get("groups") or [{"name": name} for name in self.group_names]
            interval["groups"] = [{**g, "multiplier": m, "lr": r}
                                  for g, m, r in zip(stats, self.group_multipliers, rates)]
        if self.hparam_multipliers:
            interval["hparams"] = dict(self.hparam_multipliers)
        return Observation(s.last_eval_it, cfg.max_iters, train_loss, val_loss, prev_val_loss=s.prev_val_loss,
                           first_val_loss=s.first_val_loss, multiplier=self.multiplier, lr=self.lr(s.last_eval_it),
                           base_lr=cfg.learning_rate, vocab_size=self.data.vocab_size,
                           reference_gain=reference_gain(self.reference, s.last_eval_it), **interval)

    def last_eval_losses(self) -> list:
        """[train, val] of the last evaluation (from the val log for checkpoints older than the field)."""
        s = self.state
        return s.last_eval_losses or [s.val_log[-1]["train/loss"], s.val_log[-1]["val/loss"]]

    def finish(self, status: str, stop=lambda: False) -> dict:
        """The final model's whole-split losses and sampling speed, and the seed's final_info (stop(): see shard)."""
        cfg, s = self.cfg, self.state
        last_train, last_val = self.last_eval_losses()
        optimizer_mode(self.optimizer, training=False)  # evaluate and sample the weights that were evaluated
        final_eval = final_evaluation(self.model, self.data, cfg, self.rt, lambda: self.stop_agreed(stop, True))
        # Sampling speed is measured on rank 0's device alone (the others' numbers would not be written).
        sampling = cfg if self.world.is_main else dataclasses.replace(cfg, inference_samples=0)
        speed = measure_inference_speed(self.model, self.data, sampling, self.rt, self.seed)
        self.sample = speed["sample"]
        return {
            "final_train_loss": s.last_logged_loss if s.last_logged_loss is not None else last_train,
            "best_val_loss": s.best_val_loss,
            "total_train_time": s.elapsed,
            "avg_inference_tokens_per_second": speed["avg_tokens_per_second"],
            "inference_tokens_per_second_aggregate": speed["aggregate_tokens_per_second"],
            "best_val_iter": s.best_val_iter,
            "final_val_loss": last_val,
            **final_eval,
            "train_time": s.elapsed - s.eval_time,
            "eval_time": s.eval_time,
            "compile_time": self.compile_time,
            "agent_time": s.agent_time,
            "checkpoint_time": s.checkpoint_time,
            "sample_time": speed["sample_time"],
            "rollbacks": s.rollbacks,
            "inference_kv_cache": cfg.kv_cache,  # the reference experiment samples without one: say which was used
            "seed": self.seed,
            "num_params": self.model.num_params(),
            "status": status,
        }


def train_one_seed(cfg: Config, data: CharDataset, seed_index: int, rt: Runtime, out_dir: Path,
                   interactive: bool, stop: StopRequest, resume: bool = False, on_evaluation=None) -> dict:
    """Train one model with its agent; return its final_info, train log and val log (the all_results.npy
    records). The loop: advance to the next evaluation, let the agent decide, checkpoint; on a divergence
    roll back and tell the agent; on SIGTERM/Ctrl-C checkpoint and stop. on_evaluation(run), if given, is
    called after every evaluation's checkpoint (sweep.py reports to Ray Tune there)."""
    run = TrainingRun(cfg, data, seed_index, rt, checkpoint_file(out_dir, data.name, seed_index))
    main = rt.world.is_main  # under torchrun the other ranks follow rank 0's agent (see follow) and are quiet
    agent = make_agent(cfg, run.seed, data.name, seed_index) if main else NoAgent(cfg, run.seed)
    saved_agent = run.resume() if resume else None
    if saved_agent is not None:
        agent.load_state_dict(saved_agent)
    label = f"{data.name} seed {seed_index}"
    progress = Progress(label, cfg.max_iters, run.state.next_it, interactive and main)
    log = progress.write if main else lambda line: None
    if main:
        run.on_log = lambda it, loss, lr: progress.update(it, loss, lr, force=it == cfg.max_iters)
    curves = LiveCurves(curves_folder(out_dir, data.name, seed_index), run) if cfg.tensorboard and main else None
    if curves is not None:  # --tensorboard: every record also goes to an event file, as it is made
        run.on_log, on_evaluation = curves.follow(run.on_log, on_evaluation)
    if run.state.next_it:
        log(f"[{label}] resuming at iter {run.state.next_it}")
    try:
        status = drive(run, agent, stop=lambda: stop.signal_name is not None, log=log, label=label,
                       on_evaluation=on_evaluation)
        final_info = run.finish(status, stop=lambda: stop.signal_name is not None)
    except Interrupted as e:  # (EvaluationStopped included)
        raise Interrupted(f"{stop.signal_name or 'another rank'}: {e}") from None
    finally:
        progress.close()
        if curves is not None:
            curves.close()
    result = {"final_info": final_info, "train_info": run.state.train_log, "val_info": run.state.val_log,
              "sample": run.sample, "agent_state": agent.state_dict(), "model": run.model}
    if rt.world.distributed:  # the evidence that every rank's optimizer used the same rates
        result["rank_lr_info"] = rt.world.gather(run.rank_lrs)
        final_info["ranks_lr_agree"] = all(r == result["rank_lr_info"][0] for r in result["rank_lr_info"])
        if not final_info["ranks_lr_agree"]:
            log(f"[{label}] warning: the ranks' optimizers used different learning rates (all_results: rank_lr_info)")
    return result


def drive(run: TrainingRun, agent: NoAgent, stop=lambda: False, log=lambda line: None, label: str = "",
          on_evaluation=None) -> str:
    """The control loop: advance to the next evaluation, let the agent decide, checkpoint; on a divergence
    roll back and tell the agent; when stop() asks, checkpoint and raise Interrupted. Returns the run's
    status, "finished" or "diverged". The CLI's seeds and train_agent.py's episodes both run through here."""
    cfg = run.cfg
    while run.state.last_eval_it < cfg.max_iters:  # a seed resumed from its final checkpoint is done already
        follow(run, agent)
        result = run.advance(stop=stop)
        if result.interrupted:
            run.save(agent.state_dict())
            raise Interrupted(f"checkpoint saved at iter {result.it}; continue with --resume")
        if result.diverged:
            if roll_back(run, agent, result, log, label):
                continue
            return "diverged"
        t_agent = time.perf_counter()
        decision = agent.observe(run.observation())
        agent_time = time.perf_counter() - t_agent
        run.state.agent_time += agent_time
        run.state.elapsed += agent_time
        follow(run, agent)  # the agent's choice applies from this step on
        lr = run.lr(result.it)
        run.state.val_log.append({"iter": result.it, "train/loss": result.train_loss, "val/loss": result.val_loss,
                                  "lr": lr, **run.lr_record(result.it), **decision})
        log(f"[{label}] iter {result.it}: train {result.train_loss:.4f} val {result.val_loss:.4f} lr {lr:.2e}")
        run.save(agent.state_dict())
        if on_evaluation is not None:
            on_evaluation(run)
    return "finished"


def follow(run: TrainingRun, agent: NoAgent) -> None:
    """The agent's multipliers become the run's (a global agent leaves every group at 1). Under torchrun
    only rank 0 holds the agent: every rank takes rank 0's multipliers, before any rank's next step."""
    run.multiplier = agent.multiplier
    if agent.group_multipliers is not None:
        run.group_multipliers = list(agent.group_multipliers)
    if agent.hparam_multipliers is not None:
        run.hparam_multipliers = dict(agent.hparam_multipliers)
    if run.world.distributed:
        run.multiplier, run.group_multipliers, run.hparam_multipliers = run.world.from_main(
            lambda: (run.multiplier, run.group_multipliers, run.hparam_multipliers))


def roll_back(run: TrainingRun, agent: NoAgent, result: EvalResult, log, label: str) -> bool:
    """Back to the newest checkpoint from before the failing step, with a smaller multiplier.

    False once the rollbacks are spent (or no such checkpoint exists): the seed then ends with its last
    good weights, not NaNs."""
    cfg = run.cfg
    rollbacks = run.state.rollbacks + 1
    saved_agent = run.rollback_before(result.it)
    restored = saved_agent is not None
    if not restored:  # the best there is: the weights entering the failed step
        saved_agent = run.rollback_before(result.it + 1)
    if saved_agent is not None:
        agent.load_state_dict(saved_agent)
    run.state.rollbacks = min(rollbacks, cfg.max_rollbacks)
    next_eval = min((run.state.last_eval_it // cfg.eval_interval + 1) * cfg.eval_interval, cfg.max_iters)
    diverged_loss = divergence_loss(cfg, run.state.reference_loss)
    if not restored or rollbacks > cfg.max_rollbacks:
        agent.on_rollback(diverged_loss, next_eval, final=True)
        log(f"[{label}] {result.diverged}: " + (f"{cfg.max_rollbacks} rollbacks spent" if restored
            else "no checkpoint from before it") + ", the seed ends as diverged")
        return False
    log(f"[{label}] {result.diverged}: rollback {rollbacks}/{cfg.max_rollbacks} to iter {run.state.next_it}")
    agent.on_rollback(diverged_loss, next_eval)
    follow(run, agent)
    record = run.state.val_log[-1] if run.state.val_log else None
    if record is not None and record["iter"] == run.state.next_it:
        # What the optimizer uses from here on, so the logs (and --agent replay) say what was used.
        record.update(multiplier=agent.multiplier, lr=run.lr(record["iter"]), **run.lr_record(record["iter"]),
                      rollbacks=record.get("rollbacks", 0) + 1)
    run.save(agent.state_dict())
    return True


# ----------------------------------------------------------------------------------------------
# 7. Sampling and inference speed
# ----------------------------------------------------------------------------------------------

def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row from the last position's logits: temperature, top-k, then a multinomial draw."""
    logits = logits[:, -1, :].float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    probs = F.softmax(logits, dim=-1)
    # Drawn on the CPU from an explicit generator: the same tokens on every device for a seed.
    return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(logits.device)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True) -> torch.Tensor:
    """Sample max_new_tokens after idx (B, T); the model always sees the last block_size tokens.

    use_cache=False is nanoGPT's loop: re-run the whole (cropped) context for every token.
    use_cache=True gives the same tokens faster: while the context fits in block_size, each step runs
    only the new token and attends to cached keys/values. Once it no longer fits, the window slides:
    every position embedding changes, so the cache is rebuilt from the cropped context each step
    (exactly the cache-free computation; positions are absolute, so nothing cheaper is exact).
    """
    block_size = model.config.block_size
    caches, cached_len = None, 0
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(idx[:, -block_size:])
        elif caches is None or cached_len >= block_size:  # first step, or the window has slid
            context = idx[:, -block_size:]
            caches = [{} for _ in model.transformer.h]
            logits, _ = model(context, caches=caches)
            cached_len = context.size(1)
        else:
            logits, _ = model(idx[:, -1:], caches=caches, start_pos=cached_len)
            cached_len += 1
        idx = torch.cat((idx, sample_next(logits, temperature, top_k, generator)), dim=1)
    return idx


def measure_inference_speed(model: GPT, data: CharDataset, cfg: Config, rt: Runtime, seed: int) -> dict:
    """The reference experiment's measurement: prompt " ", batch 1, tokens/s per sample, averaged."""
    result = {"avg_tokens_per_second": 0.0, "aggregate_tokens_per_second": 0.0, "sample_time": 0.0, "sample": ""}
    if cfg.inference_samples <= 0:
        return result
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([data.encode(" ")], dtype=torch.long, device=rt.device)
    rates, total_time = [], 0.0
    for k in range(cfg.inference_samples):
        t = time.time()
        with rt.autocast:
            out = generate(model, prompt, cfg.inference_new_tokens, cfg.temperature, cfg.top_k, generator,
                           use_cache=cfg.kv_cache)
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t
        rates.append(cfg.inference_new_tokens / dt)
        total_time += dt
        if k == 0:
            result["sample"] = data.decode(out[0].tolist())
    model.train()
    result.update(avg_tokens_per_second=float(np.mean(rates)), sample_time=total_time,
                  aggregate_tokens_per_second=cfg.inference_samples * cfg.inference_new_tokens / total_time)
    return result


# ----------------------------------------------------------------------------------------------
# 8. The run folder
# ----------------------------------------------------------------------------------------------

def summarize(per_seed: list[dict]) -> dict:
    """final_info.json's entry for one dataset: means, stderrs (ddof=1; null for n=1), per-seed lists."""
    keys = [k for k, v in per_seed[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "seed"]
    final_info_dict = {k: [s[k] for s in per_seed] for k in keys}
    means, stderrs = {}, {}
    for k, values in final_info_dict.items():
        means[f"{k}_mean"], stderrs[f"{k}_stderr"] = mean_and_stderr(values)
    return {"means": means, "stderrs": stderrs, "final_info_dict": final_info_dict,
            "seeds": [s["seed"] for s in per_seed], "statuses": [s.get("status", "finished") for s in per_seed],
            "n": len(per_seed)}


def inference_protocol(cfg: Config) -> dict:
    """How avg_inference_tokens_per_second was measured: rates are comparable only under the same protocol."""
    return {"kv_cache": cfg.kv_cache, "prompt": " ", "samples": cfg.inference_samples,
            "new_tokens": cfg.inference_new_tokens, "temperature": cfg.temperature, "top_k": cfg.top_k,
            "batch_size": 1}


def train_all(configs: dict, loaded: dict, rt: Runtime, out_dir: Path, interactive: bool, stop: StopRequest,
              resume: bool, on_evaluation=None) -> dict:
    """Every dataset and seed; per-seed files are written as soon as each seed ends (under torchrun: by
    rank 0; every rank trains every seed, and the others return their own, unwritten, final_infos)."""
    main = rt.world.is_main
    all_results = {}
    if resume and main and (out_dir / "all_results.json").exists():
        all_results = read_json(out_dir / "all_results.json")
    final_infos = {}
    for dataset, cfg in configs.items():
        per_seed = []
        for seed_index in range(cfg.seeds):
            done = rt.world.from_main(lambda: finished_seed(out_dir, all_results, dataset, seed_index)) \
                if resume else None
            if done is not None:
                if main:
                    print(f"[{dataset} seed {seed_index}] finished earlier: kept", flush=True)
                per_seed.append(done)
                continue
            result = train_one_seed(cfg, loaded[dataset], seed_index, rt, out_dir, interactive, stop, resume,
                                    on_evaluation)
            info = result["final_info"]
            per_seed.append(info)
            if not main:
                continue
            for kind in ("final_info", "train_info", "val_info", "rank_lr_info"):
                if kind in result:
                    all_results[f"{dataset}_{seed_index}_{kind}"] = result[kind]
            atomic_write_json(agent_file(out_dir, dataset, seed_index), result["agent_state"])
            save_model(model_file(out_dir, dataset, seed_index), result["model"])  # the final weights are kept
            atomic_save_npy(out_dir / "all_results.npy", all_results)  # after every seed: a crash loses one seed
            atomic_write_json(out_dir / "all_results.json", all_results)  # the same, readable without unpickling
            atomic_write_json(out_dir / f"final_info_{dataset}_{seed_index}.json",  # last: marks the seed done
                              {**info, "dataset": dataset, "seed_index": seed_index, "sample": result["sample"]})
            remove_checkpoints(out_dir, dataset, seed_index)  # disk use stays bounded
            print(f"[{dataset} seed {seed_index}] {info['status']}: best val {info['best_val_loss']:.4f} at iter "
                  f"{info['best_val_iter']} | final train {info['final_train_loss']:.4f} | "
                  + (f"full val {info['full_val_loss']:.4f} | " if "full_val_loss" in info else "")
                  + (f"test {info['test_loss']:.4f} | " if "test_loss" in info else "") +
                  f"{info['total_train_time']:.1f}s | {info['avg_inference_tokens_per_second']:.0f} tok/s sampling"
                  + (f" | {info['rollbacks']} rollbacks" if info["rollbacks"] else ""), flush=True)
        final_infos[dataset] = {**summarize(per_seed), "data": loaded[dataset].provenance,
                                "inference": inference_protocol(cfg)}
    return final_infos


def resolve_configs(base: Config, cli_overrides: dict, world: World):
    """(profile, configs, run_record) of the run to start or resume, validated; run_record None for a new run;
    configs None when a resumed run has finished already. Rank 0's work: it alone reads the run folder."""
    out_dir = Path(base.out_dir)
    profile = resolve_profile(base.profile)
    run_record = None
    if base.resume:
        run_record = run_to_resume(out_dir, base.overwrite, world)
        if run_record is None:
            return profile, None, None
        profile = run_record.get("profile", profile)
        configs = resume_configs(out_dir, run_record, cli_overrides, Config, dataset_dir)
    else:
        datasets = [d.strip() for d in base.datasets.split(",") if d.strip()]
        unknown = [d for d in datasets if d not in DATASETS]
        if not datasets or unknown:
            raise UserError(f"unknown dataset(s) {unknown or base.datasets!r}; choose from {', '.join(DATASETS)}")
        configs = {d: config_for_dataset(base, cli_overrides, profile, d) for d in datasets}
    for c in configs.values():
        validate(c)
        check_world(c, world)
        if c.reward == "vs_reference":
            raise UserError("--reward vs_reference compares each run with its reference run, which train_agent.py "
                            "runs and caches: train with it there (a deployed policy needs no reward)")
    return profile, configs, run_record


def load_data(configs: dict, world: World) -> dict:
    """Every dataset, prepared where missing (from an offline copy or downloaded), loaded and checked: all
    data before the run folder is touched (in torchrun's order, see harness.run_folder.load_on_every_rank)."""
    def load_one(cfg: Config, dataset: str) -> CharDataset:
        ensure_prepared(cfg, dataset, log=print if world.is_main else (lambda line: None))
        data = load_dataset(cfg, dataset)
        check_fits(cfg, data)
        return data
    return load_on_every_rank(configs, world, load_one, dataset_dir)


def open_run_folder(base: Config, configs: dict, loaded: dict, run_record: Optional[dict]) -> dict:
    """Rank 0, before anything is written: the trained policies load, a resumed run still has its data;
    then the run folder is cleared for a new run. Returns the trained policies by dataset."""
    out_dir = Path(base.out_dir)
    policies = {d: p for d, c in configs.items() if c.agent != "replay" and (p := trained_policy(c))}
    for dataset, cfg in configs.items():  # a policy file that cannot be loaded stops the run here, not mid-way
        if cfg.agent in POLICY_AGENTS or dataset in policies:
            make_agent(cfg, cfg.seed_base, dataset, 0)
    if base.resume:
        check_same_data(out_dir, run_record, loaded)
    else:
        prepare_run_folder(out_dir, base.overwrite)
    return policies


def record_ending(out_dir: Path, run_record: dict, status: str, error: str) -> None:
    """run.json says how an unfinished run ended; its finished seeds and checkpoints stay."""
    run_record.update(status=status, error=error, finished=now_iso())
    try:
        atomic_write_json(out_dir / "run.json", run_record)
    except OSError:
        pass  # the original error (a full disk, say) is the one to report


def run_experiment(base: Config, cli_overrides: dict, argv: list[str], world: Optional[World] = None) -> dict:
    """The run, start to end. Under torchrun every rank calls it: rank 0 plans and writes, every rank trains."""
    world = world or World()
    out_dir = Path(base.out_dir)
    profile, configs, run_record = world.from_main(lambda: resolve_configs(base, cli_overrides, world))
    if configs is None:
        if world.is_main:
            print(f"{out_dir} is already finished: nothing to resume", flush=True)
            return read_json(out_dir / "final_info.json")
        return {}
    datasets = list(configs)
    rt = Runtime.choose(configs[datasets[0]], world)
    loaded = load_data(configs, world)
    configs = {d: with_step_interval_from_epochs(c, loaded[d], world) for d, c in configs.items()}
    policies = world.from_main(lambda: open_run_folder(base, configs, loaded, run_record))
    warnings = {d: config_warnings(c) + world_warnings(c, world)
                + policy_warnings(c, d, policies.get(d), per_layer=lr_groups_kind(c) == "layer")
                for d, c in configs.items()}
    if world.is_main:
        frozen_policies = {d: frozen(configs[d], True) for d in policies}
        run_record = start_run_record(base, configs, loaded, rt, profile, policies, frozen_policies, warnings,
                                      run_record, command_line(__file__, argv))
        # torchrun: where another rank failed and this one does not end by itself, its failure watch ends it,
        # past every exception handler; run.json is written first
        world.on_abort = lambda error: record_ending(out_dir, run_record, "failed", error)
    stop = StopRequest(repeat_grace_s=2.0 if world.distributed else 0.0)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with world.failures_shared():  # run.json names the rank that failed, not this rank's broken collective
            final_infos = train_all(configs, loaded, rt, out_dir, sys.stderr.isatty(), stop, base.resume)
    except BaseException as e:
        if world.is_main:
            interrupted = isinstance(e, (Interrupted, KeyboardInterrupt))
            record_ending(out_dir, run_record, "interrupted" if interrupted else "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not world.is_main:
        return final_infos
    atomic_write_json(out_dir / "final_info.json", final_infos)
    run_record.update(status="finished", finished=now_iso())
    atomic_write_json(out_dir / "run.json", run_record)
    record_in_notebook(configs[datasets[0]], out_dir)
    for dataset, s in final_infos.items():
        mean, err = s["means"]["best_val_loss_mean"], s["stderrs"]["best_val_loss_stderr"]
        spread = f" ± {err:.4f} (stderr, n={s['n']})" if err is not None else f" (n={s['n']}, no stderr)"
        diverged = s["statuses"].count("diverged")
        print(f"{dataset}: best val loss {mean:.4f}{spread}" + (f", {diverged} seed(s) diverged" if diverged else ""),
              flush=True)
    return final_infos


# ----------------------------------------------------------------------------------------------
# 9. CLI
# ----------------------------------------------------------------------------------------------

PER_GROUP_AGENTS = ("none", "random", "replay", "reinforce", "ppo")  # can set a multiplier per LR group
CONTROL_AGENTS = ("none", "random", "replay", "ppo", "dqn")          # can set several hyperparameters


def validate(c: Config) -> None:
    """Reject settings that cannot work or cannot be meant, with one line naming the flag (harness.validation
    holds the checks; the agent lists are this file's)."""
    check_fields(c)
    agent_actions(c)
    check_combinations(c, SB3_AGENTS)
    check_lr_groups(c, PER_GROUP_AGENTS)
    check_control(c, CONTROL_AGENTS)
    if c.tensorboard and not tensorboard_installed():
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if c.agent_init and c.agent != "replay":
        trained_policy(c)  # a folder from train_agent.py must match this run: one line if it does not
    check_rate_bounds(c)
    if c.agent == "oracle" and c.oracle_lr <= 0:
        raise UserError("--agent oracle needs --oracle_lr LR: the peak rate it steers toward (e.g. the tuned rate)")


def with_step_interval_from_epochs(c: Config, data: CharDataset, world: Optional[World] = None) -> Config:
    """A plan's "x0.1 every 10 epochs" in steps: an epoch is one pass over the train split's tokens."""
    if c.step_epochs <= 0:
        return c
    world = world or World()
    steps, micro_batch = world.batch_split(c)
    tokens_per_step = micro_batch * c.block_size * steps * world.size
    return dataclasses.replace(c, step_interval=max(1, round(c.step_epochs * len(data.splits["train"]) / tokens_per_step)))


RUN_LEVEL_FIELDS = {"out_dir", "profile", "datasets", "title", "description", "data_dir", "source_dir",
                    "overwrite", "download", "notes", "plot", "tensorboard", "resume", "debug", "device", "dtype",
                    "compile", "compile_ddp", "backend"}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        usage="%(prog)s [--out_dir DIR] [--profile {auto,full,cpu,smoke}] [--datasets LIST] [--FIELD VALUE ...]",
        description="Train small GPTs on char-level datasets while an agent controls the learning rate. "
                    "Every setting below overrides the chosen --profile (the [Config: ...] defaults are "
                    "the dataclass's; profiles change most of them). Training settings also take "
                    "per-dataset values: --learning_rate shakespeare_char=2e-3,enwik8=1e-3,text8=1e-3.")
    return add_config_flags(parser, Config)


def parse_value(f: dataclasses.Field, text: str):
    """'2e-3' -> 0.002; 'shakespeare_char=2e-3,enwik8=1e-3' -> {dataset: value} for training settings."""
    return parse_field_value(f, text, per_dataset=() if f.name in RUN_LEVEL_FIELDS else DATASETS)


def parse_args(argv: list[str]) -> tuple[Config, dict]:
    """Return the base Config (run-level values filled in) and the fields the user actually typed."""
    args = vars(build_parser().parse_args(argv))
    typed = {}
    for f in dataclasses.fields(Config):
        value = args[f.name]
        if value is not None:
            typed[f.name] = parse_value(f, value) if isinstance(value, str) else value
    base = dataclasses.replace(Config(), **{k: v for k, v in typed.items() if not isinstance(v, dict)})
    return base, typed


def main(argv: Optional[list[str]] = None) -> int:
    return job_main(sys.argv[1:] if argv is None else argv, parse_args, run_experiment)


if __name__ == "__main__":
    sys.exit(main())
