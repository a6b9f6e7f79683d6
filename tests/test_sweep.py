"""sweep.py: grid, random and PBT search on Ray Tune, every trial an ordinary run folder. One local Ray
instance (2 CPUs) serves every test; the smoke profile keeps each trial to seconds."""
import json
from datetime import datetime
import os
import subprocess
import sys

import pytest

import experiment as ex
from conftest import ROOT

ray = pytest.importorskip("ray")
import sweep  # noqa: E402  (needs ray only when run)

SHORT = "max_iters=20,lr_decay_iters=20,eval_interval=5,final_eval_tokens=2048"


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def sweep_run(tmp_path, data_dir, method, *extra, name="S"):
    out = tmp_path / name
    args = ["--method", method, "--profile", "smoke", "--datasets", "shakespeare_char", "--out_dir", out,
            "--data_dir", data_dir, "--set", SHORT, *extra]
    assert sweep.main([str(a) for a in args]) == 0
    return out, json.loads((out / method / "results.json").read_text())


def val_losses(trial_dir):
    results = json.loads((trial_dir / "all_results.json").read_text())
    return [(r["iter"], r["val/loss"]) for r in results["shakespeare_char_0_val_info"]]


def test_grid_visits_exactly_its_grid(prepared_data_dir, tmp_path, local_ray):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"learning_rate": {"low": 1e-3, "high": 4e-3, "log": True},
                                 "weight_decay": {"low": 0.0, "high": 0.1, "log": False, "grid": [0.0, 0.1]}}))
    out, results = sweep_run(tmp_path, prepared_data_dir, "grid", "--space", space, "--grid_points", 2)
    visited = sorted((round(t["initial_hp"]["learning_rate"], 12), t["initial_hp"]["weight_decay"])
                     for t in results["trials"])
    assert visited == [(1e-3, 0.0), (1e-3, 0.1), (4e-3, 0.0), (4e-3, 0.1)]  # each point once, nothing else
    for trial in results["trials"]:  # each trial ran its own settings
        run = json.loads((out / "grid" / trial["trial"] / "run.json").read_text())
        assert run["configs"]["shakespeare_char"]["learning_rate"] == trial["initial_hp"]["learning_rate"]
        assert run["configs"]["shakespeare_char"]["weight_decay"] == trial["initial_hp"]["weight_decay"]
    best = json.loads((out / "grid" / "best.json").read_text())
    assert best["full_val_loss"] == min(t["full_val_loss"] for t in results["trials"])
    assert (out / "best_so_far.png").read_bytes().startswith(b"\x89PNG")
    assert "## Sweep grid" in (out / "notes.txt").read_text()


def test_every_trial_is_a_contract_valid_run_folder(prepared_data_dir, tmp_path, local_ray):
    out, results = sweep_run(tmp_path, prepared_data_dir, "random", "--trials", 2, "--seed", 3)
    assert len(results["trials"]) == 2
    for trial in results["trials"]:
        folder = out / "random" / trial["trial"]
        final = json.loads((folder / "final_info.json").read_text())["shakespeare_char"]
        assert final["means"]["full_val_loss_mean"] == trial["full_val_loss"]
        names = {p.name for p in folder.iterdir()}
        assert {"final_info.json", "all_results.npy", "all_results.json", "run.json"} <= names
        record = json.loads((folder / "run.json").read_text())
        assert record["status"] == "finished" and record["command"][1].endswith("sweep.py")
        assert record["configs"]["shakespeare_char"]["seed_base"] == sweep.SWEEP_SEED_BASE  # 1337.. stay held out
        assert trial["steps"] == 20  # the compute it spent: every optimizer step, counted once
        assert not list(folder.glob("ckpt_*.pt"))  # finished seeds leave no checkpoints behind
    assert results["steps"] == 40 and "| trial |" in (out / "random" / "results.md").read_text()
    before = (out / "random" / "results.json").read_bytes()
    args = ["--method", "random", "--trials", "2", "--profile", "smoke", "--out_dir", out,
            "--data_dir", prepared_data_dir]
    assert sweep.main([str(a) for a in args]) == 2  # a finished sweep is never overwritten
    assert (out / "random" / "results.json").read_bytes() == before


def test_random_search_is_reproducible_with_its_seed(prepared_data_dir):
    cfg = ex.config_for_dataset(ex.Config(data_dir=str(prepared_data_dir)), {}, "smoke", "shakespeare_char")
    space = sweep.parse_space("", cfg)
    assert sweep.random_configs(space, 5, seed=7) == sweep.random_configs(space, 5, seed=7)
    assert sweep.random_configs(space, 5, seed=7) != sweep.random_configs(space, 5, seed=8)
    for hp in sweep.random_configs(space, 50, seed=1):
        assert all(space[n]["low"] <= v <= space[n]["high"] for n, v in hp.items())
        assert isinstance(hp["warmup_iters"], int)


def test_pbt_copies_the_donors_weights(prepared_data_dir, tmp_path, local_ray):
    """Two trials at rates drawn from 1e-6..1e-2: at an evaluation the worse exploits the better, and its run
    continues from the donor's checkpoint: its loss there is the donor's, not a fresh model's."""
    out, results = sweep_run(tmp_path, prepared_data_dir, "pbt", "--trials", 2, "--space",
                             "learning_rate=1e-6:1e-2:log", "--seed", 0)
    exploits = []
    for trial in results["trials"]:
        record = json.loads((out / "pbt" / trial["trial"] / "run.json").read_text())
        exploits += [(trial["trial"], r) for r in record["restores"] if r["kind"] == "exploit"]
    assert exploits, "no exploit happened"
    for trial, restore in exploits:
        donor = val_losses(out / "pbt" / restore["from_trial"])
        assert (restore["iter"], restore["val_loss"]) in donor  # the donor's own evaluation, exactly
        mine = val_losses(out / "pbt" / trial)
        assert (restore["iter"], restore["val_loss"]) in mine  # and the exploiting run carries it on


def test_a_killed_trial_resumes_from_its_checkpoint(prepared_data_dir, tmp_path, local_ray, monkeypatch):
    marker = tmp_path / "kill_marker"
    monkeypatch.setenv("GPT_RL_TEST_SWEEP_KILL_AT", f"10:{marker}")
    space = "learning_rate=2e-3:2.0001e-3:log"
    out, results = sweep_run(tmp_path, prepared_data_dir, "random", "--trials", 1, "--space", space, name="killed")
    assert marker.exists()
    monkeypatch.delenv("GPT_RL_TEST_SWEEP_KILL_AT")
    clean, clean_results = sweep_run(tmp_path, prepared_data_dir, "random", "--trials", 1, "--space", space,
                                     name="clean")
    (trial,), (clean_trial,) = results["trials"], clean_results["trials"]
    record = json.loads((out / "random" / trial["trial"] / "run.json").read_text())
    assert [r["kind"] for r in record["restores"]] == ["resume"] and record["restores"][0]["iter"] == 10
    assert trial["full_val_loss"] == clean_trial["full_val_loss"]  # resumed, not restarted: the same run
    assert val_losses(out / "random" / trial["trial"]) == val_losses(clean / "random" / clean_trial["trial"])
    assert trial["steps"] == 20  # killed right after the checkpoint at 10: no step was run twice


@pytest.mark.parametrize("bad", [
    ["--space", "momentum=0.1:0.9"],
    ["--space", "learning_rate=1e-2:1e-4"],
    ["--space", "learning_rate=0:1e-2:log"],
    ["--space", "learning_rate=abc"],
    ["--space", "missing.json"],
    ["--method", "grid", "--trials", "3"],
    ["--method", "pbt", "--trials", "1"],
    ["--method", "pbt", "--trials", "2", "--seeds", "2"],
    ["--datasets", "shakespeare_char,text8", "--trials", "2"],
])
def test_bad_sweep_input_is_one_line_exit_2(prepared_data_dir, tmp_path, bad):
    args = ["--method", "random", "--trials", "2", "--profile", "smoke", "--out_dir", tmp_path / "S",
            "--data_dir", prepared_data_dir]
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *map(str, args + bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "S").exists()


def test_without_ray_sweep_says_which_command_installs_it(prepared_data_dir, tmp_path):
    shadow = tmp_path / "no_ray" / "ray"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), "--trials", "2", "--profile", "smoke",
                           "--out_dir", str(tmp_path / "S"), "--data_dir", str(prepared_data_dir)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: sweep.py runs on Ray Tune, which is not " \
                                                          f"installed: {sweep.RAY_INSTALL}", proc.stderr
    assert not (tmp_path / "S").exists()


def test_best_so_far_charges_the_steps_every_trial_had_spent_when_a_result_came():
    import plot

    def trial(start, end, steps=1000):
        return {"started": f"2026-01-01T00:00:{start:02d}+00:00", "finished": f"2026-01-01T00:00:{end:02d}+00:00",
                "steps": steps}
    moment = datetime.fromisoformat("2026-01-01T00:00:10+00:00").timestamp()
    assert plot.steps_spent_by([trial(0, 10), trial(10, 20)], moment) == 1000  # one after the other
    assert plot.steps_spent_by([trial(0, 10), trial(0, 20)], moment) == 1500  # side by side: half of the second
    assert plot.steps_spent_by([trial(0, 10), trial(0, 10)], moment) == 2000  # synchronous: all done together
