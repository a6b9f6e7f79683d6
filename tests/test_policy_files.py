"""A policy folder is data, never code: a shared controller folder is read without unpickling anything.

Each attack below plants something that would run code (a file appearing is its side effect) if the
harness unpickled it; deploying or continuing the folder must refuse it in one line with exit 2, before
any run folder is written, and the payload must not run. The honest folders still deploy and continue."""
import base64
import io
import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch

from test_train_agent import deploy, one_line_error, smoke_training, train_cli


class Payload:
    """Unpickling this creates the file `marker`: the attacker's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def payload_entry(marker) -> dict:
    """A `data` entry as stable-baselines3 writes a cloudpickled object (save_util.data_to_json)."""
    return {":type:": "<class 'object'>", ":serialized:": base64.b64encode(pickle.dumps(Payload(marker))).decode()}


def rewrite_zip(path, edit_data=None, replace=None, add=None):
    """policy.zip with its `data` JSON edited, members replaced or added (bytes by name)."""
    members = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            members[name] = archive.read(name)
    if edit_data:
        data = json.loads(members["data"])
        edit_data(data)
        members["data"] = json.dumps(data).encode()
    members.update(replace or {})
    members.update(add or {})
    with zipfile.ZipFile(path, "w") as archive:
        for name, blob in members.items():
            archive.writestr(name, blob)


@pytest.fixture(scope="module")
def trained(prepared_data_dir, tmp_path_factory):
    """An honest ppo and dqn folder from train_agent.py (smoke, 2 episodes), copied by each test."""
    root = tmp_path_factory.mktemp("trained")
    return {agent: smoke_training(root, prepared_data_dir, agent, 2) for agent in ("ppo", "dqn")}


def copy_of(trained, agent, tmp_path):
    folder = tmp_path / f"{agent}_copy"
    shutil.copytree(trained[agent], folder)
    return folder


def assert_refused_untouched(proc, run_dir, marker, *words):
    assert one_line_error(proc), proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert not marker.exists(), "the payload ran"
    assert not run_dir.exists() or not any(run_dir.iterdir()), "the run folder was written"


# --- deploying a stable-baselines3 policy --------------------------------------------------------

@pytest.mark.parametrize("agent", ["ppo", "dqn"])
def test_a_pickled_payload_entry_in_policy_zip_is_refused_and_never_runs(prepared_data_dir, trained, tmp_path, agent):
    folder, marker = copy_of(trained, agent, tmp_path), tmp_path / "payload_ran"
    rewrite_zip(folder / "policy.zip", edit_data=lambda d: d.update(extra_setting=payload_entry(marker)))
    proc = deploy(tmp_path, prepared_data_dir, agent, folder, "d")
    assert_refused_untouched(proc, tmp_path / "d", marker, "'extra_setting'", "pickled")


def test_a_payload_in_an_entry_the_harness_rebuilds_is_never_unpickled(prepared_data_dir, trained, tmp_path):
    """The policy class, spaces and schedules are rebuilt from the harness's settings: what the zip says
    there is ignored, so the folder deploys and the payload does not run."""
    folder, marker = copy_of(trained, "ppo", tmp_path), tmp_path / "payload_ran"
    rewrite_zip(folder / "policy.zip", edit_data=lambda d: d.update(policy_class=payload_entry(marker),
                                                                      lr_schedule=payload_entry(marker)))
    proc = deploy(tmp_path, prepared_data_dir, "ppo", folder, "d")
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()


def test_an_unexpected_zip_member_is_refused(prepared_data_dir, trained, tmp_path):
    folder = copy_of(trained, "ppo", tmp_path)
    rewrite_zip(folder / "policy.zip", add={"extra.pkl": pickle.dumps(Payload(tmp_path / "payload_ran"))})
    proc = deploy(tmp_path, prepared_data_dir, "ppo", folder, "d")
    assert_refused_untouched(proc, tmp_path / "d", tmp_path / "payload_ran", "'extra.pkl'")


def test_a_pth_member_holding_a_pickled_object_is_refused(prepared_data_dir, trained, tmp_path):
    folder, marker = copy_of(trained, "ppo", tmp_path), tmp_path / "payload_ran"
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "hook": Payload(marker)}, buffer)
    rewrite_zip(folder / "policy.zip", replace={"policy.pth": buffer.getvalue()})
    proc = deploy(tmp_path, prepared_data_dir, "ppo", folder, "d")
    assert_refused_untouched(proc, tmp_path / "d", marker, "'policy.pth'", "not plain tensors")


def test_the_untouched_folders_still_deploy(prepared_data_dir, trained, tmp_path):
    for agent in ("ppo", "dqn"):
        proc = deploy(tmp_path, prepared_data_dir, agent, trained[agent], f"d_{agent}")
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"d_{agent}" / "final_info.json").exists()


# --- continuing a training ------------------------------------------------------------------------

def continue_training(folder, data_dir, agent, episodes):
    return train_cli(["--agent", agent, "--episodes", episodes, "--profile", "smoke", "--out_dir", folder,
                      "--data_dir", data_dir, "--episodes_per_update", 1])  # (as smoke_training started it)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_continuing_is_refused(folder, data_dir, agent, marker, named):
    """train_agent.py on the folder again: one error line naming the file, the payload never ran, and the
    folder is byte for byte as it was."""
    before = snapshot(folder)
    proc = continue_training(folder, data_dir, agent, 3)
    assert one_line_error(proc) and named in proc.stderr, proc.stderr
    assert not marker.exists() and snapshot(folder) == before


def test_a_dqn_training_keeps_its_replay_buffer_as_plain_arrays_and_continues(prepared_data_dir, trained, tmp_path):
    folder = copy_of(trained, "dqn", tmp_path)
    assert not list(folder.glob("*.pkl"))
    with np.load(folder / "replay_buffer.npz", allow_pickle=False) as saved:
        assert len(saved["observations"]) == len(saved["rewards"]) == int(saved["pos"]) > 0
        assert all(saved[k].dtype != object for k in saved.files)
    proc = continue_training(folder, prepared_data_dir, "dqn", 3)
    assert proc.returncode == 0, proc.stderr
    assert "episodes 2/3 done" in proc.stdout
    assert [r["episode"] for r in json.loads((folder / "learning_curve.json").read_text())] == [0, 1, 2]
    with np.load(folder / "replay_buffer.npz", allow_pickle=False) as saved:
        assert int(saved["pos"]) > 0 and not list(folder.glob("*.pkl"))


def test_a_pickle_planted_in_a_training_folder_is_refused(prepared_data_dir, trained, tmp_path):
    folder, marker = copy_of(trained, "dqn", tmp_path), tmp_path / "payload_ran"
    (folder / "replay_buffer.pkl").write_bytes(pickle.dumps(Payload(marker)))
    assert_continuing_is_refused(folder, prepared_data_dir, "dqn", marker, "replay_buffer.pkl")


def test_an_object_array_replay_buffer_is_refused(prepared_data_dir, trained, tmp_path):
    folder, marker = copy_of(trained, "dqn", tmp_path), tmp_path / "payload_ran"
    with np.load(folder / "replay_buffer.npz", allow_pickle=False) as saved:
        arrays = {k: saved[k] for k in saved.files}
    arrays["rewards"] = np.array([Payload(marker)] * len(arrays["rewards"]), dtype=object)
    np.savez(folder / "replay_buffer.npz", **arrays)
    assert_continuing_is_refused(folder, prepared_data_dir, "dqn", marker, "replay_buffer.npz")


def test_a_continued_ppo_training_reads_its_zip_as_data_too(prepared_data_dir, trained, tmp_path):
    folder, marker = copy_of(trained, "ppo", tmp_path), tmp_path / "payload_ran"
    rewrite_zip(folder / "policy.zip", edit_data=lambda d: d.update(extra_setting=payload_entry(marker)))
    assert_continuing_is_refused(folder, prepared_data_dir, "ppo", marker, "'extra_setting'")


def test_a_reinforce_folder_is_json_and_deploys(prepared_data_dir, tmp_path):
    """Our own agents' policies are JSON: nothing to unpickle in the first place."""
    folder = smoke_training(tmp_path, prepared_data_dir, "reinforce", 1)
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".json", ".png"]
    assert deploy(tmp_path, prepared_data_dir, "reinforce", folder, "d").returncode == 0
