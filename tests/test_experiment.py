"""The trainer's contract: run-folder files and their structure, statistics, reproducibility, refusals."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import experiment as ex
from conftest import ROOT, run_cli

CONTRACT_KEYS = ("final_train_loss", "best_val_loss", "total_train_time", "avg_inference_tokens_per_second")
AGENT_FIELDS = ("multiplier", "action", "reward", "epsilon", "state")


def smoke_args(out_dir, data_dir, *extra):
    return [str(a) for a in ("--out_dir", out_dir, "--profile", "smoke", "--data_dir", data_dir, *extra)]


def folder_checksums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def smoke_run(prepared_data_dir, tmp_path_factory):
    """One smoke run on all three datasets, two seeds on shakespeare_char so stderr is defined."""
    out = tmp_path_factory.mktemp("runs") / "run_0"
    proc = run_cli(smoke_args(out, prepared_data_dir, "--seeds", "2", "--description", "smoke test"))
    assert proc.returncode == 0, proc.stderr
    return out


# --- the run folder contract (SPEC §4) ---

def test_smoke_run_writes_every_contract_file(smoke_run):
    names = {p.name for p in smoke_run.iterdir()}
    expected = {"final_info.json", "all_results.npy", "run.json"}
    expected |= {f"final_info_{d}_{s}.json" for d in ex.DATASETS for s in range(2)}
    assert expected <= names
    assert not [n for n in names if n.endswith(".tmp")], "temp files left behind"


def test_final_info_has_means_stderrs_and_per_seed_lists(smoke_run):
    final_info = json.loads((smoke_run / "final_info.json").read_text())
    assert set(final_info) == set(ex.DATASETS)
    for dataset, entry in final_info.items():
        for key in CONTRACT_KEYS:
            values = entry["final_info_dict"][key]
            assert len(values) == 2 and all(math.isfinite(v) for v in values)
            assert entry["means"][f"{key}_mean"] == pytest.approx(np.mean(values))
            assert entry["stderrs"][f"{key}_stderr"] == pytest.approx(np.std(values, ddof=1) / math.sqrt(2))
        assert entry["seeds"] == [1337, 1338]
    # AI-Scientist's perform_experiments.py reads exactly this:
    results = {k: v["means"] for k, v in final_info.items()}
    assert results["text8"]["best_val_loss_mean"] > 0



def test_final_evaluation_reads_at_most_final_eval_tokens(smoke_run):
    final_info = json.loads((smoke_run / "final_info.json").read_text())
    cfg = ex.Config(**json.loads((smoke_run / "run.json").read_text())["configs"]["enwik8"])
    for dataset, entry in final_info.items():
        values = entry["final_info_dict"]["full_val_loss"]
        assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
        assert entry["final_info_dict"]["full_val_tokens"][0] == cfg.final_eval_tokens // cfg.block_size * cfg.block_size
        # enwik8 and text8 have a test split (their standard 90/5/5 split); shakespeare_char does not.
        assert ("test_loss" in entry["final_info_dict"]) == (dataset != "shakespeare_char")


def small_enwik8(prepared_data_dir, data_dir, lengths, changed=()):
    """The prepared enwik8 cut to `lengths` tokens per split; each (split, index) in `changed` gets another token."""
    source, folder = prepared_data_dir / "enwik8", data_dir / "enwik8"
    folder.mkdir(parents=True)
    meta = json.loads((source / "meta.json").read_text())
    for split, n in lengths.items():
        tokens = np.fromfile(source / f"{split}.bin", dtype=np.uint16)[:n].copy()
        for changed_split, index in changed:
            if changed_split == split:
                tokens[index] = (int(tokens[index]) + 1) % meta["vocab_size"]
        tokens.tofile(folder / f"{split}.bin")
        meta["splits"][split] = n
        if "bin_sha256" in meta:
            meta["bin_sha256"][split] = hashlib.sha256(tokens.tobytes()).hexdigest()
    (folder / "meta.json").write_text(json.dumps(meta))
    return data_dir


def test_final_model_is_scored_on_the_whole_val_and_test_split(prepared_data_dir, tmp_path):
    """Given a final_eval_tokens budget that covers them, every full window of val and test counts, nothing else."""
    block, lengths = 32, {"train": 20_000, "val": 5_000, "test": 6_001}  # longer than the smoke cap of 4,096
    last_target = {split: (n - 1) // block * block for split, n in lengths.items()}  # of the last full window

    def final_eval(name, changed=()):
        data_dir = small_enwik8(prepared_data_dir, tmp_path / f"data_{name}", lengths, changed)
        args = smoke_args(tmp_path / name, data_dir, "--datasets", "enwik8", "--block_size", block,
                          "--max_iters", "2", "--eval_interval", "1", "--inference_samples", "0",
                          "--final_eval_tokens", 10**9)
        assert ex.main(args) == 0
        info = json.loads((tmp_path / name / "final_info.json").read_text())["enwik8"]["final_info_dict"]
        return info["full_val_loss"][0], info["test_loss"][0], info["full_val_tokens"][0]

    val_loss, test_loss, val_tokens = final_eval("whole")
    assert val_tokens == last_target["val"] == 4_992  # 156 windows of 32; their targets run to token 4,992
    last = final_eval("last", changed=[("val", last_target["val"]), ("test", last_target["test"])])
    assert last[0] != val_loss and last[1] != test_loss  # the last full window of each split is read ...
    beyond = final_eval("beyond", changed=[("val", last_target["val"] + 1), ("test", last_target["test"] + 1)])
    assert beyond == (val_loss, test_loss, val_tokens)  # ... and the tokens after it are not


def test_all_results_npy_has_train_and_val_records(smoke_run):
    results = np.load(smoke_run / "all_results.npy", allow_pickle=True).item()
    for dataset in ex.DATASETS:
        for seed in range(2):
            val_info = results[f"{dataset}_{seed}_val_info"]
            train_info = results[f"{dataset}_{seed}_train_info"]
            assert results[f"{dataset}_{seed}_final_info"]["best_val_loss"] == min(r["val/loss"] for r in val_info)
            assert [r["iter"] for r in val_info] == [0, 10, 20, 30]  # every eval_interval and the last step
            for record in val_info:
                assert {"iter", "train/loss", "val/loss", "lr", *AGENT_FIELDS} <= set(record)
                assert record["lr"] > 0
            assert [r["iter"] for r in train_info] == [0, 5, 10, 15, 20, 25, 29]
            assert all({"iter", "loss", "time"} <= set(r) and r["time"] > 0 for r in train_info)


def test_per_seed_file_matches_all_results(smoke_run):
    results = np.load(smoke_run / "all_results.npy", allow_pickle=True).item()
    per_seed = json.loads((smoke_run / "final_info_enwik8_1.json").read_text())
    assert per_seed["best_val_loss"] == results["enwik8_1_final_info"]["best_val_loss"]
    assert per_seed["seed"] == 1338 and per_seed["seed_index"] == 1
    assert len(per_seed["sample"]) == 1 + 16  # the " " prompt and the new tokens


def test_run_json_records_config_command_versions_and_device(smoke_run):
    run = json.loads((smoke_run / "run.json").read_text())
    assert run["status"] == "finished" and run["finished"] >= run["started"]
    assert run["description"] == "smoke test" and run["profile"] == "smoke"
    assert run["command"][1] == str(ROOT / "experiment.py") and "--out_dir" in run["command"]  # rerunnable as is
    assert run["versions"]["torch"].startswith("2.") and run["versions"]["numpy"]
    assert run["device"]["type"] == "cpu"
    shakespeare = run["configs"]["shakespeare_char"]
    assert shakespeare["seeds"] == 2 and shakespeare["n_layer"] == ex.PROFILES["smoke"]["*"]["n_layer"]


# --- statistics ---

def test_stderr_uses_sample_standard_deviation():
    mean, stderr = ex.mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2)  # std(ddof=1) = sqrt(5/3), n = 4


def test_single_seed_has_no_stderr_rather_than_zero():
    assert ex.mean_and_stderr([1.7]) == (1.7, None)
    summary = ex.summarize([{"best_val_loss": 1.7, "seed": 1337}])
    assert summary["stderrs"]["best_val_loss_stderr"] is None


# --- reproducibility and refusals ---

def test_same_command_twice_gives_identical_losses(prepared_data_dir, tmp_path):
    runs = []
    for name in ("a", "b"):
        proc = run_cli(smoke_args(tmp_path / name, prepared_data_dir, "--datasets", "shakespeare_char"))
        assert proc.returncode == 0, proc.stderr
        runs.append(tmp_path / name)
    infos = [json.loads((r / "final_info.json").read_text())["shakespeare_char"]["final_info_dict"] for r in runs]
    for key in ("final_train_loss", "best_val_loss", "final_val_loss"):
        assert infos[0][key] == infos[1][key]
    logs = [np.load(r / "all_results.npy", allow_pickle=True).item()["shakespeare_char_0_val_info"] for r in runs]
    assert logs[0] == logs[1]


def test_finished_run_folder_is_not_overwritten(prepared_data_dir, tmp_path):
    out = tmp_path / "run_0"
    args = smoke_args(out, prepared_data_dir, "--datasets", "shakespeare_char")
    assert run_cli(args).returncode == 0
    before = folder_checksums(out)
    proc = run_cli(args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr
    assert folder_checksums(out) == before
    proc = run_cli(args + ["--overwrite", "--max_iters", "20"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "run.json").read_text())["configs"]["shakespeare_char"]["max_iters"] == 20


@pytest.mark.parametrize("args, fragment", [
    (["--no_such_flag", "1"], "unrecognized arguments"),
    (["--n_layer", "two"], "invalid int value"),
    (["--datasets", "shakespeare_char,wikitext"], "unknown dataset"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--eval_interval", "0"], "eval_interval"),
    (["--learning_rate", "-1e-3"], "learning_rate"),
    (["--block_size", "200000"], "block_size"),
    (["--agent", "genius"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_2(prepared_data_dir, tmp_path, args, fragment):
    proc = run_cli(smoke_args(tmp_path / "run", prepared_data_dir, "--datasets", "shakespeare_char", *args))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()


def test_missing_data_offline_names_the_prepare_command(tmp_path, monkeypatch, capsys):
    prep = ex.prepare_common
    unreachable = "http://127.0.0.1:9/input.txt"  # discard port: refused at once, no internet involved
    monkeypatch.setitem(prep.DATASETS, "shakespeare_char",
                        __import__("dataclasses").replace(prep.DATASETS["shakespeare_char"], url=unreachable))
    monkeypatch.delenv("GPT_RL_DATA_SOURCE", raising=False)
    code = ex.main(smoke_args(tmp_path / "run", tmp_path / "data", "--datasets", "shakespeare_char"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert "python data/shakespeare_char/prepare.py --source" in err[0]
    assert not (tmp_path / "run").exists()


def test_offline_source_env_var_prepares_missing_data(source_dir, tmp_path):
    proc = run_cli(smoke_args(tmp_path / "run", tmp_path / "data", "--datasets", "shakespeare_char",
                              "--max_iters", "2", "--eval_interval", "1", "--inference_samples", "0"),
                   env_extra={"GPT_RL_DATA_SOURCE": str(source_dir)})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "data" / "shakespeare_char" / "train.bin").stat().st_size == 2 * 1_003_854


def test_data_paths_resolve_from_the_project_not_the_cwd(tmp_path):
    cfg = ex.Config()
    assert ex.dataset_dir(cfg, "text8") == (ex.PROJECT_ROOT / "data" / "text8").resolve()


# --- profiles and configuration ---

def test_profiles_follow_the_spec():
    full = ex.config_for_dataset(ex.Config(), {}, "full", "shakespeare_char")
    assert (full.n_layer, full.n_head, full.n_embd, full.block_size, full.batch_size) == (6, 6, 384, 256, 64)
    assert (full.dropout, full.learning_rate, full.max_iters, full.eval_iters, full.seeds) == (0.2, 1e-3, 5000, 200, 3)
    enwik8 = ex.config_for_dataset(ex.Config(), {}, "full", "enwik8")
    assert (enwik8.batch_size, enwik8.learning_rate, enwik8.max_iters, enwik8.eval_interval) == (32, 5e-4, 100000, 1000)
    cpu = ex.config_for_dataset(ex.Config(), {}, "cpu", "shakespeare_char")
    assert (cpu.n_layer, cpu.n_embd, cpu.block_size, cpu.batch_size, cpu.dropout, cpu.max_iters) == (4, 128, 64, 12, 0.0, 2000)
    assert ex.config_for_dataset(ex.Config(), {}, "cpu", "text8").seeds == 1


def test_command_line_beats_profile():
    base, typed = ex.parse_args(["--profile", "cpu", "--n_layer", "3", "--no-bias"])
    cfg = ex.config_for_dataset(base, typed, "cpu", "enwik8")
    assert (cfg.n_layer, cfg.bias, cfg.n_embd) == (3, False, 128)


def test_auto_profile_and_device_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert ex.resolve_profile("auto") == "cpu"
    rt = ex.Runtime.choose(ex.Config())
    assert rt.device.type in ("cpu", "mps") and rt.compile is False


# --- model and schedule ---

def test_gpt_ties_embeddings_and_uses_causal_attention():
    torch.manual_seed(0)
    model = ex.GPT(ex.GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=False))
    assert model.transformer.wte.weight is model.lm_head.weight
    model.eval()
    idx = torch.randint(0, 11, (1, 8))
    logits_full, _ = model(idx, idx)
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 11
    logits_changed, _ = model(changed, changed)
    assert torch.allclose(logits_full[0, :5], logits_changed[0, :5], atol=1e-6)  # the future is invisible
    assert not torch.allclose(logits_full[0, 5:], logits_changed[0, 5:])



def test_split_loss_is_the_mean_over_consecutive_windows_and_reads_no_further():
    torch.manual_seed(0)
    model = ex.GPT(ex.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False))
    cfg = ex.Config(block_size=8, batch_size=3, final_eval_tokens=40)  # 5 windows: batches of 3 and 2
    rt = ex.Runtime(torch.device("cpu"), torch.float32, ex.nullcontext(), False)
    tokens = np.random.default_rng(0).integers(0, 11, size=100).astype(np.uint16)
    by_hand = []
    with torch.no_grad():
        for start in range(0, 40, 8):
            window = torch.from_numpy(tokens[start:start + 9].astype(np.int64))[None]
            by_hand.append(model(window[:, :-1], window[:, 1:])[1].item())
    assert ex.split_loss(model, tokens, cfg, rt) == pytest.approx(np.mean(by_hand), rel=1e-6)
    later_changed = tokens.copy()
    later_changed[41:] = (later_changed[41:] + 1) % 11  # beyond the 40 targets (the last one is token 40)
    assert ex.split_loss(model, later_changed, cfg, rt) == ex.split_loss(model, tokens, cfg, rt)
    assert model.training  # handed back in training mode


def test_weight_decay_only_on_matrices():
    model = ex.GPT(ex.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=True))
    decayed, plain = model.make_optimizer(ex.Config(), torch.device("cpu")).param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])


def test_cosine_schedule_warms_up_from_above_zero_and_ends_at_min_lr():
    cfg = ex.Config(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, lr_decay_iters=2000)
    assert ex.base_lr(cfg, 0) == pytest.approx(1e-3 / 101) and ex.base_lr(cfg, 0) > 0
    assert ex.base_lr(cfg, 99) == pytest.approx(1e-3 * 100 / 101)
    assert ex.base_lr(cfg, 100) == pytest.approx(1e-3)
    assert ex.base_lr(cfg, 1050) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway: cos(pi/2) = 0
    assert ex.base_lr(cfg, 2000) == ex.base_lr(cfg, 5000) == pytest.approx(1e-4)
