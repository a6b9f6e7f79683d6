"""
The run folder's plumbing that no idea edits: checkpoint file names, which seeds a resumed run keeps, loading
every dataset in torchrun's order, and starting run.json. The config arrives as a plain object (duck typing);
what only experiment.py knows (how one dataset is prepared and loaded) arrives as a callback.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable, Optional

from filelock import FileLock

from harness.distributed import World
from harness.errors import UserError
from harness.files import atomic_write_json, read_json
from harness.records import PROJECT_ROOT, new_run_record, now_iso, policy_record, settings_of_run


def checkpoint_file(run_dir: Path, dataset: str, seed_index: int) -> Path:
    return Path(run_dir) / f"ckpt_{dataset}_{seed_index}.pt"


def previous_checkpoint_file(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.stem + ".prev.pt")


def remove_checkpoints(run_dir: Path, dataset: str, seed_index: int) -> None:
    checkpoint = checkpoint_file(run_dir, dataset, seed_index)
    checkpoint.unlink(missing_ok=True)
    previous_checkpoint_file(checkpoint).unlink(missing_ok=True)


def finished_seed(out_dir: Path, all_results: dict, dataset: str, seed_index: int) -> Optional[dict]:
    """A seed whose per-seed file and logs are on disk is kept as it is on --resume."""
    path = out_dir / f"final_info_{dataset}_{seed_index}.json"
    keys = [f"{dataset}_{seed_index}_{kind}" for kind in ("final_info", "train_info", "val_info")]
    if not path.exists() or not all(k in all_results for k in keys):
        return None
    remove_checkpoints(out_dir, dataset, seed_index)  # killed between the two writes
    return all_results[keys[0]]


def run_to_resume(out_dir: Path, overwrite: bool, world: World) -> Optional[dict]:
    """--resume: the run.json of the unfinished run in out_dir (None when it has finished), after checking
    that it can be resumed here; half-written files of a killed process are removed."""
    if overwrite:
        raise UserError("--resume and --overwrite contradict each other")
    if not (out_dir / "run.json").exists():
        raise UserError(f"--resume: {out_dir} holds no run to resume (no run.json)")
    if (out_dir / "final_info.json").exists():
        return None
    run_record = read_json(out_dir / "run.json")
    trained_by = (run_record.get("distributed") or {}).get("world_size", 1)
    if trained_by != world.size:
        raise UserError(f"--resume: {out_dir} was trained by {trained_by} process(es) (world size {trained_by}); "
                        f"this job has world size {world.size}: resume it with the same number of processes")
    for stale in out_dir.glob(".*.tmp"):  # half-written by a killed process; the real files are intact
        stale.unlink()
    return run_record


def recorded_settings(base) -> dict:
    """--resume under torchrun, on rank 0 before the process group exists: {"device", "backend"} of the run in
    base.out_dir, from its run.json; a --device or --backend typed now that asks for others is refused."""
    out_dir = Path(base.out_dir)
    if not (out_dir / "run.json").exists():
        raise UserError(f"--resume: {out_dir} holds no run to resume (no run.json)")
    return settings_of_run(out_dir, read_json(out_dir / "run.json"), base.device, base.backend)


def load_on_every_rank(configs: dict, world: World, load_one: Callable, folder: Callable) -> dict:
    """{dataset: load_one(cfg, dataset)} on every process; folder(cfg, dataset): where it is prepared.

    Under torchrun the first rank of every node prepares what is missing, all nodes at once, then the node's
    other ranks load it; each preparation holds a lock on the dataset's folder, so nodes sharing a file system
    (or two jobs on one machine) prepare it once. Every rank checks that its tokens hash as rank 0's do."""
    loaded = {}

    def load_here() -> None:
        for dataset, cfg in configs.items():
            with preparation_lock(folder(cfg, dataset)):
                loaded[dataset] = load_one(cfg, dataset)

    if not world.distributed:
        load_here()
        return loaded
    world.everywhere(lambda: load_here() if world.local_rank == 0 else None)
    world.everywhere(lambda: load_here() if world.local_rank != 0 else None)
    expected = world.gather({d: data.provenance["sha256"] for d, data in loaded.items()})[0]

    def check_same() -> None:
        differ = [d for d, data in loaded.items() if data.provenance["sha256"] != expected[d]]
        if differ:
            raise UserError(f"rank {world.rank} reads other {', '.join(differ)} data than rank 0 "
                            f"({loaded[differ[0]].provenance['folder']}): every node needs the same prepared data")

    world.everywhere(check_same)
    return loaded


def preparation_lock(dataset_folder: Path):
    """A lock beside the dataset's folder, held while it is prepared and read (released if its holder dies)."""
    dataset_folder = Path(dataset_folder)
    dataset_folder.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(dataset_folder.parent / f".{dataset_folder.name}.lock"))


def start_run_record(base, configs: dict, loaded: dict, rt, profile: str, policies: dict, frozen: dict,
                     warnings: dict, run_record: Optional[dict], command: list[str]) -> dict:
    """Print the warnings and what runs where, and write run.json (a new one, or the resumed run's, extended).
    frozen: by dataset with a trained policy, whether it acts frozen; command: the command line that ran."""
    out_dir, datasets, world = Path(base.out_dir), list(configs), rt.world
    for d, lines in warnings.items():
        for line in lines:
            print(f"warning: {d}: {line}", file=sys.stderr, flush=True)
    processes = f" | {world.size} processes ({world.backend})" if world.distributed else ""
    print(f"profile {profile} | device {rt.device.type} | dtype {str(rt.dtype)[6:]} | compile {rt.compile}"
          f"{processes} | "
          f"datasets {', '.join(datasets)} | out_dir {out_dir}" + (" | resuming" if base.resume else ""), flush=True)
    if run_record is None:
        run_record = new_run_record(base, profile, configs, {d: loaded[d].provenance for d in datasets}, warnings, rt,
                                    command)
        if policies:  # which trained policy acted: its folder, file and hash, and how it was trained
            run_record["policy"] = policy_record(policies, frozen)
    else:
        run_record.setdefault("resumed", []).append({"at": now_iso(), "command": command})
    run_record.update(status="running", error=None)
    atomic_write_json(out_dir / "run.json", run_record)
    return run_record


def record_in_notebook(cfg, out_dir: Path) -> None:
    """notes.txt gets the run's section and the comparison table; --plot redraws every run's figures.

    Both come after final_info.json: a failure here is reported and costs nothing already written.
    """
    spec = importlib.util.spec_from_file_location("plot", PROJECT_ROOT / "plot.py")
    plot = importlib.util.module_from_spec(spec)
    sys.modules["plot"] = plot
    spec.loader.exec_module(plot)
    runs_folder = out_dir.resolve().parent
    if cfg.notes != "off":
        notes = Path(cfg.notes) if cfg.notes else runs_folder / "notes.txt"
        try:
            plot.update_notes(notes, out_dir)
            print(f"notes: {notes} updated", flush=True)
        except Exception as e:  # noqa: BLE001 -- the run's results are safe; say what went wrong
            print(f"warning: could not update {notes}: {e}", file=sys.stderr, flush=True)
    if cfg.plot:
        code = plot.main([str(runs_folder), "--out_dir", str(runs_folder)])
        if code != 0:
            print("warning: plot.py could not draw the runs (see above)", file=sys.stderr, flush=True)
