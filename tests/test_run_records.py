"""What a run records about itself: where its data came from, how sampling speed was measured, who may read it."""
import hashlib
import json
import shutil
import stat

import numpy as np
import pytest

from conftest import run_cli


def smoke(out_dir, data_dir, *extra):
    return run_cli(["--out_dir", out_dir, "--profile", "smoke", "--datasets", "shakespeare_char", "--data_dir",
                    data_dir, "--notes", "off", "--inference_samples", "1", *extra])


@pytest.fixture
def own_data(prepared_data_dir, tmp_path):
    """A private copy of the prepared shakespeare_char data, free to be changed by a test."""
    folder = tmp_path / "data"
    shutil.copytree(prepared_data_dir / "shakespeare_char", folder / "shakespeare_char")
    return folder


def test_run_json_and_final_info_record_the_data_source_split_and_hashes(own_data, tmp_path):
    out = tmp_path / "run"
    assert smoke(out, own_data).returncode == 0
    recorded = json.loads((out / "run.json").read_text())["data"]["shakespeare_char"]
    final = json.loads((out / "final_info.json").read_text())["shakespeare_char"]["data"]
    assert recorded == final
    for split in ("train", "val"):
        contents = (own_data / "shakespeare_char" / f"{split}.bin").read_bytes()
        assert final["sha256"][split] == hashlib.sha256(contents).hexdigest()
        assert final["splits"][split] == len(contents) // 2
    assert final["standard_split"] is True and final["source"].endswith("input.txt")
    assert final["source_bytes"] == 1_115_394


def test_a_prefix_is_recorded_as_non_standard(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    assert run_cli(["--out_dir", out, "--profile", "smoke", "--datasets", "enwik8", "--data_dir", prepared_data_dir,
                    "--notes", "off", "--inference_samples", "0", "--max_iters", "4"]).returncode == 0
    data = json.loads((out / "final_info.json").read_text())["enwik8"]["data"]
    assert data["standard_split"] is False and "not the standard" in data["warning"]
    assert data["source"].endswith("enwik8_prefix")


def test_a_short_file_named_as_the_standard_dataset_is_refused_by_the_trainer(tmp_path):
    source = tmp_path / "raw" / "enwik8"
    source.parent.mkdir()
    source.write_bytes(b"<mediawiki>" + bytes(range(32, 127)) * 200 + b"</mediawiki>\n")
    proc = run_cli(["--out_dir", tmp_path / "run", "--profile", "smoke", "--datasets", "enwik8", "--data_dir",
                    tmp_path / "data", "--source_dir", tmp_path / "raw"])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--allow_nonstandard_data" in proc.stderr and not (tmp_path / "run").exists()


def interrupted_run(out, data_dir):
    """A run folder as a kill after its first seed leaves it: finished seed files, no final_info.json."""
    assert smoke(out, data_dir, "--seeds", "2").returncode == 0
    (out / "final_info.json").unlink()
    (out / "final_info_shakespeare_char_1.json").unlink()


def test_resume_refuses_another_data_dir_naming_both(own_data, tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, own_data)
    other = tmp_path / "other"
    shutil.copytree(own_data, other)
    proc = smoke(out, other, "--resume")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert str(own_data / "shakespeare_char") in proc.stderr and str(other / "shakespeare_char") in proc.stderr


def test_resume_refuses_data_that_changed_since_the_run_started(own_data, tmp_path):
    out = tmp_path / "run"
    interrupted_run(out, own_data)
    val = own_data / "shakespeare_char" / "val.bin"
    tokens = np.fromfile(val, dtype=np.uint16)
    tokens[:100] = tokens[100:200]  # same size, same vocabulary, other text
    tokens.tofile(val)
    proc = smoke(out, own_data, "--resume")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "other shakespeare_char data" in proc.stderr and "val split sha256" in proc.stderr


@pytest.mark.parametrize("flag, expected", [("--kv_cache", True), ("--no-kv_cache", False)])
def test_the_sampling_protocol_is_recorded(prepared_data_dir, tmp_path, flag, expected):
    out = tmp_path / "run"
    assert smoke(out, prepared_data_dir, flag).returncode == 0
    entry = json.loads((out / "final_info.json").read_text())["shakespeare_char"]
    assert entry["inference"]["kv_cache"] is expected and entry["inference"]["new_tokens"] == 16
    per_seed = json.loads((out / "final_info_shakespeare_char_0.json").read_text())
    assert per_seed["inference_kv_cache"] is expected


def test_the_kv_cache_changes_speed_not_the_sample(prepared_data_dir, tmp_path):
    samples = {}
    for flag in ("--kv_cache", "--no-kv_cache"):
        out = tmp_path / flag
        assert smoke(out, prepared_data_dir, flag).returncode == 0
        samples[flag] = json.loads((out / "final_info_shakespeare_char_0.json").read_text())["sample"]
    assert samples["--kv_cache"] == samples["--no-kv_cache"]


def test_run_files_are_readable_by_everyone(prepared_data_dir, tmp_path):
    out = tmp_path / "run"
    assert smoke(out, prepared_data_dir).returncode == 0
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, path.name
