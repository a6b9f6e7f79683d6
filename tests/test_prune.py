"""Structured pruning (prune.py): a pruned GPT computes what the masked one does, FLOPs are counted right, every
method meets its budget, PPO finds a known best allocation, and the CLI writes a contract folder or refuses in one line."""
import copy
import dataclasses
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import experiment as ex
import plot
import prune
import sample
from conftest import ROOT, run_cli
from model import load_model

CONTRACT_KEYS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")
PRUNE_KEYS = ("flops_ratio", "flops_per_token", "params", "full_val_loss", "full_val_loss_before",
              "tokens_per_second", "latency_ms_per_token")


def tiny_gpt(bias=True, seed=0, **kw) -> ex.GPT:
    """A small GPT with every weight and bias random (the init zeroes biases, which would hide mistakes)."""
    config = ex.GPTConfig(**{**dict(vocab_size=13, block_size=16, n_layer=3, n_head=4, n_embd=32, dropout=0.0,
                                    bias=bias), **kw})
    torch.manual_seed(seed)
    model = ex.GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def logits(model, x):
    return model(x, x)[0]  # (with targets: the logits of every position)


def masked(model, keep_heads, keep_neurons):
    """The unpruned model with the outputs of every unit not kept zeroed: its output-projection columns."""
    model = copy.deepcopy(model)
    d = model.config.head_dim
    with torch.no_grad():
        for block, heads, neurons in zip(model.transformer.h, keep_heads, keep_neurons):
            for h in set(range(block.attn.n_head)) - set(heads):
                block.attn.c_proj.weight[:, h * d:(h + 1) * d] = 0
            for j in set(range(block.mlp.c_fc.weight.shape[0])) - set(neurons):
                block.mlp.c_proj.weight[:, j] = 0
    return model


KEEP_CASES = {
    "some heads and neurons": ([[0, 2], [3], [0, 1, 2, 3]], [list(range(0, 128, 3)), [5, 77], list(range(128))]),
    "a layer with no heads or neurons": ([[1, 2, 3], [], [2]], [[], list(range(64)), [9]]),
}


# --- the pruned model ---

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", KEEP_CASES, ids=list(KEEP_CASES))
def test_pruning_heads_and_neurons_by_hand_equals_masking_them_in_the_unpruned_model(bias, case):
    model = tiny_gpt(bias)
    keep_heads, keep_neurons = KEEP_CASES[case]
    pruned = prune.prune_model(model, keep_heads, keep_neurons)
    assert pruned.config.layer_heads == [len(h) for h in keep_heads]
    assert pruned.config.layer_mlp == [len(n) for n in keep_neurons]
    assert pruned.num_params() < model.num_params()
    x = torch.randint(13, (3, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(pruned, x), logits(masked(model, keep_heads, keep_neurons), x),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(pruned, x), logits(model, x), atol=1e-3)  # pruning did change something


def test_pruning_keeps_the_tied_embedding_and_the_residual_width():
    pruned = prune.prune_model(tiny_gpt(), *KEEP_CASES["some heads and neurons"])
    assert pruned.lm_head.weight is pruned.transformer.wte.weight
    assert pruned.transformer.wte.weight.shape == (13, 32) and pruned.transformer.ln_f.weight.shape == (32,)


def test_an_unpruned_config_builds_the_same_model_bit_for_bit():
    plain = dict(vocab_size=13, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=False)
    torch.manual_seed(3)
    before = ex.GPT(ex.GPTConfig(**plain)).state_dict()
    torch.manual_seed(3)
    after = ex.GPT(ex.GPTConfig(**plain, layer_heads=[4, 4], layer_mlp=[128, 128])).state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_pruned_model_saves_loads_and_samples_the_same_with_and_without_the_kv_cache(tmp_path):
    pruned = prune.prune_model(tiny_gpt(), *KEEP_CASES["a layer with no heads or neurons"])
    path = tmp_path / "model.pt"
    ex.save_model(path, pruned)
    payload = torch.load(path, weights_only=True)  # plain data: no pickled classes
    assert payload["model_config"]["layer_heads"] == [3, 0, 1]
    loaded = load_model(path)
    x = torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(logits(loaded, x), logits(pruned, x))
    prompt = x[:1, :3]
    samples = [ex.generate(loaded, prompt, 40, temperature=0.8, top_k=5, use_cache=cache,
                           generator=torch.Generator().manual_seed(7)) for cache in (True, False)]
    assert torch.equal(samples[0], samples[1]) and samples[0].shape == (1, 43)  # past block_size: the window slides


def test_a_pruned_model_trains():
    model = prune.prune_model(tiny_gpt(), *KEEP_CASES["a layer with no heads or neurons"]).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(13, (4, 16), generator=torch.Generator().manual_seed(4))
    losses = []
    for _ in range(20):
        _, loss = model(x, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_distillation_trains_on_cross_entropy_and_the_teachers_soft_targets_and_evaluates_plainly():
    teacher = tiny_gpt(seed=1)
    plain = prune.prune_model(teacher, *KEEP_CASES["some heads and neurons"])
    student = prune.with_teacher(plain, teacher, alpha=0.3, temperature=2.0).train()
    x, y = (torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (5, 6))
    logits, loss = student(x, y)
    cross_entropy = F.cross_entropy(logits.reshape(-1, 13), y.reshape(-1))
    soft = F.softmax(teacher(x, y)[0] / 2.0, dim=-1)
    kl = (soft * (soft.log() - F.log_softmax(logits / 2.0, dim=-1))).sum(-1).mean()
    assert loss.item() == pytest.approx((0.7 * cross_entropy + 0.3 * 2.0 ** 2 * kl).item(), rel=1e-5)
    assert student.eval()(x, y)[1].item() == pytest.approx(plain.eval()(x, y)[1].item(), rel=1e-6)
    assert student.state_dict().keys() == plain.state_dict().keys()  # the teacher is neither trained nor saved
    assert prune.with_teacher(plain, teacher, alpha=0.0, temperature=2.0) is plain  # no distillation: untouched


def test_the_taylor_score_is_the_squared_loss_change_of_gating_a_unit_off_to_first_order():
    model = tiny_gpt(seed=5).double()
    x = torch.randint(13, (2, 16), generator=torch.Generator().manual_seed(3))
    scores = prune.taylor_importance(model, [(x, x)])
    d, eps = model.config.head_dim, 1e-6

    def loss_with_gate(layer, scale_columns):
        m = copy.deepcopy(model)
        with torch.no_grad():
            scale_columns(m.transformer.h[layer])
        return m(x, x)[1].item()
    for layer, head, neuron in ((0, 1, 7), (2, 3, 100)):
        def head_gate(g):
            return lambda b: b.attn.c_proj.weight[:, head * d:(head + 1) * d].mul_(g)

        def neuron_gate(g):
            return lambda b: b.mlp.c_proj.weight[:, neuron].mul_(g)
        for gate, score in ((head_gate, scores[layer][0][head]), (neuron_gate, scores[layer][1][neuron])):
            slope = (loss_with_gate(layer, gate(1 + eps)) - loss_with_gate(layer, gate(1 - eps))) / (2 * eps)
            assert float(score) == pytest.approx(slope ** 2, rel=1e-4)


def test_units_kept_are_the_most_important_of_each_layer():
    importance = [(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([3.0, 1.0, 2.0, 0.0]))]
    heads, neurons = prune.kept_units(importance, [(2, 1)])
    assert heads == [[1, 2]] and neurons == [[0]]


# --- FLOPs ---

@pytest.mark.parametrize("layer_heads, layer_mlp", [(None, None), ([1, 4, 0], [128, 3, 0]), ([2, 0, 2], [0, 50, 1])])
def test_analytic_flops_agree_with_flop_counter_mode_on_the_matmuls(layer_heads, layer_mlp):
    model = tiny_gpt(layer_heads=layer_heads, layer_mlp=layer_mlp)
    T = model.config.block_size
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long))
    counted = counter.get_flop_counts()["Global"]
    matmuls = sum(v for op, v in counted.items() if str(op).split(".")[1] in ("mm", "addmm", "bmm"))
    flops = prune.flops_per_token(model.config)
    assert matmuls == T * flops["matmul"]  # one full-context forward: every position through every matmul
    heads = sum(model.config.heads(i) for i in range(3))
    assert flops["attention"] == 4 * heads * model.config.head_dim * T
    space = prune.PruneSpace.of(tiny_gpt().config)
    allocation = [(model.config.heads(i), model.config.mlp_width(i)) for i in range(3)]
    assert space.flops(allocation) == flops["total"]


CPU_MODEL = ex.GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0, bias=False)
SMOKE_MODEL = ex.GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
TARGETS = (0.95, 0.75, 0.5, 0.3, 0.15, 0.06)


def random_importance(space, seed=0):
    rng = torch.Generator().manual_seed(seed)
    return [(torch.rand(h, generator=rng), torch.rand(m, generator=rng)) for h, m in zip(space.heads, space.neurons)]


def episodes_of(space, target, plans):
    """The allocations PruneEnv ends on for these action plans (one action per layer each)."""
    env = prune.PruneEnv(space, target, score=lambda allocation: 0.0)
    for plan in plans:
        env.reset()
        for action in plan:
            _, _, done, _, info = env.step(action)
        assert done
    return [allocation for allocation, _ in env.history]


@pytest.mark.parametrize("model", [CPU_MODEL, SMOKE_MODEL], ids=["cpu", "smoke"])
@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("target", TARGETS)
def test_every_method_spends_its_budget_to_within_a_hundredth_and_never_more(model, round_to, target):
    space = prune.PruneSpace.of(model, mlp_steps=16, round_to=round_to)
    budget, unit = target * space.full_flops, round_to * space.neuron_flops
    rng = np.random.default_rng(0)
    nvec = np.array([max(space.heads) + 1, 17])
    plans = [[nvec - 1] * space.n_layer, [np.zeros(2, int)] * space.n_layer, [[0, 16]] * space.n_layer,
             [[4, 0]] * space.n_layer] + [[rng.integers(nvec) for _ in range(space.n_layer)] for _ in range(40)]
    searched = prune.random_search(space, target, lambda a: float(rng.random()), 20, seed=1)
    allocations = {"uniform": prune.uniform_allocation(space, target),
                   "global": prune.global_allocation(space, random_importance(space), target),
                   "random_search": searched["allocation"],
                   **{f"episode {i}": a for i, a in enumerate(episodes_of(space, target, plans))}}
    for name, allocation in allocations.items():
        spent = space.flops(allocation)
        assert spent <= budget * (1 + 1e-12), name
        assert budget - spent < unit, name  # within one group of neurons: under a hundredth of the FLOPs here
        assert budget - spent < 0.01 * space.full_flops, name
        widths = [m for _, m in allocation]
        assert all(m % round_to == 0 or m == full for m, full in zip(widths, space.neurons)), (name, widths)


def test_uniform_keeps_the_same_share_in_every_layer_and_the_last_takes_the_rounding():
    space = prune.PruneSpace.of(CPU_MODEL, mlp_steps=16)
    allocation = prune.uniform_allocation(space, 0.5)
    assert len(set(allocation[:-1])) == 1 and allocation[-1][0] == allocation[0][0]
    assert 0 <= allocation[-1][1] - allocation[0][1] <= space.n_layer


def test_the_budget_fill_buys_a_head_with_neurons_where_every_neuron_is_kept():
    space = prune.PruneSpace(heads=[2, 2], neurons=[8, 8], head_flops=3.0, neuron_flops=1.0, fixed_flops=0.0)
    # everything but one head of the last layer, and 2.5 FLOPs to spare: the head costs 3, so one neuron goes
    filled = prune.fill_budget(space, [(2, 8), (1, 8)], budget=2 * 6 + 16 - 3 + 2.5)
    assert filled == [(2, 8), (2, 7)]
    assert prune.fill_budget(space, [(0, 0), (0, 0)], budget=10.0) == [(0, 2), (0, 8)]  # last layer first


def test_global_keeps_the_most_important_units_per_flop_across_layers():
    space = prune.PruneSpace(heads=[2, 2], neurons=[4, 4], head_flops=4.0, neuron_flops=1.0, fixed_flops=0.0)
    importance = [(torch.tensor([9.0, 1.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])),   # a head worth 9/4 per FLOP
                  (torch.tensor([0.1, 0.2]), torch.tensor([3.0, 2.0, 0.1, 0.1]))]  # neurons worth 3 and 2
    # budget 7 of 24, best per FLOP first: a neuron of layer 1 (3), the good head (2.25), the other good neuron
    # (2), then one of layer 0's neurons (0.5) with the last FLOP; the heads of layer 1 are worth too little
    assert prune.global_allocation(space, importance, 7 / 24) == [(1, 1), (0, 2)]


def test_a_budget_a_rounding_error_below_zero_is_clipped_to_nothing_instead_of_failing():
    space = prune.PruneSpace.of(CPU_MODEL)
    assert prune.clip_to_budget(space, 3, 4, 16, -1e-9) == (0, 0)


def test_head_actions_spread_evenly_over_a_smaller_layers_head_counts():
    space = prune.PruneSpace(heads=[4, 2, 1, 0], neurons=[8] * 4, head_flops=1.0, neuron_flops=1.0, fixed_flops=0.0)
    assert [space.heads_at(0, a) for a in range(5)] == [0, 1, 2, 3, 4]  # the largest layer: as asked
    for layer in (1, 2, 3):
        counts = np.bincount([space.heads_at(layer, a) for a in range(5)], minlength=space.heads[layer] + 1)
        assert len(counts) == space.heads[layer] + 1 and counts.max() - counts.min() <= 1, (layer, counts)


def test_random_search_scores_as_many_allocations_as_rl_and_leaves_the_random_state_alone():
    space = prune.PruneSpace.of(SMOKE_MODEL, mlp_steps=4)
    np.random.seed(3)
    expected = np.random.rand(2)
    np.random.seed(3)
    rl = prune.ppo_search(space, 0.5, lambda a: float(space.flops(a)), episodes=6, seed=0, episodes_per_update=2)
    searched = prune.random_search(space, 0.5, lambda a: float(space.flops(a)), rl["evaluations"], seed=0)
    assert rl["evaluations"] == 7 == searched["evaluations"] == len(searched["scores"])  # 6 episodes + greedy
    assert np.array_equal(np.random.rand(2), expected)
    assert searched["score"] == min(searched["scores"]) and searched["distinct_allocations"] <= 7
    assert searched["scored_flops_per_token"] >= searched["distinct_allocations"] * space.fixed_flops


def test_a_key_names_the_ranking_it_used_and_magnitude_is_uniforms_old_name():
    assert prune.parse_methods("magnitude,rl,uniform") == ["uniform", "rl"]
    assert prune.key_of("uniform", 0.5) == "uniform_0.5"
    assert prune.key_of("uniform", 0.5, "taylor") == "uniform_taylor_0.5"  # not magnitude_0.5
    assert prune.key_of("random_search", 0.75, "taylor") == "random_search_taylor_0.75"
    assert prune.key_of("global", 0.3, "taylor") == prune.key_of("global", 0.3) == "global_0.3"  # always taylor
    assert prune.key_of("random", 0.3, "taylor") == "random_0.3"


def test_a_target_below_what_pruning_can_remove_is_refused():
    space = prune.PruneSpace.of(CPU_MODEL)
    with pytest.raises(ex.UserError, match="output head"):
        prune.check_targets(space, [0.5, 0.005])  # the output head: ~1% of the FLOPs


# --- the RL agent ---

def test_the_ppo_search_leaves_no_log_folders_behind(tmp_path, monkeypatch):
    """stable-baselines3 makes an empty /tmp/SB3-<time> folder per learn() unless given a logger."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    space = prune.PruneSpace(heads=[2, 2], neurons=[4, 4], head_flops=1.0, neuron_flops=0.25, fixed_flops=0.2,
                             mlp_steps=2)
    prune.ppo_search(space, 0.5, lambda allocation: float(sum(h + m for h, m in allocation)), episodes=4, seed=0)
    assert list(tmp_path.glob("SB3-*")) == []


def test_ppo_finds_the_known_best_allocation_of_a_synthetic_pruning_environment():
    """Two layers; layer 0's heads and layer 1's MLP matter, the rest barely. At half the FLOPs the best is
    found by enumeration; asking for everything (the first layer takes the budget) or a uniform split is worse."""
    from stable_baselines3.common.env_checker import check_env
    space = prune.PruneSpace(heads=[2, 2], neurons=[4, 4], head_flops=1.0, neuron_flops=0.25, fixed_flops=0.2,
                             mlp_steps=2)
    weights = [(2.0, 0.1), (0.1, 1.0)]

    def loss(allocation):
        return sum(wh * (1 - h / 2) + wm * (1 - m / 4) for (wh, wm), (h, m) in zip(weights, allocation))
    target = 0.5
    budget = target * space.full_flops
    options = [[(h, space.neurons_at(layer, s)) for h in range(3) for s in range(3)] for layer in range(2)]
    # every allocation an episode can end on: the choices that fit, their leftover spent as the env spends it
    feasible = sorted({tuple(prune.fill_budget(space, a, budget)) for a in itertools.product(*options)
                       if space.flops(a) <= budget}, key=loss)
    best = list(feasible[0])
    assert loss(feasible[1]) - loss(best) > 0.3  # a unique best, by a clear margin
    assert loss(prune.uniform_allocation(space, target)) > loss(best) + 0.3
    check_env(prune.PruneEnv(space, target, loss))
    for seed in (0, 1):
        found = prune.ppo_search(space, target, loss, episodes=400, seed=seed, episodes_per_update=8)
        assert found["greedy"] == best and found["allocation"] == best, seed


def test_the_search_leaves_the_callers_random_state_alone():
    space = prune.PruneSpace(heads=[2], neurons=[4], head_flops=1.0, neuron_flops=0.25, fixed_flops=0.2, mlp_steps=2)
    torch.manual_seed(11)
    np.random.seed(11)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(11)
    np.random.seed(11)
    prune.ppo_search(space, 0.5, lambda a: 0.0, episodes=2, seed=5)
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


# --- the run folder keeps its models ---

def test_a_run_folder_holding_a_model_is_refused_and_cleared_only_with_overwrite(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "model_enwik8_0.pt").write_bytes(b"weights")
    with pytest.raises(ex.UserError, match="model_enwik8_0.pt"):
        ex.prepare_run_folder(folder, overwrite=False)
    ex.prepare_run_folder(folder, overwrite=True)
    assert not (folder / "model_enwik8_0.pt").exists()


# --- the command line ---

def run_prune(args, cwd=None, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    return subprocess.run([sys.executable, str(ROOT / "prune.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(prepared_data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("prune")
    proc = run_cli(["--profile", "smoke", "--out_dir", folder / "r", "--datasets", "shakespeare_char",
                    "--data_dir", prepared_data_dir, "--notes", "off"])
    assert proc.returncode == 0, proc.stderr
    return folder / "r"


@pytest.fixture(scope="module")
def pruned_folder(smoke_run):
    """The issue's command, as a user types it (default fine-tuning), beside the run."""
    proc = run_prune(["--run", "r", "--dataset", "shakespeare_char", "--flops_target", "0.5", "--method", "rl",
                      "--episodes", "3", "--out_dir", "p"], cwd=smoke_run.parent)
    assert proc.returncode == 0, proc.stderr
    return smoke_run.parent / "p"


def test_the_run_folder_keeps_its_final_model(smoke_run):
    payload = torch.load(smoke_run / "model_shakespeare_char_0.pt", weights_only=True)
    config = json.loads((smoke_run / "run.json").read_text())["configs"]["shakespeare_char"]
    assert {k: payload["model_config"][k] for k in ("n_layer", "n_head", "n_embd", "block_size")} == \
        {k: config[k] for k in ("n_layer", "n_head", "n_embd", "block_size")}
    assert payload["model_config"]["layer_heads"] is None


def test_prune_writes_a_contract_folder_plot_py_reads(pruned_folder, smoke_run):
    final = json.loads((pruned_folder / "final_info.json").read_text())
    assert set(final) == {"unpruned", "unpruned_finetuned", "rl_0.5"}
    for entry in final.values():
        for key in CONTRACT_KEYS + PRUNE_KEYS:
            assert len(entry["final_info_dict"][key]) == 1 and entry["means"][f"{key}_mean"] is not None, key
            assert entry["stderrs"][f"{key}_stderr"] is None  # one seed: no stderr, never a misleading 0
    rl = final["rl_0.5"]["means"]
    assert rl["flops_ratio_mean"] <= 0.5 and rl["params_mean"] < final["unpruned"]["means"]["params_mean"]
    # the unpruned row re-measures the run's kept model: the same loss as the run reported for it
    trained = json.loads((smoke_run / "final_info.json").read_text())["shakespeare_char"]["means"]
    assert final["unpruned"]["means"]["full_val_loss_mean"] == pytest.approx(trained["full_val_loss_mean"], abs=1e-6)
    # ...and the like-for-like reference starts from that model, nothing removed, and is fine-tuned as rl_0.5 is
    alike = final["unpruned_finetuned"]["means"]
    assert alike["full_val_loss_before_mean"] == pytest.approx(trained["full_val_loss_mean"], abs=1e-6)
    assert alike["flops_ratio_mean"] == 1.0 and alike["params_mean"] == final["unpruned"]["means"]["params_mean"]
    assert alike["full_val_loss_mean"] != alike["full_val_loss_before_mean"]
    run = plot.load_run(pruned_folder)  # the harness's own reader: final_info checks and curves
    assert set(run.curves) == {"unpruned", "unpruned_finetuned", "rl_0.5"}
    record = json.loads((pruned_folder / "run.json").read_text())
    assert record["status"] == "finished" and record["versions"]["stable-baselines3"]
    assert record["args"]["method"] == "rl" and "prune.py" in record["command"][1]
    assert record["search"]["rl_0.5"]["episodes"] == 3
    per_key = json.loads((pruned_folder / "final_info_rl_0.5_0.json").read_text())
    model = load_model(pruned_folder / "model_rl_0.5_0.pt")
    assert model.config.layer_heads == [h for h, _ in per_key["allocation"]]
    assert model.config.layer_mlp == [len(n) for n in per_key["neurons"]]
    assert "## Prune p:" in (pruned_folder.parent / "notes.txt").read_text()


def test_a_prune_folder_holding_results_is_not_overwritten(pruned_folder, smoke_run):
    before = {p.name: p.read_bytes() for p in pruned_folder.iterdir()}
    proc = run_prune(["--run", smoke_run, "--flops_target", "0.5", "--method", "magnitude", "--out_dir",
                      pruned_folder])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--overwrite" in proc.stderr
    assert {p.name: p.read_bytes() for p in pruned_folder.iterdir()} == before


def reward_loss_of(run, final_info_file) -> float:
    """The reward (no fine-tuning, the last 16384 train tokens) of the source model pruned to a key's units."""
    cfg = ex.Config(**json.loads((run / "run.json").read_text())["configs"]["shakespeare_char"])
    data = ex.load_dataset(cfg, "shakespeare_char")
    tokens = data.splits["train"][-16384:]
    source = types.SimpleNamespace(cfg=cfg, model=load_model(run / "model_shakespeare_char_0.pt"),
                                   rt=ex.Runtime.choose(dataclasses.replace(cfg, device="cpu")))
    chosen = json.loads(final_info_file.read_text())
    return prune.RewardScorer(source, None, tokens).units_loss(chosen["heads"], chosen["neurons"])


def test_several_targets_and_methods_give_one_entry_each_and_the_pareto_figure(smoke_run, tmp_path):
    out = tmp_path / "several"
    proc = run_prune(["--run", smoke_run, "--flops_target", "0.75,0.4", "--method", "magnitude,random",
                      "--finetune_iters", "4", "--notes", "off", "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_info.json").read_text())
    assert set(final) == {"unpruned", "unpruned_finetuned", "uniform_0.75", "random_0.75", "uniform_0.4",
                          "random_0.4"}  # magnitude: uniform's old name
    for target in (0.75, 0.4):
        files = [out / f"final_info_{m}_{target:g}_0.json" for m in ("uniform", "random")]
        same = [json.loads(f.read_text()) for f in files]
        assert same[0]["allocation"] == same[1]["allocation"]  # random: uniform's allocation, other units
        assert same[0]["neurons"] != same[1]["neurons"]
        assert target - 0.01 <= same[0]["flops_ratio"] <= target
        assert [s["importance"] for s in same] == ["magnitude", "random"]
        # each reports the reward of its own units (random's used to be uniform's)
        assert same[1]["reward_loss"] != same[0]["reward_loss"]
        assert same[1]["reward_loss"] == pytest.approx(reward_loss_of(smoke_run, files[1]), abs=1e-9)
    assert (out / "pareto.png").stat().st_size > 0


EVERY_METHOD_ARGS = ["--flops_target", "0.5", "--method", ",".join(prune.METHODS), "--episodes", "3",
                     "--finetune_iters", "4", "--scratch", "0.5", "--notes", "off"]


@pytest.fixture(scope="module")
def every_method(smoke_run):
    """Every method at half the FLOPs with the from-scratch control, a few episodes and steps."""
    out = smoke_run.parent / "every"
    proc = run_prune(["--run", smoke_run, *EVERY_METHOD_ARGS, "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    return out


def test_every_method_lands_on_the_target_and_is_charged_its_search(every_method):
    final = json.loads((every_method / "final_info.json").read_text())
    info = {m: json.loads((every_method / f"final_info_{m}_0.5_0.json").read_text()) for m in prune.METHODS}
    for method, entry in info.items():
        assert 0.49 <= entry["flops_ratio"] <= 0.5, method
        assert final[f"{method}_0.5"]["means"]["flops_ratio_mean"] == entry["flops_ratio"]
    assert info["rl"]["search_evaluations"] == info["random_search"]["search_evaluations"] == 4  # 3 + greedy
    assert info["global"]["importance"] == "taylor" and info["global"]["search_evaluations"] == 0
    for method in ("rl", "random_search", "global"):  # reward forward passes; global: the Taylor scores'
        assert info[method]["search_flops"] > 0 and info[method]["search_steps"] > 0, method
    assert info["uniform"]["search_flops"] == info["random"]["search_flops"] == 0
    # its pick among them, scored on the reward slice's whole windows (block_size 32)
    assert info["rl"]["search_flops"] >= info["rl"]["flops_per_token"] * (16384 - 32)
    record = json.loads((every_method / "run.json").read_text())
    assert record["search"]["random_search_0.5"]["evaluations"] == 4
    assert (every_method / "search.png").stat().st_size > 0  # rl's and random_search's episodes, drawn


def test_a_search_shows_its_progress_and_the_best_score_so_far(capsys):
    scored = prune.reporting(lambda allocation: float(sum(allocation)), "rl_0.5", 3)
    assert [scored([x]) for x in (3, 1, 2)] == [3.0, 1.0, 2.0]  # the scores themselves pass through
    assert "[rl_0.5 search] episode 3/3 best 1.0000" in capsys.readouterr().err  # no terminal: a plain line


def interrupted_copy(folder: Path, out: Path, finished: int) -> Path:
    """What an attempt interrupted after its first `finished` keys leaves: their files (saved in order), no
    final_info.json; the later keys' files never written."""
    shutil.copytree(folder, out)
    order = list(json.loads((folder / "final_info.json").read_text()))
    (out / "final_info.json").unlink()
    for key in order[finished:]:
        for name in (f"final_info_{key}_0.json", f"model_{key}_0.pt"):
            (out / name).unlink(missing_ok=True)
    return out


def test_an_interrupted_prune_folder_is_continued_with_resume_keeping_what_it_finished(every_method, smoke_run,
                                                                                       tmp_path):
    out = interrupted_copy(every_method, tmp_path / "cut", finished=4)  # unpruned, unpruned_finetuned, rl, random_s.
    kept = {name: (out / name).read_bytes() for name in ("final_info_rl_0.5_0.json", "model_rl_0.5_0.pt")}
    proc = run_prune(["--run", smoke_run, *EVERY_METHOD_ARGS, "--out_dir", out, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "[random_search_0.5] kept" in proc.stdout and "[global_0.5] kept" not in proc.stdout
    assert {name: (out / name).read_bytes() for name in kept} == kept  # not computed again
    whole, resumed = (json.loads((f / "final_info.json").read_text()) for f in (every_method, out))
    assert list(resumed) == list(whole)  # every key, in its place
    for key in whole:  # the keys computed now are those an uninterrupted run computed, bit for bit
        assert resumed[key]["final_info_dict"]["full_val_loss"] == whole[key]["final_info_dict"]["full_val_loss"]
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["resumed"] == sorted(list(whole)[:4])
    assert record["search"]["rl_0.5"]["evaluations"] == 4  # the kept search, back in the record


def test_a_resume_before_any_key_finished_starts_the_folder_again(every_method, smoke_run, tmp_path):
    out = interrupted_copy(every_method, tmp_path / "cut", finished=0)  # run.json written, no key yet
    proc = run_prune(["--run", smoke_run, *EVERY_METHOD_ARGS, "--out_dir", out, "--resume"])
    assert proc.returncode == 0, proc.stderr
    assert "kept" not in proc.stdout and "resumed" not in json.loads((out / "run.json").read_text())
    assert set(json.loads((out / "final_info.json").read_text())) == \
        set(json.loads((every_method / "final_info.json").read_text()))


@pytest.mark.parametrize("args, fragment", [(["--finetune_iters", "5"], "other settings (finetune_iters)"),
                                            ([], "is finished")])
def test_resume_refuses_other_settings_and_a_finished_folder(every_method, smoke_run, tmp_path, args, fragment):
    out = interrupted_copy(every_method, tmp_path / "cut", finished=3) if args else every_method
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    proc = run_prune(["--run", smoke_run, *EVERY_METHOD_ARGS, *args, "--out_dir", out, "--resume"])
    assert proc.returncode == 2 and fragment in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_the_scratch_control_trains_each_chosen_architecture_from_scratch_for_the_same_steps(every_method,
                                                                                              smoke_run):
    final = json.loads((every_method / "final_info.json").read_text())
    source_steps = json.loads((smoke_run / "run.json").read_text())["configs"]["shakespeare_char"]["max_iters"]
    # random's architecture is uniform's: trained once
    assert {k for k in final if k.endswith("_scratch")} == {f"{m}_0.5_scratch" for m in prune.METHODS[:4]}
    for method in prune.METHODS[:4]:
        pruned = json.loads((every_method / f"final_info_{method}_0.5_0.json").read_text())
        scratch = json.loads((every_method / f"final_info_{method}_0.5_scratch_0.json").read_text())
        assert scratch["allocation"] == pruned["allocation"] and "full_val_loss_before" not in scratch
        assert scratch["steps_trained"] == pruned["steps_trained"] == source_steps + 4
        assert scratch["flops_per_token"] == pruned["flops_per_token"]
        model = load_model(every_method / f"model_{method}_0.5_scratch_0.pt")
        assert model.config.layer_heads == [h for h, _ in pruned["allocation"]]
        assert scratch["full_val_loss"] != pruned["full_val_loss"]


def test_a_pruned_model_is_pruned_again_by_its_key_and_sampled(every_method, tmp_path):
    out = tmp_path / "again"
    proc = run_prune(["--run", every_method, "--key", "rl_0.5", "--flops_target", "0.5", "--method", "uniform",
                      "--finetune_iters", "2", "--notes", "off", "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    first = json.loads((every_method / "final_info_rl_0.5_0.json").read_text())
    final = json.loads((out / "final_info.json").read_text())
    unpruned = final["unpruned"]["means"]
    assert unpruned["params_mean"] == first["params"]  # what it pruned: the rl model, re-measured alike
    assert unpruned["full_val_loss_mean"] == pytest.approx(first["full_val_loss"], abs=1e-6)
    again = json.loads((out / "final_info_uniform_0.5_0.json").read_text())
    assert 0.49 <= again["flops_per_token"] / first["flops_per_token"] <= 0.5  # of the model it pruned
    assert again["steps_trained"] == first["steps_trained"] + 2
    record = json.loads((out / "run.json").read_text())
    assert record["source"]["key"] == "rl_0.5" and record["source"]["model"].endswith("model_rl_0.5_0.pt")
    assert sample.main(["--run", str(out), "--key", "uniform_0.5", "--num_samples", "1", "--max_new_tokens", "5"]) == 0


def test_distillation_changes_the_fine_tuning_and_nothing_before_it(every_method, smoke_run, tmp_path):
    out = tmp_path / "distilled"
    proc = run_prune(["--run", smoke_run, "--flops_target", "0.5", "--method", "uniform", "--distill", "0.5",
                      "--finetune_iters", "4", "--notes", "off", "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    plain, distilled = (json.loads((folder / "final_info_uniform_0.5_0.json").read_text())
                        for folder in (every_method, out))
    assert distilled["distill"] == 0.5 and plain["distill"] == 0.0
    assert distilled["neurons"] == plain["neurons"] and distilled["full_val_loss_before"] == plain["full_val_loss_before"]
    assert distilled["full_val_loss"] != plain["full_val_loss"]


@pytest.mark.parametrize("args, fragment", [
    ([], "is a prune folder: choose the model to prune with --key (global_0.5, global_0.5_scratch, random_0.5"),
    (["--key", "rl_0.3"], "choose the model to prune with --key"),
    (["--dataset", "enwik8", "--key", "rl_0.5"], "pruned a shakespeare_char model, not enwik8"),
])
def test_a_prune_folder_without_a_model_key_it_holds_is_refused(every_method, tmp_path, args, fragment):
    proc = run_prune(["--run", every_method, *args, "--out_dir", tmp_path / "p"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--flops_target", "0"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "1"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "0.5,1.5"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "half"], "--flops_target must be numbers"),
    (["--method", "rl,greedy"], "unknown --method greedy"),
    (["--episodes", "0"], "--episodes must be at least 1"),
    (["--round_to", "0"], "--round_to must be at least 1"),
    (["--distill", "1.5"], "--distill must be in [0, 1]"),
    (["--distill_temperature", "0"], "--distill_temperature must be a finite number above 0"),
    (["--flops_target", "0.5,0.3", "--scratch", "0.75"], "--scratch 0.75 is not one of --flops_target"),
    (["--key", "rl_0.5"], "--key names a prune folder's model"),
    (["--run", "nowhere"], "not a run folder"),
    (["--seed", "3"], "model_shakespeare_char_3.pt does not exist"),
    (["--dataset", "enwik8"], "has no enwik8"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragment):
    run = tmp_path / "run_0"  # a run folder as far as the checks before any work look: run.json, no model
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"configs": {"shakespeare_char": {}}}))
    proc = run_prune(["--run", run, "--out_dir", tmp_path / "p", *args])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "p").exists()


def test_a_run_without_a_kept_model_is_refused(smoke_run, tmp_path):
    old = tmp_path / "old_run"
    old.mkdir()
    for name in ("run.json", "final_info.json", "final_info_shakespeare_char_0.json"):
        (old / name).write_bytes((smoke_run / name).read_bytes())
    proc = run_prune(["--run", old, "--out_dir", tmp_path / "p"])
    assert proc.returncode == 2 and "model_shakespeare_char_0.pt does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
