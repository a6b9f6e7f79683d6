"""Several hyperparameters under control (--control lr,weight_decay,grad_clip,dropout): one multiplier each,
one factor each per decision, and records that say what the optimizer used."""
import json

import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import experiment as ex
from harness.control import CONTROL_BOUNDS, DROPOUT_MAX, control_action
from harness.observation import OBSERVATION_FEATURES
import train_agent as ta
from conftest import run_cli
from test_train_agent import deploy, one_line_error, smoke_training, train_cli

THREE = "lr,weight_decay,grad_clip"


def cli_run(tmp_path, data_dir, name, *extra):
    out = tmp_path / name
    args = ["--out_dir", out, "--profile", "smoke", "--data_dir", data_dir, "--datasets", "shakespeare_char",
            "--notes", "off", "--inference_samples", "0", *extra]
    assert ex.main([str(a) for a in args]) == 0
    results = json.loads((out / "all_results.json").read_text())
    return results["shakespeare_char_0_val_info"], results["shakespeare_char_0_train_info"], out


def losses(val_info):
    return [(r["iter"], r["train/loss"], r["val/loss"]) for r in val_info]


@pytest.fixture
def used(monkeypatch):
    """Per optimizer step: the rate, the weight decay of the matrices' param group and the clipping norm used."""
    steps, clip = [], []
    real_step, real_clip = torch.optim.AdamW.step, torch.nn.utils.clip_grad_norm_

    def recording_step(self, *a, **k):
        (decay,) = {g["weight_decay"] for g in self.param_groups if g["matrices"]}
        steps.append({"lr": self.param_groups[0]["lr"], "weight_decay": decay, "grad_clip": clip[-1]})
        return real_step(self, *a, **k)

    def recording_clip(parameters, max_norm, *a, **k):
        clip.append(max_norm)
        return real_clip(parameters, max_norm, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    return steps


def test_every_evaluation_records_the_values_the_optimizer_used(prepared_data_dir, tmp_path, used):
    val_info, train_info, _ = cli_run(tmp_path, prepared_data_dir, "three", "--agent", "random", "--control", THREE)
    assert len(used) == 30
    for record in val_info[:-1]:  # chosen at the evaluation, used from its step on
        assert record["hparams"] == used[record["iter"]], record["iter"]
        assert set(record["hparam_multipliers"]) == {"weight_decay", "grad_clip"}
    assert list(val_info[-1]["hparams"]) == ["lr", "weight_decay", "grad_clip"]
    for record in train_info:
        assert record["hparams"] == used[record["iter"]]
    for name in ("weight_decay", "grad_clip"):
        assert len({s[name] for s in used}) > 1, name  # the agent really moved it
    wd, clip = CONTROL_BOUNDS["weight_decay"], CONTROL_BOUNDS["grad_clip"]
    assert all(0.1 * wd[0] <= s["weight_decay"] <= 0.1 * wd[1] and clip[0] <= s["grad_clip"] <= clip[1] for s in used)


def test_controlling_with_nothing_acting_is_the_lr_only_run_bit_for_bit(prepared_data_dir, tmp_path):
    plain, _, _ = cli_run(tmp_path, prepared_data_dir, "plain", "--agent", "none", "--dropout", "0.1")
    controlled, _, _ = cli_run(tmp_path, prepared_data_dir, "controlled", "--agent", "none", "--dropout", "0.1",
                               "--control", THREE + ",dropout")
    assert losses(controlled) == losses(plain)
    assert all(r["hparams"] == {"lr": r["lr"], "weight_decay": 0.1, "grad_clip": 1.0, "dropout": 0.1}
               for r in controlled)


def test_dropout_control_reaches_every_dropout_of_the_model_within_its_cap(prepared_data_dir, tmp_path):
    cfg = ex.config_for_dataset(ex.Config(data_dir=str(prepared_data_dir), control="lr,dropout"), {"dropout": 0.2},
                                "smoke", "shakespeare_char")
    run = ex.TrainingRun(cfg, ex.load_dataset(cfg, "shakespeare_char"), 0, ex.Runtime.choose(cfg), None)

    def dropouts():
        return {m.p for m in run.model.modules() if isinstance(m, torch.nn.Dropout)} | \
            {m.dropout for m in run.model.modules() if isinstance(m, ex.CausalSelfAttention)}
    assert dropouts() == {0.2}
    run.hparam_multipliers["dropout"] = 2.0
    run.step(0, 1e-3)
    assert dropouts() == {0.4}
    run.hparam_multipliers["dropout"] = 4.0  # (beyond the bounds an agent keeps to) 0.8: capped
    run.step(1, 1e-3)
    assert dropouts() == {DROPOUT_MAX}


def test_replay_plays_back_every_controlled_hyperparameter(prepared_data_dir, tmp_path, used):
    original, _, first = cli_run(tmp_path, prepared_data_dir, "random", "--agent", "random", "--control", THREE)
    original_steps = list(used)
    used.clear()
    replayed, _, _ = cli_run(tmp_path, prepared_data_dir, "replay", "--agent", "replay", "--agent_init", first,
                             "--control", THREE)
    assert used == original_steps
    assert losses(replayed) == losses(original)


def test_a_flattened_action_decodes_to_one_factor_per_hyperparameter():
    cfg = ex.Config(control=THREE, agent="dqn")
    assert ex.policy_inputs(cfg).action_sizes(5) == [125]
    assert ex.policy_inputs(ex.Config(control=THREE, agent="ppo")).action_sizes(5) == [5, 5, 5]
    assert ex.policy_inputs(ex.Config(agent="ppo")).action_sizes(5) == [5]
    for triple in ([0, 0, 0], [4, 4, 4], [1, 3, 2], [2, 0, 4]):
        flat = int(np.ravel_multi_index(triple, (5, 5, 5)))
        assert control_action(cfg, flat, 5) == triple  # dqn's one index
        assert control_action(cfg, np.array(triple), 5) == triple  # ppo's vector


def test_the_observation_carries_the_controlled_multipliers():
    cfg = ex.Config(control=THREE)
    obs = ex.Observation(it=10, max_iters=30, train_loss=3.0, val_loss=3.1,
                         hparams={"weight_decay": 2.0, "grad_clip": 0.25})
    features = ex.policy_inputs(cfg).features(obs)
    assert len(features) == ex.policy_inputs(cfg).count() == len(OBSERVATION_FEATURES) + 2
    assert list(features[-2:]) == pytest.approx([1 / 3, -2 / 3])
    assert ex.policy_inputs(cfg).spec()["control_features"] == ["log2_weight_decay_multiplier",
                                                            "log2_grad_clip_multiplier"]


@pytest.mark.parametrize("agent,space", [("ppo", "MultiDiscrete"), ("dqn", "Discrete")])
def test_the_control_environment_passes_gymnasiums_checker(prepared_data_dir, agent, space):
    cfg = ex.config_for_dataset(ex.Config(data_dir=str(prepared_data_dir), agent=agent, control=THREE), {}, "smoke",
                                "shakespeare_char")
    env = ta.LRControlEnv(cfg, ex.load_dataset(cfg, "shakespeare_char"), ex.Runtime.choose(cfg))
    assert type(env.action_space).__name__ == space
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    action = np.array([4, 0, 3]) if agent == "ppo" else int(np.ravel_multi_index([4, 0, 3], (5, 5, 5)))
    env.step(action)  # x2 on the rate, x0.1 on weight decay (to its bound), x1.5 on the clipping norm
    assert env.run.multiplier == 2.0 and env.run.hparam_multipliers == {"weight_decay": 0.125, "grad_clip": 1.5}


@pytest.mark.parametrize("agent", ["ppo", "dqn"])
def test_a_multi_hyperparameter_policy_trains_across_runs_and_deploys_frozen(prepared_data_dir, tmp_path, agent):
    policy = smoke_training(tmp_path, prepared_data_dir, agent, 2, "--control", THREE)
    curve = json.loads((policy / "learning_curve.json").read_text())
    assert all(list(h) == ["lr", "weight_decay", "grad_clip"] for e in curve for h in e["hparams"])
    proc = deploy(tmp_path, prepared_data_dir, agent, policy, "deployed", "--control", THREE)
    assert proc.returncode == 0, proc.stderr
    val_info = json.loads((tmp_path / "deployed" / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    assert all(list(r["hparams"]) == ["lr", "weight_decay", "grad_clip"] for r in val_info)
    assert all(len(r["action"]) == 3 for r in val_info[:-1])
    proc = deploy(tmp_path, prepared_data_dir, agent, policy, "lr_only")  # trained on three, deployed on lr
    assert one_line_error(proc) and f"--control {THREE}" in proc.stderr, proc.stderr


def test_control_refusals_are_one_line(prepared_data_dir, tmp_path):
    common = ["--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir", prepared_data_dir, "--notes", "off"]
    for bad in (["--control", "lr,momentum"],
                ["--control", ","],
                ["--control", "lr,dropout"],  # the smoke profile has no dropout
                ["--control", THREE, "--agent", "qlearning"],
                ["--control", THREE, "--agent", "reinforce"],
                ["--control", THREE, "--agent", "random", "--lr_groups", "layer"],
                ["--control", "lr,grad_clip", "--grad_clip", "0"]):
        proc = run_cli(["--out_dir", tmp_path / "bad", *common, *bad])
        assert one_line_error(proc), (bad, proc.stderr)
        assert not (tmp_path / "bad").exists()
    proc = train_cli(["--agent", "reinforce", "--control", THREE, "--episodes", 1, "--profile", "smoke",
                      "--out_dir", tmp_path / "reinforce_three", "--data_dir", prepared_data_dir])
    assert one_line_error(proc), proc.stderr
