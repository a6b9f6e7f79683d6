"""
The network: nanoGPT's GPT (pre-LN, tied embeddings, SDPA causal attention), with structured pruning's per-layer
sizes, the optimizer's parameter groups (one LR group per layer under --lr_groups layer) and the model files a run
keeps. Read beside experiment.py, which builds it from its Config; nothing here imports experiment.py, and
make_optimizer reads the config it is given by duck typing.
"""
from __future__ import annotations

import dataclasses
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from harness.control import lr_group_names
from harness.errors import UserError
from harness.files import atomic_write_bytes


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float
    bias: bool
    # Structured pruning (prune.py): per layer, the attention heads and MLP hidden neurons it has. None = every
    # layer has n_head heads and 4 * n_embd neurons, nanoGPT's model. The head width stays n_embd // n_head, and
    # the residual width and the tied embedding are never pruned. 0 is allowed: a layer with no heads (or no
    # neurons) adds only its output projection's bias (nothing without bias), i.e. the sublayer is removed.
    layer_heads: Optional[list] = None
    layer_mlp: Optional[list] = None

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def heads(self, layer: int) -> int:
        return self.n_head if self.layer_heads is None else int(self.layer_heads[layer])

    def mlp_width(self, layer: int) -> int:
        return 4 * self.n_embd if self.layer_mlp is None else int(self.layer_mlp[layer])


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's cannot drop only the bias)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    """nn.Linear; one pruned to nothing (0 rows or columns) without torch's warning that it initialises nothing."""
    if n_in and n_out:
        return nn.Linear(n_in, n_out, bias=bias)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        return nn.Linear(n_in, n_out, bias=bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, c: GPTConfig, layer: int = 0):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = c.heads(layer), c.head_dim, c.dropout
        width = self.n_head * self.head_dim  # n_embd unless pruned
        # q, k, v in one matmul: rows [q of head 0, q of head 1, ..., k of head 0, ..., v of head 0, ...]
        self.c_attn = linear(c.n_embd, 3 * width, c.bias)
        self.c_proj = linear(width, c.n_embd, c.bias)  # columns: head 0's outputs, head 1's, ...
        self.resid_dropout = nn.Dropout(c.dropout)

    def forward(self, x, cache: Optional[dict] = None):
        """cache (sampling only): this layer's keys/values so far; filled from empty, then one token at a time."""
        B, T, C = x.shape
        if self.n_head == 0:  # every head pruned: nothing to attend with, only c_proj's bias remains
            return self.resid_dropout(self.c_proj(x.new_zeros(B, T, 0)))
        width = self.n_head * self.head_dim
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        causal = True
        if cache is not None:
            if "k" in cache:  # one new token attends to every cached position: no mask needed
                assert T == 1, "the KV cache takes the prompt from empty, then one token per call"
                k, v = torch.cat((cache["k"], k), dim=2), torch.cat((cache["v"], v), dim=2)
                causal = False
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, width)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, c: GPTConfig, layer: int = 0):
        super().__init__()
        self.c_fc = linear(c.n_embd, c.mlp_width(layer), c.bias)  # a row per hidden neuron
        self.c_proj = linear(c.mlp_width(layer), c.n_embd, c.bias)  # a column per hidden neuron
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, c: GPTConfig, layer: int = 0):
        super().__init__()
        self.ln_1, self.attn = LayerNorm(c.n_embd, c.bias), CausalSelfAttention(c, layer)
        self.ln_2, self.mlp = LayerNorm(c.n_embd, c.bias), MLP(c, layer)

    def forward(self, x, cache: Optional[dict] = None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd),
            wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout),
            h=nn.ModuleList([Block(c, layer) for layer in range(c.n_layer)]),
            ln_f=LayerNorm(c.n_embd, c.bias),
        ))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input/output embeddings
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight") and p.numel():
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module):
        # (A fully pruned sublayer's weights are empty: nothing to draw, and torch warns if asked to.)
        if isinstance(module, nn.Linear):
            if module.weight.numel():
                torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters without the position embeddings (as nanoGPT reports them)."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def forward(self, idx, targets=None, caches: Optional[list] = None, start_pos: int = 0):
        """Logits (and the loss when targets are given). caches/start_pos: KV-cached sampling, see generate."""
        T = idx.shape[1]
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, caches[i] if caches is not None else None)
        x = self.transformer.ln_f(x)
        if targets is None:  # generation needs only the last position's logits
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def make_optimizer(self, cfg, device: torch.device) -> torch.optim.Optimizer:
        """AdamW; weight decay only on >=2-D tensors (matmul weights, embeddings), not on norms/biases.
        --lr_groups layer: that split within each LR group (lr_group_names), so each layer has its own rate;
        every param group carries its "lr_group" and whether it holds "matrices"."""
        names = lr_group_names(cfg)
        params = [(lr_group_of(name) if len(names) > 1 else "all", p)
                  for name, p in self.named_parameters() if p.requires_grad]
        groups = [{"params": [p for g, p in params if g == group and (p.dim() >= 2) == matrices],
                   "weight_decay": cfg.weight_decay if matrices else 0.0, "lr_group": group, "matrices": matrices}
                  for group in names for matrices in (True, False)]
        groups = [g for g in groups if g["params"]] if len(names) > 1 else groups
        if cfg.optimizer == "schedulefree":  # averages iterates itself: needs .train()/.eval() switching
            import schedulefree
            return schedulefree.AdamWScheduleFree(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                                  warmup_steps=cfg.warmup_iters)
        if cfg.optimizer == "prodigy":  # Mishchenko & Defazio 2024: estimates the step size; lr 1.0 documented
            import prodigyopt
            return prodigyopt.Prodigy(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        if cfg.optimizer == "dadapt_adam":  # Defazio & Mishchenko 2023; decoupled decay, as AdamW's
            import dadaptation
            return dadaptation.DAdaptAdam(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), decouple=True)
        fused = device.type == "cuda"  # one kernel for all parameters; foreach (the default) on CPU
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


def model_file(run_dir: Path, dataset: str, seed_index: int) -> Path:
    """Each seed's final weights, kept in its run folder (prune.py starts from them)."""
    return Path(run_dir) / f"model_{dataset}_{seed_index}.pt"


def save_model(path: Path, model: GPT) -> None:
    """The weights and the GPTConfig that builds them (pruned layer sizes included), atomically; plain tensors,
    numbers and lists, so load_model reads it with torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save({"model_config": dataclasses.asdict(model.config), "model": model.state_dict()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_model(path: Path, device="cpu") -> GPT:
    """A model saved by save_model, on `device`, in eval mode."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**payload["model_config"]))
        model.load_state_dict(payload["model"])
    except Exception as e:  # a truncated or foreign file: say which, do not guess
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"model file {path} is unreadable ({type(e).__name__}: {reason})") from e
    return model.to(device).eval()


# --lr_groups layer: which LR group (harness/control.py's lr_group_names) each parameter belongs to.

def lr_group_of(parameter_name: str) -> str:
    """transformer.wte.weight -> embedding, transformer.h.3.mlp.c_fc.weight -> block3, ... -> ln_f."""
    parts = parameter_name.split(".")
    if parts[1] in ("wte", "wpe"):
        return "embedding"
    if parts[1] == "h":
        return f"block{parts[2]}"
    return "ln_f"
