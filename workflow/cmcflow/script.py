"""What every rule script does first: log to the rule's log file, and turn user errors
into one clear line instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from cmcflow.errors import InputError

log = logging.getLogger("cmcflow")


def open_log(path: str) -> None:
    """Send stderr and the ``cmcflow`` logger to the rule's ``log:`` file."""
    sys.stderr = open(path, "w", buffering=1)  # noqa: SIM115 - lives as long as the job
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Exit with status 1 and a one-line ``cmcflow: error: …`` on an :class:`InputError`.

    The line goes to the log and to the job's own stderr (the terminal, or the scheduler's
    job log), so the user sees it next to Snakemake's "Error in rule …". Any other
    exception is a bug and propagates with its traceback.
    """
    try:
        yield
    except InputError as error:
        line = f"cmcflow: error: {error}"
        print(line, file=sys.stderr, flush=True)
        if sys.stderr is not sys.__stderr__:
            print(line, file=sys.__stderr__, flush=True)
        sys.exit(1)
