"""Every malformed or inconsistent command line is one `error:` line and exit 2, before anything is written."""
import dataclasses
import json
import math

import pytest

import experiment as ex
from harness.validation import parse_bounds
from conftest import run_cli

FLOAT_FIELDS = [f for f in dataclasses.fields(ex.Config) if f.type == "float"]


def out_of_range(bounds: str) -> list[float]:
    """Values just outside a field's declared interval: below/above a finite end, or on an open end."""
    low, high, low_in, high_in = parse_bounds(bounds)
    values = []
    if math.isfinite(low):
        values.append(low if not low_in else low - 1.0)
    if math.isfinite(high):
        values.append(high if not high_in else high + 1.0)
    return values


def cases():
    for f in FLOAT_FIELDS:
        for text in ("nan", "inf", "-inf"):
            yield f.name, text
        for value in out_of_range(f.metadata["bounds"]):
            yield f.name, repr(value)


def test_every_float_flag_declares_its_range():
    assert FLOAT_FIELDS and all(f.metadata["bounds"] for f in FLOAT_FIELDS)


@pytest.mark.parametrize("name, text", list(cases()))
def test_a_bad_float_is_one_line_exit_2_and_writes_nothing(name, text, tmp_path, capsys):
    out = tmp_path / "run"
    code = ex.main(["--out_dir", str(out), "--profile", "smoke", "--datasets", "shakespeare_char",
                    "--data_dir", str(tmp_path / "no_data"), f"--{name}", text])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and f"--{name}" in err[0]
    assert not out.exists() and not (tmp_path / "no_data").exists()


@pytest.mark.parametrize("flag", ["--learning_rate", "--weight_decay", "--grad_clip"])
def test_non_finite_values_through_the_real_command_line(flag, tmp_path):
    for value in ("nan", "shakespeare_char=inf"):
        proc = run_cli(["--out_dir", tmp_path / "run", "--profile", "smoke", "--datasets", "shakespeare_char",
                        flag, value])
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {flag} must be a finite number")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--min_lr", "1e-2"], "--min_lr 0.01 is above --learning_rate 0.001"),
    (["--learning_rate", "5e-5"], "--min_lr 0.0001 is above --learning_rate 5e-05"),
    (["--schedule", "wsd", "--min_lr", "1e-2"], "the wsd decay would rise"),
    (["--warmup_iters", "20", "--lr_decay_iters", "10"], "--lr_decay_iters 10 is shorter than --warmup_iters 20"),
])
def test_settings_that_cannot_be_meant_are_refused(args, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code = ex.main(["--out_dir", str(out), "--profile", "smoke", "--datasets", "shakespeare_char", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and fragment in err[0]
    assert not out.exists()


def test_min_lr_above_the_rate_is_fine_where_no_schedule_decays_to_it(tmp_path):
    ex.validate(ex.Config(schedule="constant", learning_rate=1e-4, min_lr=1e-3))


def test_settings_that_may_be_meant_are_warned_on_one_line_and_recorded(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(["--out_dir", out, "--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir",
                    prepared_data_dir, "--max_iters", "4", "--eval_interval", "2", "--notes", "off",
                    "--inference_samples", "0"])
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
    assert any("--warmup_iters 5 >= --max_iters 4" in w for w in warnings)
    assert any("--lr_decay_iters 30 > --max_iters 4" in w for w in warnings)
    recorded = json.loads((out / "run.json").read_text())["warnings"]["shakespeare_char"]
    assert len(recorded) == 2 and all(any(r in w for w in warnings) for r in recorded)
