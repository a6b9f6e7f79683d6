"""Adding an agent is an edit of experiment.py alone: the class docs/lr_control.md shows, pasted above the
registry, plus its registry entry, gives a working --agent (checked on a copy of experiment.py)."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import experiment as ex
from conftest import ROOT


def documented_agent() -> str:
    page = (ROOT / "docs" / "lr_control.md").read_text()
    section = page[page.index("### Adding an agent"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_agent_is_short():
    assert len(documented_agent().strip().splitlines()) <= 30


def test_the_documented_agent_halves_the_rate_on_a_plateau():
    namespace = vars(ex).copy()
    exec(documented_agent(), namespace)
    agent = namespace["PlateauAgent"](ex.Config(), seed=0)
    for it, loss in enumerate([2.0, 1.5, 1.499, 1.498, 1.2, 1.199, 1.198]):
        agent.observe(ex.Observation(it=it, max_iters=10, train_loss=loss, val_loss=loss))
    assert agent.multiplier == 0.25  # two plateaus of two evaluations each
    copy = namespace["PlateauAgent"](ex.Config(), seed=1)
    copy.load_state_dict(json.loads(json.dumps(agent.state_dict())))
    assert (copy.best, copy.waited, copy.multiplier) == (agent.best, agent.waited, agent.multiplier)


def test_the_class_and_one_registry_entry_make_a_working_agent_flag(prepared_data_dir, tmp_path):
    source = (ROOT / "experiment.py").read_text()
    registry = re.search(r"^AGENTS = \{", source, re.M)
    assert registry, "experiment.py has no AGENTS registry"
    edited = (source[:registry.start()] + documented_agent() + "\n\n"
              + source[registry.start():].replace("AGENTS = {", 'AGENTS = {"plateau": PlateauAgent, ', 1))
    (tmp_path / "experiment.py").write_text(edited)
    shutil.copy(ROOT / "model.py", tmp_path / "model.py")  # the network, read beside experiment.py: unchanged
    for package in ("harness", "data"):  # the rest of the project, unchanged: its code only
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=lambda folder, names: [n for n in names if (Path(folder) / n).is_file()
                                                      and not n.endswith(".py")])
    proc = subprocess.run([sys.executable, str(tmp_path / "experiment.py"), "--profile", "smoke", "--datasets",
                           "shakespeare_char", "--agent", "plateau", "--data_dir", prepared_data_dir, "--notes", "off",
                           "--inference_samples", "1", "--out_dir", tmp_path / "run"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    state = json.loads((tmp_path / "run" / "agent_shakespeare_char_0.json").read_text())
    assert state["agent"] == "plateau" and {"best", "waited"} <= set(state)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["configs"]["shakespeare_char"]["agent"] == "plateau"


@pytest.mark.parametrize("name", ["plateau"])
def test_an_unregistered_agent_is_refused_in_one_line(prepared_data_dir, tmp_path, name):
    proc = subprocess.run([sys.executable, str(ROOT / "experiment.py"), "--profile", "smoke", "--agent", name,
                           "--data_dir", prepared_data_dir, "--out_dir", tmp_path / "run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1
    assert "plateau" in proc.stderr and "qlearning" in proc.stderr
