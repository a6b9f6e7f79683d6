"""Training controllers across runs: the gymnasium environment over one training run, train_agent.py
(resumable at episode granularity), deployment with experiment.py --agent_init DIR, and its refusals."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from gymnasium.utils.env_checker import check_env

import experiment as ex
from harness.observation import PolicyInputs
import train_agent as ta
from conftest import ROOT, run_cli


def smoke_env(data_dir, agent="random", instance=None):
    cfg = ex.config_for_dataset(ex.Config(data_dir=str(data_dir), agent=agent), {}, "smoke", "shakespeare_char")
    return ta.LRControlEnv(cfg, ex.load_dataset(cfg, "shakespeare_char"), ex.Runtime.choose(cfg), instance=instance)


def train_cli(args, env_extra=None, **kw):
    env = {**{k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "train_agent.py"), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


def one_line_error(proc):
    return proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0


def smoke_training(tmp_path, data_dir, agent, episodes=2, *extra):
    """A few smoke episodes; one update per episode unless asked otherwise (so even two episodes learn)."""
    out = tmp_path / f"agent_{agent}"
    per_update = [] if "--episodes_per_update" in map(str, extra) else ["--episodes_per_update", 1]
    proc = train_cli(["--agent", agent, "--episodes", episodes, "--profile", "smoke", "--out_dir", out,
                      "--data_dir", data_dir, *per_update, *extra])
    assert proc.returncode == 0, proc.stderr
    return out


def deploy(tmp_path, data_dir, agent, policy_dir, name="deployed", *extra):
    return run_cli(["--out_dir", tmp_path / name, "--profile", "smoke", "--datasets", "shakespeare_char",
                    "--data_dir", data_dir, "--notes", "off", "--inference_samples", "1", "--agent", agent,
                    "--agent_init", policy_dir, *extra])


# --- the environment ------------------------------------------------------------------------------

def test_the_environment_passes_gymnasiums_checker(prepared_data_dir):
    check_env(smoke_env(prepared_data_dir), skip_render_check=True)


def test_stepping_the_environment_equals_the_cli_run_and_its_replay(prepared_data_dir, tmp_path):
    """The same actions, by hand through the env, as --agent random chose and --agent replay played back."""
    common = ["--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir", prepared_data_dir,
              "--notes", "off", "--inference_samples", "1"]
    assert run_cli(["--out_dir", tmp_path / "random", "--agent", "random", *common]).returncode == 0
    proc = run_cli(["--out_dir", tmp_path / "replay", "--agent", "replay", "--agent_init", tmp_path / "random", *common])
    assert proc.returncode == 0, proc.stderr
    chosen = json.loads((tmp_path / "random" / "all_results.json").read_text())
    replayed = json.loads((tmp_path / "replay" / "all_results.json").read_text())

    env = smoke_env(prepared_data_dir, instance=lambda episode: (1337, 1.0))  # the CLI's seed 0, its LR
    _, info = env.reset()
    evaluations = [(info["it"], info["train_loss"], info["val_loss"])]
    for record in chosen["shakespeare_char_0_val_info"][:-1]:
        _, _, terminated, truncated, info = env.step(record["action"])
        evaluations.append((info["it"], info["train_loss"], info["val_loss"]))
        assert info["multiplier"] == record["multiplier"] and not truncated
    assert terminated
    for results in (chosen, replayed):
        assert evaluations == [(r["iter"], r["train/loss"], r["val/loss"])
                               for r in results["shakespeare_char_0_val_info"]]
        assert [(r["iter"], r["loss"], r["lr"]) for r in env.run.state.train_log] == \
            [(r["iter"], r["loss"], r["lr"]) for r in results["shakespeare_char_0_train_info"]]


def test_a_divergence_is_the_worst_reward_and_ends_the_episode_when_the_rollbacks_are_spent(prepared_data_dir):
    env = smoke_env(prepared_data_dir)
    env.cfg = ex.dataclasses.replace(env.cfg, max_rollbacks=1, lr_ceiling=1e4, multiplier_max=1e6)
    env.actions = [1.0, 1e6]  # x1e6: the loss explodes within the interval
    env.reset()
    _, calm, *_ = env.step(0)
    _, blown, terminated, _, info = env.step(1)
    assert blown < calm and blown < -4 and not terminated and info["diverged"]
    assert env.run.state.last_eval_it == env.cfg.eval_interval  # rolled back: the agent decides again, same place
    assert env.run.multiplier == pytest.approx(1e6 * env.cfg.rollback_cut)
    _, again, terminated, _, info = env.step(1)
    assert again < calm and terminated and info["episode_record"]["status"] == "diverged"


def test_the_run_draws_from_its_own_random_stream(prepared_data_dir):
    """A policy sampling from torch's global RNG between evaluations changes nothing in the training."""
    import torch
    runs = []
    for disturb in (False, True):
        env = smoke_env(prepared_data_dir, instance=lambda episode: (1337, 1.0))
        env.cfg = ex.dataclasses.replace(env.cfg, dropout=0.1)  # dropout draws from the run's stream
        env.reset()
        losses = []
        for _ in range(3):
            if disturb:
                torch.rand(1000)
            losses.append(env.step(2)[4]["val_loss"])
        runs.append(losses)
    assert runs[0] == runs[1]


# --- train_agent.py --------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", ["reinforce", "ppo", "dqn", "qlearning"])
def test_train_agent_writes_policy_manifest_and_learning_curve(prepared_data_dir, tmp_path, agent):
    out = smoke_training(tmp_path, prepared_data_dir, agent, 3, "--lr_range", "0.5,2")
    manifest = json.loads((out / "manifest.json").read_text())
    curve = json.loads((out / "learning_curve.json").read_text())
    assert (out / manifest["policy_file"]).exists() and (out / "learning_curve.png").exists()
    assert manifest["agent"] == agent and manifest["episodes_done"] == 3 and manifest["observation"] == PolicyInputs().spec()
    assert manifest["seeds"] == [1_000_000, 1_000_001, 1_000_002]  # clear of the evaluation seeds 1337...
    assert manifest["versions"]["stable-baselines3"] and manifest["versions"]["gymnasium"]
    assert [r["episode"] for r in curve] == [0, 1, 2]
    for record in curve:
        assert 0.5 <= record["lr_factor"] <= 2 and record["base_lr"] == pytest.approx(1e-3 * record["lr_factor"])
        assert record["decisions"] == 3 and len(record["lr_trajectory"]) == 3
        assert record["final_val_loss"] >= record["best_val_loss"]


def comparable(curve):
    return [{k: v for k, v in r.items() if k not in ("seconds", "train_seconds")} for r in curve]


def test_train_agent_killed_mid_way_continues_where_it_stopped(prepared_data_dir, tmp_path):
    """reinforce saves everything it learned (network, optimizer, baseline, RNGs) after every episode:
    killed and re-run, it ends exactly where the uninterrupted training ends."""
    args = ["--agent", "reinforce", "--episodes", 6, "--profile", "smoke", "--set", "max_iters=150,lr_decay_iters=150",
            "--data_dir", prepared_data_dir, "--lr_range", "0.5,2"]
    whole = tmp_path / "whole"
    assert train_cli([*args, "--out_dir", whole]).returncode == 0
    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_agent.py"), *map(str, args), "--out_dir", killed],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    curve_file = killed / "learning_curve.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (curve_file.exists() and len(json.loads(curve_file.read_text())) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(json.loads(curve_file.read_text()))
    assert 2 <= done_before < 6
    rerun = train_cli([*args, "--out_dir", killed])
    assert rerun.returncode == 0, rerun.stderr
    assert f"episodes {done_before}/6 done" in rerun.stdout
    assert comparable(json.loads(curve_file.read_text())) == comparable(json.loads((whole / "learning_curve.json").read_text()))
    assert json.loads((killed / "policy.json").read_text()) == json.loads((whole / "policy.json").read_text())
    assert len(json.loads((killed / "manifest.json").read_text())["resumed"]) == 1


def test_a_stable_baselines3_training_continues_from_its_last_saved_episode(prepared_data_dir, tmp_path):
    out = smoke_training(tmp_path, prepared_data_dir, "ppo", 2)
    first = json.loads((out / "learning_curve.json").read_text())
    temp = tmp_path / "temp"  # and leaves no empty log folder per update there (SB3-<time>: its default logger)
    temp.mkdir()
    more = train_cli(["--agent", "ppo", "--episodes", 4, "--profile", "smoke", "--out_dir", out,
                      "--data_dir", prepared_data_dir, "--episodes_per_update", 1],  # (as smoke_training started it)
                     env_extra={"TMPDIR": str(temp)})
    assert more.returncode == 0, more.stderr
    assert list(temp.glob("SB3-*")) == []
    curve = json.loads((out / "learning_curve.json").read_text())
    assert curve[:2] == first and [r["episode"] for r in curve] == [0, 1, 2, 3]
    assert [r["seed"] for r in curve] == [1_000_000 + e for e in range(4)]


def test_a_folder_is_continued_only_by_the_same_training(prepared_data_dir, tmp_path):
    out = smoke_training(tmp_path, prepared_data_dir, "reinforce", 1)
    proc = train_cli(["--agent", "reinforce", "--episodes", 2, "--profile", "smoke", "--out_dir", out,
                      "--data_dir", prepared_data_dir, "--lr_range", "0.1,10"])
    assert one_line_error(proc) and "lr_range" in proc.stderr



def test_a_training_started_before_a_config_field_existed_continues_at_its_default(prepared_data_dir, tmp_path):
    out = smoke_training(tmp_path, prepared_data_dir, "reinforce", 1)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["config"]["batch_grows_with_world"]  # as a version before the field recorded it
    (out / "manifest.json").write_text(json.dumps(manifest))
    smoke_training(tmp_path, prepared_data_dir, "reinforce", 2)
    assert json.loads((out / "manifest.json").read_text())["episodes_done"] == 2

@pytest.mark.parametrize("bad", [["--agent", "sarsa"], ["--episodes", "0"], ["--lr_range", "10,0.1"],
                                 ["--seed", "1337"], ["--set", "max_iters=-5"], ["--set", "nonsense=1"]])
def test_bad_train_agent_input_is_one_line(prepared_data_dir, tmp_path, bad):
    proc = train_cli(["--profile", "smoke", "--out_dir", tmp_path / "x", "--data_dir", prepared_data_dir, *bad])
    assert one_line_error(proc), proc.stderr
    assert not (tmp_path / "x").exists()


# --- deployment -----------------------------------------------------------------------------------

def test_a_trained_ppo_policy_is_deployed_frozen_and_recorded_by_hash(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "ppo", 3)
    proc = deploy(tmp_path, prepared_data_dir, "ppo", policy_dir)
    assert proc.returncode == 0, proc.stderr
    run = json.loads((tmp_path / "deployed" / "run.json").read_text())
    record = run["policy"]["shakespeare_char"]
    assert record["sha256"] == hashlib.sha256((policy_dir / "policy.zip").read_bytes()).hexdigest()
    assert record["trained"]["agent"] == "ppo" and record["trained"]["episodes_done"] == 3 and record["frozen"]
    val_info = json.loads((tmp_path / "deployed" / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    assert all(r["action"] in range(5) for r in val_info[:-1])
    # Deployed twice: the same decisions (a frozen policy acts deterministically).
    assert deploy(tmp_path, prepared_data_dir, "ppo", policy_dir, "again").returncode == 0
    again = json.loads((tmp_path / "again" / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    assert [r["action"] for r in again] == [r["action"] for r in val_info]


def test_a_reinforce_policy_deploys_frozen_or_learning(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "reinforce", 2)
    for name, extra in (("frozen", []), ("learning", ["--agent_learn", "--policy_batch", "1"])):
        proc = deploy(tmp_path, prepared_data_dir, "reinforce", policy_dir, name, *extra)
        assert proc.returncode == 0, proc.stderr
    trained = json.loads((policy_dir / "policy.json").read_text())["updates"]
    frozen = json.loads((tmp_path / "frozen" / "agent_shakespeare_char_0.json").read_text())
    learning = json.loads((tmp_path / "learning" / "agent_shakespeare_char_0.json").read_text())
    assert frozen["updates"] == trained and learning["updates"] == trained + 1


def test_a_policy_for_another_observation_definition_is_refused_in_one_line(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "ppo", 1)
    manifest = json.loads((policy_dir / "manifest.json").read_text())
    manifest["observation"] = {"version": 0, "features": manifest["observation"]["features"][:5]}
    (policy_dir / "manifest.json").write_text(json.dumps(manifest))
    proc = deploy(tmp_path, prepared_data_dir, "ppo", policy_dir)
    assert one_line_error(proc) and "observation version 0" in proc.stderr
    assert not (tmp_path / "deployed").exists()


@pytest.mark.parametrize("agent,policy_file", [("ppo", "policy.zip"), ("reinforce", "policy.json")])
def test_a_corrupt_policy_file_is_refused_in_one_line(prepared_data_dir, tmp_path, agent, policy_file):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, agent, 1)
    path = policy_dir / policy_file
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    proc = deploy(tmp_path, prepared_data_dir, agent, policy_dir)
    assert one_line_error(proc), proc.stderr
    assert not (tmp_path / "deployed").exists()


def test_deployment_refusals_are_one_line(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "ppo", 1)
    for extra, words in ((["--agent", "dqn", "--agent_init", policy_dir], "holds a ppo policy"),
                         (["--agent", "ppo", "--agent_init", policy_dir, "--agent_learn"], "deployed frozen"),
                         (["--agent", "ppo"], "needs --agent_init"),
                         (["--agent", "ppo", "--agent_init", policy_dir, "--agent_actions", "0.5,1,2"], "actions"),
                         (["--agent", "sarsa"], "invalid choice")):
        proc = run_cli(["--out_dir", tmp_path / "x", "--profile", "smoke", "--datasets", "shakespeare_char",
                        "--data_dir", prepared_data_dir, "--notes", "off", *extra])
        assert one_line_error(proc) and words in proc.stderr, (extra, proc.stderr)
    assert not (tmp_path / "x").exists()


def test_evaluating_on_a_training_seed_is_flagged(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "reinforce", 1)
    proc = deploy(tmp_path, prepared_data_dir, "reinforce", policy_dir, "deployed", "--seed_base", 1_000_000)
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads((tmp_path / "deployed" / "run.json").read_text())["warnings"]["shakespeare_char"]
    assert any("not held out" in w for w in warnings)
    assert not any("trained with" in w for w in warnings)  # same dataset and profile: no transfer warning


def test_a_policy_deployed_on_another_dataset_is_flagged_as_a_transfer(prepared_data_dir, tmp_path):
    policy_dir = smoke_training(tmp_path, prepared_data_dir, "reinforce", 1)
    proc = run_cli(["--out_dir", tmp_path / "t", "--profile", "smoke", "--datasets", "text8", "--data_dir",
                    prepared_data_dir, "--notes", "off", "--inference_samples", "1", "--agent", "reinforce",
                    "--agent_init", policy_dir])
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads((tmp_path / "t" / "run.json").read_text())["warnings"]["text8"]
    assert "the policy was trained with dataset shakespeare_char, deployed with text8" in warnings
