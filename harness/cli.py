"""Command-line plumbing shared by the entry points: a parser whose errors are one `error:` line (exit 2),
a --flag per field of a dataclass (help, choices and bounds from its metadata), and the main() wrappers
that turn UserError / RunFailed into that line and its exit code."""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional

from harness.distributed import RankFailed, World
from harness.errors import Interrupted, RunFailed, UserError
from harness.run_folder import recorded_settings
from harness.validation import check_bounds


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on errors; we print one line and exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def option(default, help: str, choices=None, bounds: Optional[str] = None) -> dataclasses.Field:
    """A dataclass field that is also a --flag: its --help text, allowed values and allowed range kept next to it
    (experiment.py's Config, every entry point's Args).

    bounds: an interval such as "[0, 1)" or "(0, inf)"; the parser and validate() check every field
    against its own, and nan or inf never pass (an inf end means "no upper limit")."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "bounds": bounds})


def field_choices(f: dataclasses.Field) -> Optional[tuple]:
    """A field's allowed values; a callable gives them when asked (experiment.py's --agent: its AGENTS registry,
    so that adding an agent is the class and its registry entry)."""
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def dataclass_parser(fields_of, description: str) -> argparse.ArgumentParser:
    """A one-line-error parser with a --flag per field of a dataclass whose fields carry "help" and "choices"
    metadata (train_agent.py's Args, sweep.py's SweepArgs)."""
    parser = OneLineArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(fields_of):
        kwargs = dict(dest=f.name, default=f.default, help=f.metadata["help"] + f" [default: {f.default}]")
        if f.type == "bool":
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{f.name}", type={"int": int, "float": float, "str": str}[f.type],
                                choices=field_choices(f), **kwargs)
    return parser


def entry_point(work, argv: list[str], interrupted: str = "interrupted") -> int:
    """The main() of train_agent.py, sweep.py and prune.py: work(argv), then 0; a UserError or RunFailed is one
    `error:` line and its exit code (--debug: the traceback instead); an Interrupted (a sweep stopped before
    its end) is one `interrupted:` line saying how to continue, 130; Ctrl-C prints `interrupted` and gives 130."""
    try:
        work(argv)
        return 0
    except (UserError, RunFailed, Interrupted) as e:
        if "--debug" in argv:
            raise
        print(f"{'interrupted' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def add_config_flags(parser: argparse.ArgumentParser, config_type) -> argparse.ArgumentParser:
    """A --flag per field of the config dataclass, default None (so a typed value can be told from a default);
    values arrive as text, for parse_field_value."""
    for f in dataclasses.fields(config_type):
        flag, meta, allowed = f"--{f.name}", f.metadata, field_choices(f)
        choices = f" {{{','.join(allowed)}}}" if allowed else ""
        bounds = f" in {meta['bounds']}" if meta["bounds"] else ""
        kwargs = dict(dest=f.name, default=None, help=meta["help"] + choices + bounds + f" [Config: {f.default}]")
        if f.type in ("bool", "Optional[bool]"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:  # converted (and checked against choices) by parse_field_value, which knows per-dataset values
            parser.add_argument(flag, metavar=f.name.upper() if not allowed else "CHOICE", **kwargs)
    return parser


def parse_field_value(f: dataclasses.Field, text: str, per_dataset=()):
    """'2e-3' -> 0.002, checked against the field's bounds and choices; 'a=2e-3,b=1e-3' -> {dataset: value}
    when every name is one of per_dataset (the datasets a training setting may differ on)."""
    items = [item.split("=", 1) for item in text.split(",")] if "=" in text else None
    if items and per_dataset and all(len(i) == 2 and i[0].strip() in per_dataset for i in items):
        return {name.strip(): parse_field_value(f, value.strip(), per_dataset) for name, value in items}
    kind = {"int": int, "float": float, "str": str}[f.type]
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"argument --{f.name}: invalid {f.type} value: {text!r} (see --help)") from None
    check_bounds(f, value)  # nan, inf and out-of-range values stop here, before anything is written
    allowed = field_choices(f)
    if allowed and value not in allowed:
        raise UserError(f"argument --{f.name}: invalid choice: {text!r} (choose from {', '.join(allowed)})")
    return value


def job_main(argv: list[str], parse, run) -> int:
    """experiment.py's main(): run(*parse(argv), argv, world) in one process or as a rank under torchrun,
    0 when it ends well; UserError / RunFailed / Interrupted are one line and their exit code (--debug: the
    traceback), an OSError (a full disk) one line and 1, Ctrl-C 130. Under torchrun any other failure on any
    rank is one line from rank 0 naming the rank that failed, and 1. The process group is left in any case."""
    debug = "--debug" in argv
    report = os.environ.get("RANK", "0") == "0"  # under torchrun rank 0 speaks for the job: one line, not one per rank
    world, together = World(), False  # together: every rank ends here alike (see World.close)
    try:
        base, typed = parse(argv)
        # --resume: the run's own device and backend, read by rank 0 before the process group is joined
        world = World.from_environment(base, recorded_settings if getattr(base, "resume", False) else None)
        with world.failures_shared():  # an exception on one rank: every rank ends, naming it (RankFailed)
            run(base, typed, argv, world)
        together = True
        return 0
    except (UserError, RunFailed, Interrupted) as e:  # raised on every rank alike (World.from_main, agreed stops)
        together = not isinstance(e, RankFailed)  # a failed rank's peers may be gone: no farewell barrier
        if debug:
            raise
        if report:
            print(f"{'interrupted' if isinstance(e, Interrupted) else 'error'}: {e}", file=sys.stderr, flush=True)
            world.reported = True
        return e.exit_code
    except OSError as e:  # a full disk, a vanished folder: earlier results are intact (atomic writes)
        if debug:
            raise
        if report:
            print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if report:
            print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        world.close(together)
