"""Errors that a user can act on (as opposed to bugs, which keep their traceback)."""


class InputError(Exception):
    """Bad input table or bad settings; the message is one line naming file, column, problem."""


class ConfigError(InputError):
    """A configuration value that breaks the schema or what the schema cannot check (e.g. a
    model's own options); the message names the key path and the rule. ``details``: more
    than the line can hold (a user module's traceback), for a log file."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details
