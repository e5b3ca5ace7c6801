"""Checkpoints of a NUTS run, so that a sample job killed mid-sampling resumes where it was.

A checkpoint holds the chains' sampler state after warmup or after the last completed
block of draws (NumPyro's ``HMCState``, every array on the host) and the draws collected
so far. Continuing a chain from its saved state reproduces the uninterrupted run bit for
bit: every NUTS transition is a function of the state alone, its PRNG key included.

The file is pickled (the state is a tree of NumPyro's named tuples) and read only by a
rerun of the job that wrote it; ``key`` identifies that job (data, model, settings,
library versions), and a checkpoint with another key is ignored and replaced.

This module imports neither JAX nor NumPyro.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmcflow.io import atomic_path

log = logging.getLogger(__name__)


@dataclass
class SavedRun:
    """What a checkpoint holds.

    ``state``: the sampler state of every chain after the last saved draw (host arrays);
    ``samples`` and ``stats``: per completed block, ``{site: (chains, draws, …)}`` and
    ``{field: (chains, draws)}``; ``draws``: draws per chain saved so far.
    """

    key: str
    state: object
    samples: list[dict[str, np.ndarray]] = field(default_factory=list)
    stats: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def draws(self) -> int:
        return sum(next(iter(block.values())).shape[1] for block in self.samples) if self.samples else 0


def run_key(**facts) -> str:
    """A digest of everything that determines a run's draws (JSON values, and arrays by
    their dtype, shape and bytes)."""
    digest = hashlib.sha256()
    for name in sorted(facts):
        value = facts[name]
        digest.update(name.encode())
        if isinstance(value, Mapping) and all(isinstance(v, np.ndarray) for v in value.values()):
            for array_name in sorted(value):
                array = np.ascontiguousarray(value[array_name])
                digest.update(f"{array_name}{array.dtype}{array.shape}".encode())
                digest.update(array.tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class Checkpoint:
    """The checkpoint file ``path`` of the run identified by ``key``, saved every ``every``
    draws per chain."""

    def __init__(self, path: str | os.PathLike, every: int, key: str):
        self.path = Path(path)
        self.every = every
        self.key = key

    def load(self) -> SavedRun | None:
        """The saved run, or ``None`` where there is none, it is unreadable, or it belongs
        to another run (other data, settings or library versions): the run starts afresh."""
        if not self.path.exists():
            return None
        try:
            with self.path.open("rb") as file:
                saved = pickle.load(file)
        except Exception as error:  # a checkpoint is a cache: never trust, recompute
            log.warning("ignoring unreadable checkpoint %s (%s: %s)", self.path, type(error).__name__, error)
            return None
        if not isinstance(saved, SavedRun) or saved.key != self.key:
            log.warning("ignoring checkpoint %s: it was written by another run (data, settings or versions)", self.path)
            return None
        return saved

    def save(self, saved: SavedRun) -> None:
        """Write ``saved`` atomically (a kill while writing leaves the previous checkpoint)."""
        with atomic_path(self.path) as tmp, tmp.open("wb") as file:
            pickle.dump(saved, file, protocol=pickle.HIGHEST_PROTOCOL)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
