"""
Structured pruning of a trained run's GPT for a FLOPs budget: whole attention heads and MLP hidden neurons,
per layer, allocated by a PPO agent (AMC-style), by random search at equal evaluations, by one global ranking,
uniformly, or at random; then fine-tuned (optionally distilled from the model pruned) and measured.

    python experiment.py --profile smoke --out_dir r --datasets shakespeare_char
    python prune.py --run r --dataset shakespeare_char --flops_target 0.5 --method rl --episodes 3 --out_dir p
    python prune.py --run run_0 --dataset shakespeare_char --seed 0 --flops_target 0.75,0.5,0.3 \
        --method rl,random_search,global,uniform,random --out_dir prune_0
    python prune.py --run prune_0 --key rl_0.75 --flops_target 0.5 --method uniform --out_dir prune_1   # again

The model pruned is the run folder's model_<dataset>_<seed>.pt (experiment.py keeps every seed's final weights),
or, with --key, a prune folder's model_<key>_0.pt (a pruned model pruned again: targets are then fractions of ITS
FLOPs). Within a layer, the units kept are the most important by --importance: magnitude (L2 norm of the unit's
weights: a head's q, k, v rows and output-projection columns; a neuron's c_fc row and c_proj column) or taylor
(first-order Taylor score, Molchanov et al. 2019: the squared change of the loss when the unit's output is gated
off, summed over --taylor_batches training batches). The methods differ in how many units each layer keeps:

  rl             AMC (He et al. 2018): a stable-baselines3 PPO agent (MlpPolicy, one hidden layer of --hidden, clip
                 0.2, gamma 0.99, learning rate 3e-4) walks the layers and chooses (heads kept, MLP keep ratio in
                 steps of 1/--mlp_steps) for each. Each choice is clipped to what the budget still allows if every
                 later layer were pruned away entirely, and what the episode leaves unspent is then taken, last
                 layer first (fill_budget), so every episode lands on the target. The reward, at the end of the
                 episode, is minus the pruned model's loss (no fine-tuning) on a held-out slice of the TRAIN split:
                 its last --reward_tokens tokens (the val split reports the result and is never searched on).
                 --episodes episodes; kept: the best allocation scored (the episodes' and the greedy policy's).
  random_search  the rival at equal evaluations: uniformly random actions through the same environment (clipping,
                 budget fill, reward), as many scored episodes as rl's (--episodes + 1), the best kept.
  global         one ranking across all layers, the Torch-Pruning / LLM-Pruner family's baseline: every head and
                 neuron by its first-order Taylor importance per FLOP, kept best first while it fits the budget.
  uniform        the target spread uniformly over the layers: each keeps the same share of its FLOPs (heads
                 rounded to the nearest, MLP neurons filling the rest of the share); ranked by --importance.
                 (Formerly `magnitude`, which is still accepted as its name.)
  random         uniform's allocation, with the units kept drawn at random (--search_seed): the control for the
                 importance score.
A key names the method and the target (rl_0.5); where a method ranks a layer's units by --importance taylor the key
says so (uniform_taylor_0.5), so no key claims a ranking it did not use. --round_to 8 keeps MLP widths multiples of
8 (GPU kernels); every method ends within one such group of neurons of its budget.

FLOPs per token (forward, one token in a full block_size context; elementwise ops, norms, softmax and embedding
lookups not counted), for a layer with h heads of width d = n_embd // n_head and m MLP neurons, C = n_embd,
T = block_size, V = vocab_size:
    qkv 2*C*3*h*d + attention 4*h*d*T (q.k and the weighted sum of v) + output projection 2*h*d*C + MLP 4*C*m,
    plus the output head 2*C*V once.
The matmul part (everything but the attention term) is what torch.utils.flop_counter counts on a CPU (tests).
Compute charged to a method (search_flops): the forward passes scoring its distinct allocations on the reward
slice, plus the Taylor scores' forward and backward passes where it ranks by them (3 forward passes each);
search_steps expresses that in training steps of the model pruned.

Each pruned model is then fine-tuned for --finetune_iters steps by experiment.py's own training loop
(TrainingRun, the run's training settings; warmup and cosine from --finetune_lr), with --distill ALPHA on the loss
(1 - ALPHA) x cross-entropy + ALPHA x T^2 x KL(model pruned || pruned model) at temperature T =
--distill_temperature, and measured: full_val_loss before and after fine-tuning, params, flops_per_token and
flops_ratio (pruned / the model pruned), sampling tokens/s and ms per token on this device (the run's inference
protocol). --scratch TARGETS: at those targets each method's architecture is also trained from a fresh
initialisation for the source's steps plus --finetune_iters (Liu et al. 2019's control), key <key>_scratch.

Output, in --out_dir: final_info.json in the harness's contract, one entry per key plus "unpruned" (the model
pruned, measured here the same way; its training numbers are its own) and "unpruned_finetuned" (that model,
nothing removed, fine-tuned as the pruned ones are: the like-for-like reference, since the pruned models train
--finetune_iters steps more); final_info_<key>_0.json (numbers, allocation, the units kept, a sample),
model_<key>_0.pt (the fine-tuned pruned model: experiment.load_model reads it, prune.py --key prunes it again),
all_results.npy/.json (fine-tuning logs), run.json (arguments, command, source model, its hash and training
config, versions), pareto.png (loss against FLOPs, when several targets are given), search.png (rl's and
random_search's reward loss per scored episode and the best so far) and a section in notes.txt beside the
folder. A folder holding results is not overwritten without --overwrite; an interrupted one is continued by the
same command with --resume (the keys it finished are kept, the rest computed as they would have been).
"""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from torch.nn import functional as F

import experiment as ex
from harness.cli import dataclass_parser, entry_point, option
from harness.controllers import logging_nowhere
from harness.files import atomic_save_npy, atomic_write_json, read_json, sha256_file
from harness.records import environment_record
from harness.runtime import Progress
from model import load_model

METHODS = ("rl", "random_search", "global", "uniform", "random")
ALIASES = {"magnitude": "uniform"}  # uniform's old name (from its default ranking); still accepted
SEARCHED = ("rl", "random_search")  # allocations found by scoring episodes of PruneEnv
RANKED = ("rl", "random_search", "uniform")  # keep a layer's units by --importance (named in the key if not magnitude)
UNPRUNED_FINETUNED = "unpruned_finetuned"  # the source model fine-tuned as the pruned ones are
BACKWARD_FACTOR = 3  # a training step's FLOPs ~ 3 forward passes (forward + backward), the usual estimate
FLOPS_FORMULA = ("forward FLOPs per token = sum over layers of [2*C*3*h*d (qkv) + 4*h*d*T (attention) + 2*h*d*C "
                 "(output projection) + 4*C*m (MLP)] + 2*C*V (output head); C = n_embd, d = n_embd // n_head, "
                 "T = block_size, V = vocab_size, h heads and m MLP neurons in the layer")
PPO_SETTINGS = dict(clip_range=0.2, gamma=0.99, learning_rate=3e-4, n_epochs=10, ent_coef=0.01)  # the seed's


@dataclass
class Args:
    run: str = option("run_0", "the run folder whose model is pruned (experiment.py's), or a prune folder (prune.py's) "
                               "with --key")
    key: str = option("", "with a prune folder as --run: which of its models to prune again (rl_0.75, ...)")
    dataset: str = option("shakespeare_char", "which of the run's datasets", ex.DATASETS)
    seed: int = option(0, "seed index of the run's model (model_<dataset>_<seed>.pt) and of the fine-tuning")
    flops_target: str = option("0.5", "FLOPs per token kept, as a fraction of the unpruned model's, in (0, 1); a comma "
                                      "list (0.75,0.5,0.3) prunes for each")
    method: str = option(",".join(METHODS), "comma list of rl, random_search, global, uniform (alias magnitude), "
                                            "random")
    out_dir: str = option("prune_0", "the prune folder to write")
    importance: str = option("magnitude", "which units a layer keeps: L2 magnitude or first-order taylor score",
                             ("magnitude", "taylor"))
    taylor_batches: int = option(8, "taylor scores (--importance taylor, global): training batches summed over")
    episodes: int = option(100, "rl: search episodes (one pruned model scored per episode); random_search scores "
                                "as many allocations as rl does (episodes + its greedy one)")
    episodes_per_update: int = option(4, "rl: episodes per PPO update (n_steps = this x layers)")
    hidden: int = option(64, "rl: units of the policy's (and value function's) one hidden layer")
    mlp_steps: int = option(16, "rl, random_search: the MLP keep ratio is chosen in steps of 1/mlp_steps")
    round_to: int = option(1, "MLP widths kept are multiples of this (8 suits GPU kernels); 1 = any width")
    reward_tokens: int = option(16384, "rl, random_search: the reward's held-out slice, the last N train tokens")
    search_seed: int = option(0, "seeds PPO, random_search, the taylor batches and the random method")
    finetune_iters: int = option(200, "fine-tuning steps of each pruned model")
    finetune_lr: float = option(0.0, "peak fine-tuning learning rate (cosine to a tenth of it); 0 = the run's / 10")
    distill: float = option(0.0, "ALPHA in [0, 1]: fine-tune on (1 - ALPHA) x cross-entropy + ALPHA x T^2 x KL to "
                                 "the model pruned's logits; 0 = cross-entropy alone")
    distill_temperature: float = option(1.0, "--distill: the temperature T of both distributions")
    scratch: str = option("", "targets (of --flops_target) at which each method's architecture is also trained from "
                              "scratch for the source's steps plus --finetune_iters (key <key>_scratch)")
    device: str = option("", "where to prune, fine-tune and measure; default: the run's --device",
                         ("", "auto", "cuda", "mps", "cpu"))
    data_dir: str = option("", "folder holding <dataset>/ (default: where the run's data was)")
    notes: str = option("", "notes file for the prune section (default notes.txt beside --out_dir; 'off' to skip)")
    overwrite: bool = option(False, "replace the results in --out_dir")
    resume: bool = option(False, "continue an interrupted --out_dir with the same arguments: the keys it finished "
                                 "are kept as they are, the rest computed")
    debug: bool = option(False, "full tracebacks")


# ----------------------------------------------------------------------------------------------
# FLOPs per token, and the allocations that spend a budget
# ----------------------------------------------------------------------------------------------

def flops_per_token(c: ex.GPTConfig) -> dict:
    """{"matmul", "attention", "total"}: the formula in the module docstring, summed over the layers."""
    C, d, T = c.n_embd, c.head_dim, c.block_size
    matmul, attention = 2 * C * c.vocab_size, 0
    for layer in range(c.n_layer):
        h, m = c.heads(layer), c.mlp_width(layer)
        matmul += 2 * C * 3 * h * d + 2 * h * d * C + 4 * C * m
        attention += 4 * h * d * T
    return {"matmul": matmul, "attention": attention, "total": matmul + attention}


@dataclass
class PruneSpace:
    """What the search chooses from, as plain numbers: per layer the heads and neurons there are, and the FLOPs
    per token each head and each neuron costs (linear in both), plus the FLOPs no pruning removes. MLP widths
    kept are multiples of round_to (or the layer's whole width)."""
    heads: list            # per layer: heads in the model being pruned
    neurons: list          # per layer: MLP hidden neurons
    head_flops: float
    neuron_flops: float
    fixed_flops: float     # the output head
    mlp_steps: int = 16
    round_to: int = 1

    @staticmethod
    def of(c: ex.GPTConfig, mlp_steps: int = 16, round_to: int = 1) -> "PruneSpace":
        C, d, T = c.n_embd, c.head_dim, c.block_size
        return PruneSpace([c.heads(i) for i in range(c.n_layer)], [c.mlp_width(i) for i in range(c.n_layer)],
                          head_flops=d * (6 * C + 2 * C + 4 * T), neuron_flops=4 * C, fixed_flops=2 * C * c.vocab_size,
                          mlp_steps=mlp_steps, round_to=round_to)

    @property
    def n_layer(self) -> int:
        return len(self.heads)

    def layer_flops(self, heads: int, neurons: int) -> float:
        return heads * self.head_flops + neurons * self.neuron_flops

    def flops(self, allocation) -> float:
        """allocation: [(heads, neurons)] per layer."""
        return self.fixed_flops + sum(self.layer_flops(h, m) for h, m in allocation)

    @property
    def full_flops(self) -> float:
        return self.flops(list(zip(self.heads, self.neurons)))

    def width(self, layer: int, neurons: int) -> int:
        """A number of neurons as a width the layer may keep: rounded down to a multiple of round_to."""
        return neurons if neurons >= self.neurons[layer] else neurons - neurons % self.round_to

    def neurons_at(self, layer: int, step: int) -> int:
        return self.width(layer, round(step * self.neurons[layer] / self.mlp_steps))

    def heads_at(self, layer: int, action: int) -> int:
        """A head action (0 .. the most heads of any layer) as the heads this layer keeps, spread evenly over
        0 .. its heads: every count is chosen by as many actions as any other, give or take one. (Clipping the
        action instead made every action above a smaller layer's heads mean "keep all", biasing the agent.)"""
        return action * (self.heads[layer] + 1) // (max(self.heads) + 1)

    def widest(self, layer: int, heads: int, room: float) -> int:
        """The widest MLP the layer may keep beside `heads` heads within `room` FLOPs; -1 if the heads alone
        do not fit."""
        spare = room - heads * self.head_flops
        if spare < -1e-9 * self.full_flops:
            return -1
        return self.width(layer, min(self.neurons[layer], math.floor(max(spare, 0.0) / self.neuron_flops + 1e-9)))


def clip_to_budget(space: PruneSpace, layer: int, heads: int, step: int, budget: float) -> tuple[int, int]:
    """AMC's action clipping: the (heads, MLP step) at or below the asked one, each, whose FLOPs fit `budget`
    and are the largest that do (ties: more heads). (0, 0) always fits: a budget a rounding error below 0
    counts as 0 (it used to leave nothing to choose from)."""
    heads, budget = min(heads, space.heads[layer]), max(budget, 0.0)
    fits = [(space.layer_flops(h, space.neurons_at(layer, s)), h, s)
            for h in range(heads + 1) for s in range(step + 1)
            if space.layer_flops(h, space.neurons_at(layer, s)) <= budget * (1 + 1e-12)]
    _, h, s = max(fits)
    return h, s


def fill_budget(space: PruneSpace, allocation, budget: float) -> list[tuple[int, int]]:
    """Spend what an allocation leaves of `budget` (FLOPs per token), last layer first (AMC's last layer takes
    what is left): MLP neurons while they fit; then, in a layer whose neurons are all kept, heads, a head that
    does not fit paid for with as few of that layer's neurons as it needs. Ends less than one round_to group of
    neurons below the budget, unless the whole model fits."""
    allocation = [list(a) for a in allocation]

    def room(layer: int) -> float:  # what the layer may spend with every other layer as it is
        return budget - space.flops(allocation) + space.layer_flops(*allocation[layer])
    unit = space.round_to * space.neuron_flops
    for layer in reversed(range(space.n_layer)):
        allocation[layer][1] = max(allocation[layer][1], space.widest(layer, allocation[layer][0], room(layer)))
    for layer in reversed(range(space.n_layer)):
        while allocation[layer][0] < space.heads[layer] and budget - space.flops(allocation) >= unit:
            widest = space.widest(layer, allocation[layer][0] + 1, room(layer))
            if widest < 0:
                break
            allocation[layer] = [allocation[layer][0] + 1, widest]
    return [tuple(a) for a in allocation]


def uniform_allocation(space: PruneSpace, target: float) -> list[tuple[int, int]]:
    """The target spread uniformly over the layers: every layer keeps the same share of its own FLOPs, the
    share that spends the whole budget, (target x full - fixed) / (full - fixed). Within a layer the heads (the
    coarse unit) are that share of its heads, rounded to the nearest and lowered while they alone exceed the
    layer's FLOPs, and the MLP neurons fill the rest; the rounding left over goes to the last layers (fill_budget).
    (Keeping the same fraction of heads and of neurons instead would round 4 heads x 0.75 - epsilon down to 2
    and leave a tenth of the budget unspent.)"""
    layers = space.full_flops - space.fixed_flops
    share = (target * space.full_flops - space.fixed_flops) / layers
    allocation = []
    for layer, (heads, neurons) in enumerate(zip(space.heads, space.neurons)):
        budget = share * space.layer_flops(heads, neurons)
        h = min(heads, round(share * heads))
        while h > 0 and h * space.head_flops > budget:
            h -= 1
        allocation.append((h, max(space.widest(layer, h, budget), 0)))
    return fill_budget(space, allocation, target * space.full_flops)


def global_allocation(space: PruneSpace, importance, target: float) -> list[tuple[int, int]]:
    """One ranking across all layers (the Torch-Pruning / LLM-Pruner family's global baseline): every head and
    neuron by its importance per FLOP it costs, kept best first while it fits the budget (a unit that does not
    fit is passed over for cheaper ones after it); widths rounded, the rest spent by fill_budget.
    importance: per layer (head scores, neuron scores), first-order Taylor in prune.py."""
    units = [(float(s) / cost, layer, kind) for layer, scores in enumerate(importance)
             for kind, cost in ((0, space.head_flops), (1, space.neuron_flops)) for s in scores[kind].tolist()]
    units.sort(key=lambda unit: -unit[0])  # (stable: ties in model order)
    counts = [[0, 0] for _ in range(space.n_layer)]
    left = target * space.full_flops - space.fixed_flops
    for _, layer, kind in units:
        cost = space.neuron_flops if kind else space.head_flops
        if cost <= left + 1e-9 * space.full_flops:
            counts[layer][kind] += 1
            left -= cost
    return fill_budget(space, [(h, space.width(layer, m)) for layer, (h, m) in enumerate(counts)],
                       target * space.full_flops)


# ----------------------------------------------------------------------------------------------
# The search environment (AMC): one episode walks the layers, one step per layer
# ----------------------------------------------------------------------------------------------

class PruneEnv(gym.Env):
    """Choose each layer's (heads kept, MLP keep step), first layer to last; the episode's allocation always meets
    target x the unpruned FLOPs (clip_to_budget) and, once the last layer is chosen, spends what is left of it
    (fill_budget). Reward 0 until the last layer, then -score(allocation): score is the pruned model's held-out
    loss in prune.py, anything else in a test. Every finished episode is kept in `history` as (allocation,
    score), so a caller keeps the best one found.

    Observation (float32, each in [0, 1]): the layer's position, the budget still free, this layer's and the later
    layers' unpruned FLOPs (all as shares of the unpruned model's), and the previous layer's two choices."""

    def __init__(self, space: PruneSpace, target: float, score: Callable[[list], float]):
        super().__init__()
        self.space, self.target, self.score = space, target, score
        self.action_space = spaces.MultiDiscrete([max(space.heads) + 1, space.mlp_steps + 1])
        self.observation_space = spaces.Box(0.0, 1.0, shape=(6,), dtype=np.float32)
        self.history: list[tuple[list, float]] = []
        self.allocation: list[tuple[int, int]] = []

    def budget_left(self) -> float:
        """What the current layer may spend: the target minus the fixed part and the layers already chosen
        (the later ones could still be pruned to nothing)."""
        return self.target * self.space.full_flops - self.space.flops(self.allocation)

    def observe(self) -> np.ndarray:
        s, layer = self.space, len(self.allocation)
        full = s.full_flops
        later = sum(s.layer_flops(h, m) for h, m in zip(s.heads[layer + 1:], s.neurons[layer + 1:]))
        prev_h, prev_m = self.allocation[-1] if self.allocation else (s.heads[0], s.neurons[0])
        prev = layer - 1 if layer else 0
        obs = [layer / max(s.n_layer - 1, 1), max(self.budget_left(), 0.0) / full,
               s.layer_flops(s.heads[layer], s.neurons[layer]) / full, later / full,
               prev_h / max(s.heads[prev], 1), prev_m / max(s.neurons[prev], 1)]
        return np.clip(np.array(obs, dtype=np.float32), 0.0, 1.0)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.allocation = []
        return self.observe(), {}

    def step(self, action):
        layer, s = len(self.allocation), self.space
        heads, step = clip_to_budget(s, layer, s.heads_at(layer, int(action[0])), int(action[1]), self.budget_left())
        self.allocation.append((heads, s.neurons_at(layer, step)))
        if len(self.allocation) < s.n_layer:
            return self.observe(), 0.0, False, False, {}
        allocation = fill_budget(s, self.allocation, self.target * s.full_flops)  # the last layer takes the rest
        score = float(self.score(list(allocation)))
        self.history.append((list(allocation), score))
        # (the terminal observation is not used: the value of a terminated state is 0)
        return np.zeros(6, dtype=np.float32), -score, True, False, {"allocation": list(allocation), "score": score}


@contextmanager
def own_global_rngs():
    """Run the block with torch's, numpy's and random's global RNG states restored after it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def search_outcome(env: PruneEnv, t0: float, **extra) -> dict:
    """The best allocation a search scored and what the search cost: its scored episodes (search_evaluations)
    and the FLOPs per token of the distinct allocations among them (a repeated one is scored once)."""
    best, best_score = min(env.history, key=lambda item: item[1])
    distinct = {tuple(map(tuple, allocation)) for allocation, _ in env.history}
    return {"allocation": best, "score": best_score,
            "best_episode": next(i for i, item in enumerate(env.history) if item[1] == best_score),
            "evaluations": len(env.history), "distinct_allocations": len(distinct),
            "scored_flops_per_token": sum(env.space.flops(a) for a in distinct),
            "scores": [s for _, s in env.history], **extra, "seconds": time.time() - t0}


def ppo_search(space: PruneSpace, target: float, score, episodes: int, seed: int, hidden: int = 64,
               episodes_per_update: int = 4, **ppo_settings) -> dict:
    """Train PPO for `episodes` episodes on PruneEnv, then roll out its greedy policy once (episodes + 1 scored
    allocations); returns the best allocation found and how the search went. PPO collects n_steps before its
    first update (SB3 #366), so n_steps is sized in episodes: episodes_per_update x layers (one minibatch).
    ppo_settings override PPO_SETTINGS (prune.py itself uses the seed's)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    class StopAfterEpisodes(BaseCallback):
        def _on_step(self) -> bool:
            return len(env.history) < episodes

    threads = torch.get_num_threads()

    def scored(allocation):  # the pruned model is scored with the caller's threads
        with torch_threads(threads):
            return score(allocation)

    t0 = time.time()
    env = PruneEnv(space, target, scored)
    n_steps = space.n_layer * max(1, min(episodes_per_update, episodes))
    # SB3 seeds and draws from the global RNGs: leave the caller's alone. The policy is tiny: on one thread
    # (several threads on its small matmuls cost more than they save: x7 slower on 2 busy cores here).
    with own_global_rngs(), torch_threads(1):
        agent = logging_nowhere(PPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps, seed=seed, device="cpu",
                                    policy_kwargs={"net_arch": [hidden]}, verbose=0, **{**PPO_SETTINGS, **ppo_settings}))
        agent.learn(total_timesteps=episodes * space.n_layer, callback=StopAfterEpisodes(), progress_bar=False)
        obs, _ = env.reset()
        done = False
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, _, done, _, info = env.step(action)
    return search_outcome(env, t0, greedy=info["allocation"], greedy_score=info["score"],
                          episodes=len(env.history) - 1)


def random_search(space: PruneSpace, target: float, score, evaluations: int, seed: int) -> dict:
    """The rival at equal evaluations: `evaluations` episodes of uniformly random actions through the same
    PruneEnv as PPO's (the same clipping, budget fill and reward), the best one kept."""
    t0 = time.time()
    env = PruneEnv(space, target, score)
    rng = np.random.default_rng(seed)
    for _ in range(evaluations):
        env.reset()
        done = False
        while not done:
            _, _, done, _, _ = env.step(rng.integers(env.action_space.nvec))
    return search_outcome(env, t0)


# ----------------------------------------------------------------------------------------------
# Importance and pruning
# ----------------------------------------------------------------------------------------------

def head_columns(head_dim: int, heads) -> torch.Tensor:
    """attn.c_proj's columns of the given heads, in order (also their places within each of q, k and v)."""
    return torch.tensor([h * head_dim + i for h in heads for i in range(head_dim)], dtype=torch.long)


def qkv_rows(width: int, head_dim: int, heads) -> torch.Tensor:
    """c_attn's rows of the given heads: their q rows, then k rows, then v rows (c_attn is [q | k | v], width each)."""
    cols = head_columns(head_dim, heads)
    return torch.cat([cols, cols + width, cols + 2 * width])


def magnitude_importance(model: ex.GPT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (head scores, neuron scores): the L2 norm of all weights (and biases) that belong to the unit."""
    out = []
    with torch.no_grad():
        for layer, block in enumerate(model.transformer.h):
            attn, mlp = block.attn, block.mlp
            width, d = attn.n_head * attn.head_dim, attn.head_dim
            heads = []
            for h in range(attn.n_head):
                rows, cols = qkv_rows(width, d, [h]), head_columns(d, [h])
                sq = attn.c_attn.weight[rows].square().sum() + attn.c_proj.weight[:, cols].square().sum()
                if attn.c_attn.bias is not None:
                    sq = sq + attn.c_attn.bias[rows].square().sum()
                heads.append(sq.sqrt())
            neurons = mlp.c_fc.weight.square().sum(1) + mlp.c_proj.weight.square().sum(0)
            if mlp.c_fc.bias is not None:
                neurons = neurons + mlp.c_fc.bias.square()
            out.append((torch.stack(heads).cpu() if heads else torch.zeros(0), neurons.sqrt().cpu()))
    return out


def taylor_importance(model: ex.GPT, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (head scores, neuron scores): sum over batches of (dL/dg)^2, g a gate on the unit's output (1 in
    the model). A unit's output enters the residual only through its columns W of the output projection, so
    dL/dg = sum(W * dL/dW) over those columns: no gates need adding to the model."""
    scores = [(torch.zeros(b.attn.n_head), torch.zeros(b.mlp.c_fc.weight.shape[0])) for b in model.transformer.h]
    model.eval()  # (no dropout: the score of the model as it predicts)
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        with torch.no_grad():
            for (heads, neurons), block in zip(scores, model.transformer.h):
                attn, mlp = block.attn, block.mlp
                wg = (attn.c_proj.weight * attn.c_proj.weight.grad).sum(0)  # per input column
                heads += wg.view(attn.n_head, attn.head_dim).sum(1).square().cpu() if attn.n_head else 0
                neurons += (mlp.c_proj.weight * mlp.c_proj.weight.grad).sum(0).square().cpu()
    model.zero_grad(set_to_none=True)
    return scores


def kept_units(importance, allocation) -> tuple[list, list]:
    """The most important heads and neurons of each layer, as many as the allocation keeps, in model order."""
    heads, neurons = [], []
    for (head_scores, neuron_scores), (h, m) in zip(importance, allocation):
        heads.append(sorted(torch.argsort(head_scores, descending=True, stable=True)[:h].tolist()))
        neurons.append(sorted(torch.argsort(neuron_scores, descending=True, stable=True)[:m].tolist()))
    return heads, neurons


def prune_model(model: ex.GPT, keep_heads: list, keep_neurons: list) -> ex.GPT:
    """A new, smaller GPT holding only the kept heads' rows of c_attn and columns of attn.c_proj, and the kept
    neurons' rows of c_fc and columns of mlp.c_proj, per layer; everything else copied. It computes exactly what
    the model computes with the other units' outputs zeroed (tests)."""
    c = model.config
    pruned_config = dataclasses.replace(c, layer_heads=[len(k) for k in keep_heads],
                                        layer_mlp=[len(k) for k in keep_neurons])
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for layer, (heads, neurons) in enumerate(zip(keep_heads, keep_neurons)):
        p = f"transformer.h.{layer}."
        width, d = c.heads(layer) * c.head_dim, c.head_dim
        rows, cols = qkv_rows(width, d, heads), head_columns(d, heads)
        neurons = torch.tensor(neurons, dtype=torch.long)
        state[p + "attn.c_attn.weight"] = state[p + "attn.c_attn.weight"][rows]
        state[p + "attn.c_proj.weight"] = state[p + "attn.c_proj.weight"][:, cols]
        state[p + "mlp.c_fc.weight"] = state[p + "mlp.c_fc.weight"][neurons]
        state[p + "mlp.c_proj.weight"] = state[p + "mlp.c_proj.weight"][:, neurons]
        if c.bias:
            state[p + "attn.c_attn.bias"] = state[p + "attn.c_attn.bias"][rows]
            state[p + "mlp.c_fc.bias"] = state[p + "mlp.c_fc.bias"][neurons]
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: it must not move anyone's RNG
        pruned = ex.GPT(pruned_config)
    pruned.load_state_dict(state)
    return pruned.to(next(model.parameters()).device).train(model.training)


# ----------------------------------------------------------------------------------------------
# Distillation from the model pruned
# ----------------------------------------------------------------------------------------------

def distillation_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(softmax(teacher / T) || softmax(student / T)): summed over the vocabulary, averaged over the
    positions. The T^2 keeps the soft term's gradients on the hard one's scale (Hinton et al. 2015); at T = 1
    it is the plain KL."""
    vocab = student_logits.size(-1)
    student = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return temperature ** 2 * F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class DistilledGPT(ex.GPT):
    """A pruned GPT fine-tuned towards the model it was pruned from: in training, with targets, its loss is
    (1 - alpha) x cross-entropy + alpha x distillation_kl(its logits, the teacher's). Evaluation, sampling and
    saving are the plain GPT's (save_model writes a GPT that load_model reads): the teacher is held outside the
    module's parameters, so it is neither trained nor saved, and it runs in eval mode (no dropout)."""

    def __init__(self, config: ex.GPTConfig, teacher: ex.GPT, alpha: float, temperature: float):
        super().__init__(config)
        self.teacher = (teacher,)  # (a tuple: not registered as a submodule)
        self.alpha, self.temperature = alpha, temperature

    def forward(self, idx, targets=None, caches: Optional[list] = None, start_pos: int = 0):
        logits, loss = super().forward(idx, targets, caches, start_pos)
        if targets is None or not self.training:
            return logits, loss
        teacher = self.teacher[0].eval()  # (evaluations elsewhere leave a model in train mode)
        with torch.no_grad():
            teacher_logits, _ = teacher(idx, targets)
        return logits, (1 - self.alpha) * loss + self.alpha * distillation_kl(logits, teacher_logits, self.temperature)


def with_teacher(pruned: ex.GPT, teacher: ex.GPT, alpha: float, temperature: float) -> ex.GPT:
    """The pruned model to fine-tune: itself with alpha 0 (cross-entropy alone, bit for bit as without
    distillation), else the same weights as a DistilledGPT."""
    if not alpha:
        return pruned
    with torch.random.fork_rng(devices=[]):  # the fresh init is overwritten: it must not move anyone's RNG
        student = DistilledGPT(pruned.config, teacher, alpha, temperature)
    student.load_state_dict(pruned.state_dict())
    return student.to(next(pruned.parameters()).device).train(pruned.training)


# ----------------------------------------------------------------------------------------------
# Checking the command line and reading the model to prune
# ----------------------------------------------------------------------------------------------

def parse_targets(text: str, flag: str = "--flops_target") -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ex.UserError(f"{flag} must be numbers in (0, 1), comma-separated; got {text!r}") from None
    bad = [t for t in targets if not (0 < t < 1)]
    if not targets or bad:
        raise ex.UserError(f"{flag} must be in (0, 1) (a fraction of the unpruned FLOPs); got {text!r}")
    if len(set(targets)) != len(targets):
        raise ex.UserError(f"{flag} {text!r} names a target twice")
    return targets


def parse_methods(text: str) -> list[str]:
    """The methods asked for, by their names (an alias becomes the name: magnitude -> uniform), once each."""
    methods = [ALIASES.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ex.UserError(f"unknown --method {','.join(unknown) or repr(text)}: choose from {', '.join(METHODS)} "
                           f"(comma-separated; magnitude is uniform's old name)")
    return list(dict.fromkeys(methods))


def parse_scratch(args: Args) -> list[float]:
    """--scratch's targets: some of --flops_target's (none by default)."""
    if not args.scratch.strip():
        return []
    scratch = parse_targets(args.scratch, "--scratch")
    missing = [t for t in scratch if t not in parse_targets(args.flops_target)]
    if missing:
        raise ex.UserError(f"--scratch {missing[0]:g} is not one of --flops_target {args.flops_target}")
    return scratch


def parse_args(argv: list[str]) -> Args:
    args = Args(**vars(dataclass_parser(Args, __doc__.split("\n\n")[0].strip()).parse_args(argv)))
    parse_targets(args.flops_target)
    parse_methods(args.method)
    parse_scratch(args)
    for name in ("episodes", "episodes_per_update", "hidden", "mlp_steps", "finetune_iters", "taylor_batches",
                 "round_to"):
        if getattr(args, name) < 1:
            raise ex.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0 or args.search_seed < 0:
        raise ex.UserError("--seed and --search_seed must be >= 0")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr >= 0):
        raise ex.UserError(f"--finetune_lr must be >= 0 (0: the run's learning rate / 10), got {args.finetune_lr}")
    if not 0 <= args.distill <= 1:
        raise ex.UserError(f"--distill must be in [0, 1] (the weight of the KL term), got {args.distill}")
    if not (math.isfinite(args.distill_temperature) and args.distill_temperature > 0):
        raise ex.UserError(f"--distill_temperature must be a finite number above 0, got {args.distill_temperature}")
    return args


def importance_of(method: str, importance: str) -> str:
    """How a method ranks the units within a layer."""
    return "random" if method == "random" else "taylor" if method == "global" else importance


def key_of(method: str, target: float, importance: str = "magnitude") -> str:
    """final_info.json's key for one method at one target, e.g. rl_0.5; a method that ranks by --importance
    taylor says so (uniform_taylor_0.5): a key never names a ranking it did not use."""
    ranking = f"_{importance}" if method in RANKED and importance != "magnitude" else ""
    return f"{method}{ranking}_{target:g}"


@dataclass
class Source:
    """The model to prune and what trained it."""
    run_dir: Path
    record: dict           # the folder's run.json
    cfg: ex.Config         # the config it was trained with (a pruned model: its original run's)
    model: ex.GPT
    model_path: Path
    data: ex.CharDataset
    rt: ex.Runtime
    info_path: Path        # its final_info: a run's final_info_<dataset>_<seed>.json, a prune folder's per key
    log_key: str           # its logs in the folder's all_results.json: <dataset>_<seed> or <key>_0
    steps: int             # optimizer steps behind the model: its run's, plus every fine-tuning since


def run_folder_model(run_dir: Path, record: dict, args: Args) -> dict:
    """experiment.py's folder: model_<dataset>_<seed>.pt, trained by the run's config for the dataset."""
    if args.key:
        raise ex.UserError(f"--key names a prune folder's model; {run_dir} is experiment.py's run folder: choose "
                           f"its model with --dataset and --seed")
    configs = record.get("configs") or {}
    if args.dataset not in configs:
        raise ex.UserError(f"--run {run_dir} has no {args.dataset} (it trained {', '.join(configs) or 'nothing'})")
    path = ex.model_file(run_dir, args.dataset, args.seed)
    info = run_dir / f"final_info_{args.dataset}_{args.seed}.json"
    if not path.exists() or not info.exists():
        raise ex.UserError(f"{path} does not exist: the run kept no model for {args.dataset} seed {args.seed} "
                           f"(unfinished, another seed, or trained before experiment.py kept its models)")
    return dict(config=configs[args.dataset], data=(record.get("data") or {}).get(args.dataset, {}),
                model_path=path, info_path=info, log_key=f"{args.dataset}_{args.seed}", steps=None)


def prune_folder_model(run_dir: Path, record: dict, args: Args) -> dict:
    """prune.py's folder: model_<key>_0.pt, trained by the original run's config and the fine-tuning since."""
    source = record["source"]
    if source.get("dataset") != args.dataset:
        raise ex.UserError(f"--run {run_dir} pruned a {source.get('dataset')} model, not {args.dataset}")
    keys = sorted(p.name[len("model_"):-len("_0.pt")] for p in run_dir.glob("model_*_0.pt"))
    if args.key not in keys:
        raise ex.UserError(f"--run {run_dir} is a prune folder: choose the model to prune with --key "
                           f"({', '.join(keys) or 'it holds none'})")
    info = run_dir / f"final_info_{args.key}_0.json"
    if not info.exists() or not source.get("train_config"):
        raise ex.UserError(f"{run_dir} does not record what trained {args.key} (written before prune.py recorded "
                           f"it): prune its source run instead")
    return dict(config=source["train_config"], data=record.get("data") or {}, model_path=run_dir /
                f"model_{args.key}_0.pt", info_path=info, log_key=f"{args.key}_0",
                steps=read_json(info).get("steps_trained"))


def read_source(args: Args) -> Source:
    run_dir = Path(args.run)
    record = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else None
    if not isinstance(record, dict) or not ({"configs", "source"} & set(record)):
        raise ex.UserError(f"--run {run_dir} is not a run folder of experiment.py or prune.py (no run.json of theirs)")
    found = (run_folder_model if "configs" in record else prune_folder_model)(run_dir, record, args)
    try:
        cfg = ex.Config(**found["config"])
    except TypeError as e:
        raise ex.UserError(f"{run_dir}/run.json does not describe a run of this version ({e})") from None
    folder = found["data"].get("folder")
    data_dir = args.data_dir or (str(Path(folder).parent) if folder else cfg.data_dir)
    cfg = dataclasses.replace(cfg, data_dir=data_dir, device=args.device or cfg.device, resume=False)
    rt = ex.Runtime.choose(cfg)
    ex.ensure_prepared(cfg, args.dataset)
    data = ex.load_dataset(cfg, args.dataset)
    recorded = found["data"].get("sha256")
    if recorded and recorded != data.provenance["sha256"]:
        raise ex.UserError(f"the {args.dataset} data in {data.provenance['folder']} is not what {run_dir} was "
                           f"trained on (its sha256 differs from run.json's): pass the right --data_dir")
    model = load_model(found["model_path"], rt.device)
    if (model.config.vocab_size, model.config.block_size) != (data.vocab_size, cfg.block_size):
        raise ex.UserError(f"{found['model_path']} does not match {run_dir}'s {args.dataset} config (vocab or "
                           f"block size)")
    return Source(run_dir, record, cfg, model, found["model_path"], data, rt, found["info_path"], found["log_key"],
                  found["steps"] or cfg.max_iters)


def check_targets(space: PruneSpace, targets: list[float]) -> None:
    fixed = space.fixed_flops / space.full_flops
    if min(targets) <= fixed:
        raise ex.UserError(f"--flops_target {min(targets):g} is at or below the share no pruning removes (the output "
                           f"head: {fixed:.3f} of the FLOPs): choose a target above it")


# ----------------------------------------------------------------------------------------------
# Choosing, fine-tuning and measuring
# ----------------------------------------------------------------------------------------------

def plain_training(cfg: ex.Config, iters: int, lr: float, min_lr: float, warmup: int) -> ex.Config:
    """The run's training settings for `iters` steps: warmup, then cosine from lr to min_lr, no agent and no
    other control; evaluated a few times."""
    plain = dataclasses.replace(cfg, max_iters=iters, lr_decay_iters=iters, warmup_iters=warmup, learning_rate=lr,
                                min_lr=min_lr, schedule="cosine", optimizer="adamw", agent="none", agent_init="",
                                agent_actions="", reward="", agent_learn=None, lr_groups="global", layer_trust="none",
                                control="lr", step_epochs=0.0, lr_ceiling=max(cfg.lr_ceiling, lr), lr_floor=0.0,
                                eval_interval=min(cfg.eval_interval, max(1, iters // 4)),
                                log_interval=min(cfg.log_interval, max(1, iters // 10)), seeds=1, resume=False)
    plain = dataclasses.replace(plain, agent_actions=ex.TABLE_ACTIONS, reward=ex.reward_kind(plain),
                                lr_groups=ex.lr_groups_kind(plain))
    ex.validate(plain)
    return plain


def finetune_config(cfg: ex.Config, args: Args) -> ex.Config:
    """A short fine-tuning: --finetune_iters steps, 10% warmup, cosine from --finetune_lr (default the run's
    rate / 10) to a tenth of it."""
    lr = args.finetune_lr or cfg.learning_rate / 10
    return plain_training(cfg, args.finetune_iters, lr, lr / 10, args.finetune_iters // 10)


def scratch_config(cfg: ex.Config, steps: int) -> ex.Config:
    """Liu et al. 2019's control: the run's own training (its rate, floor and warmup, cosine) for `steps` steps."""
    return plain_training(cfg, steps, cfg.learning_rate, cfg.min_lr, cfg.warmup_iters)


def tokens_per_step(cfg: ex.Config) -> int:
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


class RewardScorer:
    """The searches' reward: the loss (no fine-tuning) of the source model pruned to given units on the reward
    slice of the train split, each set of units computed once. An allocation is scored with the units `ranking`
    keeps; units_loss scores any units (a method's own: random's are not the ranking's)."""

    def __init__(self, source: Source, ranking, tokens: np.ndarray):
        self.cfg = dataclasses.replace(source.cfg, final_eval_tokens=len(tokens),
                                       batch_size=max(source.cfg.batch_size, 32))
        self.source, self.ranking, self.tokens, self.cache = source, ranking, tokens, {}
        self.tokens_scored = ex.final_eval_windows(len(tokens), self.cfg) * self.cfg.block_size

    def units_loss(self, heads: list, neurons: list) -> float:
        key = (tuple(map(tuple, heads)), tuple(map(tuple, neurons)))
        if key not in self.cache:
            pruned = prune_model(self.source.model, heads, neurons)
            self.cache[key] = ex.split_loss(pruned, self.tokens, self.cfg, self.source.rt)
        return self.cache[key]

    def __call__(self, allocation) -> float:
        return self.units_loss(*kept_units(self.ranking, allocation))


def taylor_batches(source: Source, n: int, search_tokens: np.ndarray, seed: int):
    sampler = ex.BatchSampler(search_tokens, source.cfg.block_size, source.cfg.batch_size, source.rt.device, seed)
    return [sampler.next_batch() for _ in range(n)]


def importance_scores(source: Source, args: Args, methods: list[str], search_tokens: np.ndarray) -> dict:
    """Each ranking the methods use, by name ("scores": magnitude and/or taylor, its batches from the train split
    before the reward slice, drawn with --search_seed), and the seconds it took ("seconds", charged to the methods
    that rank by it)."""
    needed = {importance_of(m, args.importance) for m in methods} | {args.importance}
    scores, seconds = {}, {}
    if "taylor" in needed:
        t0 = time.time()
        scores["taylor"] = taylor_importance(source.model, taylor_batches(
            source, args.taylor_batches, search_tokens, source.cfg.seed_base + args.search_seed))
        seconds["taylor"] = time.time() - t0
    if "magnitude" in needed:
        scores["magnitude"] = magnitude_importance(source.model)
    return {"scores": scores, "seconds": seconds}


@dataclass
class Pruning:
    """One prune.py invocation: the model to prune, its search space, rankings and reward, the fine-tuning
    config, and the folder being written, with the results so far."""
    args: Args
    source: Source
    space: PruneSpace
    ft_cfg: ex.Config
    importances: dict
    scorer: RewardScorer
    out: Path
    record: dict
    targets: list
    methods: list
    scratch: list          # the targets whose architectures are also trained from scratch
    results: dict = field(default_factory=dict)
    resumed: dict = field(default_factory=dict)  # --resume: the keys an interrupted attempt finished, as saved


def reporting(score: Callable[[list], float], label: str, episodes: int) -> Callable[[list], float]:
    """score, showing a search's progress: episodes scored and the best score so far (a bar on a terminal,
    else a line every 15 s): a search of a thousand episodes takes minutes."""
    progress = Progress(f"{label} search", episodes, 0, sys.stderr.isatty(), unit="episode", metric="best")
    scores: list = []

    def scored(allocation: list) -> float:
        scores.append(score(allocation))
        progress.update(len(scores), min(scores), force=len(scores) == episodes)
        if len(scores) == episodes:
            progress.close()
        return scores[-1]
    return scored


def choose(p: Pruning, method: str, target: float) -> dict:
    """The allocation and the units kept for one method at one target, and how long choosing took (the Taylor
    scores' time included where it ranks by them)."""
    args, space, t0 = p.args, p.space, time.time()
    search, ranking = {}, importance_of(method, args.importance)
    if method == "rl":
        search = ppo_search(space, target, reporting(p.scorer, f"rl_{target:g}", args.episodes + 1),
                            args.episodes, args.search_seed, args.hidden, args.episodes_per_update)
    elif method == "random_search":  # as many scored episodes as rl: its --episodes and its greedy one
        search = random_search(space, target, reporting(p.scorer, f"random_search_{target:g}", args.episodes + 1),
                               args.episodes + 1, args.search_seed)
    if search:
        allocation = search.pop("allocation")
    elif method == "global":
        allocation = global_allocation(space, p.importances["scores"]["taylor"], target)
    else:
        allocation = uniform_allocation(space, target)
    if ranking == "random":  # uniform's allocation, the units drawn at random instead of by score
        rng = torch.Generator().manual_seed(args.search_seed)
        scores = [(torch.rand(len(h), generator=rng), torch.rand(len(m), generator=rng))
                  for h, m in p.importances["scores"][args.importance]]
    else:
        scores = p.importances["scores"][ranking]
    heads, neurons = kept_units(scores, allocation)
    return {"allocation": [list(a) for a in allocation], "heads": heads, "neurons": neurons, "importance": ranking,
            "search_time": time.time() - t0 + p.importances["seconds"].get(ranking, 0.0), "search": search}


def search_compute(p: Pruning, chosen: dict) -> dict:
    """What choosing cost, charged to the method: forward passes scoring its distinct allocations on the
    reward slice, plus the Taylor scores' forward and backward passes where it ranks by them; search_steps is
    that in training steps of the model pruned (3 forward passes per token each)."""
    cfg, full = p.source.cfg, p.space.full_flops
    scoring = chosen["search"].get("scored_flops_per_token", 0.0) * p.scorer.tokens_scored
    taylor = BACKWARD_FACTOR * full * p.args.taylor_batches * cfg.batch_size * cfg.block_size \
        if chosen["importance"] == "taylor" else 0.0
    return {"search_evaluations": chosen["search"].get("evaluations", 0), "search_flops": scoring + taylor,
            "importance_flops": taylor,
            "search_steps": (scoring + taylor) / (BACKWARD_FACTOR * full * tokens_per_step(cfg))}


def trained(p: Pruning, model: ex.GPT, cfg: ex.Config) -> dict:
    """`model` trained for cfg.max_iters steps by the harness's loop (TrainingRun and drive, no agent), then
    measured as every key is; its logs, sample and the trained model."""
    source, args = p.source, p.args
    run = ex.TrainingRun(cfg, source.data, args.seed, source.rt, checkpoint=None, model=model)
    info = run.finish(ex.drive(run, ex.make_agent(cfg, run.seed, args.dataset, args.seed)))
    flops, full = flops_per_token(run.model.config), flops_per_token(source.model.config)["total"]
    aggregate = info["inference_tokens_per_second_aggregate"]
    info.update(flops_per_token=flops["total"], flops_ratio=flops["total"] / full,
                matmul_flops_per_token=flops["matmul"], params=run.model.num_params(),
                tokens_per_second=info["avg_inference_tokens_per_second"],
                latency_ms_per_token=1000.0 / aggregate if aggregate else None,
                train_flops=BACKWARD_FACTOR * flops["total"] * tokens_per_step(cfg) * cfg.max_iters)
    return {"info": info, "model": run.model, "train_info": run.state.train_log, "val_info": run.state.val_log,
            "sample": run.sample}


def pruned_result(p: Pruning, method: str, target: float, chosen: dict) -> dict:
    """Prune, score before fine-tuning, fine-tune (towards the model pruned with --distill), measure."""
    source, args = p.source, p.args
    pruned = prune_model(source.model, chosen["heads"], chosen["neurons"])
    before = ex.final_evaluation(pruned, source.data, p.ft_cfg, source.rt).get("full_val_loss")
    r = trained(p, with_teacher(pruned, source.model, args.distill, args.distill_temperature), p.ft_cfg)
    r["info"].update(method=method, flops_target=target, full_val_loss_before=before, importance=chosen["importance"],
                     reward_loss=p.scorer.units_loss(chosen["heads"], chosen["neurons"]), distill=args.distill,
                     search_time=chosen["search_time"], finetune_time=r["info"]["total_train_time"],
                     steps_trained=source.steps + p.ft_cfg.max_iters, **search_compute(p, chosen))
    return r


def scratch_result(p: Pruning, method: str, target: float, allocation: list) -> dict:
    """The architecture an allocation gives, from a fresh initialisation (the run's seed), trained for the
    source's steps plus the fine-tuning's by the source's own schedule: does pruning beat training it small?"""
    source, args = p.source, p.args
    cfg = scratch_config(source.cfg, source.steps + args.finetune_iters)
    config = dataclasses.replace(source.model.config, layer_heads=[h for h, _ in allocation],
                                 layer_mlp=[m for _, m in allocation])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed_base + args.seed)
        model = ex.GPT(config).to(source.rt.device)
    r = trained(p, model, cfg)
    r["info"].update(method=f"{method}_scratch", flops_target=target, allocation=allocation, importance="none",
                     search_time=0.0, finetune_time=r["info"]["total_train_time"], steps_trained=cfg.max_iters)
    return r


def measure_speed(model: ex.GPT, source: Source, cfg: ex.Config, seed: int) -> dict:
    """The run's inference protocol, after one discarded warm-up sample: the first generation in a process pays
    one-time costs (kernel selection, allocations) that the fine-tuned models have paid before finish() samples."""
    prompt = torch.tensor([source.data.encode(" ")], dtype=torch.long, device=source.rt.device)
    ex.generate(model.eval(), prompt, min(cfg.inference_new_tokens, 32), cfg.temperature, cfg.top_k,
                torch.Generator().manual_seed(seed), use_cache=cfg.kv_cache)
    speed = ex.measure_inference_speed(model, source.data, cfg, source.rt, seed)
    aggregate = speed["aggregate_tokens_per_second"]
    return {"tokens_per_second": speed["avg_tokens_per_second"],
            "latency_ms_per_token": 1000.0 / aggregate if aggregate else None, "sample": speed["sample"]}


def unpruned_result(source: Source, ft_cfg: ex.Config, args: Args) -> dict:
    """The model pruned, measured here as the pruned ones are (loss on the val split, sampling speed on this
    device now); its training numbers and logs are its own."""
    trained_info = read_json(source.info_path)
    loss = ex.final_evaluation(source.model, source.data, ft_cfg, source.rt).get("full_val_loss")
    speed = measure_speed(source.model, source, ft_cfg, ft_cfg.seed_base + args.seed)
    flops = flops_per_token(source.model.config)
    info = {**{k: trained_info.get(k) for k in ("final_train_loss", "best_val_loss", "total_train_time")},
            "avg_inference_tokens_per_second": speed["tokens_per_second"], "full_val_loss": loss,
            "full_val_loss_before": loss, "method": "unpruned", "flops_target": 1.0,
            "flops_per_token": flops["total"], "flops_ratio": 1.0, "matmul_flops_per_token": flops["matmul"],
            "params": source.model.num_params(), "tokens_per_second": speed["tokens_per_second"],
            "latency_ms_per_token": speed["latency_ms_per_token"], "seed": source.cfg.seed_base + args.seed,
            "steps_trained": source.steps, "status": "finished"}
    results_path = source.run_dir / "all_results.json"
    logs = read_json(results_path) if results_path.exists() else {}
    return {"info": {k: v for k, v in info.items() if v is not None}, "model": None,
            "train_info": logs.get(f"{source.log_key}_train_info", []),
            "val_info": logs.get(f"{source.log_key}_val_info", []), "sample": speed["sample"]}


# ----------------------------------------------------------------------------------------------
# The prune folder
# ----------------------------------------------------------------------------------------------

LAYOUT = ("final_info.json: one entry per '<method>_<target>' (and 'unpruned') in place of the dataset, each with "
          "one seed (the run's --seed); full_val_loss is after fine-tuning, full_val_loss_before before it")
NOT_NUMBERS = ("allocation", "heads", "neurons", "search")  # per-key lists, kept in final_info_<key>_0.json only


def write_results(out: Path, results: dict) -> dict:
    """all_results for every key so far; returns final_info.json's content."""
    all_results, final_infos = {}, {}
    for key, r in results.items():
        info = r["info"]
        numbers = {k: v for k, v in info.items() if k not in NOT_NUMBERS}
        for kind in ("train_info", "val_info"):
            all_results[f"{key}_0_{kind}"] = r[kind]
        all_results[f"{key}_0_final_info"] = numbers
        final_infos[key] = {**ex.summarize([numbers]), "method": info["method"], "flops_target": info["flops_target"],
                            "importance": info.get("importance")}
    atomic_save_npy(out / "all_results.npy", all_results)
    atomic_write_json(out / "all_results.json", all_results)
    return final_infos


def record_search(p: Pruning, key: str, seconds: float, search: dict) -> None:
    """run.json's record of how key's allocation was chosen: the whole choosing time (Taylor scores included)
    in place of the search's own."""
    p.record["search"][key] = {"seconds": seconds, **{k: v for k, v in search.items() if k != "seconds"}}


def save_key(p: Pruning, key: str, r: dict, chosen: Optional[dict] = None) -> None:
    """One key's results into the folder as soon as it has them: its model, final_info_<key>_0.json, the
    search in run.json's record, all_results so far."""
    if chosen:
        r["info"].update(allocation=chosen["allocation"], heads=chosen["heads"], neurons=chosen["neurons"],
                         search=chosen["search"])
        record_search(p, key, chosen["search_time"], chosen["search"])
    p.results[key] = r
    if r["model"] is not None:
        ex.save_model(ex.model_file(p.out, key, 0), r["model"])
    atomic_write_json(p.out / f"final_info_{key}_0.json", {**r["info"], "key": key, "sample": r["sample"]})
    write_results(p.out, p.results)
    i = r["info"]
    if "allocation" in i:
        before = f"{i['full_val_loss_before']:.4f} -> " if "full_val_loss_before" in i else "from scratch "
        print(f"[{key}] heads {[a[0] for a in i['allocation']]} mlp {[a[1] for a in i['allocation']]} | "
              f"flops x{i['flops_ratio']:.3f} | params {i['params']:,} | val {before}{i['full_val_loss']:.4f} "
              f"trained | {i['tokens_per_second']:.0f} tok/s | search {i.get('search_evaluations', 0)} "
              f"evaluations, {i['search_time']:.1f}s", flush=True)


def kept(p: Pruning, key: str) -> bool:
    """--resume: whether the interrupted attempt finished key; if so its results go back in their place (the
    attempt saved the same keys in the same order), with its search in run.json."""
    if key not in p.resumed:
        return False
    r = p.results[key] = p.resumed.pop(key)
    if "search" in r["info"]:
        record_search(p, key, r["info"]["search_time"], r["info"]["search"])
    print(f"[{key}] kept: finished by the interrupted attempt", flush=True)
    return True


def finished_keys(out: Path, args: Args, source: Source) -> dict:
    """--resume: the keys an interrupted prune.py of the same model and settings saved in out (final_info_<key>_0.json
    and its logs in all_results.json: a key saved without its logs is computed again), by key. Paths may differ
    (the folder moved); the model pruned is compared by its sha256."""
    if (out / "final_info.json").exists():
        raise ex.UserError(f"{out} is finished: nothing to resume (--overwrite replaces it)")
    record, defaults = read_json(out / "run.json"), dataclasses.asdict(Args())
    old = {**record.get("args", {}), "model_sha256": record.get("source", {}).get("model_sha256")}
    new = {**dataclasses.asdict(args), "model_sha256": sha256_file(source.model_path)}
    paths = ("run", "out_dir", "data_dir", "notes", "resume", "overwrite", "debug")
    differ = sorted(k for k, v in new.items() if k not in paths and old.get(k, defaults.get(k)) != v)
    if differ:
        raise ex.UserError(f"--resume: {out} was started with other settings ({', '.join(differ)}); run its own "
                           f"command again, or --overwrite")
    logs = read_json(out / "all_results.json") if (out / "all_results.json").exists() else {}
    resumed = {}
    for path in out.glob("final_info_*_0.json"):
        saved = read_json(path)
        key, sample = saved.pop("key"), saved.pop("sample")
        if f"{key}_0_train_info" in logs:
            resumed[key] = {"info": saved, "model": None, "train_info": logs[f"{key}_0_train_info"],
                            "val_info": logs[f"{key}_0_val_info"], "sample": sample}
    return resumed


def train_from_scratch(p: Pruning, target: float, chosen: dict) -> None:
    """--scratch: each distinct architecture chosen at this target also trained from scratch, key
    <key>_scratch (random's architecture is uniform's: trained once)."""
    done: dict = {}
    for key, c in chosen.items():
        architecture = tuple(map(tuple, c["allocation"]))
        if architecture in done:
            print(f"[{key}_scratch] the architecture of {done[architecture]}: see {done[architecture]}_scratch",
                  flush=True)
            continue
        done[architecture] = key
        if not kept(p, f"{key}_scratch"):
            save_key(p, f"{key}_scratch", scratch_result(p, p.results[key]["info"]["method"], target, c["allocation"]))


def notes_lines(final_infos: dict, record: dict) -> list[str]:
    shown = ("full_val_loss_before", "full_val_loss", "flops_ratio", "params", "tokens_per_second")
    results = {key: {k: round(entry["means"][f"{k}_mean"], 4) if isinstance(entry["means"].get(f"{k}_mean"), float)
                     else entry["means"].get(f"{k}_mean") for k in shown}
               for key, entry in final_infos.items()}
    a = record["args"]
    distill = f", distilled (alpha {a['distill']}, T {a['distill_temperature']})" if a["distill"] else ""
    return [f"Results: {results!r}",
            f"Description: structured pruning of {record['source']['model']} ({a['importance']} importance, "
            f"{a['episodes']} rl episodes and as many random_search evaluations, {a['finetune_iters']} fine-tuning "
            f"steps{distill}); full_val_loss after fine-tuning, _before without it; flops_ratio = pruned / unpruned "
            f"FLOPs per token"]


def prepare(args: Args, argv: list[str]) -> Pruning:
    """Every check, then the folder opened: bad input touches nothing. The model read, rankings computed."""
    targets, methods, scratch = parse_targets(args.flops_target), parse_methods(args.method), parse_scratch(args)
    out = Path(args.out_dir)
    if out.resolve() == Path(args.run).resolve():
        raise ex.UserError("--out_dir must not be the --run folder (its results would be replaced)")
    source = read_source(args)
    space = PruneSpace.of(source.model.config, args.mlp_steps, args.round_to)
    check_targets(space, targets)
    ft_cfg = finetune_config(source.cfg, args)
    train = source.data.splits["train"]
    if not source.cfg.block_size + 1 < args.reward_tokens <= len(train) // 2:
        raise ex.UserError(f"--reward_tokens must exceed block_size + 1 ({source.cfg.block_size + 1}) and be at most "
                           f"half the train split ({len(train) // 2}); got {args.reward_tokens}")
    resuming = args.resume and (out / "run.json").exists()
    resumed = finished_keys(out, args, source) if resuming else {}
    if not resumed:  # (a resume before any key finished starts the folder again)
        ex.prepare_run_folder(out, args.overwrite or resuming)

    record = prune_record(args, argv, source, ft_cfg, targets, methods)
    if resumed:
        record.update(started=read_json(out / "run.json")["started"], resumed=sorted(resumed))
    atomic_write_json(out / "run.json", record)
    print(f"pruning {source.model_path} ({flops_per_token(source.model.config)['total']:,} FLOPs/token, "
          f"{source.model.num_params():,} params) | targets {targets} | {', '.join(methods)} | "
          f"importance {args.importance} | device {source.rt.device.type} | out_dir {out}", flush=True)
    importances = importance_scores(source, args, methods, train[:-args.reward_tokens])
    scorer = RewardScorer(source, importances["scores"][args.importance], train[-args.reward_tokens:])
    return Pruning(args, source, space, ft_cfg, importances, scorer, out, record, targets, methods, scratch,
                   resumed=resumed)


def prune(args: Args, argv: list[str]) -> dict:
    p = prepare(args, argv)
    if not kept(p, "unpruned"):
        save_key(p, "unpruned", unpruned_result(p.source, p.ft_cfg, args))
    # The like-for-like reference: the pruned models train --finetune_iters steps more than the source model did,
    # so the source model, nothing removed, is fine-tuned the same way (a model still improving gains from it too).
    space = p.space
    everything = {"allocation": [[h, m] for h, m in zip(space.heads, space.neurons)], "search_time": 0.0,
                  "search": {}, "importance": "none", "heads": [list(range(h)) for h in space.heads],
                  "neurons": [list(range(m)) for m in space.neurons]}
    if not kept(p, UNPRUNED_FINETUNED):
        save_key(p, UNPRUNED_FINETUNED, pruned_result(p, UNPRUNED_FINETUNED, 1.0, everything), everything)
    for target in p.targets:
        chosen = {}
        for method in p.methods:
            key = key_of(method, target, args.importance)
            if kept(p, key):
                chosen[key] = {"allocation": p.results[key]["info"]["allocation"]}
                continue
            chosen[key] = choose(p, method, target)
            save_key(p, key, pruned_result(p, method, target, chosen[key]), chosen[key])
        if target in p.scratch:
            train_from_scratch(p, target, chosen)
    final_infos = write_results(p.out, p.results)
    atomic_write_json(p.out / "final_info.json", final_infos)  # last: its presence means the folder is complete
    p.record.update(status="finished", finished=ex.now_iso())
    atomic_write_json(p.out / "run.json", p.record)
    report(p.out, final_infos, p.record, p.targets, args)
    return final_infos


def prune_record(args: Args, argv: list[str], source: Source, ft_cfg: ex.Config, targets: list[float],
                 methods: list[str]) -> dict:
    """run.json of the prune folder: the command, the model pruned (its sha256, the config that trained it and
    its steps: what a later prune.py --key needs), the reward slice of the train split, the fine-tuning config
    and the machine; "search" fills in as each method finishes."""
    train = source.data.splits["train"]
    return {"title": f"prune {source.run_dir.name}{f' {args.key}' if args.key else ''} {args.dataset} seed "
                     f"{args.seed}",
            "description": f"structured pruning for FLOPs targets {targets} by {', '.join(methods)}",
            "command": ex.command_line(__file__, argv), "cwd": str(Path.cwd()), "started": ex.now_iso(),
            "finished": None, "status": "running", "args": dataclasses.asdict(args), "layout": LAYOUT,
            "source": {"run": str(source.run_dir.resolve()), "key": args.key or None, "dataset": args.dataset,
                       "seed_index": args.seed, "model": str(source.model_path.resolve()),
                       "model_sha256": sha256_file(source.model_path),
                       "model_config": dataclasses.asdict(source.model.config),
                       "train_config": dataclasses.asdict(source.cfg), "steps": source.steps},
            "flops_formula": FLOPS_FORMULA,
            "reward_slice": {"split": "train", "tokens": args.reward_tokens, "from": len(train) - args.reward_tokens},
            "data": source.data.provenance, "finetune_config": dataclasses.asdict(ft_cfg), "search": {},
            **environment_record(source.rt)}


def search_panels(final_infos: dict, searches: dict) -> dict:
    """search.png's panels: per target, the scores of each method that searched (rl, random_search)."""
    panels: dict = {}
    for key, search in searches.items():
        if search.get("scores") and key in final_infos:
            entry = final_infos[key]
            panels.setdefault(f"{entry['flops_target']:g} of the FLOPs", {})[entry["method"]] = [search["scores"]]
    return panels


def report(out: Path, final_infos: dict, record: dict, targets: list[float], args: Args) -> None:
    """pareto.png (several targets), search.png (where a method searched) and the notes section: after
    final_info.json, so a failure costs nothing."""
    import plot
    if len(targets) > 1:
        plot.plot_pareto(final_infos, out / "pareto.png", record["title"])
        print(f"wrote {out / 'pareto.png'}", flush=True)
    panels = search_panels(final_infos, record["search"])
    if panels:
        plot.plot_search_curves(panels, out / "search.png", record["title"])
        print(f"wrote {out / 'search.png'}", flush=True)
    if args.notes != "off":
        notes = Path(args.notes) if args.notes else out.resolve().parent / "notes.txt"
        try:
            plot.update_notes_section(notes, f"## Prune {out.name}: {record['title']}",
                                      notes_lines(final_infos, record))
            print(f"notes: {notes} updated", flush=True)
        except Exception as e:  # noqa: BLE001 -- the results are safe; say what went wrong
            print(f"warning: could not update {notes}: {e}", file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(lambda argv: prune(parse_args(argv), argv), sys.argv[1:] if argv is None else argv,
                       "interrupted: the keys finished so far are in the folder (no final_info.json); the same command "
                       "with --resume continues it")


if __name__ == "__main__":
    sys.exit(main())
