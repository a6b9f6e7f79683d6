"""Shared fixtures: the offline raw data, prepared once per test session, and a way to run the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import experiment.py directly


def offline_source_dir() -> Path:
    return Path(os.environ.get("GPT_RL_DATA_SOURCE", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def source_dir() -> Path:
    path = offline_source_dir()
    if not (path / "shakespeare_char" / "input.txt").exists():
        pytest.skip(f"offline raw data not found in {path} (set GPT_RL_DATA_SOURCE)")
    return path


@pytest.fixture(scope="session")
def prepared_data_dir(source_dir, tmp_path_factory) -> Path:
    """All three datasets prepared from the offline copies into one folder for the whole session."""
    from data import prepare_common as prep  # one module name everywhere (as experiment.py imports it)
    out = tmp_path_factory.mktemp("prepared")
    for dataset in ("shakespeare_char", "enwik8", "text8"):
        prep.prepare(dataset, out / dataset, source=prep.find_local_source(dataset, source_dir), log=lambda *a: None)
    return out


def run_cli(args, cwd=None, env_extra=None, timeout=600) -> subprocess.CompletedProcess:
    """Run experiment.py as a user would, without offline sources unless the test passes them."""
    env = {k: v for k, v in os.environ.items() if k != "GPT_RL_DATA_SOURCE"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, str(ROOT / "experiment.py"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
