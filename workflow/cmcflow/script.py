"""What every rule script does first: log to the rule's log file, and turn user errors
into one clear line instead of a traceback; and last: end the finished job at once."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
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


def collect_cycles_rarely() -> None:
    """Run CPython's cyclic garbage collector rarely in this process: young objects every
    50,000 net allocations instead of 700, older generations 20 times more rarely still
    (default: 10). For the short jobs whose seconds are mostly imports and tracing (sample,
    reweight, correct): they allocate millions of objects that live on, and each full
    collection scans them all (under the default thresholds, a fifth of a second of a warm
    sample job: README, "Many small shards"). Garbage without cycles is freed at once
    either way; these jobs' cycles come mostly from tracing their programs, which a batch of
    shards does once, and young cycles are still collected."""
    gc.set_threshold(50_000, 20, 20)


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Run a job's body: exit with status 1 and a one-line ``cmcflow: error: …`` on an
    :class:`InputError`, and at once (:func:`exit_finished`) when the body finishes.

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
    exit_finished()


def exit_finished() -> None:
    """End a job whose outputs are written (each closed, atomically): flush the log and the
    standard streams, run the ``atexit`` handlers, and leave without the interpreter's
    teardown of every module and object, which takes 0.35–0.4 s once JAX, NumPyro and
    xarray are imported (the XLA client and its thread pools among them) and writes nothing.
    """
    import atexit

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        if stream is not None and not stream.closed:
            stream.flush()
    os._exit(0)
