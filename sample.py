"""
Sample from a run folder's kept model, nanoGPT's sample.py convention.

    python sample.py --run run_0 --dataset shakespeare_char --seed 0 --start "ROMEO:" --num_samples 2 \
        --max_new_tokens 200 --temperature 0.8 --top_k 200
    python sample.py --run run_0 --start FILE:prompt.txt      # the prompt read from a file
    python sample.py --run prune_0 --key rl_0.5               # a prune folder's model (prune.py's output)

The model is experiment.py's model_<dataset>_<seed>.pt (defaults: the run's first dataset, seed 0), or a prune
folder's model_<key>_0.pt (--key unpruned: the model it pruned, a run's or, pruned twice, another prune folder's).
Tokens are decoded with the vocabulary of the data the run trained on (its meta.json, found where run.json says the
data was; checked against the run's sha256).
Samples go to stdout, each followed by a line of dashes as nanoGPT prints them; the same --sample_seed gives the
same samples on the same device and dtype (the tokens are drawn from a seeded CPU generator).
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

import experiment as ex
from harness.cli import dataclass_parser, entry_point, option
from model import load_model


@dataclass
class Args:
    run: str = option("run_0", "the run folder (experiment.py's) or prune folder (prune.py's) to sample from")
    dataset: str = option("", "which of the run's datasets; default: its first")
    seed: int = option(0, "seed index of the run's model (model_<dataset>_<seed>.pt)")
    key: str = option("", "a prune folder's model, a key of its final_info.json (rl_0.5, unpruned_finetuned, ...)")
    start: str = option("", "the prompt, or FILE:path to read it from a file; empty: a newline (a space where the "
                            "vocabulary has no newline, text8)")
    num_samples: int = option(10, "samples to draw")
    max_new_tokens: int = option(500, "tokens generated per sample")
    temperature: float = option(0.8, "1.0 = the model's distribution; lower: less random, higher: more")
    top_k: int = option(200, "sample among the top_k most likely tokens (0 = all)")
    sample_seed: int = option(1337, "seeds the sampling: the same seed, the same samples")
    device: str = option("auto", "where to sample; auto = cuda, else mps, else cpu", ("auto", "cpu", "cuda", "mps"))
    data_dir: str = option("", "folder holding <dataset>/ with its meta.json (default: where the run's data was)")
    debug: bool = option(False, "full tracebacks")


def parse_args(argv: list[str]) -> Args:
    args = Args(**vars(dataclass_parser(Args, __doc__.strip().split("\n\n")[0]).parse_args(argv)))
    for name in ("num_samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ex.UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.seed < 0 or args.top_k < 0 or args.sample_seed < 0:
        raise ex.UserError("--seed, --top_k and --sample_seed must be >= 0")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ex.UserError(f"--temperature must be a finite number above 0, got {args.temperature}")
    if args.dataset and args.dataset not in ex.DATASETS:
        raise ex.UserError(f"unknown dataset {args.dataset!r}; choose from {', '.join(ex.DATASETS)}")
    return args


@dataclass
class Kept:
    """The model to sample from, and where the vocabulary that decodes it is."""
    path: Path
    dataset: str
    config: dict  # the Config it was trained (or fine-tuned) with, as run.json keeps it
    data: dict    # run.json's provenance of its data: folder and sha256 per split


def read_run_record(run_dir: Path) -> dict:
    """run.json of experiment.py ("configs") or prune.py ("source"); any other folder is not ours to read."""
    if not run_dir.is_dir():
        raise ex.UserError(f"--run {run_dir} does not exist")
    record = ex.read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else None
    if not isinstance(record, dict) or not ({"configs", "source"} & set(record)):
        raise ex.UserError(f"--run {run_dir} is not a run folder of experiment.py or prune.py (no run.json of theirs)")
    return record


def run_model(run_dir: Path, record: dict, args: Args) -> Kept:
    """experiment.py's folder: model_<dataset>_<seed>.pt."""
    if args.key:
        raise ex.UserError(f"--key names a prune folder's model; {run_dir} is experiment.py's run folder: choose "
                           f"its model with --dataset and --seed")
    configs = record["configs"]
    dataset = args.dataset or next(iter(configs), "")
    if dataset not in configs:
        raise ex.UserError(f"--run {run_dir} has no {dataset} (it trained {', '.join(configs) or 'nothing'})")
    path = ex.model_file(run_dir, dataset, args.seed)
    if not path.exists():
        raise ex.UserError(f"{path} does not exist: the run kept no model for {dataset} seed {args.seed} "
                           f"(unfinished, another seed, or trained before experiment.py kept its models)")
    return Kept(path, dataset, configs[dataset], (record.get("data") or {}).get(dataset, {}))


def pruned_model(run_dir: Path, record: dict, args: Args) -> Kept:
    """prune.py's folder: model_<key>_0.pt, or with --key unpruned the model it pruned (a run's or, for a model
    pruned twice, another prune folder's: run.json names its file)."""
    source = record["source"]
    dataset = source.get("dataset", "")
    if args.dataset and args.dataset != dataset:
        raise ex.UserError(f"--run {run_dir} pruned a {dataset} model, not {args.dataset}")
    keys = sorted(p.name[len("model_"):-len("_0.pt")] for p in run_dir.glob("model_*_0.pt"))
    if not args.key:
        raise ex.UserError(f"--run {run_dir} is a prune folder: choose its model with --key "
                           f"({', '.join(['unpruned', *keys])})")
    path = Path(source["model"]) if args.key == "unpruned" else ex.model_file(run_dir, args.key, 0)
    if not path.exists():
        raise ex.UserError(f"--key {args.key}: {path} does not exist (the models of {run_dir}: "
                           f"{', '.join(['unpruned', *keys])})")
    return Kept(path, dataset, record.get("finetune_config") or {}, record.get("data") or {})


def load_vocabulary(kept: Kept, args: Args) -> tuple[ex.CharDataset, ex.Runtime]:
    """The dataset the model was trained on (its meta.json is the vocabulary), and where to sample."""
    try:
        cfg = ex.Config(**kept.config)
    except TypeError as e:
        raise ex.UserError(f"the run.json beside {kept.path} does not describe a run of this version ({e})") from None
    folder = kept.data.get("folder")
    data_dir = args.data_dir or (str(Path(folder).parent) if folder else cfg.data_dir)
    cfg = dataclasses.replace(cfg, data_dir=data_dir, device=args.device)
    data = ex.load_dataset(cfg, kept.dataset)
    recorded = kept.data.get("sha256")
    if recorded and recorded != data.provenance["sha256"]:  # another vocabulary would decode to nonsense, silently
        raise ex.UserError(f"the {kept.dataset} data in {data.provenance['folder']} is not what {kept.path.name} "
                           f"was trained on (its sha256 differs from run.json's): pass the right --data_dir")
    return data, ex.Runtime.choose(cfg)


def read_prompt(start: str, data: ex.CharDataset) -> list[int]:
    """--start as token ids: FILE:path reads the file; empty starts from a newline (a space without one)."""
    if start.startswith("FILE:"):
        try:
            start = Path(start[len("FILE:"):]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ex.UserError(f"--start {start}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not start:
        start = "\n" if "\n" in data.meta["stoi"] else " "
    return data.encode(start)


def sample(args: Args) -> list[str]:
    run_dir = Path(args.run)
    record = read_run_record(run_dir)
    kept = run_model(run_dir, record, args) if "configs" in record else pruned_model(run_dir, record, args)
    data, rt = load_vocabulary(kept, args)
    prompt = read_prompt(args.start, data)
    model = load_model(kept.path, rt.device)
    if model.config.vocab_size != data.vocab_size:
        raise ex.UserError(f"{kept.path} has {model.config.vocab_size} tokens, the {kept.dataset} vocabulary "
                           f"{data.vocab_size}: pass the --data_dir it was trained on")
    print(f"sampling {kept.path} ({kept.dataset}, {model.num_params():,} params) on {rt.device.type}",
          file=sys.stderr, flush=True)
    generator = torch.Generator().manual_seed(args.sample_seed)
    x = torch.tensor([prompt], dtype=torch.long, device=rt.device)
    samples = []
    for _ in range(args.num_samples):
        with rt.autocast:
            y = ex.generate(model, x, args.max_new_tokens, args.temperature, args.top_k or None, generator)
        samples.append(data.decode(y[0].tolist()))
        print(samples[-1], "---------------", sep="\n", flush=True)
    return samples


def main(argv: Optional[list[str]] = None) -> int:
    return entry_point(lambda argv: sample(parse_args(argv)), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
