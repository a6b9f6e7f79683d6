"""Every bench/ study runs end to end at its --smoke size, writes its summary through bench/study.py, and
reuses its finished runs when run again (its figures are not asserted: smoke sizes measure nothing)."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


def run_study(script, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *map(str, args)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def started(out, script="experiment.py") -> int:
    """How many times the study started script (its log.txt records every command)."""
    return sum(line.startswith(f"$ {script}") for line in (out / "log.txt").read_text().splitlines())


@pytest.fixture(scope="module")
def controller_study(prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("studies") / "controller"
    run_study("controller_study.py", "--out", out, "--data_dir", prepared_data_dir)
    return out


def test_controller_study_smoke_charges_training_and_reuses_every_run(controller_study, prepared_data_dir):
    summary = json.loads((controller_study / "summary.json").read_text())
    arms = summary["arms"]
    assert set(arms) == {"tuned", "cosine_x1", "random_x1", "ppo_x1", "reinforce_x1"}
    assert all(a["n"] == 2 and a["seeds"] == [1337, 1338] for a in arms.values())
    assert arms["ppo_x1"]["extra_steps"] == summary["training_steps"]["ppo"] > 0
    assert arms["tuned"]["extra_steps"] == summary["sweep_steps"] > 0 and arms["cosine_x1"]["extra_steps"] == 0
    assert len(summary["comparisons"]) == 8 and summary["commit"] and summary["command"]
    assert "p (Holm)" in (controller_study / "summary.md").read_text()
    runs = started(controller_study)
    run_study("controller_study.py", "--out", controller_study, "--data_dir", prepared_data_dir)
    assert started(controller_study) == runs and started(controller_study, "train_agent.py") == 2
    assert json.loads((controller_study / "summary.json").read_text())["arms"] == arms


def test_layer_study_smoke_shares_the_controller_studys_runs(controller_study, prepared_data_dir, tmp_path):
    cached = len(list((controller_study / "runs").iterdir()))
    run_study("layer_study.py", "--out", tmp_path / "layer", "--controller_study", controller_study,
              "--data_dir", prepared_data_dir)
    summary = json.loads((tmp_path / "layer" / "summary.json").read_text())
    assert len(summary["arms"]) == 10 and len(summary["comparisons"]) == 17
    # the sweep and cosine at 1e-3 were run by the controller study: only the new arms ran
    assert started(tmp_path / "layer") == len(list((controller_study / "runs").iterdir())) - cached
    assert started(tmp_path / "layer", "train_agent.py") == 1  # the per-layer policy; the global one is reused
    assert list((tmp_path / "layer" / "figures").glob("*.png"))


def test_prune_study_smoke_compares_the_methods_on_each_source_model(prepared_data_dir, tmp_path):
    proc = run_study("prune_study.py", "--out", tmp_path, "--data_dir", prepared_data_dir)
    assert "interim summary (4 fine-tuning steps only)" in proc.stdout  # before the longest's hours
    summary = json.loads((tmp_path / "summary.json").read_text())
    arms, rows = summary["arms"], summary["comparisons"]
    assert summary["complete"] is True
    assert summary["search_seeds"] == [0, 1] and summary["finetune_iters"] == [4, 8]
    # 2 lengths x 3 targets x 5, 6 before, 10 distilled, 4 from scratch, 5 long searches, 14 at the tuned rate
    assert arms["rl_0.5 @8"]["n"] == 2 and len(rows) == 69 and summary["long_episodes"] == 6
    # the fine-tuning rate swept on a tuning model (not a held-out one), its steps charged to the tuned arms
    tuning = summary["finetune_rate"]
    assert tuning["rate"] in (1e-3, 2e-3) and set(tuning["loss_by_rate"]) == {"0.001", "0.002"}
    assert "_2000_" in tuning["model"] and tuning["steps"] > 0
    assert arms["uniform_0.5 tuned @8"]["extra_steps"] == tuning["steps"]
    assert "uniform_0.5 tuned @8 - uniform_0.5 @8" in {r["comparison"] for r in rows}
    assert {"rl_0.5 @8 - random_search_0.5 @8", "rl_0.5 distilled @4 - rl_0.5 @4", "uniform_0.5 @8 - "
            "uniform_0.5_scratch"} <= {r["comparison"] for r in rows}
    assert all(r["p_holm"] >= r["p"] for r in rows if r["p"] is not None)  # Holm over the whole table
    # search compute charged: the reward's forward passes (rl, random_search), the Taylor scores (global)
    assert all(arms[f"{m}_0.5 @8"]["extra_steps"] > 0 for m in ("rl", "random_search", "global"))
    assert arms["uniform_0.5 @8"]["extra_steps"] == 0 and arms["uniform_0.5 @8"]["run_steps"] == 8 * 4
    # a source model's number is its mean over the search seeds
    finals = [json.loads((f / "final_info.json").read_text()) for f in tmp_path.glob("prune_1337_*_plain_8_*")]
    assert len(finals) == 2
    mean = sum(f["rl_0.5"]["final_info_dict"]["full_val_loss"][0] for f in finals) / 2
    assert arms["rl_0.5 @8"]["values"]["1337"] == pytest.approx(mean)
    assert "FLOPs ratio" in (tmp_path / "summary.md").read_text()
    assert all((tmp_path / "figures" / f"pareto_{n}.png").stat().st_size > 0 for n in (4, 8))
    assert (tmp_path / "figures" / "search_curves.png").stat().st_size > 0
    assert "- rl, 0.5 of the FLOPs, 6 episodes (4 searches)" in (tmp_path / "summary.md").read_text()


def test_sweep_study_smoke_charges_each_search_its_steps_and_replays_pbts_lineage(prepared_data_dir, tmp_path):
    pytest.importorskip("ray")
    proc = run_study("sweep_study.py", "--out", tmp_path, "--data_dir", prepared_data_dir)
    assert "interim summary (every row but ppo_until_flat's)" in proc.stdout  # before its hours of training
    summary = json.loads((tmp_path / "summary.json").read_text())
    arms = summary["arms"]
    assert summary["complete"] is True and summary["until_flat"]["episodes"] == 2
    assert set(arms) == {"cosine", "grid_2", "random_2", "pbt_2", "tuned_cosine_2", "ppo_2", "ppo_until_flat"}
    assert all(arms[m]["extra_steps"] > 0 for m in ("grid_2", "random_2", "pbt_2", "tuned_cosine_2", "ppo_2"))
    # ppo given its fair chance is charged the tuning it is centred on as well as its own training
    assert arms["ppo_until_flat"]["extra_steps"] > arms["tuned_cosine_2"]["extra_steps"]
    tuned_lr = summary["chosen"]["tuned_cosine_2"]["hp"]["learning_rate"]
    assert arms["ppo_until_flat"]["flags"][:2] == ["--learning_rate", str(tuned_lr)]
    assert {r["b"] for r in summary["comparisons"] if r["a"] == "ppo_until_flat"} == \
        {"cosine", "ppo_2", "grid_2", "random_2", "pbt_2", "tuned_cosine_2"}
    pbt = arms["pbt_2"]["flags"]  # PBT's product, its best member's lineage, replayed on the held-out seeds
    assert pbt[-6:-3] == ["--agent", "replay", "--agent_init"] and pbt[-3].endswith("pbt/best_lineage")
    assert pbt[-2:] == ["--control", "lr,weight_decay,grad_clip"]
    assert all(r["p_holm"] is None or r["p_holm"] >= r["p"] for r in summary["comparisons"])
    assert all((tmp_path / "figures" / f).stat().st_size > 0 for f in ("best_so_far_2.png", "learning_curves.png"))
    assert started(tmp_path, "sweep.py") == 4  # grid, random, pbt, tuned cosine: once each
    run_study("sweep_study.py", "--out", tmp_path, "--data_dir", prepared_data_dir)
    assert started(tmp_path, "sweep.py") == 4  # finished sweeps are reused, never run again


def test_a_study_refuses_bad_input_and_overlapping_seeds_in_one_line(tmp_path):
    for args, message in ((["--episodes", "many"], "error: argument --episodes"),
                          (["--seeds", "700"], "error: seed sets search and held_out overlap"),
                          (["--jobs", "0"], "error: argument --jobs: a whole number of at least 1, not '0'")):
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "controller_study.py"), "--out", tmp_path, *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.startswith(message), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_lr_leaderboard_smoke_names_every_arm_and_corrects_over_the_table(prepared_data_dir, tmp_path):
    run_study("lr_leaderboard.py", "--out", tmp_path, "--data_dir", prepared_data_dir)
    summary = json.loads((tmp_path / "summary.json").read_text())
    arms = set(summary["arms"])
    for factor in ("x0.1", "x1", "x10"):
        assert {f"{a}_{factor}" for a in ("cosine", "schedulefree", "oracle", "random", "replay", "ppo",
                                          "reinforce", "qlearning")} <= arms
    assert {"tuned", "prodigy", "dadapt_adam", "anchored_ppo_x1", "enwik8_tuned", "enwik8_ppo_x10"} <= arms
    assert summary["complete"] is True
    assert all(r["p_holm"] is None or r["p_holm"] >= r["p"] for r in summary["comparisons"])
    assert summary["arms"]["ppo_x1"]["extra_steps"] == summary["training_steps"]["ppo"] > 0
    assert set(summary["rules"]) == {f"{rule}_{f}" for rule in ("narrow_100", "wide_100", "wide_50")
                                     for f in ("x0.1", "x10")}
    assert "p (Holm)" in (tmp_path / "summary.md").read_text() and (tmp_path / "leaderboard.png").exists()
