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
    out, results = sweep_run(tmp_path, prepared_data_dir, "grid", "--space", space, "--trials", 4)
    assert results["grid"] == "grid: 2 x 2 = 4 points (learning_rate 2, weight_decay 2)"  # stated, as run
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


def drawn(space, n, seed):
    """What the seeded search algorithm draws from the Tuner's param_space (Tune's own sampling)."""
    import numpy as np
    from ray import tune
    from ray.tune.search.variant_generator import generate_variants
    spec = {"config": sweep.param_space(tune, "random", sweep.Plan(None, {}, space, n))}
    rng = np.random.RandomState(seed)
    return [next(generate_variants(spec, random_state=rng))[1]["config"]["hp"] for _ in range(n)]


def test_random_search_draws_reproducibly_within_the_space(prepared_data_dir):
    cfg = ex.config_for_dataset(ex.Config(data_dir=str(prepared_data_dir)), {}, "smoke", "shakespeare_char")
    space = sweep.parse_space("", cfg)
    assert drawn(space, 5, seed=7) == drawn(space, 5, seed=7)
    assert drawn(space, 5, seed=7) != drawn(space, 5, seed=8)
    for hp in drawn(space, 50, seed=1):
        assert all(space[n]["low"] <= v <= space[n]["high"] for n, v in hp.items())
        assert isinstance(hp["warmup_iters"], int)


@pytest.mark.parametrize("trials, counts", [(8, [2, 2, 2]), (27, [3, 3, 3]), (16, [4, 2, 2]), (12, [3, 2, 2]),
                                            (7, [7, 1, 1])])
def test_grid_trials_are_exactly_the_most_even_factorisation(trials, counts):
    space = sweep.parse_space("learning_rate=1e-4:1e-2,weight_decay=0.01:1,grad_clip=0.25:4", ex.Config())
    axes = sweep.grid_axes(space, trials, points=2)
    assert [len(v) for v in axes.values()] == counts and len(sweep.grid_configs(axes)) == trials
    if counts[-1] == 1:
        assert axes["grad_clip"] == [pytest.approx(1.0)]  # one point: the centre of its log scale


def test_pbt_perturbations_stay_within_the_space():
    """Ray's explore step (x0.8 / x1.2, or a resample) from settings on the space's edges, through our
    custom explore: every setting it produces lies within its declared bounds, integers stay integers."""
    import random
    from functools import partial
    from ray import tune
    from ray.tune.schedulers.pbt import _explore
    space = sweep.parse_space("learning_rate=1e-4:1e-2,weight_decay=0.01:1,grad_clip=0.25:4,warmup_iters=1:9",
                              ex.Config())
    mutations = {"hp": {n: sweep.tune_domain(tune, space[n]) for n in sweep.PBT_MUTATED}}
    random.seed(0)
    edges = [{"hp": {n: s[edge] for n, s in space.items()}} for edge in ("low", "high")]
    seen = set()
    for config in edges * 100:
        new, ops = _explore(config, mutations, 0.25, (1.2, 0.8), partial(sweep.within_space, space))
        seen |= set(ops["hp"].values())
        assert all(space[n]["low"] <= v <= space[n]["high"] for n, v in new["hp"].items()), new
        assert new["hp"]["warmup_iters"] == config["hp"]["warmup_iters"]  # not perturbed
    assert {"* 1.2", "* 0.8", "resample"} <= seen  # the edges were pushed outwards, and came back in


def test_pbt_never_acts_on_a_result_at_or_after_the_last_iteration():
    """At iter == max_iters the scheduler leaves the trial alone (no save, no exploit, no pause); before it,
    PopulationBasedTraining's own logic runs (here it fails for want of a registered trial: it was reached)."""
    from ray import tune
    from ray.tune.schedulers import TrialScheduler
    space = sweep.parse_space("learning_rate=1e-4:1e-2", ex.Config())
    cfg = ex.Config(max_iters=20, eval_interval=5)
    scheduler = sweep.pbt_scheduler(tune, sweep.Plan(cfg, {}, space, 2))
    scheduler.set_search_properties("val_loss", "min")
    for it in (20, 25):
        assert scheduler.on_trial_result(None, object(), {"iter": it, "val_loss": 1.0}) == TrialScheduler.CONTINUE
    with pytest.raises(KeyError):
        scheduler.on_trial_result(None, object(), {"iter": 15, "val_loss": 1.0})


def test_an_exploited_copy_draws_its_own_batches_not_its_donors(tmp_path):
    """reseed_batches replaces only the copied checkpoint's training-batch stream, with the one its trial
    number and exploit count give: another trial, or the same trial's next exploit, draws other batches."""
    import torch
    donor_stream = torch.Generator().manual_seed(2000).get_state()
    checkpoint = tmp_path / "ckpt_shakespeare_char_0.pt"
    torch.save({"sampler_rng": donor_stream, "meta": "{}", "model": {"w": torch.ones(2)}}, checkpoint)
    cfg = ex.Config(seed_base=2000)
    seed = sweep.exploit_batch_seed(cfg, "trial_00003", 1)
    sweep.reseed_batches(checkpoint, seed)
    payload = torch.load(checkpoint, weights_only=True)
    assert torch.equal(payload["sampler_rng"], torch.Generator().manual_seed(seed).get_state())
    assert not torch.equal(payload["sampler_rng"], donor_stream)
    assert payload["meta"] == "{}" and torch.equal(payload["model"]["w"], torch.ones(2))  # the rest as copied
    others = {sweep.exploit_batch_seed(cfg, "trial_00004", 1), sweep.exploit_batch_seed(cfg, "trial_00003", 2)}
    assert seed not in others and len(others) == 2
    assert sweep.exploit_batch_seed(cfg, "trial_00003", 1) == seed  # recorded, and reproducible


def test_a_lineage_follows_every_exploit_back_to_its_root():
    """c copied b at 10, b had copied a at 5: c's weights trained with a's settings to 5, b's to 10, then c's.
    What c did before its exploit, and what b did after c copied it, are not c's lineage."""
    from harness import pbt_lineage

    def exploit(donor, it, lr):
        return {"kind": "exploit", "from_trial": donor, "iter": it, "hp": {"learning_rate": lr}}
    records = {"a": {"sweep": {"hp": {"learning_rate": 1.0}}, "restores": []},
               "b": {"sweep": {"hp": {"learning_rate": 2.0}},
                     "restores": [exploit("a", 5, 3.0), {"kind": "resume", "from_trial": "b", "iter": 10,
                                                         "hp": {"learning_rate": 3.0}}, exploit("a", 15, 9.0)]},
               "c": {"sweep": {"hp": {"learning_rate": 4.0}}, "restores": [exploit("b", 10, 5.0)]}}
    segments = pbt_lineage.lineage(records, "c")
    assert [(s["from_iter"], s["trial"], s["hp"]["learning_rate"]) for s in segments] == \
        [(0, "a", 1.0), (5, "b", 3.0), (10, "c", 5.0)]
    configured = {"learning_rate": 1.0, "weight_decay": 0.1, "grad_clip": 1.0}
    trajectory = pbt_lineage.replay_schedule(segments, configured, [0, 5, 10, 15, 20])
    assert [t["multiplier"] for t in trajectory] == [1.0, 3.0, 5.0, 5.0, 5.0]
    assert all(t["hparam_multipliers"] == {"weight_decay": 1.0, "grad_clip": 1.0} for t in trajectory)
    base = pbt_lineage.replay_base(segments, configured, 0.125, 8.0)
    assert base == configured  # x5 is within the rate multiplier's bounds: the plain replay is exact
    wide = pbt_lineage.replay_base(segments + [{"from_iter": 20, "trial": "c", "hp": {"learning_rate": 16.0}}],
                                   configured, 0.125, 8.0)
    assert wide["learning_rate"] == pytest.approx(4.0)  # beyond x8: centred between the rates used (1 and 16)


def test_pbt_copies_the_donors_weights_never_at_the_end_and_with_fresh_batches(prepared_data_dir, tmp_path,
                                                                               local_ray):
    """Two trials at rates drawn from 1e-6..1e-2: at an evaluation the worse exploits the better, and its run
    continues from the donor's checkpoint: its loss there is the donor's, not a fresh model's. No exploit at
    the last evaluation (20); each exploit draws its own batch stream, recorded."""
    out, results = sweep_run(tmp_path, prepared_data_dir, "pbt", "--trials", 2, "--space",
                             "learning_rate=1e-6:1e-2:log", "--seed", 0)
    exploits = []
    for trial in results["trials"]:
        record = json.loads((out / "pbt" / trial["trial"] / "run.json").read_text())
        exploits += [(trial["trial"], r) for r in record["restores"] if r["kind"] == "exploit"]
    assert exploits, "no exploit happened"
    assert all(restore["iter"] < 20 for _, restore in exploits)
    assert len({restore["batch_seed"] for _, restore in exploits}) == len(exploits)
    for trial, restore in exploits:
        donor = val_losses(out / "pbt" / restore["from_trial"])
        assert (restore["iter"], restore["val_loss"]) in donor  # the donor's own evaluation, exactly
        mine = val_losses(out / "pbt" / trial)
        assert (restore["iter"], restore["val_loss"]) in mine  # and the exploiting run carries it on
    replay_plays_the_best_lineage(out / "pbt", results, prepared_data_dir, tmp_path)


def replay_plays_the_best_lineage(folder, results, data_dir, tmp_path):
    """S/pbt/best_lineage: the best member (by its final model) and its lineage, which experiment.py --agent
    replay plays on an unseen seed: at every evaluation the optimizer uses the lineage's settings there."""
    from harness import pbt_lineage
    lineage = json.loads((folder / "best_lineage" / "lineage.json").read_text())
    assert lineage["trial"] == results["best"]["trial"] == min(
        results["trials"], key=lambda t: t["full_val_loss"])["trial"]
    records = {t["trial"]: json.loads((folder / t["trial"] / "run.json").read_text()) for t in results["trials"]}
    assert lineage["segments"] == pbt_lineage.lineage(records, lineage["trial"])
    assert lineage["segments"][-1]["hp"]["learning_rate"] == results["best"]["hp"]["learning_rate"]
    run = tmp_path / "replayed"
    code = ex.main(["--out_dir", str(run), "--profile", "smoke", "--datasets", "shakespeare_char", "--seed_base",
                    "9000", "--data_dir", str(data_dir), "--notes", "off", "--inference_samples", "0",
                    *lineage["flags"], "--agent", "replay", "--agent_init", str(folder / "best_lineage"),
                    "--control", "lr,weight_decay,grad_clip"])
    assert code == 0
    base = lineage["base"]
    for record in json.loads((run / "all_results.json").read_text())["shakespeare_char_0_val_info"]:
        hp = pbt_lineage.settings_at(lineage["segments"], record["iter"])
        assert record["multiplier"] == pytest.approx(hp["learning_rate"] / base["learning_rate"])
        assert record["hparams"]["weight_decay"] == pytest.approx(hp.get("weight_decay", base["weight_decay"]))
        assert record["hparams"]["grad_clip"] == pytest.approx(hp.get("grad_clip", base["grad_clip"]))


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


def test_a_trial_that_fails_for_good_is_listed_with_its_error_and_charged_its_steps(prepared_data_dir, tmp_path,
                                                                                      local_ray, monkeypatch):
    """trial_00001 raises at every evaluation from 10 on; one retry resumes it at 10 and it fails again at 15.
    The sweep still ends (every trial finished or failed for good): listed, with its error, charged 15 steps."""
    monkeypatch.setenv("GPT_RL_TEST_SWEEP_FAIL_AT", "10:trial_00001")
    out, results = sweep_run(tmp_path, prepared_data_dir, "random", "--trials", 2, "--max_failures", 1)
    rows = {t["trial"]: t for t in results["trials"]}
    assert rows["trial_00000"]["status"] == "finished" and rows["trial_00000"]["steps"] == 20
    failed = rows["trial_00001"]
    assert failed["status"] == "failed" and failed["full_val_loss"] is None
    assert failed["error"].endswith("injected failure at iter 15") and results["failed"] == {
        "trial_00001": failed["error"]}
    assert failed["steps"] == 15 and results["steps"] == 35  # what it spent, charged to the search
    assert results["best"]["trial"] == "trial_00000"
    assert "injected failure at iter 15" in (out / "random" / "results.md").read_text()


def test_an_interrupted_sweep_continues_with_the_same_command(prepared_data_dir, tmp_path):
    """SIGINT once the first trial has finished: exit 130, one line saying how to continue, nothing
    summarised. The same command again: exit 0, four finished trials, the first one's results untouched."""
    import signal
    import time
    out = tmp_path / "S"
    command = [sys.executable, str(ROOT / "sweep.py"), "--method", "random", "--trials", "4", "--profile", "smoke",
               "--datasets", "shakespeare_char", "--set", "max_iters=60,eval_interval=10", "--out_dir", str(out),
               "--data_dir", str(prepared_data_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.glob("random/trial_*/final_info.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    first = sorted(out.glob("random/trial_*/final_info.json"))[0]
    before = (first.read_bytes(), first.stat().st_mtime_ns)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted: ") and "same command" in err.splitlines()[-1]
    assert not (out / "random" / "results.json").exists()  # a partial sweep is never summarised
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    results = json.loads((out / "random" / "results.json").read_text())
    assert [t["status"] for t in results["trials"]] == ["finished"] * 4
    assert (first.read_bytes(), first.stat().st_mtime_ns) == before  # kept, not run again


def test_a_sweep_folder_is_continued_only_by_the_same_sweep(tmp_path):
    """A re-run continues the sweep it finds only with the settings it was started with; trials without Ray's
    state, or a finished sweep, are never run over."""
    folder = tmp_path / "random"
    args = sweep.SweepArgs(method="random", trials=4, out_dir=str(tmp_path))
    sweep.claim_folder(args, folder, restorable=False)
    assert json.loads((folder / sweep.SWEEP_FILE).read_text())["trials"] == 4
    sweep.claim_folder(args, folder, restorable=True)  # the same command: continued
    with pytest.raises(ex.UserError, match="started with --trials 4: re-run that command"):
        sweep.claim_folder(sweep.SweepArgs(method="random", trials=5, out_dir=str(tmp_path)), folder, True)
    (folder / "trial_00000").mkdir()
    with pytest.raises(ex.UserError, match="no state to continue"):
        sweep.claim_folder(args, folder, restorable=False)
    (folder / "results.json").write_text("{}")
    with pytest.raises(ex.UserError, match="already holds a finished random sweep"):
        sweep.claim_folder(args, folder, restorable=True)


@pytest.mark.parametrize("bad", [
    ["--space", "momentum=0.1:0.9"],
    ["--space", "learning_rate=1e-2:1e-4"],
    ["--space", "learning_rate=0:1e-2:log"],
    ["--space", "learning_rate=abc"],
    ["--space", "missing.json"],
    ["--method", "grid", "--trials", "3", "--space", "warmup_iters=1:2:lin"],
    ["--method", "pbt", "--trials", "2", "--space", "warmup_iters=1:5"],
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
