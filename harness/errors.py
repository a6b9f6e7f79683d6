"""The two kinds of failure every entry point turns into one line and an exit code."""


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, occupied run folder): one line, exit 2."""
    exit_code = 2


class RunFailed(Exception):
    """The run could not go on for a reason outside the user's input (e.g. offline download): exit 1."""
    exit_code = 1
