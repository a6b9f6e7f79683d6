"""Run under torchrun by tests/test_distributed.py: the gradients one optimizer step of a DDP run accumulates.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_gradients.py DATA_DIR OUT_DIR

Every rank takes fixed_batches(...)[rank] as its only micro-batch (gradient_accumulation_steps 2 divided
among 2 ranks) and writes the gradients DDP leaves it with to OUT_DIR/grads_<rank>.pt.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import experiment as ex  # noqa: E402


def gradient_config(data_dir: str) -> ex.Config:
    cfg = ex.config_for_dataset(ex.Config(data_dir=data_dir, gradient_accumulation_steps=2), {}, "smoke",
                                "shakespeare_char")
    return ex.dataclasses.replace(cfg, device="cpu")


def fixed_batches(cfg: ex.Config, data: ex.CharDataset, n: int = 2) -> list:
    """n training batches drawn from a generator of their own: the same on every rank and in the test."""
    sampler = ex.BatchSampler(data.splits["train"], cfg.block_size, cfg.batch_size, torch.device("cpu"), seed=99)
    return [sampler.next_batch() for _ in range(n)]


def main(data_dir: str, out_dir: str) -> None:
    cfg = gradient_config(data_dir)
    world = ex.World.from_environment(cfg)
    try:
        data = ex.load_dataset(cfg, "shakespeare_char")
        run = ex.TrainingRun(cfg, data, 0, ex.Runtime.choose(cfg, world), checkpoint=None)
        assert run.micro_steps == 1, run.micro_steps
        batch = fixed_batches(cfg, data)[world.rank]
        run.sampler.next_batch = lambda: batch
        run.accumulate_gradients(0)
        torch.save({name: p.grad for name, p in run.model.named_parameters()}, Path(out_dir) / f"grads_{world.rank}.pt")
        del run  # (its DDP wrapper must be gone before the process group is: see World.close)
    finally:
        world.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
