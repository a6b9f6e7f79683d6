"""The errors a run ends with, each carrying its exit code: the CLI prints one `error:` line, never a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, occupied run folder): one line, exit 2."""
    exit_code = 2


class RunFailed(Exception):
    """The run could not go on for a reason outside the user's input (e.g. offline download): exit 1."""
    exit_code = 1


class Interrupted(Exception):
    """SIGTERM / Ctrl-C: the run checkpointed and stopped; exit 130."""
    exit_code = 130
