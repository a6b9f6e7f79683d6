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
    """One dataset and seed's SummaryWriter. Under torchrun rank 0 alone opens one (experiment.py's check)."""

    def __init__(self, folder: Path, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        folder = Path(folder)
        if not resumed_at:  # the seed starts from scratch: curves an earlier run left here are not this run's
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()
        # purge_step: on --resume TensorBoard hides what the interrupted process wrote past its checkpoint,
        # so the curves continue from where training does.
        self.writer = SummaryWriter(str(folder), purge_step=resumed_at or None)

    def add(self, record: dict, tags: dict) -> None:
        names = list_names(record)
        for key, tag in tags.items():
            for name, value in scalars(tag, record.get(key), names.get(key)):
                self.writer.add_scalar(name, value, record["iter"])

    def train_step(self, record: dict) -> None:
        self.add(record, TRAIN_TAGS)

    def evaluation(self, record: dict) -> None:
        self.add(record, EVALUATION_TAGS)
        self.writer.flush()  # live: each evaluation shows up as it ends, not when the writer's queue fills

    def follow(self, run, on_log, on_evaluation):
        """The run's two callbacks, each also writing the record just made: run.on_log hears a logged step
        (the newest record of run.state.train_log), on_evaluation(run) an evaluation (of run.state.val_log)."""
        def log_step(it, loss, lr):
            on_log(it, loss, lr)
            self.train_step(run.state.train_log[-1])

        def evaluated(run):
            self.evaluation(run.state.val_log[-1])
            if on_evaluation is not None:
                on_evaluation(run)
        return log_step, evaluated

    def close(self) -> None:
        self.writer.close()  # flushes
