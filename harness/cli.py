"""Command-line plumbing shared by the entry points: a parser whose errors are one `error:` line (exit 2),
a --flag per field of a dataclass, and the main() wrapper that turns UserError / RunFailed into that line."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from harness.errors import RunFailed, UserError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on errors; we print one line and exit 2."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


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
                                choices=f.metadata["choices"], **kwargs)
    return parser


def entry_point(work, argv: list[str], interrupted: str = "interrupted") -> int:
    """The main() of train_agent.py, sweep.py and prune.py: work(argv), then 0; a UserError or RunFailed is one
    `error:` line and its exit code (--debug: the traceback instead); Ctrl-C prints `interrupted` and gives 130."""
    try:
        work(argv)
        return 0
    except (UserError, RunFailed) as e:
        if "--debug" in argv:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
