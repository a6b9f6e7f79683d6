"""One run on several processes (torchrun + DistributedDataParallel, gloo on the CPU): the same contract,
gradients averaged as one process accumulating them would, the agent's decisions on every rank, kills
survived, a failure on any rank ending every rank, several nodes. Each test launches
`python -m torch.distributed.run --standalone --nproc_per_node=2` (or two one-process nodes on localhost)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import experiment as ex
from harness.distributed import EvaluationStopped, JobStore, RankFailed, World, collective_timeout_s, describe
from harness.records import resume_configs, settings_of_run, world_record
from harness.runtime import FaultInjector
from conftest import ROOT, run_cli
from distributed_gradients import fixed_batches, gradient_config
from test_reliability import EVALUATED, comparable

CONTRACT_KEYS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")


def torchrun_command(script, args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(script), *map(str, args)]


def trained(run_dir):
    """What an interrupted-and-resumed run shares bit for bit with an uninterrupted one: everything but the rates
    each process saw itself use (the resumed processes saw only their part)."""
    losses, logs, agents = comparable(run_dir)
    return losses, {k: v for k, v in logs.items() if not k.endswith("_rank_lr_info")}, agents


def torchrun_env():
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    env["OMP_NUM_THREADS"] = "1"  # what torchrun sets by itself (it also prints a banner saying so)
    return env


def torchrun(args, script=ROOT / "experiment.py", timeout=300):
    return subprocess.run(torchrun_command(script, args), env=torchrun_env(), capture_output=True, text=True,
                          timeout=timeout)


def smoke(out_dir, data_dir, *extra):
    """The smoke profile on 2 processes, each taking one of the 2 micro-batches of one process's global batch."""
    return ["--out_dir", out_dir, "--profile", "smoke", "--data_dir", data_dir, "--datasets", "shakespeare_char",
            "--inference_samples", "1", "--gradient_accumulation_steps", "2", *extra]


def resumed_equals_uninterrupted(folder, tmp_path, data_dir, args, resumed_at: str):
    """`--resume` finishes the run in folder, and it then holds what the same run without a stop trains;
    returns the uninterrupted run's folder."""
    resumed = torchrun(["--out_dir", folder, "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert resumed_at in resumed.stderr
    uninterrupted = tmp_path / "uninterrupted"
    reference = torchrun(smoke(uninterrupted, data_dir, *args))
    assert reference.returncode == 0, reference.stderr
    assert trained(folder) == trained(uninterrupted)
    return uninterrupted


def error_lines(stderr):
    """Our own `error:` lines (torchrun adds its failure summary, which never starts so)."""
    return [line for line in stderr.splitlines() if line.startswith(("error:", "interrupted:"))]


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


def test_run_json_records_the_processes_and_one_processs_global_batch(ddp_run):
    out, _ = ddp_run
    record = json.loads((out / "run.json").read_text())["distributed"]
    # smoke: batch 8 x block 32, gradient_accumulation_steps 2 shared by 2 ranks: 2 x 8 sequences, as one process
    assert record == {"world_size": 2, "backend": "gloo", "batch_grows_with_world": False, "global_batch": {
        "shakespeare_char": {"micro_steps_per_rank": 1, "micro_batch_per_rank": 8, "sequences": 16,
                             "tokens": 512}}}
    warnings = json.loads((out / "run.json").read_text())["warnings"].get("shakespeare_char", [])
    assert not any("batch" in w for w in warnings)


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

    resumed_equals_uninterrupted(interrupted, tmp_path, prepared_data_dir, args, "resuming at iter")
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


def test_the_default_one_micro_batch_on_two_processes_keeps_one_processs_global_batch(prepared_data_dir, tmp_path):
    run = smoke(tmp_path / "r", prepared_data_dir, "--max_iters", "10")
    i = run.index("--gradient_accumulation_steps")
    proc = torchrun(run[:i] + run[i + 2:])  # the profile's 1 micro-batch of 8 sequences: 4 on each rank
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["distributed"]["global_batch"]["shakespeare_char"] == {
        "micro_steps_per_rank": 1, "micro_batch_per_rank": 4, "sequences": 8, "tokens": 256}


def test_a_global_batch_the_processes_cannot_share_is_refused_in_one_line_naming_the_fix(prepared_data_dir,
                                                                                         tmp_path):
    run = smoke(tmp_path / "r", prepared_data_dir)
    i = run.index("--gradient_accumulation_steps")
    proc = torchrun(run[:i] + run[i + 2:] + ["--batch_size", "3"])
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "error: a global batch of 3 sequences (--batch_size 3 x --gradient_accumulation_steps 1) cannot be shared "
        "among 2 processes: make it a multiple of 2, or --batch_grows_with_world to give every process all of it "
        "(2x the batch)"]
    assert "exitcode  : 2" in proc.stderr, "the workers' exit code (torchrun's own is 1)"
    assert not (tmp_path / "r").exists(), "nothing is written"


def test_a_batch_that_grows_with_the_world_is_asked_for_and_recorded(prepared_data_dir, tmp_path):
    out = tmp_path / "grown"
    proc = torchrun(smoke(out, prepared_data_dir, "--batch_grows_with_world", "--max_iters", "10"))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "run.json").read_text())
    # each of 2 ranks takes both micro-batches of 8 sequences: twice one process's global batch
    assert record["distributed"]["batch_grows_with_world"] is True
    assert record["distributed"]["global_batch"]["shakespeare_char"] == {
        "micro_steps_per_rank": 2, "micro_batch_per_rank": 8, "sequences": 32, "tokens": 1024}
    assert record["configs"]["shakespeare_char"]["batch_grows_with_world"] is True
    assert any("2x one process's global batch" in w for w in record["warnings"]["shakespeare_char"])


# --- a failure on any rank ends every rank, in one line naming it; resume finishes the run (issue 28) ---

FAILING = ["--max_iters", "60", "--lr_decay_iters", "60", "--eval_interval", "10", "--log_interval", "5"]


def torchrun_failing_at(spec, out_dir, data_dir):
    """The run, with GPT_RL_TEST_RAISE_AT=spec ("RANK:STEP"); the subprocess timeout is the test's only clock."""
    return subprocess.run(torchrun_command(ROOT / "experiment.py", smoke(out_dir, data_dir, *FAILING)),
                          env={**torchrun_env(), "GPT_RL_TEST_RAISE_AT": spec}, capture_output=True, text=True,
                          timeout=240)


def test_an_exception_on_rank_1_ends_every_rank_in_one_line_and_resume_finishes_as_if_uninterrupted(
        prepared_data_dir, tmp_path):
    failed = tmp_path / "failed"
    proc = torchrun_failing_at("1:35", failed, prepared_data_dir)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "error: rank 1 failed: RuntimeError: GPT_RL_TEST_RAISE_AT: the test failure at iter 35"], proc.stderr
    assert f'File "{ROOT / "experiment.py"}"' not in proc.stderr, "no worker's traceback (torchrun's is its own)"
    record = json.loads((failed / "run.json").read_text())
    assert record["status"] == "failed" and "rank 1 failed: RuntimeError" in record["error"]
    checkpoint = torch.load(failed / "ckpt_shakespeare_char_0.pt", weights_only=True)
    assert json.loads(checkpoint["meta"])["state"]["next_it"] == 30, "the last checkpoint before step 35, intact"
    assert not (failed / "final_info.json").exists()

    # the run resumes where it ran: a flag asking for another device is refused before anything starts
    refused = torchrun(["--out_dir", failed, "--resume", "--device", "cuda"])
    assert refused.returncode != 0
    assert error_lines(refused.stderr) == [
        f"error: --resume: {failed} trained with --device cpu, this command asks for --device cuda: drop --device "
        f"(a run resumes on the device and backend it ran on)"]

    uninterrupted = resumed_equals_uninterrupted(failed, tmp_path, prepared_data_dir, FAILING, "resuming at iter 30")
    full_val = [json.loads((d / "final_info_shakespeare_char_0.json").read_text())["full_val_loss"]
                for d in (failed, uninterrupted)]
    assert full_val[0] == full_val[1]


def test_an_exception_on_rank_0_ends_rank_1_too(prepared_data_dir, tmp_path):
    failed = tmp_path / "failed"
    proc = torchrun_failing_at("0:12", failed, prepared_data_dir)
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        "error: rank 0 failed: RuntimeError: GPT_RL_TEST_RAISE_AT: the test failure at iter 12"], proc.stderr
    assert json.loads((failed / "run.json").read_text())["status"] == "failed"
    checkpoint = torch.load(failed / "ckpt_shakespeare_char_0.pt", weights_only=True)
    assert json.loads(checkpoint["meta"])["state"]["next_it"] == 10


def test_a_sigterm_during_a_long_evaluation_checkpoints_without_waiting_for_its_end(prepared_data_dir, tmp_path):
    out = tmp_path / "long_evaluation"
    # 200,000 batches per split: the evaluation at iter 0 outlasts torchrun's 30 s between SIGTERM and SIGKILL
    args = smoke(out, prepared_data_dir, "--eval_iters", "200000", "--max_iters", "20")
    stdout = tmp_path / "stdout.txt"
    with open(stdout, "w") as log:
        proc = subprocess.Popen(torchrun_command(ROOT / "experiment.py", args), env=torchrun_env(), stdout=log,
                                stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 180
    while "profile smoke" not in stdout.read_text():  # training (its first evaluation) begins
        assert proc.poll() is None and time.time() < deadline, stdout.read_text()
        time.sleep(0.1)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=180)
    # a worker killed at the end of the grace period would have left run.json "running" and no checkpoint
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    state = json.loads(torch.load(out / "ckpt_shakespeare_char_0.pt", weights_only=True)["meta"])["state"]
    assert (state["next_it"], state["last_eval_it"]) == (0, -1), "stopped inside the evaluation at iter 0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_localhost_train_one_run_on_data_they_prepare_under_a_lock(source_dir, tmp_path):
    """Two one-process "nodes" joined by a c10d rendezvous; both find the data missing and prepare it at once."""
    port, out, data = free_port(), tmp_path / "two_nodes", tmp_path / "data"
    args = ["--out_dir", out, "--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir", data,
            "--source_dir", source_dir, "--gradient_accumulation_steps", "2", "--max_iters", "20"]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "i28",
                               "--node_rank", str(node), str(ROOT / "experiment.py"), *map(str, args)],
                              env=torchrun_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    ended = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], ended
    record = json.loads((out / "run.json").read_text())
    assert record["distributed"]["world_size"] == 2
    assert (data / ".shakespeare_char.lock").exists()
    assert json.loads((data / "shakespeare_char" / "meta.json").read_text())["vocab_size"] == 65
    files = [p.name for p in (data / "shakespeare_char").iterdir()]
    assert not [name for name in files if "tmp" in name], "no preparation was left half-done by the other"


# --- in one process: the rules, without a process group ---

def test_the_raise_hook_raises_on_its_rank_at_its_step_only():
    FaultInjector("", "1:35", rank=1).raise_if_due(34)
    with pytest.raises(RuntimeError, match="GPT_RL_TEST_RAISE_AT: the test failure at iter 35"):
        FaultInjector("", "1:35", rank=1).raise_if_due(35)
    FaultInjector("", "1:35", rank=0).raise_if_due(35)
    with pytest.raises(ex.UserError, match="RANK:STEP"):
        FaultInjector("", "35", rank=0)


def test_a_rank_names_its_own_failure_in_one_line():
    failure = World(rank=1, size=2).explain(OSError(28, "No space left on device", "/runs/ckpt.pt"))
    assert isinstance(failure, RankFailed) and failure.exit_code == 1
    assert str(failure) == "rank 1 failed: OSError: No space left on device: /runs/ckpt.pt"
    assert describe(RuntimeError("[gloo/pair.cc:534] Connection closed by peer\nmore")) == \
        "RuntimeError: [gloo/pair.cc:534] Connection closed by peer"
    with pytest.raises(ValueError):  # in one process an exception stays what it is
        with World().failures_shared():
            raise ValueError("a bug")
    with pytest.raises(RankFailed, match="rank 1 failed: ValueError: a bug"):
        with World(rank=1, size=2).failures_shared():
            raise ValueError("a bug")
    with pytest.raises(ex.UserError):  # raised on every rank alike: left as it is
        with World(rank=1, size=2).failures_shared():
            raise ex.UserError("a bad flag")


def test_the_first_failure_posted_is_the_one_every_rank_names(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # no launcher: rank 0 hosts the store
    rank_0, rank_1 = JobStore(0, 2, timeout_s=30), JobStore(1, 2, timeout_s=30)
    assert rank_0.failure() is None
    failing = World(rank=1, size=2, store=rank_1).explain(RuntimeError("GPT_RL_TEST_RAISE_AT: boom"))
    assert (failing.rank, failing.error) == (1, "RuntimeError: GPT_RL_TEST_RAISE_AT: boom")
    # rank 0's collective then breaks: it names rank 1's failure, not its own echo of it
    echo = World(rank=0, size=2, store=rank_0).explain(RuntimeError("[pair.cc:534] Connection closed by peer"))
    assert str(echo) == "rank 1 failed: RuntimeError: GPT_RL_TEST_RAISE_AT: boom"
    assert rank_0.failure() == rank_1.failure() == (1, "RuntimeError: GPT_RL_TEST_RAISE_AT: boom")
    # what rank 0 alone can read (a resumed run's settings), every rank learns; its refusal is every rank's
    assert rank_0.share(0, "settings", lambda: {"device": "cpu"}) == rank_1.share(1, "settings", dict) == \
        {"device": "cpu"}
    with pytest.raises(ex.UserError, match="no run.json"):
        rank_0.share(0, "refused", lambda: (_ for _ in ()).throw(ex.UserError("no run.json")))
    with pytest.raises(ex.UserError, match="no run.json"):
        rank_1.share(1, "refused", dict)


def test_several_processes_without_torchrun_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ex.UserError, match="launch the job with torchrun"):
        World.from_environment(ex.Config(backend="gloo"))


def test_the_collective_timeout_is_bounded_and_checked(monkeypatch):
    monkeypatch.delenv("GPT_RL_COLLECTIVE_TIMEOUT_S", raising=False)
    assert 0 < collective_timeout_s() <= 3600
    monkeypatch.setenv("GPT_RL_COLLECTIVE_TIMEOUT_S", "90")
    assert collective_timeout_s() == 90
    for bad in ("soon", "0", "nan"):
        monkeypatch.setenv("GPT_RL_COLLECTIVE_TIMEOUT_S", bad)
        with pytest.raises(ex.UserError, match="GPT_RL_COLLECTIVE_TIMEOUT_S must be a number of seconds"):
            collective_timeout_s()


def test_resume_takes_the_device_and_backend_from_the_run(tmp_path):
    cfg = ex.Config(device="auto")
    record = {"configs": {"shakespeare_char": ex.dataclasses.asdict(cfg)}, "device": {"type": "cuda"},
              "distributed": {"world_size": 2, "backend": "nccl"}}
    assert settings_of_run(tmp_path, record, "auto", "auto") == {"device": "cuda", "backend": "nccl"}
    assert settings_of_run(tmp_path, record, "cuda", "nccl") == {"device": "cuda", "backend": "nccl"}
    with pytest.raises(ex.UserError, match="trained with --device cuda, this command asks for --device cpu"):
        settings_of_run(tmp_path, record, "cpu", "auto")
    with pytest.raises(ex.UserError, match="trained with --backend nccl, this command asks for --backend gloo"):
        settings_of_run(tmp_path, record, "auto", "gloo")
    # --device auto resumes on the device the run ran on, not on what this machine would choose now
    configs = resume_configs(tmp_path, record, {}, ex.Config, ex.dataset_dir)
    assert configs["shakespeare_char"].device == "cuda"


def test_a_shard_gives_each_rank_every_size_th_item_and_asks_stop_at_the_same_rounds():
    assert list(World(rank=0, size=2).shard(range(5))) == [0, 2, 4]
    assert list(World(rank=1, size=2).shard(range(5))) == [1, 3]  # (rank 1 has no item in the last round)
    asked = {0: 0, 1: 0}

    def counting(rank):
        def stop():
            asked[rank] += 1
            return False
        return stop
    for rank in (0, 1):
        list(World(rank=rank, size=2).shard(range(5), counting(rank), every=1))
    assert asked == {0: 3, 1: 3}, "every rank asks at every round, items or not: the collective lines up"
    taken, calls = [], []
    with pytest.raises(EvaluationStopped):
        for item in World().shard(range(20), lambda: calls.append(1) or len(calls) == 2, every=8):
            taken.append(item)
    assert taken == list(range(8)), "asked before the first item and before the ninth, where it said stop"

def test_accumulation_is_divided_among_the_ranks_so_the_global_batch_is_one_processs():
    cfg = ex.Config(gradient_accumulation_steps=4, batch_size=8, block_size=32)
    assert ex.World().batch_split(cfg) == (4, 8)
    assert ex.World(size=2).batch_split(cfg) == (2, 8)
    assert world_record({"d": cfg}, ex.World(size=2, backend="gloo"))["global_batch"]["d"] == {
        "micro_steps_per_rank": 2, "micro_batch_per_rank": 8, "sequences": 32, "tokens": 1024}
    assert world_record({"d": cfg}, ex.World())["global_batch"]["d"]["sequences"] == 32
    assert ex.world_warnings(cfg, ex.World(size=2)) == []
    ex.check_world(cfg, ex.World(size=4))
    # a count that does not divide: the sequences are shared instead, the global batch stays one process's
    for accumulation, size, split in ((1, 2, (1, 4)), (3, 2, (2, 6)), (3, 4, (1, 6)), (2, 8, (1, 2))):
        c = ex.Config(gradient_accumulation_steps=accumulation, batch_size=8)
        ex.check_world(c, ex.World(size=size))
        steps, micro_batch = ex.World(size=size).batch_split(c)
        assert (steps, micro_batch) == split and steps * micro_batch * size == 8 * accumulation
    with pytest.raises(ex.UserError, match="cannot be shared among 2 processes.*--batch_grows_with_world"):
        ex.check_world(ex.Config(gradient_accumulation_steps=3, batch_size=3), ex.World(size=2))
    ex.check_world(ex.Config(gradient_accumulation_steps=3, batch_size=3), ex.World())  # one process: anything goes


def test_growing_the_batch_with_the_world_takes_the_flag_and_is_recorded():
    cfg = ex.Config(gradient_accumulation_steps=1, batch_size=8, block_size=32, batch_grows_with_world=True)
    ex.check_world(cfg, ex.World(size=2))
    assert ex.World(size=2).batch_split(cfg) == (1, 8)
    record = world_record({"d": cfg}, ex.World(size=2, backend="gloo"))
    assert record["batch_grows_with_world"] is True
    assert record["global_batch"]["d"] == {"micro_steps_per_rank": 1, "micro_batch_per_rank": 8, "sequences": 16,
                                           "tokens": 512}
    assert any("2x one process's global batch" in w for w in ex.world_warnings(cfg, ex.World(size=2)))
    assert ex.world_warnings(cfg, ex.World()) == []


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


WATCH_ENDS_RANK_0 = """
import sys, time
sys.path.insert(0, {root!r})
from harness.distributed import FailureWatch, World

class PostedFailure:  # torchrun's store, with rank 1's failure posted
    def another_connection(self):
        return None
    def failure(self, connection):
        return (1, "RuntimeError: boom")

world = World(rank=0, size=2)
world.on_abort = lambda line: open({record!r}, "w").write(line)
FailureWatch(world, PostedFailure(), poll_s=0.01, grace_s=0.2).start()
time.sleep(30)  # rank 0 stuck in a collective that never returns
print("not ended")
"""


def test_the_failure_watch_ends_a_stuck_rank_0_after_letting_the_run_record_it(tmp_path):
    record = tmp_path / "ending.txt"
    proc = subprocess.run([sys.executable, "-c", WATCH_ENDS_RANK_0.format(root=str(ROOT), record=str(record))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "not ended" not in proc.stdout
    assert proc.stderr.strip() == "error: rank 1 failed: RuntimeError: boom (rank 0 did not end by itself within " \
                                  "0.2 s)"
    assert record.read_text() == "rank 1 failed: RuntimeError: boom (rank 0 did not end by itself within 0.2 s)"
