"""
Structured pruning of a trained run's GPT for a FLOPs budget: whole attention heads and MLP hidden neurons,
per layer, allocated by a PPO agent (AMC-style), uniformly, or at random; then fine-tuned and measured.

    python experiment.py --profile smoke --out_dir r --datasets shakespeare_char
    python prune.py --run r --dataset shakespeare_char --flops_target 0.5 --method rl --episodes 3 --out_dir p
    python prune.py --run run_0 --dataset shakespeare_char --seed 0 --flops_target 0.75,0.5,0.3 \
        --method rl,magnitude,random --out_dir prune_0

The model pruned is the run folder's model_<dataset>_<seed>.pt (experiment.py keeps every seed's final weights).
Within a layer, the units kept are the most important by --importance: magnitude (L2 norm of the unit's weights:
a head's q, k, v rows and output-projection columns; a neuron's c_fc row and c_proj column) or taylor (first-order
Taylor score, Molchanov et al. 2019: the squared change of the loss when the unit's output is gated off, summed
over --taylor_batches training batches). The methods differ in how many units each layer keeps:

  rl         AMC (He et al. 2018): a stable-baselines3 PPO agent (MlpPolicy, one hidden layer of --hidden, clip 0.2,
             gamma 0.99, learning rate 3e-4) walks the layers and chooses (heads kept, MLP keep ratio in steps of
             1/--mlp_steps) for each. Each choice is clipped to what the budget still allows if every later layer
             were pruned away entirely, so every episode meets the target. The reward, at the end of the episode,
             is minus the pruned model's loss (no fine-tuning) on a held-out slice of the TRAIN split: its last
             --reward_tokens tokens (the val split reports the result and is never searched on). --episodes
             episodes; the allocation kept is the best one found (episodes and the trained policy's greedy one).
  magnitude  the target spread uniformly over the layers: each keeps the same share of its FLOPs (heads
             rounded to the nearest, MLP neurons filling the rest of the share).
  random     magnitude's allocation, with the units kept drawn at random (--search_seed): the control for the
             importance score.

FLOPs per token (forward, one token in a full block_size context; elementwise ops, norms, softmax and embedding
lookups not counted), for a layer with h heads of width d = n_embd // n_head and m MLP neurons, C = n_embd,
T = block_size, V = vocab_size:
    qkv 2*C*3*h*d + attention 4*h*d*T (q.k and the weighted sum of v) + output projection 2*h*d*C + MLP 4*C*m,
    plus the output head 2*C*V once.
The matmul part (everything but the attention term) is what torch.utils.flop_counter counts on a CPU (tests).

Each pruned model is then fine-tuned for --finetune_iters steps by experiment.py's own training loop
(TrainingRun, the run's training settings; warmup and cosine from --finetune_lr) and measured: full_val_loss before
and after fine-tuning, params, flops_per_token and flops_ratio (pruned / unpruned), sampling tokens/s and ms per
token on this device (the run's inference protocol).

Output, in --out_dir: final_info.json in the harness's contract, one entry per "<method>_<target>" (e.g. rl_0.5)
plus "unpruned" (the source model, measured here the same way; its training numbers are the run's) and
"unpruned_finetuned" (the source model, nothing removed, fine-tuned as the pruned ones are: the like-for-like
reference, since the pruned models train --finetune_iters steps more than the source did);
final_info_<key>_0.json (numbers, allocation, the units kept, a sample), model_<key>_0.pt (the fine-tuned pruned
model: experiment.load_model reads it), all_results.npy/.json (fine-tuning logs), run.json (arguments, command,
source model and its hash, versions), pareto.png (loss against FLOPs, when several targets are given) and a
section in notes.txt beside the folder. A folder holding results is not overwritten without --overwrite.
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

import experiment as ex
from harness.cli import dataclass_parser, entry_point
from harness.files import atomic_save_npy, atomic_write_json, read_json, sha256_file
from harness.records import environment_record
from model import load_model

METHODS = ("rl", "magnitude", "random")
UNPRUNED_FINETUNED = "unpruned_finetuned"  # the source model fine-tuned as the pruned ones are
FLOPS_FORMULA = ("forward FLOPs per token = sum over layers of [2*C*3*h*d (qkv) + 4*h*d*T (attention) + 2*h*d*C "
                 "(output projection) + 4*C*m (MLP)] + 2*C*V (output head); C = n_embd, d = n_embd // n_head, "
                 "T = block_size, V = vocab_size, h heads and m MLP neurons in the layer")
PPO_SETTINGS = dict(clip_range=0.2, gamma=0.99, learning_rate=3e-4, n_epochs=10, ent_coef=0.01)  # the seed's


def _arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Args:
    run: str = _arg("run_0", "the run folder whose model is pruned (experiment.py's output)")
    dataset: str = _arg("shakespeare_char", "which of the run's datasets", ex.DATASETS)
    seed: int = _arg(0, "seed index of the run's model (model_<dataset>_<seed>.pt)")
    flops_target: str = _arg("0.5", "FLOPs per token kept, as a fraction of the unpruned model's, in (0, 1); a comma "
                                    "list (0.75,0.5,0.3) prunes for each")
    method: str = _arg("rl,magnitude,random", "comma list of rl, magnitude, random")
    out_dir: str = _arg("prune_0", "the prune folder to write")
    importance: str = _arg("magnitude", "which units a layer keeps: L2 magnitude or first-order taylor score",
                           ("magnitude", "taylor"))
    taylor_batches: int = _arg(8, "--importance taylor: training batches the score is summed over")
    episodes: int = _arg(100, "rl: search episodes (one pruned model scored per episode)")
    episodes_per_update: int = _arg(4, "rl: episodes per PPO update (n_steps = this x layers)")
    hidden: int = _arg(64, "rl: units of the policy's (and value function's) one hidden layer")
    mlp_steps: int = _arg(16, "rl: the MLP keep ratio is chosen in steps of 1/mlp_steps")
    reward_tokens: int = _arg(16384, "rl: the reward's held-out slice, the last N tokens of the train split")
    search_seed: int = _arg(0, "seeds PPO and the random method")
    finetune_iters: int = _arg(200, "fine-tuning steps of each pruned model")
    finetune_lr: float = _arg(0.0, "peak fine-tuning learning rate (cosine to a tenth of it); 0 = the run's / 10")
    device: str = _arg("", "where to prune, fine-tune and measure; default: the run's --device",
                       ("", "auto", "cuda", "mps", "cpu"))
    data_dir: str = _arg("", "folder holding <dataset>/ (default: where the run's data was)")
    notes: str = _arg("", "notes file for the prune section (default notes.txt beside --out_dir; 'off' to skip)")
    overwrite: bool = _arg(False, "replace the results in --out_dir")
    debug: bool = _arg(False, "full tracebacks")


# ----------------------------------------------------------------------------------------------
# FLOPs per token
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
    per token each head and each neuron costs (linear in both), plus the FLOPs no pruning removes."""
    heads: list            # per layer: heads in the model being pruned
    neurons: list          # per layer: MLP hidden neurons
    head_flops: float
    neuron_flops: float
    fixed_flops: float     # the output head
    mlp_steps: int = 16

    @staticmethod
    def of(c: ex.GPTConfig, mlp_steps: int = 16) -> "PruneSpace":
        C, d, T = c.n_embd, c.head_dim, c.block_size
        return PruneSpace([c.heads(i) for i in range(c.n_layer)], [c.mlp_width(i) for i in range(c.n_layer)],
                          head_flops=d * (6 * C + 2 * C + 4 * T), neuron_flops=4 * C, fixed_flops=2 * C * c.vocab_size,
                          mlp_steps=mlp_steps)

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

    def neurons_at(self, layer: int, step: int) -> int:
        return round(step * self.neurons[layer] / self.mlp_steps)


def clip_to_budget(space: PruneSpace, layer: int, heads: int, step: int, budget: float) -> tuple[int, int]:
    """AMC's action clipping: the (heads, MLP step) at or below the asked one, each, whose FLOPs fit `budget`
    and are the largest that do (ties: more heads). (0, 0) always fits a budget >= 0."""
    heads = min(heads, space.heads[layer])
    fits = [(space.layer_flops(h, space.neurons_at(layer, s)), h, s)
            for h in range(heads + 1) for s in range(step + 1)
            if space.layer_flops(h, space.neurons_at(layer, s)) <= budget * (1 + 1e-12)]
    _, h, s = max(fits)
    return h, s


def uniform_allocation(space: PruneSpace, target: float) -> list[tuple[int, int]]:
    """The target spread uniformly over the layers: every layer keeps the same share of its own FLOPs, the
    share that spends the whole budget, (target x full - fixed) / (full - fixed). Within a layer the heads (the
    coarse unit) are that share of its heads, rounded to the nearest and lowered while they alone exceed the
    layer's FLOPs, and the MLP neurons fill the rest: a layer ends below its share by less than one neuron.
    (Keeping the same fraction of heads and of neurons instead would round 4 heads x 0.75 - epsilon down to 2
    and leave a tenth of the budget unspent.)"""
    layers = space.full_flops - space.fixed_flops
    share = (target * space.full_flops - space.fixed_flops) / layers
    allocation = []
    for heads, neurons in zip(space.heads, space.neurons):
        budget = share * space.layer_flops(heads, neurons)
        h = min(heads, round(share * heads))
        while h > 0 and h * space.head_flops > budget:
            h -= 1
        m = min(neurons, math.floor((budget - h * space.head_flops) / space.neuron_flops + 1e-9))
        allocation.append((h, max(m, 0)))
    return allocation


# ----------------------------------------------------------------------------------------------
# The search environment (AMC): one episode walks the layers, one step per layer
# ----------------------------------------------------------------------------------------------

class PruneEnv(gym.Env):
    """Choose each layer's (heads kept, MLP keep step), first layer to last; the episode's allocation always meets
    target x the unpruned FLOPs (clip_to_budget). Reward 0 until the last layer, then -score(allocation): score
    is the pruned model's held-out loss in prune.py, anything else in a test. Every finished episode is kept in
    `history` as (allocation, score), so a caller keeps the best one found.

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
        layer = len(self.allocation)
        heads, step = clip_to_budget(self.space, layer, int(action[0]), int(action[1]), self.budget_left())
        self.allocation.append((heads, self.space.neurons_at(layer, step)))
        if len(self.allocation) < self.space.n_layer:
            return self.observe(), 0.0, False, False, {}
        score = float(self.score(list(self.allocation)))
        self.history.append((list(self.allocation), score))
        # (the terminal observation is not used: the value of a terminated state is 0)
        return np.zeros(6, dtype=np.float32), -score, True, False, {"allocation": list(self.allocation),
                                                                    "score": score}


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


def ppo_search(space: PruneSpace, target: float, score, episodes: int, seed: int, hidden: int = 64,
               episodes_per_update: int = 4, **ppo_settings) -> dict:
    """Train PPO for `episodes` episodes on PruneEnv, then roll out its greedy policy once; returns the best
    allocation found and how the search went. PPO collects n_steps before its first update (SB3 #366), so
    n_steps is sized in episodes: episodes_per_update x layers (one minibatch). ppo_settings override
    PPO_SETTINGS (prune.py itself uses the seed's)."""
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
        agent = PPO("MlpPolicy", env, n_steps=n_steps, batch_size=n_steps, policy_kwargs={"net_arch": [hidden]},
                    seed=seed, device="cpu", verbose=0, **{**PPO_SETTINGS, **ppo_settings})
        agent.learn(total_timesteps=episodes * space.n_layer, callback=StopAfterEpisodes(), progress_bar=False)
        obs, _ = env.reset()
        done = False
        while not done:
            action, _ = agent.predict(obs, deterministic=True)
            obs, _, done, _, info = env.step(action)
    greedy = info["allocation"]
    best, best_score = min(env.history, key=lambda item: item[1])
    best_episode = next(i for i, item in enumerate(env.history) if item[1] == best_score)
    return {"allocation": best, "score": best_score, "best_episode": best_episode, "greedy": greedy,
            "greedy_score": info["score"], "episodes": len(env.history) - 1,
            "scores": [s for _, s in env.history], "seconds": time.time() - t0}


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
# Checking the command line and reading the run
# ----------------------------------------------------------------------------------------------

def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ex.UserError(f"--flops_target must be numbers in (0, 1), comma-separated; got {text!r}") from None
    bad = [t for t in targets if not (0 < t < 1)]
    if not targets or bad:
        raise ex.UserError(f"--flops_target must be in (0, 1) (a fraction of the unpruned FLOPs); got {text!r}")
    if len(set(targets)) != len(targets):
        raise ex.UserError(f"--flops_target {text!r} names a target twice")
    return targets


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ex.UserError(f"unknown --method {','.join(unknown) or repr(text)}: choose from {', '.join(METHODS)} "
                           f"(comma-separated)")
    return list(dict.fromkeys(methods))


def parse_args(argv: list[str]) -> Args:
    args = Args(**vars(dataclass_parser(Args, __doc__.split("\n\n")[0].strip()).parse_args(argv)))
    parse_targets(args.flops_target)
    parse_methods(args.method)
    for name in ("episodes", "episodes_per_update", "hidden", "mlp_steps", "finetune_iters", "taylor_batches"):
        if getattr(args, name) < 1:
            raise ex.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0 or args.search_seed < 0:
        raise ex.UserError("--seed and --search_seed must be >= 0")
    if not (math.isfinite(args.finetune_lr) and args.finetune_lr >= 0):
        raise ex.UserError(f"--finetune_lr must be >= 0 (0: the run's learning rate / 10), got {args.finetune_lr}")
    return args


def key_of(method: str, target: float) -> str:
    """final_info.json's key for one method at one target, e.g. rl_0.5."""
    return f"{method}_{target:g}"


@dataclass
class Source:
    """The run's model to prune and what it was trained with."""
    run_dir: Path
    record: dict           # the run's run.json
    cfg: ex.Config         # its config for the dataset
    model: ex.GPT
    model_path: Path
    data: ex.CharDataset
    rt: ex.Runtime


def read_source(args: Args) -> Source:
    run_dir = Path(args.run)
    if not (run_dir / "run.json").exists():
        raise ex.UserError(f"--run {run_dir} is not a run folder of experiment.py (no run.json)")
    record = read_json(run_dir / "run.json")
    configs = record.get("configs") or {}
    if args.dataset not in configs:
        raise ex.UserError(f"--run {run_dir} has no {args.dataset} (it trained {', '.join(configs) or 'nothing'})")
    path = ex.model_file(run_dir, args.dataset, args.seed)
    if not path.exists() or not (run_dir / f"final_info_{args.dataset}_{args.seed}.json").exists():
        raise ex.UserError(f"{path} does not exist: the run kept no model for {args.dataset} seed {args.seed} "
                           f"(unfinished, another seed, or trained before experiment.py kept its models)")
    try:
        cfg = ex.Config(**configs[args.dataset])
    except TypeError as e:
        raise ex.UserError(f"{run_dir}/run.json does not describe a run of this version ({e})") from None
    folder = (record.get("data") or {}).get(args.dataset, {}).get("folder")
    data_dir = args.data_dir or (str(Path(folder).parent) if folder else cfg.data_dir)
    cfg = dataclasses.replace(cfg, data_dir=data_dir, device=args.device or cfg.device, resume=False)
    rt = ex.Runtime.choose(cfg)
    ex.ensure_prepared(cfg, args.dataset)
    data = ex.load_dataset(cfg, args.dataset)
    recorded = (record.get("data") or {}).get(args.dataset, {}).get("sha256")
    if recorded and recorded != data.provenance["sha256"]:
        raise ex.UserError(f"the {args.dataset} data in {data.provenance['folder']} is not what {run_dir} was "
                           f"trained on (its sha256 differs from run.json's): pass the right --data_dir")
    model = load_model(path, rt.device)
    if (model.config.vocab_size, model.config.block_size) != (data.vocab_size, cfg.block_size):
        raise ex.UserError(f"{path} does not match {run_dir}'s {args.dataset} config (vocab or block size)")
    return Source(run_dir, record, cfg, model, path, data, rt)


def check_targets(space: PruneSpace, targets: list[float]) -> None:
    fixed = space.fixed_flops / space.full_flops
    if min(targets) <= fixed:
        raise ex.UserError(f"--flops_target {min(targets):g} is at or below the share no pruning removes (the output "
                           f"head: {fixed:.3f} of the FLOPs): choose a target above it")


# ----------------------------------------------------------------------------------------------
# Choosing, fine-tuning and measuring
# ----------------------------------------------------------------------------------------------

def finetune_config(cfg: ex.Config, args: Args) -> ex.Config:
    """The run's training settings for a short fine-tuning: --finetune_iters steps, 10% warmup, cosine from
    --finetune_lr to a tenth of it, no agent; evaluated a few times."""
    lr = args.finetune_lr or cfg.learning_rate / 10
    iters = args.finetune_iters
    ft = dataclasses.replace(cfg, max_iters=iters, lr_decay_iters=iters, warmup_iters=iters // 10, learning_rate=lr,
                             min_lr=lr / 10, schedule="cosine", optimizer="adamw", agent="none", agent_init="",
                             agent_actions="", reward="", agent_learn=None, lr_groups="global", layer_trust="none",
                             control="lr", step_epochs=0.0, lr_ceiling=max(cfg.lr_ceiling, lr), lr_floor=0.0,
                             eval_interval=min(cfg.eval_interval, max(1, iters // 4)),
                             log_interval=min(cfg.log_interval, max(1, iters // 10)), seeds=1, resume=False)
    ft = dataclasses.replace(ft, agent_actions=ex.TABLE_ACTIONS, reward=ex.reward_kind(ft),
                             lr_groups=ex.lr_groups_kind(ft))
    ex.validate(ft)
    return ft


def reward_scorer(source: Source, importance, tokens: np.ndarray) -> Callable[[list], float]:
    """allocation -> loss of the model pruned to it (no fine-tuning) on `tokens`, each allocation computed once."""
    cfg = dataclasses.replace(source.cfg, final_eval_tokens=len(tokens), batch_size=max(source.cfg.batch_size, 32))
    cache: dict = {}

    def score(allocation) -> float:
        key = tuple(map(tuple, allocation))
        if key not in cache:
            cache[key] = ex.split_loss(prune_model(source.model, *kept_units(importance, allocation)), tokens, cfg,
                                       source.rt)
        return cache[key]
    return score


def taylor_batches(source: Source, n: int, search_tokens: np.ndarray, seed: int):
    sampler = ex.BatchSampler(search_tokens, source.cfg.block_size, source.cfg.batch_size, source.rt.device, seed)
    return [sampler.next_batch() for _ in range(n)]


def choose(method: str, target: float, space: PruneSpace, importance, score, args: Args) -> dict:
    """The allocation and the units kept for one method at one target, and how long choosing took."""
    t0 = time.time()
    search = {}
    if method == "rl":
        search = ppo_search(space, target, score, args.episodes, args.search_seed, args.hidden,
                            args.episodes_per_update)
        allocation = search.pop("allocation")
    else:
        allocation = uniform_allocation(space, target)
    if method == "random":  # the same allocation as magnitude, the units drawn at random instead of by score
        rng = torch.Generator().manual_seed(args.search_seed)
        importance = [(torch.rand(len(h), generator=rng), torch.rand(len(m), generator=rng)) for h, m in importance]
    heads, neurons = kept_units(importance, allocation)
    return {"allocation": [list(a) for a in allocation], "heads": heads, "neurons": neurons,
            "search_time": time.time() - t0, "search": search}


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


def pruned_result(method: str, target: float, chosen: dict, source: Source, ft_cfg: ex.Config, args: Args) -> dict:
    """Prune, score before fine-tuning, fine-tune with the harness's loop, measure; the per-key record."""
    pruned = prune_model(source.model, chosen["heads"], chosen["neurons"])
    before = ex.final_evaluation(pruned, source.data, ft_cfg, source.rt).get("full_val_loss")
    run = ex.TrainingRun(ft_cfg, source.data, args.seed, source.rt, checkpoint=None, model=pruned)
    status = ex.drive(run, ex.make_agent(ft_cfg, run.seed, args.dataset, args.seed))
    info = run.finish(status)
    flops = flops_per_token(pruned.config)
    full = flops_per_token(source.model.config)["total"]
    aggregate = info["inference_tokens_per_second_aggregate"]
    info.update(method=method, flops_target=target, flops_per_token=flops["total"],
                flops_ratio=flops["total"] / full, matmul_flops_per_token=flops["matmul"],
                params=pruned.num_params(), full_val_loss_before=before,
                tokens_per_second=info["avg_inference_tokens_per_second"],
                latency_ms_per_token=1000.0 / aggregate if aggregate else None,
                search_time=chosen["search_time"], finetune_time=info["total_train_time"])
    return {"info": info, "model": run.model, "train_info": run.state.train_log, "val_info": run.state.val_log,
            "sample": run.sample}


def unpruned_result(source: Source, ft_cfg: ex.Config, args: Args) -> dict:
    """The source model measured here as the pruned ones are (loss on the val split, sampling speed on this
    device now); its training numbers and logs are the run's own."""
    trained = read_json(source.run_dir / f"final_info_{args.dataset}_{args.seed}.json")
    loss = ex.final_evaluation(source.model, source.data, ft_cfg, source.rt).get("full_val_loss")
    speed = measure_speed(source.model, source, ft_cfg, ft_cfg.seed_base + args.seed)
    flops = flops_per_token(source.model.config)
    info = {"final_train_loss": trained.get("final_train_loss"), "best_val_loss": trained.get("best_val_loss"),
            "total_train_time": trained.get("total_train_time"),
            "avg_inference_tokens_per_second": speed["tokens_per_second"], "full_val_loss": loss,
            "full_val_loss_before": loss, "method": "unpruned", "flops_target": 1.0,
            "flops_per_token": flops["total"], "flops_ratio": 1.0, "matmul_flops_per_token": flops["matmul"],
            "params": source.model.num_params(), "tokens_per_second": speed["tokens_per_second"],
            "latency_ms_per_token": speed["latency_ms_per_token"], "seed": source.cfg.seed_base + args.seed,
            "status": "finished"}
    results_path = source.run_dir / "all_results.json"
    logs = read_json(results_path) if results_path.exists() else {}
    return {"info": {k: v for k, v in info.items() if v is not None}, "model": None,
            "train_info": logs.get(f"{args.dataset}_{args.seed}_train_info", []),
            "val_info": logs.get(f"{args.dataset}_{args.seed}_val_info", []), "sample": speed["sample"]}


# ----------------------------------------------------------------------------------------------
# The prune folder
# ----------------------------------------------------------------------------------------------

LAYOUT = ("final_info.json: one entry per '<method>_<target>' (and 'unpruned') in place of the dataset, each with "
          "one seed (the run's --seed); full_val_loss is after fine-tuning, full_val_loss_before before it")


def write_results(out: Path, results: dict) -> dict:
    """final_info_<key>_0.json and all_results for every key so far; returns final_info.json's content."""
    all_results, final_infos = {}, {}
    for key, r in results.items():
        info = r["info"]
        numbers = {k: v for k, v in info.items() if k not in ("allocation", "heads", "neurons", "search")}
        for kind in ("train_info", "val_info"):
            all_results[f"{key}_0_{kind}"] = r[kind]
        all_results[f"{key}_0_final_info"] = numbers
        final_infos[key] = {**ex.summarize([numbers]), "method": info["method"], "flops_target": info["flops_target"]}
    atomic_save_npy(out / "all_results.npy", all_results)
    atomic_write_json(out / "all_results.json", all_results)
    return final_infos


def notes_lines(final_infos: dict, record: dict) -> list[str]:
    shown = ("full_val_loss_before", "full_val_loss", "flops_ratio", "params", "tokens_per_second")
    results = {key: {k: round(entry["means"][f"{k}_mean"], 4) if isinstance(entry["means"].get(f"{k}_mean"), float)
                     else entry["means"].get(f"{k}_mean") for k in shown}
               for key, entry in final_infos.items()}
    return [f"Results: {results!r}",
            f"Description: structured pruning of {record['source']['model']} ({record['args']['importance']} "
            f"importance, {record['args']['episodes']} rl episodes, {record['args']['finetune_iters']} fine-tuning "
            f"steps); full_val_loss after fine-tuning, _before without it; flops_ratio = pruned / unpruned FLOPs "
            f"per token"]


def prune(args: Args, argv: list[str]) -> dict:
    targets, methods = parse_targets(args.flops_target), parse_methods(args.method)
    out = Path(args.out_dir)
    if out.resolve() == Path(args.run).resolve():
        raise ex.UserError("--out_dir must not be the --run folder (its results would be replaced)")
    source = read_source(args)
    space = PruneSpace.of(source.model.config, args.mlp_steps)
    check_targets(space, targets)
    ft_cfg = finetune_config(source.cfg, args)
    train = source.data.splits["train"]
    if not source.cfg.block_size + 1 < args.reward_tokens <= len(train) // 2:
        raise ex.UserError(f"--reward_tokens must exceed block_size + 1 ({source.cfg.block_size + 1}) and be at most "
                           f"half the train split ({len(train) // 2}); got {args.reward_tokens}")
    ex.prepare_run_folder(out, args.overwrite)  # every check above: bad input touches nothing

    reward_tokens, search_tokens = train[-args.reward_tokens:], train[:-args.reward_tokens]
    record = prune_record(args, argv, source, ft_cfg, targets, methods)
    atomic_write_json(out / "run.json", record)
    print(f"pruning {source.model_path} ({flops_per_token(source.model.config)['total']:,} FLOPs/token, "
          f"{source.model.num_params():,} params) | targets {targets} | {', '.join(methods)} | "
          f"importance {args.importance} | device {source.rt.device.type} | out_dir {out}", flush=True)

    if args.importance == "taylor":
        importance = taylor_importance(source.model, taylor_batches(source, args.taylor_batches, search_tokens,
                                                                    source.cfg.seed_base + args.search_seed))
    else:
        importance = magnitude_importance(source.model)
    score = reward_scorer(source, importance, reward_tokens)
    results = {"unpruned": unpruned_result(source, ft_cfg, args)}
    atomic_write_json(out / "final_info_unpruned_0.json",
                         {**results["unpruned"]["info"], "key": "unpruned", "sample": results["unpruned"]["sample"]})
    # The like-for-like reference: the pruned models train --finetune_iters steps more than the source model did,
    # so the source model, nothing removed, is fine-tuned the same way (a model still improving gains from it too).
    everything = {"allocation": [[h, m] for h, m in zip(space.heads, space.neurons)], "search_time": 0.0, "search": {},
                  "heads": [list(range(h)) for h in space.heads], "neurons": [list(range(m)) for m in space.neurons]}
    keys = [(UNPRUNED_FINETUNED, 1.0, UNPRUNED_FINETUNED)] + [(key_of(m, t), t, m) for t in targets for m in methods]
    for key, target, method in keys:
        chosen = everything if method == UNPRUNED_FINETUNED else choose(method, target, space, importance, score, args)
        r = pruned_result(method, target, chosen, source, ft_cfg, args)
        r["info"].update(allocation=chosen["allocation"], heads=chosen["heads"], neurons=chosen["neurons"],
                         search=chosen["search"], reward_loss=score(chosen["allocation"]))
        results[key] = r
        ex.save_model(ex.model_file(out, key, 0), r["model"])
        atomic_write_json(out / f"final_info_{key}_0.json", {**r["info"], "key": key, "sample": r["sample"]})
        record["search"][key] = {"seconds": chosen["search_time"], **{k: v for k, v in chosen["search"].items()
                                                                        if k != "seconds"}}
        write_results(out, results)
        i = r["info"]
        print(f"[{key}] heads {[a[0] for a in chosen['allocation']]} mlp {[a[1] for a in chosen['allocation']]} | "
              f"flops x{i['flops_ratio']:.3f} | params {i['params']:,} | val {i['full_val_loss_before']:.4f} -> "
              f"{i['full_val_loss']:.4f} fine-tuned | {i['tokens_per_second']:.0f} tok/s | search "
              f"{i['search_time']:.1f}s", flush=True)
    final_infos = write_results(out, results)
    atomic_write_json(out / "final_info.json", final_infos)  # last: its presence means the folder is complete
    record.update(status="finished", finished=ex.now_iso())
    atomic_write_json(out / "run.json", record)
    report(out, final_infos, record, targets, args)
    return final_infos


def prune_record(args: Args, argv: list[str], source: Source, ft_cfg: ex.Config, targets: list[float],
                 methods: list[str]) -> dict:
    """run.json of the prune folder: the command, the source model (and its sha256), the reward slice of the
    train split, the fine-tuning config and the machine; "search" fills in as each method finishes."""
    train = source.data.splits["train"]
    return {"title": f"prune {source.run_dir.name} {args.dataset} seed {args.seed}",
            "description": f"structured pruning for FLOPs targets {targets} by {', '.join(methods)}",
            "command": ex.command_line(__file__, argv), "cwd": str(Path.cwd()), "started": ex.now_iso(),
            "finished": None, "status": "running", "args": dataclasses.asdict(args), "layout": LAYOUT,
            "source": {"run": str(source.run_dir.resolve()), "dataset": args.dataset, "seed_index": args.seed,
                       "model": str(source.model_path.resolve()), "model_sha256": sha256_file(source.model_path),
                       "model_config": dataclasses.asdict(source.model.config)},
            "flops_formula": FLOPS_FORMULA,
            "reward_slice": {"split": "train", "tokens": args.reward_tokens, "from": len(train) - args.reward_tokens},
            "data": source.data.provenance, "finetune_config": dataclasses.asdict(ft_cfg), "search": {},
            **environment_record(source.rt)}


def report(out: Path, final_infos: dict, record: dict, targets: list[float], args: Args) -> None:
    """pareto.png (several targets) and the notes section: after final_info.json, so a failure costs nothing."""
    import plot
    if len(targets) > 1:
        plot.plot_pareto(final_infos, out / "pareto.png", record["title"])
        print(f"wrote {out / 'pareto.png'}", flush=True)
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
                          "interrupted: the methods finished so far are in the folder (no final_info.json)")


if __name__ == "__main__":
    sys.exit(main())
