"""A controller given a fair chance: trained on a task centred on the tuned rate with bounds that reach it, an
anchored reward whose reference runs are shared, the oracle that shows the ceiling, the parameter-free rivals,
and rewards that are never dropped. (The learners' synthetic tests are in test_controllers.py.)"""
import json

import numpy as np
import pytest

import experiment as ex
from conftest import run_cli
from test_controllers import cfg_for, observation
from test_train_agent import deploy, one_line_error, smoke_training, train_cli


def smoke_run(tmp_path, data_dir, name, *flags):
    out = tmp_path / name
    proc = run_cli(["--out_dir", out, "--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir", data_dir,
                    "--notes", "off", "--inference_samples", "0", *flags])
    return out, proc


def decisions(out):
    results = json.loads((out / "all_results.json").read_text())
    return [r for r in results["shakespeare_char_0_val_info"] if r.get("action") is not None]


def test_the_oracle_moves_the_rate_toward_its_target_with_the_agents_own_actions(prepared_data_dir, tmp_path):
    out, proc = smoke_run(tmp_path, prepared_data_dir, "oracle", "--agent", "oracle", "--oracle_lr", "2e-3")
    assert proc.returncode == 0, proc.stderr
    # The smoke profile's rate is 1e-3: x2 reaches 2e-3 at the first decision, then x1 holds it there.
    assert [d["multiplier"] for d in decisions(out)] == [2.0, 2.0, 2.0]
    _, refused = smoke_run(tmp_path, prepared_data_dir, "no_target", "--agent", "oracle")
    assert one_line_error(refused) and "--oracle_lr" in refused.stderr


def test_the_oracle_stops_at_the_bounds_when_its_target_is_out_of_reach():
    agent = ex.OracleAgent(cfg_for("oracle", oracle_lr=1.0, learning_rate=1e-3), 0)
    for k in range(5):
        agent.observe(observation(k, 2.0, None, 2.0, agent.multiplier))
    assert agent.multiplier == agent.cfg.multiplier_max


@pytest.mark.parametrize("optimizer", ["prodigy", "dadapt_adam"])
def test_parameter_free_optimizers_train_at_their_documented_rate_and_are_recorded(prepared_data_dir, tmp_path,
                                                                                   optimizer):
    out, proc = smoke_run(tmp_path, prepared_data_dir, optimizer, "--optimizer", optimizer)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "run.json").read_text())
    config = record["configs"]["shakespeare_char"]
    assert config["optimizer"] == optimizer and config["learning_rate"] == 1.0 and config["min_lr"] == 0.1
    assert json.dumps(record).count({"prodigy": "prodigyopt", "dadapt_adam": "dadaptation"}[optimizer]) >= 1
    first, last = decisions_or_evals(out)
    assert np.isfinite(last) and last < first  # it learned


def decisions_or_evals(out):
    evals = json.loads((out / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    return evals[0]["val/loss"], evals[-1]["val/loss"]


def test_a_centred_training_records_its_centre_range_and_bounds_and_its_policy_deploys_within_them(
        prepared_data_dir, tmp_path):
    out = smoke_training(tmp_path, prepared_data_dir, "ppo", 4, "--episodes_per_update", 2, "--lr_center", "2e-3",
                         "--lr_range", "0.1,10", "--n_envs", 2)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["lr_center"], manifest["lr_range"], manifest["n_envs"]) == (2e-3, [0.1, 10.0], 2)
    assert (manifest["multiplier_min"], manifest["multiplier_max"]) == (1 / 16, 16.0)
    curve = json.loads((out / "learning_curve.json").read_text())
    assert sorted(e["episode"] for e in curve) == [0, 1, 2, 3]
    assert all(2e-4 <= e["base_lr"] <= 2e-2 for e in curve)
    proc = deploy(tmp_path, prepared_data_dir, "ppo", out)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "deployed" / "run.json").read_text())["configs"]["shakespeare_char"]
    assert (config["multiplier_min"], config["multiplier_max"]) == (1 / 16, 16.0)
    refused = deploy(tmp_path, prepared_data_dir, "ppo", out, "other_bounds", "--multiplier_max", "8")
    assert one_line_error(refused) and "multiplier_max" in refused.stderr


def test_anchored_rewards_compare_with_reference_runs_that_every_training_shares(prepared_data_dir, tmp_path):
    curves = []
    for name in ("R1", "R2"):
        proc = train_cli(["--agent", "reinforce", "--dataset", "shakespeare_char", "--profile", "smoke",
                          "--episodes", 2, "--reward", "vs_reference", "--out_dir", tmp_path / name,
                          "--data_dir", prepared_data_dir])
        assert proc.returncode == 0, proc.stderr
        curves.append(json.loads((tmp_path / name / "learning_curve.json").read_text()))
    assert [e["reference_steps"] for e in curves[0]] == [30, 30]  # computed (and charged) the first time
    assert [e["reference_steps"] for e in curves[1]] == [0, 0]    # reused the second
    assert len(list((tmp_path / "references").glob("*.json"))) == 2
    assert [e["return"] for e in curves[0]] == [e["return"] for e in curves[1]]


def test_vs_reference_rewards_add_up_to_the_gain_over_the_reference_run():
    losses, reference = [4.0, 3.0, 2.6, 2.5], [4.0, 3.2, 2.7, 2.6]
    rewards = [ex.reward_for("vs_reference", losses[k - 1], losses[k], reference[k - 1] - reference[k])
               for k in range(1, 4)]
    assert sum(rewards) == pytest.approx(reference[-1] - losses[-1])
    assert ex.reward_for("vs_reference", 3.0, 2.5, None) is None  # no reference: no reward, never a guess


def test_experiment_py_refuses_an_anchored_reward_it_has_no_reference_for(prepared_data_dir, tmp_path):
    _, proc = smoke_run(tmp_path, prepared_data_dir, "anchored", "--agent", "qlearning", "--reward", "vs_reference")
    assert one_line_error(proc) and "train_agent.py" in proc.stderr


def test_after_a_rollback_the_re_run_intervals_reward_still_reaches_reinforce():
    agent = ex.AGENTS["reinforce"](cfg_for("reinforce", reward="improvement", policy_batch=100), 0)
    agent.start_run()
    agent.observe(observation(0, 3.0, None, 3.0, agent.multiplier))
    agent.observe(observation(1, 2.8, 3.0, 3.0, agent.multiplier))  # decision d1 at iteration 100
    agent.on_rollback(10.0, 200)  # d1's interval diverged; the loop re-runs it with a cut multiplier
    agent.observe(observation(2, 2.7, 2.8, 3.0, agent.multiplier))
    rewards = [s["reward"] for s in agent.steps]
    assert rewards[1] == pytest.approx(2.8 - 10.0 + agent.cfg.divergence_penalty)  # d1: the divergence
    assert agent.steps[2]["action"] is None and rewards[2] == pytest.approx(2.8 - 2.7)  # the re-run: kept
    for k in (3, 4, 5, 6, 7, 8, 9, 10):
        agent.observe(observation(k, 2.7 - 0.01 * k, 2.7, 3.0, agent.multiplier))
    episode = agent.learner.pending[-1]
    assert any(s["action"] is None and s["reward"] == pytest.approx(0.1) for s in episode)


def test_parallel_reinforce_episodes_learn_exactly_what_one_at_a_time_learns(prepared_data_dir, tmp_path):
    policies = []
    for n_envs in (1, 2):  # (one torch thread each: the same arithmetic in every process)
        out = tmp_path / f"n{n_envs}"
        proc = train_cli(["--agent", "reinforce", "--profile", "smoke", "--episodes", 4, "--episodes_per_update", 2,
                          "--n_envs", n_envs, "--threads_per_env", 1, "--out_dir", out, "--data_dir", prepared_data_dir])
        assert proc.returncode == 0, proc.stderr
        policies.append(json.loads((out / "policy.json").read_text()))
    assert policies[0]["updates"] == policies[1]["updates"] == 2
    assert policies[0]["policy"] == policies[1]["policy"] and policies[0]["value"] == policies[1]["value"]


def test_parallel_qlearning_episodes_add_up_their_tables_and_continue(prepared_data_dir, tmp_path):
    out = tmp_path / "q"
    for episodes in (2, 4):
        proc = train_cli(["--agent", "qlearning", "--profile", "smoke", "--episodes", episodes, "--n_envs", 2,
                          "--out_dir", out, "--data_dir", prepared_data_dir])
        assert proc.returncode == 0, proc.stderr
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [e["episode"] for e in curve] == [0, 1, 2, 3]
    visits = np.asarray(json.loads((out / "policy.json").read_text())["visits"])
    assert visits.sum() == sum(e["decisions"] for e in curve)  # every decision of every episode counted once
