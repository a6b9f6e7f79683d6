"""A kill, a full disk or a diverging agent costs minutes, never results."""
import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import experiment as ex
from harness import files
from conftest import ROOT, run_cli

LOSS_KEYS = ("final_train_loss", "best_val_loss", "final_val_loss", "best_val_iter", "rollbacks")


def args_for(out_dir, data_dir, *extra):
    return [str(a) for a in ("--out_dir", out_dir, "--profile", "smoke", "--data_dir", data_dir,
                             "--datasets", "shakespeare_char", "--inference_samples", "1", *extra)]


def comparable(run_dir):
    """What must be bit-identical between an interrupted-and-resumed run and an uninterrupted one."""
    info = json.loads((run_dir / "final_info.json").read_text())
    results = json.loads((run_dir / "all_results.json").read_text())
    losses = {d: {k: v["final_info_dict"][k] for k in LOSS_KEYS} for d, v in info.items()}
    logs = {k: ([{f: r[f] for f in r if f != "time"} for r in v] if k.endswith("_train_info") else v)
            for k, v in results.items() if not k.endswith("_final_info")}
    agents = {p.name: {k: v for k, v in json.loads(p.read_text()).items()} for p in run_dir.glob("agent_*.json")}
    return losses, logs, agents


def checksums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def start(args, env_extra=None, stderr=subprocess.PIPE):
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, str(ROOT / "experiment.py"), *args], env=env,
                            stdout=subprocess.PIPE if stderr == subprocess.PIPE else subprocess.DEVNULL,
                            stderr=stderr, text=True)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.02)
    return True


# --- kill and resume ---

# With stderr not a terminal, each evaluation prints "[<dataset> seed <i>] iter <N>: train ... val ..." and
# then checkpoints; a restarted seed prints "[<dataset> seed <i>] resuming at iter <N>".
EVALUATED = re.compile(r"\[shakespeare_char seed (\d+)\] iter (\d+): train ")
RESUMING = re.compile(r"^\[shakespeare_char seed (\d+)\] resuming at iter (\d+)$", re.M)


def wait_for_evaluation(proc, log, at_least, timeout=60):
    """(seed, iter) of the first evaluation line in the stderr file `log` at or past (seed, iter) `at_least`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        exited = proc.poll() is not None
        for m in EVALUATED.finditer(log.read_text()):
            if (int(m[1]), int(m[2])) >= at_least:
                return int(m[1]), int(m[2])
        if exited:
            pytest.fail(f"exited with {proc.returncode} before evaluating {at_least}:\n{log.read_text()}")
        time.sleep(0.002)
    pytest.fail(f"no evaluation at or past {at_least} within {timeout} s:\n{log.read_text()}")


@pytest.mark.parametrize("agent", ["random", "qlearning"])
def test_sigkill_mid_training_on_every_seed_then_resume_equals_an_uninterrupted_run(prepared_data_dir, tmp_path,
                                                                                     agent):
    interval, seeds = 10, 2
    extra = ["--agent", agent, "--agent_actions", "0.5,1,2", "--epsilon", "0.5", "--max_iters", "60",
             "--eval_interval", str(interval), "--seeds", str(seeds)]
    reference = tmp_path / "reference"
    assert run_cli(args_for(reference, prepared_data_dir, *extra)).returncode == 0

    # Kill each seed twice, each time after a later evaluation than the kill before: (seed, iter) in training
    # order, never the last evaluation (60), so every kill lands while a seed is still training.
    rng = random.Random(agent)
    plan = sorted((seed, it) for seed in range(seeds) for it in rng.sample(range(20, 60, interval), 2))
    out = tmp_path / "killed"
    args = args_for(out, prepared_data_dir, *extra)
    kills, resumed = [], []  # (seed, iter): the evaluation each killed process had passed; where each restart began
    for n, target in enumerate([*plan, None]):
        log = tmp_path / f"stderr_{n}.txt"
        with open(log, "w") as err:
            proc = start(args, stderr=err)
        if target is None:
            break
        seed, it = wait_for_evaluation(proc, log, target)
        time.sleep(rng.uniform(0.0, 0.02))  # somewhere in the checkpoint write or the training steps after it
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / f"final_info_shakespeare_char_{seed}.json").exists()  # the seed had not finished
        kills.append((seed, it))
        args = args_for(out, prepared_data_dir, "--resume")
    assert proc.wait(timeout=120) == 0, log.read_text()
    for n in range(1, len(kills) + 1):
        found = RESUMING.findall((tmp_path / f"stderr_{n}.txt").read_text())
        assert len(found) == 1, (tmp_path / f"stderr_{n}.txt").read_text()
        resumed.append((int(found[0][0]), int(found[0][1])))

    assert kills == plan  # every planned kill happened, at the planned point
    assert len({seed for seed, _ in kills}) == seeds and kills == sorted(set(kills))  # every seed, always further on
    for (seed, it), (resumed_seed, resumed_it) in zip(kills, resumed):
        # The restart picked up the killed seed from its checkpoint at that evaluation or the one before
        # (a kill during the checkpoint write): the kill landed in that seed's training, past `it - interval`.
        assert resumed_seed == seed and it - interval <= resumed_it <= it
    assert comparable(out) == comparable(reference)
    assert not list(out.glob("ckpt_*")) and not list(out.glob(".*.tmp"))  # nothing left behind


def test_sigterm_checkpoints_exits_cleanly_and_resumes(prepared_data_dir, tmp_path):
    extra = ["--max_iters", "400", "--eval_interval", "50"]
    reference = tmp_path / "reference"
    assert run_cli(args_for(reference, prepared_data_dir, *extra)).returncode == 0
    out = tmp_path / "run"
    proc = start(args_for(out, prepared_data_dir, *extra))
    assert wait_for(out / "ckpt_shakespeare_char_0.pt", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().strip().splitlines()
    assert code == 130 and err[-1].startswith("interrupted: SIGTERM: checkpoint saved at iter")
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    state = torch.load(out / "ckpt_shakespeare_char_0.pt", weights_only=True)  # a safe format
    assert json.loads(state["meta"])["state"]["next_it"] > 0
    assert run_cli(args_for(out, prepared_data_dir, "--resume")).returncode == 0
    assert comparable(out) == comparable(reference)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_resume_refuses_a_different_config_and_names_the_fields(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = start(args_for(out, prepared_data_dir, "--max_iters", "400", "--eval_interval", "50"))
    assert wait_for(out / "ckpt_shakespeare_char_0.pt", proc)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    before = checksums(out)
    result = run_cli(args_for(out, prepared_data_dir, "--resume", "--learning_rate", "3e-3"))
    assert result.returncode == 2 and "learning_rate: 0.001 -> 0.003" in result.stderr
    assert checksums(out) == before


def test_resume_of_a_finished_run_changes_nothing(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(args_for(out, prepared_data_dir)).returncode == 0
    before = checksums(out)
    result = run_cli(["--out_dir", str(out), "--resume"])
    assert result.returncode == 0 and "nothing to resume" in result.stdout
    assert checksums(out) == before


# --- divergence guard ---

def test_one_nan_rolls_back_and_the_run_finishes(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(args_for(out, prepared_data_dir, "--agent", "qlearning"), env_extra={"GPT_RL_TEST_NAN_AT": "12"})
    assert proc.returncode == 0, proc.stderr
    info = json.loads((out / "final_info.json").read_text())["shakespeare_char"]
    assert info["statuses"] == ["finished"] and info["final_info_dict"]["rollbacks"] == [1]
    assert "rollback 1/3" in proc.stderr
    # Where the cut and the penalty go, and what the records say: tests/test_agents.py.


def test_repeated_nan_ends_the_seed_as_diverged_without_nan_numbers(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(args_for(out, prepared_data_dir, "--max_rollbacks", "2"), env_extra={"GPT_RL_TEST_NAN_AT": "12+"})
    assert proc.returncode == 0, proc.stderr
    text = (out / "final_info.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    info = json.loads(text)["shakespeare_char"]
    assert info["statuses"] == ["diverged"] and info["final_info_dict"]["rollbacks"] == [2]
    assert info["final_info_dict"]["best_val_loss"][0] < 4.5


def test_exploding_loss_counts_as_divergence():
    assert ex.is_diverged(float("nan"), 4.0, 2.0) and ex.is_diverged(float("inf"), None, 2.0)
    assert ex.is_diverged(8.5, 4.0, 2.0) and not ex.is_diverged(7.9, 4.0, 2.0)
    assert not ex.is_diverged(100.0, 4.0, 0.0)  # factor 0: only non-finite losses


# --- bad input: exit 2, one line, nothing changed ---

@pytest.fixture(scope="module")
def finished_run(prepared_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run_0"
    assert run_cli(args_for(out, prepared_data_dir)).returncode == 0
    return out


def corrupt_data(prepared_data_dir, tmp_path, how):
    """A copy of the prepared shakespeare_char, damaged in one way."""
    folder = tmp_path / "data" / "shakespeare_char"
    folder.mkdir(parents=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        (folder / name).write_bytes((prepared_data_dir / "shakespeare_char" / name).read_bytes())
    if how == "truncated_bin":
        with open(folder / "val.bin", "r+b") as f:
            f.truncate(1001)
    elif how == "vocab_mismatch":
        meta = json.loads((folder / "meta.json").read_text())
        meta["vocab_size"] = 64
        (folder / "meta.json").write_text(json.dumps(meta))
    elif how == "token_out_of_vocab":
        ids = np.fromfile(folder / "val.bin", dtype=np.uint16)
        ids[7] = 65
        ids.tofile(folder / "val.bin")
    elif how == "garbled_meta":
        (folder / "meta.json").write_text("{not json")
    return tmp_path / "data"


BAD_INPUTS = [
    (["--no_such_flag", "1"], None, "unrecognized arguments"),
    (["--max_iters", "ten"], None, "invalid int value"),
    (["--learning_rate", "-0.001"], None, "--learning_rate must be in (0, inf), got -0.001"),
    (["--block_size", "500000"], None, "--block_size 500000 is larger"),
    (["--eval_interval", "0"], None, "--eval_interval must be in [1, inf), got 0"),
    (["--n_embd", "30", "--n_head", "4"], None, "divisible"),
    (["--datasets", "wikitext"], None, "unknown dataset"),
    (["--agent", "clairvoyant"], None, "invalid choice"),
    (["--schedule", "linear"], None, "invalid choice"),
    (["--agent", "qlearning", "--agent_init", "/nonexistent/agent.json"], None, "--agent_init"),
    ([], "truncated_bin", "val.bin has 1001 bytes"),
    ([], "vocab_mismatch", "meta.json"),
    ([], "token_out_of_vocab", "token id 65"),
    ([], "garbled_meta", "meta.json is missing or corrupt"),
    ([], "missing", "--no-download"),
]


@pytest.mark.parametrize("extra, damage, fragment", BAD_INPUTS, ids=[b[2][:24] for b in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_touches_nothing(finished_run, prepared_data_dir, tmp_path,
                                                              extra, damage, fragment):
    data_dir = prepared_data_dir
    if damage == "missing":
        data_dir = tmp_path / "empty"
    elif damage:
        data_dir = corrupt_data(prepared_data_dir, tmp_path, damage)
    before = checksums(finished_run)
    proc = run_cli(args_for(finished_run, data_dir, "--overwrite", "--no-download", *extra))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and fragment in lines[0]
    assert checksums(finished_run) == before


def test_unreadable_agent_init_file(prepared_data_dir, tmp_path):
    bad = tmp_path / "agent.json"
    bad.write_text("[1, 2")
    proc = run_cli(args_for(tmp_path / "run", prepared_data_dir, "--agent", "qlearning", "--agent_init", bad))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: cannot read --agent_init {bad}")


def test_unwritable_out_dir(prepared_data_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    proc = run_cli(args_for(blocker / "run", prepared_data_dir))
    assert proc.returncode == 2 and "cannot write" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(prepared_data_dir, tmp_path):
    proc = run_cli(args_for(tmp_path / "run", prepared_data_dir, "--eval_interval", "0", "--debug"))
    assert proc.returncode != 0 and "Traceback" in proc.stderr


# --- a full disk ---

def test_disk_full_keeps_earlier_results_and_resume_finishes(prepared_data_dir, tmp_path, monkeypatch, capsys):
    args = args_for(tmp_path / "run", prepared_data_dir, "--seeds", "2")
    reference = tmp_path / "reference"
    assert ex.main(args_for(reference, prepared_data_dir, "--seeds", "2")) == 0
    real_write = files.atomic_write_bytes  # the one atomic writer, which all_results.npy goes through
    writes = {"all_results.npy": 0}

    def failing_write(path, data):
        if path.name == "all_results.npy":
            writes["all_results.npy"] += 1
            if writes["all_results.npy"] == 2:  # the second seed's results: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)
    monkeypatch.setattr(files, "atomic_write_bytes", failing_write)
    out = tmp_path / "run"
    assert ex.main(args) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: No space left on device: {out / 'all_results.npy'}"
    first_seed = json.loads((out / "final_info_shakespeare_char_0.json").read_text())
    results = np.load(out / "all_results.npy", allow_pickle=True).item()  # still the complete first-seed file
    assert set(results) == {f"shakespeare_char_0_{k}" for k in ("final_info", "train_info", "val_info")}
    assert first_seed["best_val_loss"] == results["shakespeare_char_0_final_info"]["best_val_loss"]
    assert not list(out.glob(".*.tmp"))
    monkeypatch.setattr(files, "atomic_write_bytes", real_write)
    assert ex.main(["--out_dir", str(out), "--resume", "--data_dir", str(prepared_data_dir)]) == 0
    assert comparable(out) == comparable(reference)
