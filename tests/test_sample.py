"""sample.py: nanoGPT's sampling command over a run folder's kept model (or a prune folder's), reproducible for a
seed, and every input it cannot use refused in one line with exit code 2."""
import json
import subprocess
import sys

import pytest
import torch

import experiment as ex
import sample
from conftest import ROOT, run_cli
from model import load_model

SEPARATOR = "\n---------------\n"


@pytest.fixture(scope="module")
def run_0(prepared_data_dir, tmp_path_factory):
    """A smoke run named as in the issue, with two datasets: text8 first (the default), then shakespeare_char."""
    folder = tmp_path_factory.mktemp("sample") / "run_0"
    proc = run_cli(["--profile", "smoke", "--datasets", "text8,shakespeare_char", "--data_dir", prepared_data_dir,
                    "--notes", "off", "--out_dir", folder])
    assert proc.returncode == 0, proc.stderr
    return folder


@pytest.fixture(scope="module")
def prune_0(run_0):
    """prune.py at its smallest: one method, one target, two fine-tuning steps."""
    proc = subprocess.run([sys.executable, str(ROOT / "prune.py"), "--run", run_0, "--flops_target", "0.5",
                           "--method", "uniform", "--finetune_iters", "2", "--notes", "off",
                           "--out_dir", run_0.parent / "prune_0"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return run_0.parent / "prune_0"


def samples_of(argv, capsys) -> list[str]:
    assert sample.main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    assert out.endswith(SEPARATOR)
    return out[:-len(SEPARATOR)].split(SEPARATOR)


def expected(model_path, dataset_dir, prompt, n, new_tokens, temperature=0.8, top_k=200, seed=1337) -> list[str]:
    """The samples, computed the long way: the model file, its vocabulary, experiment.generate from the seed."""
    meta = json.loads((dataset_dir / "meta.json").read_text())
    model = load_model(model_path)
    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([[meta["stoi"][c] for c in prompt]])
    return ["".join(meta["itos"][str(i)] for i in ex.generate(model, x, new_tokens, temperature, top_k,
                                                                generator)[0].tolist()) for _ in range(n)]


def test_the_issue_command_prints_the_kept_models_samples(run_0, prepared_data_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--run", "run_0", "--dataset", "shakespeare_char",
                           "--seed", "0", "--start", "ROMEO:", "--num_samples", "2", "--max_new_tokens", "200",
                           "--temperature", "0.8", "--top_k", "200"], cwd=run_0.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    samples = proc.stdout[:-len(SEPARATOR)].split(SEPARATOR)
    assert samples == expected(run_0 / "model_shakespeare_char_0.pt", prepared_data_dir / "shakespeare_char",
                               "ROMEO:", 2, 200)
    assert all(s.startswith("ROMEO:") and len(s) == 206 for s in samples) and samples[0] != samples[1]


def test_defaults_are_the_runs_first_dataset_and_seed_0(run_0, prepared_data_dir, capsys):
    got = samples_of(["--run", run_0, "--num_samples", "1", "--max_new_tokens", "30"], capsys)
    # text8 has no newline, so the empty prompt is a space there
    assert got == expected(run_0 / "model_text8_0.pt", prepared_data_dir / "text8", " ", 1, 30)


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(run_0, capsys):
    args = ["--run", run_0, "--dataset", "shakespeare_char", "--num_samples", "2", "--max_new_tokens", "40"]
    first, again = samples_of(args, capsys), samples_of(args, capsys)
    other = samples_of([*args, "--sample_seed", "7"], capsys)
    assert first == again and other != first


def test_the_prompt_can_come_from_a_file(run_0, prepared_data_dir, tmp_path, capsys):
    (tmp_path / "prompt.txt").write_text("JULIET:\nO Romeo")
    got = samples_of(["--run", run_0, "--dataset", "shakespeare_char", "--start", f"FILE:{tmp_path / 'prompt.txt'}",
                      "--num_samples", "1", "--max_new_tokens", "20", "--top_k", "0"], capsys)
    assert got == expected(run_0 / "model_shakespeare_char_0.pt", prepared_data_dir / "shakespeare_char",
                           "JULIET:\nO Romeo", 1, 20, top_k=None)


def test_a_prune_folders_models_by_key(run_0, prune_0, prepared_data_dir, capsys):
    args = ["--num_samples", "1", "--max_new_tokens", "25", "--start", "KING"]
    pruned = samples_of(["--run", prune_0, "--key", "uniform_0.5", *args], capsys)
    assert pruned == expected(prune_0 / "model_uniform_0.5_0.pt", prepared_data_dir / "shakespeare_char",
                              "KING", 1, 25)
    assert load_model(prune_0 / "model_uniform_0.5_0.pt").num_params() < \
        load_model(run_0 / "model_shakespeare_char_0.pt").num_params()
    unpruned = samples_of(["--run", prune_0, "--key", "unpruned", *args], capsys)  # the model prune.py started from
    assert unpruned == samples_of(["--run", run_0, "--dataset", "shakespeare_char", *args], capsys)


def test_a_model_pruned_twice_samples_by_its_key_and_its_unpruned_is_the_model_pruned(prune_0, capsys):
    again = prune_0.parent / "prune_again"
    proc = subprocess.run([sys.executable, str(ROOT / "prune.py"), "--run", prune_0, "--key", "uniform_0.5",
                           "--flops_target", "0.5", "--method", "uniform", "--finetune_iters", "2", "--notes", "off",
                           "--out_dir", again], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    args = ["--num_samples", "1", "--max_new_tokens", "25", "--start", "KING"]
    assert samples_of(["--run", again, "--key", "unpruned", *args], capsys) == \
        samples_of(["--run", prune_0, "--key", "uniform_0.5", *args], capsys)
    twice = samples_of(["--run", again, "--key", "uniform_0.5", *args], capsys)
    assert len(twice) == 1 and twice[0].startswith("KING") and len(twice[0]) == 29
    assert load_model(again / "model_uniform_0.5_0.pt").num_params() < \
        load_model(prune_0 / "model_uniform_0.5_0.pt").num_params()


@pytest.mark.parametrize("case, args, fragment", [
    ("missing folder", ["--run", "{tmp}/nowhere"], "nowhere does not exist"),
    ("foreign folder", ["--run", "{tmp}/foreign"], "is not a run folder of experiment.py or prune.py"),
    ("another tool's run.json", ["--run", "{tmp}/other"], "is not a run folder of experiment.py or prune.py"),
    ("missing model", ["--run", "{run}", "--seed", "3"], "model_text8_3.pt does not exist"),
    ("unknown dataset", ["--run", "{run}", "--dataset", "tinystories"], "unknown dataset 'tinystories'"),
    ("dataset not trained", ["--run", "{run}", "--dataset", "enwik8"], "has no enwik8 (it trained text8, "),
    ("key on a run folder", ["--run", "{run}", "--key", "rl_0.5"], "--key names a prune folder's model"),
    ("unknown key", ["--run", "{prune}", "--key", "rl_0.5"], "model_rl_0.5_0.pt does not exist"),
    ("no key", ["--run", "{prune}"], "is a prune folder: choose its model with --key (unpruned, uniform_0.5"),
    ("prompt out of vocabulary", ["--run", "{run}", "--start", "Romeo"], "not in the text8 vocabulary: ['R']"),
    ("prompt file missing", ["--run", "{run}", "--start", "FILE:{tmp}/none.txt"], "cannot read it"),
    ("no samples", ["--run", "{run}", "--num_samples", "0"], "--num_samples must be at least 1"),
    ("temperature 0", ["--run", "{run}", "--temperature", "0"], "--temperature must be a finite number above 0"),
    ("not a number", ["--run", "{run}", "--top_k", "many"], "argument --top_k: invalid int value"),
])
def test_unusable_input_is_one_line_and_exit_2(run_0, prune_0, tmp_path, capsys, case, args, fragment):
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "final_info.json").write_text("{}")  # results, but no run.json of ours
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text(json.dumps({"name": "someone else's"}))
    argv = [a.format(tmp=tmp_path, run=run_0, prune=prune_0) for a in args]
    assert sample.main(argv) == 2, case
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (case, lines)
    assert captured.out == ""


def test_a_refusal_from_the_command_line_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--run", tmp_path / "nowhere"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: --run {tmp_path / 'nowhere'} "
                                                                         f"does not exist"]


def test_data_other_than_the_run_trained_on_is_refused(run_0, prepared_data_dir, tmp_path, capsys):
    """Another vocabulary would decode to nonsense without an error: the split hashes run.json keeps decide."""
    other = tmp_path / "shakespeare_char"
    other.mkdir()
    for name in ("meta.json", "train.bin", "val.bin"):
        (other / name).write_bytes((prepared_data_dir / "shakespeare_char" / name).read_bytes())
    tokens = bytearray((other / "train.bin").read_bytes())
    tokens[0:2] = (1 if tokens[0:2] != b"\x01\x00" else 2).to_bytes(2, "little")  # one token changed
    (other / "train.bin").write_bytes(bytes(tokens))
    assert sample.main(["--run", str(run_0), "--dataset", "shakespeare_char", "--data_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not what model_shakespeare_char_0.pt was trained on" in err[0], err
