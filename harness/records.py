"""Run records and provenance: what ran (command, commit, package versions, device, processes), on which
tokens (data provenance, checked again on --resume), and the run folder's guard against overwriting results.
Config is read by duck typing; nothing here imports experiment.py."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from harness.distributed import World
from harness.errors import UserError
from harness.runtime import Runtime

PROJECT_ROOT = Path(__file__).resolve().parents[1]  # the repository: its git commit is recorded
RESULT_FILES = ("final_info.json", "all_results.npy", "all_results.json", "run.json")  # plus final_info_*.json,
# agent_*.json, model_*.pt


def data_provenance(folder: Path, meta: dict, splits: dict) -> dict:
    """Where the tokens came from, recorded in run.json and final_info.json: a 4 MB prefix of enwik8 must
    never pass for enwik8. sha256 of each split as read (the bytes of its .bin file)."""
    source = meta.get("source") or {}
    return {"folder": str(folder), "source": source.get("path") or source.get("url"),
            "source_bytes": source.get("text_bytes", source.get("bytes")),
            "standard_split": bool(meta.get("standard_split", False)), "warning": meta.get("warning"),
            "splits": {k: int(len(v)) for k, v in splits.items()},
            "sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in splits.items()}}


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_record(rt: Runtime) -> dict:
    import importlib.metadata as md
    versions = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "tiktoken", "matplotlib", "requests", "tqdm", "schedulefree", "prodigyopt",
                "dadaptation", "scipy", "gymnasium", "stable-baselines3"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    device = {"type": rt.device.type, "dtype": str(rt.dtype).replace("torch.", ""), "compile": rt.compile,
              "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
              "processor": platform.processor() or platform.machine()}
    if rt.device.type == "cuda":
        device["name"] = torch.cuda.get_device_name()
    return {"versions": versions, "device": device, "git_commit": git_commit()}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(script: str, argv: list[str]) -> list[str]:
    """The command that ran: interpreter, script (absolute: rerunnable from anywhere) and arguments."""
    return [sys.executable, str(Path(script).resolve()), *map(str, argv)]


def prepare_run_folder(out_dir: Path, overwrite: bool) -> None:
    """Refuse to touch a folder holding results unless --overwrite; then clear our files from it."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out_dir {out_dir} exists and is not a folder")
    ours = [p for p in out_dir.glob("*") if p.name in RESULT_FILES
            or p.name.startswith(("final_info_", "agent_", "ckpt_", "model_"))] \
        if out_dir.exists() else []
    if ours and not overwrite:
        state = "finished results" if (out_dir / "final_info.json").exists() else "an unfinished run"
        raise UserError(f"{out_dir} already holds {state} ({', '.join(sorted(p.name for p in ours))}); "
                        f"use --overwrite to replace it, or choose another --out_dir")
    for p in ours:
        p.unlink()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to {out_dir}: {e.strerror or e}") from e


# Flags that may differ on --resume: they change where files are, not what is computed.
# --data_dir may be spelled differently, but must name the same folder (and the data must hash the same).
def settings_that_differ(old: dict, new: dict, defaults: dict) -> list[str]:
    """The settings two recorded configs disagree on. A setting one side lacks counts at its default: a field
    added to Config since the older record was written reproduces the old behaviour at its default, so it
    changes nothing there (a cached result or a training to continue stays valid)."""
    return sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k)))


IGNORED_ON_RESUME = {"resume", "debug", "overwrite", "out_dir", "title", "description", "source_dir",
                     "download", "notes", "plot", "device", "backend"}  # (the last two: settings_of_run)


def resume_configs(out_dir: Path, run_record: dict, typed: dict, config_type, dataset_dir) -> dict:
    """The interrupted run's own configs (rebuilt as config_type); refuse if a flag typed now would change any
    of them. dataset_dir(cfg, dataset): the folder a config reads a dataset from."""
    try:
        stored = {d: config_type(**c) for d, c in run_record["configs"].items()}
    except (KeyError, TypeError) as e:
        raise UserError(f"{out_dir}/run.json does not describe a run of this version ({e})") from e
    diffs = []
    for name, value in typed.items():
        if name in IGNORED_ON_RESUME:
            continue
        if name == "profile" and value not in ("auto", run_record.get("profile")):
            diffs.append(f"profile: {run_record.get('profile')!r} -> {value!r}")
        elif name == "datasets" and [d.strip() for d in value.split(",") if d.strip()] != list(stored):
            diffs.append(f"datasets: {','.join(stored)!r} -> {value!r}")
        elif name == "data_dir":
            for d, old in stored.items():
                before, after = dataset_dir(old, d), dataset_dir(dataclasses.replace(old, data_dir=value), d)
                if before != after:
                    diffs.append(f"{d} data: {str(before)!r} -> {str(after)!r}")
        elif name not in ("profile", "datasets", "data_dir"):
            for d, old in stored.items():
                new = value.get(d, getattr(old, name)) if isinstance(value, dict) else value
                if getattr(old, name) != new:
                    diffs.append(f"{d}.{name}: {getattr(old, name)!r} -> {new!r}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise UserError(f"--resume: {out_dir} was made with a different config ({shown}); "
                        f"resume with just --out_dir {out_dir} --resume")
    keep = {k: v for k, v in typed.items() if k in ("source_dir", "download", "notes", "plot")}
    # where it ran, not where this machine would choose: a --device cpu run stays on the CPU on a CUDA host
    keep["device"] = settings_of_run(out_dir, run_record, typed.get("device", "auto"),
                                     typed.get("backend", "auto"))["device"]
    return {d: dataclasses.replace(c, resume=True, **keep) for d, c in stored.items()}


def settings_of_run(out_dir: Path, run_record: dict, device: str, backend: str) -> dict:
    """{"device", "backend"} a recorded run trained with (backend None: one process). A --device or --backend
    asked for now ("auto": none) that differs is refused in one line naming both: a run resumes where it ran."""
    configs = list((run_record.get("configs") or {}).values())
    recorded = {"device": (run_record.get("device") or {}).get("type") or (configs[0]["device"] if configs else "auto"),
                "backend": (run_record.get("distributed") or {}).get("backend")}
    for flag, asked in (("device", device), ("backend", backend)):
        if asked not in (None, "auto") and recorded[flag] is not None and asked != recorded[flag]:
            raise UserError(f"--resume: {out_dir} trained with --{flag} {recorded[flag]}, this command asks for "
                            f"--{flag} {asked}: drop --{flag} (a run resumes on the device and backend it ran on)")
    return recorded


def check_same_data(out_dir: Path, run_record: dict, loaded: dict) -> None:
    """--resume on other tokens than the run started with would splice two experiments together."""
    for d, data in loaded.items():
        recorded = run_record.get("data", {}).get(d, {}).get("sha256")
        if recorded is not None and recorded != data.provenance["sha256"]:
            changed = [k for k in data.provenance["sha256"] if recorded.get(k) != data.provenance["sha256"][k]]
            raise UserError(f"--resume: {out_dir} was trained on other {d} data ({', '.join(changed)} split sha256 "
                            f"{recorded.get(changed[0], 'none')[:12]}... recorded, "
                            f"{data.provenance['sha256'][changed[0]][:12]}... in {data.provenance['folder']} now)")


def world_record(configs: dict, world: World) -> dict:
    """run.json's "distributed": the processes, and the batch one optimizer step averages over all of them."""
    batches = {}
    for d, c in configs.items():
        steps, micro_batch = world.batch_split(c)
        sequences = micro_batch * steps * world.size
        batches[d] = {"micro_steps_per_rank": steps, "micro_batch_per_rank": micro_batch, "sequences": sequences,
                      "tokens": sequences * c.block_size}
    grows = any(getattr(c, "batch_grows_with_world", False) for c in configs.values())
    return {"world_size": world.size, "backend": world.backend, "batch_grows_with_world": grows,
            "global_batch": batches}


def new_run_record(base, profile: str, configs: dict, data: dict, warnings: dict, rt: Runtime, command: list) -> dict:
    """run.json of a new run: what it is, the command, every dataset's resolved config and data provenance,
    the warnings given, the processes, and the machine and package versions."""
    return {"title": base.title, "description": base.description, "profile": profile,
            "datasets": list(configs), "command": command, "cwd": os.getcwd(),
            "started": now_iso(), "finished": None,
            "configs": {d: dataclasses.asdict(c) for d, c in configs.items()},
            "data": data,
            "warnings": {d: w for d, w in warnings.items() if w},
            "distributed": world_record(configs, rt.world), **environment_record(rt)}


def policy_record(policies: dict, frozen: dict) -> dict:
    """run.json's "policy": per dataset, the trained policy that acted (folder, file, sha256), whether it was
    deployed frozen, and how it was trained (from its manifest)."""
    return {d: {k: p[k] for k in ("dir", "file", "sha256")} | {"frozen": frozen[d],
            "trained": {k: p["manifest"].get(k) for k in ("agent", "dataset", "profile", "episodes_done",
                                                            "seeds", "lr_range", "reward")}}
            for d, p in policies.items()}
