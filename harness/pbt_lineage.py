"""A PBT member's lineage, and that lineage as a schedule `--agent replay` plays on any seed.

PBT's product is a schedule, not final settings: the best member trained with its first settings until some
member it copied (an exploit) took over its weights, and so on back. `lineage` follows the run.json records of
sweep.py's trials through every exploit; `replay_schedule` turns the segments into the trajectory file that
experiment.py's ReplayAgent reads from an --agent_init folder (agent_<dataset>_0.json, used for every seed):

    python experiment.py --agent replay --agent_init S/pbt/best_lineage --control lr,weight_decay,grad_clip

Plain data: nothing here imports Ray, torch or experiment.py.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.files import atomic_write_json
from harness.policy_files import agent_file

REPLAYED = {"learning_rate": "lr", "weight_decay": "weight_decay", "grad_clip": "grad_clip"}  # setting: --control
CONTROL = ",".join(REPLAYED.values())
LINEAGE_FILE = "lineage.json"


def lineage(records: dict, trial: str, until: float = math.inf) -> list[dict]:
    """The segments [{"from_iter", "trial", "hp"}] the weights of `trial` trained through up to iteration
    `until`: the donor's lineage up to the last exploit before `until`, then the trial's settings from there.
    records: trial name -> its run.json (sweep.py's: "sweep": {"hp"} and "restores")."""
    record = records[trial]
    exploits = [r for r in record.get("restores", []) if r.get("kind") == "exploit" and r["iter"] < until]
    if not exploits:
        return [{"from_iter": 0, "trial": trial, "hp": dict(record["sweep"]["hp"])}]
    last = exploits[-1]  # an exploit replaces the weights: what came before it in this trial is gone
    return lineage(records, last["from_trial"], last["iter"]) + [
        {"from_iter": last["iter"], "trial": trial, "hp": dict(last["hp"])}]


def settings_at(segments: list[dict], it: int) -> dict:
    """The settings the lineage trained with from iteration `it` on (to the next evaluation)."""
    return [s for s in segments if s["from_iter"] <= it][-1]["hp"]


def replay_base(segments: list[dict], configured: dict, multiplier_min: float, multiplier_max: float) -> dict:
    """{setting: the value its multipliers are taken against}: the configured value, so that the plain replay
    command plays the lineage exactly, unless a rate it used lies beyond the rate multiplier's bounds (which
    ReplayAgent clips to; weight decay's and the clipping norm's multipliers it plays as recorded): then the
    geometric centre of the rates used, which the replay must pass (--learning_rate, see lineage.json flags)."""
    base = dict(configured)
    rates = [s["hp"].get("learning_rate", configured["learning_rate"]) for s in segments]
    if not all(multiplier_min <= r / configured["learning_rate"] <= multiplier_max for r in rates):
        base["learning_rate"] = math.sqrt(min(rates) * max(rates))
    return base


def replay_exact(segments: list[dict], base: dict, multiplier_min: float, multiplier_max: float) -> bool:
    """Whether every rate of the lineage is within the multiplier's bounds on `base` (else the replay clips)."""
    return all(multiplier_min <= s["hp"].get("learning_rate", base["learning_rate"]) / base["learning_rate"]
               <= multiplier_max for s in segments)


def replay_schedule(segments: list[dict], base: dict, eval_iters: list[int]) -> list[dict]:
    """ReplayAgent's trajectory: at every evaluation the multipliers (on `base`) of the settings in force."""
    trajectory = []
    for it in eval_iters:
        hp = settings_at(segments, it)
        m = {name: hp.get(name, base[name]) / base[name] for name in REPLAYED}
        trajectory.append({"iter": it, "multiplier": m["learning_rate"],
                           "hparam_multipliers": {"weight_decay": m["weight_decay"], "grad_clip": m["grad_clip"]}})
    return trajectory


def write_lineage(folder: Path, dataset: str, segments: list[dict], trajectory: list[dict], about: dict) -> None:
    """The replayable folder: the agent file ReplayAgent reads for every seed, and lineage.json (the segments,
    the base, the flags a replay needs, the command), each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(agent_file(folder, dataset, 0), {
        "agent": "replay", "multiplier": trajectory[-1]["multiplier"], "trajectory": trajectory,
        "hparam_multipliers": trajectory[-1]["hparam_multipliers"]})
    atomic_write_json(folder / LINEAGE_FILE, {**about, "segments": segments})
