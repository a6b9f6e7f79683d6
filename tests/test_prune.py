"""Structured pruning (prune.py): a pruned GPT computes what the masked one does, FLOPs are counted right, every
method meets its budget, PPO finds a known best allocation, and the CLI writes a contract folder or refuses in one line."""
import copy
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import experiment as ex
import plot
import prune
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
TARGETS = (0.95, 0.75, 0.5, 0.3, 0.15, 0.06)


@pytest.mark.parametrize("target", TARGETS)
def test_every_method_meets_the_budget_at_every_target(target):
    space = prune.PruneSpace.of(CPU_MODEL, mlp_steps=16)
    budget = target * space.full_flops
    uniform = prune.uniform_allocation(space, target)
    assert space.flops(uniform) <= budget
    assert len({a for a in uniform}) == 1  # the same in every layer (they are alike in size)
    assert budget - space.flops(uniform) < space.n_layer * space.neuron_flops  # ...spending the budget
    env = prune.PruneEnv(space, target, score=lambda allocation: 0.0)
    rng = np.random.default_rng(0)
    plans = [[env.action_space.nvec - 1] * 4, [np.zeros(2, int)] * 4] + \
        [[rng.integers(env.action_space.nvec) for _ in range(4)] for _ in range(50)]
    for plan in plans:  # asking for everything, nothing, and at random: clipping keeps every episode in budget
        env.reset()
        for action in plan:
            _, _, done, _, info = env.step(action)
        assert done and space.flops(info["allocation"]) <= budget * (1 + 1e-12)
    greedy = env.history[0][0]  # asking for everything spends the budget, to within one unit of the last layer
    assert budget - space.flops(greedy) < space.head_flops + space.neuron_flops * 128 / 16


def test_a_target_below_what_pruning_can_remove_is_refused():
    space = prune.PruneSpace.of(CPU_MODEL)
    with pytest.raises(ex.UserError, match="output head"):
        prune.check_targets(space, [0.5, 0.005])  # the output head: ~1% of the FLOPs


# --- the RL agent ---

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
    options = [[(h, space.neurons_at(layer, s)) for h in range(3) for s in range(3)] for layer in range(2)]
    feasible = sorted((a for a in itertools.product(*options) if space.flops(a) <= target * space.full_flops),
                      key=loss)
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


def test_several_targets_and_methods_give_one_entry_each_and_the_pareto_figure(smoke_run, tmp_path):
    out = tmp_path / "several"
    proc = run_prune(["--run", smoke_run, "--flops_target", "0.75,0.4", "--method", "magnitude,random",
                      "--finetune_iters", "4", "--notes", "off", "--out_dir", out])
    assert proc.returncode == 0, proc.stderr
    final = json.loads((out / "final_info.json").read_text())
    assert set(final) == {"unpruned", "unpruned_finetuned", "magnitude_0.75", "random_0.75", "magnitude_0.4",
                          "random_0.4"}
    for target in (0.75, 0.4):
        same = [json.loads((out / f"final_info_{m}_{target:g}_0.json").read_text()) for m in ("magnitude", "random")]
        assert same[0]["allocation"] == same[1]["allocation"]  # random: magnitude's allocation, other units
        assert same[0]["neurons"] != same[1]["neurons"]
        assert same[0]["flops_ratio"] <= target
    assert (out / "pareto.png").stat().st_size > 0


@pytest.mark.parametrize("args, fragment", [
    (["--flops_target", "0"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "1"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "0.5,1.5"], "--flops_target must be in (0, 1)"),
    (["--flops_target", "half"], "--flops_target must be numbers"),
    (["--method", "rl,greedy"], "unknown --method greedy"),
    (["--episodes", "0"], "--episodes must be at least 1"),
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
