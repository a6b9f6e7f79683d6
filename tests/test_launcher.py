"""launcher.sh reproduces the five reference runs and the random control, skips finished ones and resumes
interrupted ones."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def launch(folder, data_dir):
    env = {**{k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "launcher.sh"), "--profile", "smoke", "--datasets", "shakespeare_char",
                           "--dir", str(folder), "--", "--data_dir", str(data_dir), "--inference_samples", "1"],
                          env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def launched(prepared_data_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("launcher")
    proc = launch(folder, prepared_data_dir)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return folder


def test_five_reference_runs_and_the_random_control_with_their_settings(launched):
    runs = {i: json.loads((launched / f"run_{i}" / "run.json").read_text()) for i in range(6)}
    assert all(r["status"] == "finished" for r in runs.values())
    configs = {i: r["configs"]["shakespeare_char"] for i, r in runs.items()}
    assert configs[0]["agent"] == "none" and all(configs[i]["agent"] == "qlearning" for i in (1, 2, 3, 4))
    assert configs[2]["learning_rate"] == 2e-3 and configs[1]["learning_rate"] == 1e-3
    assert configs[3]["reward"] == "improvement" and configs[1]["reward"] == "neg_val_loss"
    assert configs[4]["epsilon_decay"] == 0.9 and configs[1]["epsilon_decay"] == 1.0
    assert configs[5]["agent"] == "random" and configs[5]["agent_actions"] == configs[1]["agent_actions"]
    assert runs[0]["title"] == "Baseline"


def test_notes_tell_every_run_once_with_one_table(launched):
    notes = (launched / "notes.txt").read_text()
    assert notes.startswith("# Title: ")
    for i in range(6):
        assert notes.count(f"## Run {i}: ") == 1
    assert notes.count("<!-- comparison table") == 1 and notes.count("<!-- end comparison table -->") == 1
    assert notes.count("Results: {'shakespeare_char': {'final_train_loss_mean': ") == 6


def test_plots_are_drawn(launched):
    for name in ("train_loss_shakespeare_char.png", "val_loss_shakespeare_char.png", "lr_shakespeare_char.png",
                 "summary.png"):
        assert (launched / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_launch_skips_finished_runs_and_resumes_an_interrupted_one(launched, prepared_data_dir):
    kept = (launched / "run_0" / "final_info.json").read_bytes()
    (launched / "run_3" / "final_info.json").unlink()  # as if run_3 died after its last seed
    proc = launch(launched, prepared_data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("finished earlier, skipped") == 5
    assert "run_3: interrupted earlier, resuming" in proc.stdout
    assert (launched / "run_3" / "final_info.json").exists()
    assert (launched / "run_0" / "final_info.json").read_bytes() == kept
    assert (launched / "notes.txt").read_text().count("## Run 3: ") == 1


def test_launcher_stops_on_the_first_failure(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "launcher.sh"), "--profile", "smoke", "--datasets", "shakespeare_char",
                           "--dir", str(tmp_path), "--", "--data_dir", str(tmp_path / "no_data"), "--no-download"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "launcher: run_0 failed" in proc.stderr and "run_1" not in proc.stdout
