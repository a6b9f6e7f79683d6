"""One run on several processes (torchrun + DistributedDataParallel, gloo on the CPU): the same contract,
gradients averaged as one process accumulating them would, the agent's decisions on every rank, kills
survived. Each test launches `python -m torch.distributed.run --standalone --nproc_per_node=2`."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import experiment as ex
from harness.records import world_record
from conftest import ROOT, run_cli
from distributed_gradients import fixed_batches, gradient_config
from test_reliability import EVALUATED, comparable

CONTRACT_KEYS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")


def torchrun_command(script, args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *map(str, args)]


def torchrun_env():
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets by itself (it also prints a banner saying so)
    return env


def torchrun(args, script=ROOT / "experiment.py", timeout=300):
    return subprocess.run(torchrun_command(script, args), env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)


def smoke(out_dir, data_dir, *extra):
    return ["--out_dir", out_dir, "--profile", "smoke", "--data_dir", data_dir, "--datasets", "shakespeare_char",
            "--inference_samples", "1", *extra]


@pytest.fixture(scope="module")
def ddp_run(prepared_data_dir, tmp_path_factory):
    """The issue's command, with two seeds (so stderrs exist) and the random control acting at every evaluation."""
    out = tmp_path_factory.mktemp("ddp") / "run_0"
    proc = torchrun(smoke(out, prepared_data_dir, "--agent", "random", "--seeds", "2"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_a_two_process_run_writes_the_contract_once(ddp_run):
    out, proc = ddp_run
    final_info = json.loads((out / "final_info.json").read_text())["shakespeare_char"]
    for key in CONTRACT_KEYS:
        assert len(final_info["final_info_dict"][key]) == 2
        assert final_info["stderrs"][f"{key}_stderr"] is not None
    assert final_info["seeds"] == [1337, 1338] and final_info["statuses"] == ["finished", "finished"]
    names = {p.name for p in out.iterdir()}
    assert {"all_results.npy", "run.json", "final_info_shakespeare_char_0.json",
            "final_info_shakespeare_char_1.json"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith("ckpt_")]
    notes = (out.parent / "notes.txt").read_text()
    assert notes.count("## Run 0") == 1, "only rank 0 writes the notebook"
    assert proc.stdout.count("profile smoke") == 1, "only rank 0 reports"
    import plot  # reads a two-process run as any other (its extra rank_lr_info records included)
    figures = out.parent / "figures"
    assert plot.main([str(out.parent), "--out_dir", str(figures)]) == 0
    assert list(figures.glob("*.png"))


def test_run_json_records_the_processes_and_the_global_batch(ddp_run):
    out, _ = ddp_run
    record = json.loads((out / "run.json").read_text())["distributed"]
    # smoke: batch 8 x block 32, gradient_accumulation_steps 1 -> each rank one micro-batch: 2 x 8 sequences
    assert record == {"world_size": 2, "backend": "gloo", "global_batch": {"shakespeare_char": {
        "micro_steps_per_rank": 1, "sequences": 16, "tokens": 512}}}
    warnings = json.loads((out / "run.json").read_text())["warnings"]["shakespeare_char"]
    assert any("2x one process's batch" in w for w in warnings)


def test_every_rank_used_rank_0s_rate_at_every_logged_step(ddp_run):
    out, _ = ddp_run
    results = json.loads((out / "all_results.json").read_text())
    for seed in (0, 1):
        per_rank = results[f"shakespeare_char_{seed}_rank_lr_info"]
        assert len(per_rank) == 2
        logged = [r["iter"] for r in results[f"shakespeare_char_{seed}_train_info"]]
        assert [r["iter"] for r in per_rank[0]] == logged
        assert per_rank[1] == per_rank[0], "rank 1's optimizer used other rates than rank 0's"
        # ...and those are the agent's: the random control moved them off the plain schedule
        multipliers = [r["multiplier"] for r in results[f"shakespeare_char_{seed}_val_info"]]
        assert len(set(multipliers)) > 1
        for record, used in zip(results[f"shakespeare_char_{seed}_train_info"], per_rank[0]):
            assert used["lr"] == [pytest.approx(record["lr"], rel=1e-12)] * len(used["lr"])
        assert json.loads((out / f"final_info_shakespeare_char_{seed}.json").read_text())["ranks_lr_agree"] is True


def test_two_ranks_one_micro_step_each_give_one_process_two_micro_steps_gradients(prepared_data_dir, tmp_path):
    proc = torchrun([prepared_data_dir, tmp_path], script=ROOT / "tests" / "distributed_gradients.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = gradient_config(str(prepared_data_dir))
    data = ex.load_dataset(cfg, "shakespeare_char")
    run = ex.TrainingRun(cfg, data, 0, ex.Runtime.choose(cfg), checkpoint=None)
    assert run.micro_steps == 2
    batches = iter(fixed_batches(cfg, data))
    run.sampler.next_batch = lambda: next(batches)
    run.accumulate_gradients(0)
    alone = {name: p.grad for name, p in run.model.named_parameters()}
    first_only = ex.TrainingRun(cfg, data, 0, ex.Runtime.choose(cfg), checkpoint=None)
    first_batch = fixed_batches(cfg, data)[0]
    first_only.sampler.next_batch = lambda: first_batch
    first_only.accumulate_gradients(0)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"grads_{rank}.pt", weights_only=True)
        assert set(ddp) == set(alone)
        for name, grad in alone.items():
            torch.testing.assert_close(ddp[name], grad, rtol=1e-5, atol=1e-7, msg=f"rank {rank}: {name}")
        # a rank's own batch alone is not what it ends up with: the exchange happened
        wte = "transformer.wte.weight"
        assert not torch.allclose(ddp[wte], dict(first_only.model.named_parameters())[wte].grad / 2, atol=1e-6)


def test_a_sigterm_to_the_job_checkpoints_and_resume_finishes_it_as_if_uninterrupted(prepared_data_dir, tmp_path):
    args = ["--agent", "random", "--max_iters", "3000", "--lr_decay_iters", "3000", "--eval_interval", "100",
            "--log_interval", "10"]
    interrupted = tmp_path / "interrupted"
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen(torchrun_command(ROOT / "experiment.py", smoke(interrupted, prepared_data_dir, *args)),
                                env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=err, text=True)
    deadline = time.time() + 120
    while not any(int(m[2]) >= 200 for m in EVALUATED.finditer(log.read_text())):
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to every worker
    proc.wait(timeout=60)
    record = json.loads((interrupted / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"], log.read_text()
    assert (interrupted / "ckpt_shakespeare_char_0.pt").exists()
    assert not (interrupted / "final_info.json").exists()
    stopped_at = torch.load(interrupted / "ckpt_shakespeare_char_0.pt", weights_only=True)
    assert len(stopped_at["rank_rng"]) == 2, "every rank's RNG streams are kept"
    assert json.loads(stopped_at["meta"])["state"]["next_it"] < 3000

    # one process cannot continue what two began
    refused = run_cli(["--out_dir", interrupted, "--resume"])
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0
    assert "world size 2" in refused.stderr and "world size 1" in refused.stderr

    resumed = torchrun(["--out_dir", interrupted, "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at iter" in resumed.stderr
    uninterrupted = tmp_path / "uninterrupted"
    reference = torchrun(smoke(uninterrupted, prepared_data_dir, *args))
    assert reference.returncode == 0, reference.stderr
    # Bit for bit, but for the rates each process saw itself use: the resumed processes saw only their part.
    def trained(run_dir):
        losses, logs, agents = comparable(run_dir)
        return losses, {k: v for k, v in logs.items() if not k.endswith("_rank_lr_info")}, agents
    assert trained(interrupted) == trained(uninterrupted)
    after_resume = json.loads((interrupted / "all_results.json").read_text())["shakespeare_char_0_rank_lr_info"]
    assert after_resume[0] == after_resume[1] and after_resume[0][0]["iter"] > 0


def test_a_divergence_rolls_every_rank_back_together(prepared_data_dir, tmp_path):
    out = tmp_path / "fault"
    proc = subprocess.run(torchrun_command(ROOT / "experiment.py", smoke(out, prepared_data_dir, "--agent", "random")),
                          env={**torchrun_env(), "GPT_RL_TEST_NAN_AT": "15"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("rollback 1/3 to iter 10") == 1, "rank 0 alone reports it"
    info = json.loads((out / "final_info_shakespeare_char_0.json").read_text())
    assert info["status"] == "finished" and info["rollbacks"] == 1 and info["ranks_lr_agree"] is True
    results = json.loads((out / "all_results.json").read_text())
    per_rank = results["shakespeare_char_0_rank_lr_info"]
    assert per_rank[0] == per_rank[1]
    assert [r["iter"] for r in per_rank[0]].count(15) == 2, "step 15 taken twice by every rank: before and after"
    record = next(r for r in results["shakespeare_char_0_val_info"] if r["iter"] == 10)
    assert record["rollbacks"] == 1
    replayed = [r["lr"][0] for r in per_rank[0] if r["iter"] == 15]
    assert replayed[1] == pytest.approx(replayed[0] * 0.5, rel=1e-9), "the cut applies on every rank"


def test_a_refusal_under_torchrun_is_one_line_from_rank_0(prepared_data_dir, tmp_path):
    proc = torchrun(smoke(tmp_path / "r", prepared_data_dir, "--gradient_accumulation_steps", "3"))
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert ours == ["error: --gradient_accumulation_steps 3 cannot be divided among 2 processes: use a multiple of 2"]
    assert not (tmp_path / "r").exists(), "nothing is written"


# --- in one process: the rules, without a process group ---

def test_accumulation_is_divided_among_the_ranks():
    assert ex.World().micro_steps(4) == 4
    assert ex.World(size=2).micro_steps(4) == 2
    assert ex.World(size=4).micro_steps(1) == 1  # at least one each: the global batch grows (a warning says so)
    cfg = ex.Config(gradient_accumulation_steps=4, batch_size=8, block_size=32)
    assert world_record({"d": cfg}, ex.World(size=2, backend="gloo"))["global_batch"]["d"] == {
        "micro_steps_per_rank": 2, "sequences": 32, "tokens": 1024}
    assert world_record({"d": cfg}, ex.World())["global_batch"]["d"]["sequences"] == 32
    assert ex.world_warnings(cfg, ex.World(size=2)) == []
    assert ex.world_warnings(ex.Config(gradient_accumulation_steps=1), ex.World(size=2))
    with pytest.raises(ex.UserError, match="cannot be divided among 2 processes"):
        ex.check_world(ex.Config(gradient_accumulation_steps=3), ex.World(size=2))


def test_nccl_without_cuda_is_refused_before_joining(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ex.UserError, match="--backend nccl needs CUDA"):
        ex.World.from_environment(ex.Config(backend="nccl"))
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not ex.World.from_environment(ex.Config(backend="nccl")).distributed  # one process: no group at all


def test_a_repeated_signal_within_the_grace_is_the_launcher_forwarding_it():
    stop = ex.StopRequest(repeat_grace_s=60.0)
    stop(signal.SIGINT, None)
    stop(signal.SIGINT, None)  # the terminal's Ctrl-C, then torchrun's copy of it: still a clean stop
    assert stop.signal_name == "SIGINT"
    impatient = ex.StopRequest()
    impatient(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        impatient(signal.SIGINT, None)
