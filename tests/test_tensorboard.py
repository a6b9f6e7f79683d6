"""--tensorboard: every logged step and evaluation goes to run_N/tensorboard/<dataset>_<seed>/ as it is made, the
training is bit for bit what it is without the flag, --resume keeps writing there, and without the package the
flag is refused in one line before anything is written."""
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import experiment as ex
from harness.tensorboard import LiveCurves, curves_folder
from conftest import ROOT, run_cli

SMOKE = ["--profile", "smoke", "--datasets", "shakespeare_char", "--seeds", "1", "--agent", "random", "--notes", "off"]


def read_curves(folder) -> dict:
    """tag -> [(step, value)], as TensorBoard shows them (events an interrupted process left past its
    checkpoint purged)."""
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def float32(x: float) -> float:
    return float(np.float32(x))  # event files keep 32-bit floats


@pytest.fixture(scope="module")
def runs(prepared_data_dir, tmp_path_factory):
    """The issue's smoke run with --tensorboard, and the same run without it."""
    folder = tmp_path_factory.mktemp("tensorboard")
    for name, extra in (("with", ["--tensorboard"]), ("without", [])):
        proc = run_cli([*SMOKE, "--data_dir", prepared_data_dir, "--out_dir", folder / name, *extra])
        assert proc.returncode == 0, proc.stderr
    return folder / "with", folder / "without"


def test_the_event_files_hold_every_logged_step_and_evaluation(runs):
    run = runs[0]
    results = json.loads((run / "all_results.json").read_text())
    train, val = results["shakespeare_char_0_train_info"], results["shakespeare_char_0_val_info"]
    curves = read_curves(curves_folder(run, "shakespeare_char", 0))
    assert curves["train/loss"] == [(r["iter"], float32(r["loss"])) for r in train]
    assert curves["train/lr"] == [(r["iter"], float32(r["lr"])) for r in train]
    for tag, key in (("eval/val_loss", "val/loss"), ("eval/train_loss", "train/loss"), ("eval/lr", "lr"),
                     ("agent/multiplier", "multiplier"), ("agent/action", "action")):
        assert curves[tag] == [(r["iter"], float32(r[key])) for r in val], tag
    assert "agent/reward" not in curves  # random has no reward: nothing drawn, not zeros
    assert [p.name for p in (run / "tensorboard").iterdir()] == ["shakespeare_char_0"]


def test_the_flag_changes_no_number_of_the_run(runs):
    def numbers(run):
        info = json.loads((run / "final_info.json").read_text())["shakespeare_char"]["final_info_dict"]
        results = json.loads((run / "all_results.json").read_text())
        logs = [[{k: v for k, v in r.items() if k != "time"} for r in results[f"shakespeare_char_0_{kind}"]]
                for kind in ("train_info", "val_info")]
        return {k: v for k, v in info.items() if "time" not in k and "per_second" not in k}, logs
    with_flag, without = numbers(runs[0]), numbers(runs[1])
    assert "full_val_loss" in with_flag[0] and with_flag == without
    assert not (runs[1] / "tensorboard").exists()


def fake_run(**logs):
    """What LiveCurves reads of a TrainingRun: its state's logs and the iteration it starts at."""
    return SimpleNamespace(state=SimpleNamespace(**{"next_it": 0, "train_log": [], "val_log": [], **logs}))


def test_per_group_and_per_hyperparameter_lists_are_named(tmp_path):
    """Records as drive() makes them with --lr_groups layer and with --control; a reward when there is one."""
    layered = {"iter": 10, "train/loss": 3.9, "val/loss": 3.8, "lr": 1e-3, "multiplier": 1.0,
               "lr_groups": {"embedding": 1e-3, "block0": 4e-3, "ln_f": 1e-3}, "multipliers": [1.0, 4.0, 1.0],
               "action": [2, 4, 1], "reward": -3.8, "epsilon": 0.1, "state": [0, 1, 2], "explored": False}
    control = {"iter": 20, "train/loss": 3.6, "val/loss": 3.5, "lr": 5e-4, "multiplier": 0.5,
               "hparams": {"lr": 5e-4, "weight_decay": 0.2, "grad_clip": 2.5},
               "hparam_multipliers": {"weight_decay": 2.0, "grad_clip": 2.5}, "action": [0, 2, 4], "reward": None}
    step = {"iter": 25, "loss": 4.0, "lr": 1e-3, "lr_groups": {"embedding": 1e-3, "block0": 2e-3, "ln_f": 5e-4},
            "time": 40.0}
    run = fake_run()
    curves = LiveCurves(tmp_path, run)
    for log, record in ((run.state.val_log, layered), (run.state.val_log, control), (run.state.train_log, step)):
        log.append(record)
        curves.record_made("train" if log is run.state.train_log else "eval")
    curves.close()
    got = read_curves(tmp_path)
    assert got["agent/multipliers/block0"] == [(10, 4.0)] and got["agent/action/ln_f"] == [(10, 1.0)]
    assert got["eval/lr_groups/block0"] == [(10, float32(4e-3))]
    assert got["train/lr_groups/ln_f"] == [(25, float32(5e-4))]
    assert got["agent/action/grad_clip"] == [(20, 4.0)] and got["agent/action/lr"] == [(20, 0.0)]
    assert got["eval/hparams/weight_decay"] == [(20, float32(0.2))]
    assert got["agent/hparam_multipliers/grad_clip"] == [(20, 2.5)]
    assert got["agent/reward"] == [(10, float32(-3.8))] and got["agent/epsilon"] == [(10, float32(0.1))]
    assert not [tag for tag in got if "state" in tag or "explored" in tag or "time" in tag]


def test_a_divergence_rollback_redraws_the_curves_from_the_checkpoint(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli([*SMOKE, "--data_dir", prepared_data_dir, "--out_dir", out, "--tensorboard"],
                   env_extra={"GPT_RL_TEST_NAN_AT": "12"})  # a NaN at step 12: back to the checkpoint at 10
    assert proc.returncode == 0 and "rollback 1/3" in proc.stderr, proc.stderr
    results = json.loads((out / "all_results.json").read_text())
    train, val = results["shakespeare_char_0_train_info"], results["shakespeare_char_0_val_info"]
    curves = read_curves(curves_folder(out, "shakespeare_char", 0))
    assert curves["train/loss"] == [(r["iter"], float32(r["loss"])) for r in train]
    assert curves["train/lr"] == [(r["iter"], float32(r["lr"])) for r in train]
    assert curves["eval/val_loss"] == [(r["iter"], float32(r["val/loss"])) for r in val]
    # the evaluation rolled back to is drawn with the multiplier cut by the rollback, as val_info records it
    assert curves["agent/multiplier"] == [(r["iter"], float32(r["multiplier"])) for r in val]
    assert [r["iter"] for r in val if r.get("rollbacks")] == [10]


def test_an_interrupted_run_resumed_keeps_writing_to_the_same_folder(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    args = [*SMOKE, "--data_dir", str(prepared_data_dir), "--out_dir", str(out), "--max_iters", "300",
            "--eval_interval", "50", "--inference_samples", "1"]
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "experiment.py"), *args, "--tensorboard"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt_shakespeare_char_0.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into the training steps after the first evaluation
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    folder = curves_folder(out, "shakespeare_char", 0)
    (first,) = folder.iterdir()
    assert read_curves(first)["eval/val_loss"]  # the interrupted process flushed what it had
    resumed = run_cli(["--out_dir", out, "--resume", "--data_dir", prepared_data_dir])  # the flag comes from run.json
    assert resumed.returncode == 0, resumed.stderr
    assert len(list(folder.iterdir())) == 2
    val = json.loads((out / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    train = json.loads((out / "all_results.json").read_text())["shakespeare_char_0_train_info"]
    curves = read_curves(folder)
    assert curves["eval/val_loss"] == [(r["iter"], float32(r["val/loss"])) for r in val]
    assert [step for step, _ in curves["train/loss"]] == [r["iter"] for r in train]


def test_without_the_package_the_flag_is_refused_before_anything_is_written(prepared_data_dir, tmp_path,
                                                                            monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what `import` meets without tensorboard
    out = tmp_path / "run"
    code = ex.main([*SMOKE, "--data_dir", str(prepared_data_dir), "--out_dir", str(out), "--tensorboard"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines == ["error: --tensorboard needs the tensorboard package: pip install tensorboard"]
    assert not out.exists()


def test_under_torchrun_only_rank_0_writes(prepared_data_dir, tmp_path):
    out = tmp_path / "run_0"
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "experiment.py"), *SMOKE, "--data_dir", str(prepared_data_dir), "--out_dir",
                           str(out), "--inference_samples", "1", "--tensorboard", "--gradient_accumulation_steps", "2"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    folder = curves_folder(out, "shakespeare_char", 0)
    assert len(list(folder.iterdir())) == 1  # one writer: rank 0's
    val = json.loads((out / "all_results.json").read_text())["shakespeare_char_0_val_info"]
    assert read_curves(folder)["eval/val_loss"] == [(r["iter"], float32(r["val/loss"])) for r in val]


def test_a_seed_from_scratch_drops_the_event_files_an_earlier_run_left_a_resumed_one_keeps_them(tmp_path):
    stale = tmp_path / "events.out.tfevents.1.host.1.0"
    stale.write_bytes(b"")
    LiveCurves(tmp_path, fake_run(next_it=20, train_log=[{"iter": 15, "loss": 3.0, "lr": 1e-3}])).close()
    assert stale.exists() and len(list(tmp_path.iterdir())) == 2
    LiveCurves(tmp_path, fake_run()).close()
    assert not stale.exists() and len(list(tmp_path.iterdir())) == 1
