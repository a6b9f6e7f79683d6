"""Live curves for TensorBoard (experiment.py --tensorboard): each dataset and seed gets one event-file folder,
<run folder>/tensorboard/<dataset>_<seed>/, holding the records all_results.npy keeps, written as they are made.

    tensorboard --logdir run_0/tensorboard

Tags (the step is the training iteration):
  train/loss, train/lr, train/lr_groups/<group>, train/hparams/<name>     every logged step (train_info)
  eval/val_loss, eval/train_loss, eval/lr, eval/lr_groups/<group>,        every evaluation (val_info): the rates
  eval/hparams/<name>                                                       set from that evaluation on
  agent/multiplier, agent/multipliers/<group>,                            the agent's decision there, and its
  agent/hparam_multipliers/<name>, agent/action[/<group or name>],        action, reward and epsilon when it
  agent/reward, agent/epsilon                                               has them

torch.utils.tensorboard (the tensorboard package) is imported here only, and only with the flag: a run without
it needs no tensorboard installed.
"""
from __future__ import annotations

import numbers
from pathlib import Path

# The record fields drawn, and the tag each goes under: a logged step's (train_info) and an evaluation's (val_info).
TRAIN_TAGS = {"loss": "train/loss", "lr": "train/lr", "lr_groups": "train/lr_groups", "hparams": "train/hparams"}
EVALUATION_TAGS = {"val/loss": "eval/val_loss", "train/loss": "eval/train_loss", "lr": "eval/lr",
                   "lr_groups": "eval/lr_groups", "hparams": "eval/hparams", "multiplier": "agent/multiplier",
                   "multipliers": "agent/multipliers", "hparam_multipliers": "agent/hparam_multipliers",
                   "action": "agent/action", "reward": "agent/reward", "epsilon": "agent/epsilon"}


def installed() -> bool:
    """Whether --tensorboard can write: asked before the run folder is touched."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401 -- raises ImportError without tensorboard
    except ImportError:
        return False
    return True


def curves_folder(run_dir: Path, dataset: str, seed_index: int) -> Path:
    return Path(run_dir) / "tensorboard" / f"{dataset}_{seed_index}"


def scalars(tag: str, value, names=None) -> list[tuple[str, float]]:
    """(tag, number) pairs of one record field: a number as it is; a dict's items, or a list's (named by
    `names` where they fit, else by index), under tag/<name>. None, booleans and text are not curves."""
    if value is None or isinstance(value, (bool, str)):
        return []
    if isinstance(value, numbers.Real):
        return [(tag, float(value))]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = zip(names if names is not None and len(names) == len(value) else range(len(value)), value)
    else:
        return []
    return [pair for name, item in items for pair in scalars(f"{tag}/{name}", item)]


def list_names(record: dict) -> dict:
    """What a list in the record is indexed by: the agent's per-group multipliers by LR group; its actions by
    LR group (--lr_groups layer) or by controlled hyperparameter (--control), in the order the records keep."""
    groups, controls = list(record.get("lr_groups") or {}), list(record.get("hparams") or {})
    return {"multipliers": groups, "action": groups or controls}


class LiveCurves:
    """One dataset and seed's SummaryWriter, fed from a training run's logs (run.state.train_log and val_log,
    the records all_results.npy keeps). Under torchrun rank 0 alone opens one (experiment.py's check)."""

    def __init__(self, folder: Path, run):
        self.folder, self.run = Path(folder), run
        resumed_at = run.state.next_it
        if not resumed_at:  # the seed starts from scratch: curves an earlier run left here are not this run's
            for stale in self.folder.glob("events.out.tfevents.*"):
                stale.unlink()
        # purge_step: on --resume TensorBoard hides what the interrupted process wrote past its checkpoint,
        # so the curves continue from where training does.
        self.writer = self.open(purge_step=resumed_at or None)
        self.last_iter = {kind: log[-1]["iter"] if log else -1 for kind, log in self.logs().items()}

    def open(self, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(self.folder), purge_step=purge_step)

    def logs(self) -> dict:
        return {"train": self.run.state.train_log, "eval": self.run.state.val_log}  # (a restore replaces state)

    def add(self, kind: str, record: dict) -> None:
        names = list_names(record)
        for key, tag in (TRAIN_TAGS if kind == "train" else EVALUATION_TAGS).items():
            for name, value in scalars(tag, record.get(key), names.get(key)):
                self.writer.add_scalar(name, value, record["iter"])
        self.last_iter[kind] = record["iter"]

    def record_made(self, kind: str) -> None:
        """The newest record of a log goes to the event file. One no later than the last of its kind means a
        divergence rollback took training back to a checkpoint: a new event file starts at that iteration,
        hiding every point the abandoned steps wrote, and the records the run kept from there on are redrawn."""
        record = self.logs()[kind][-1]
        if record["iter"] > self.last_iter[kind]:
            self.add(kind, record)
            return
        self.writer.close()
        self.writer = self.open(purge_step=record["iter"])
        for each, log in self.logs().items():
            for kept in log:
                if kept["iter"] >= record["iter"]:
                    self.add(each, kept)

    def follow(self, on_log, on_evaluation):
        """The run's two callbacks, each also writing the record just made: run.on_log(it, loss, lr) hears a
        logged step, on_evaluation(run) an evaluation."""
        def log_step(it, loss, lr):
            on_log(it, loss, lr)
            self.record_made("train")

        def evaluated(run):
            self.record_made("eval")
            self.writer.flush()  # live: each evaluation shows up as it ends, not when the writer's queue fills
            if on_evaluation is not None:
                on_evaluation(run)
        return log_step, evaluated

    def close(self) -> None:
        self.writer.close()  # flushes
