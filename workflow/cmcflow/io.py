"""Atomic file output: a failed or killed job never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def default_mode(base: int) -> int:
    """``base`` (0o666 for files, 0o777 for directories) less the process umask: the mode a
    plain ``open`` or ``mkdir`` would give. Temporary files are created private (0600/0700);
    published outputs get this, so group members on a shared file system can read them."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def remove_stale_temporaries(target: Path) -> None:
    """Remove what an earlier, killed writer of ``target`` left behind (``.<name>.*.tmp``
    beside it)."""
    for stale in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, own_output: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the same directory, so the final ``os.replace`` is atomic
    on POSIX file systems (including the shared file systems of clusters). ``own_output``:
    ``path`` is the job's own output, which no other process writes, so temporaries that a
    killed earlier run left beside it are removed first (not so for a shared cache entry).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if own_output:
        remove_stale_temporaries(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, default_mode(0o666))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; rename it onto ``path`` only on success.

    ``path`` must not exist yet (Snakemake removes a directory output before its job runs).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, default_mode(0o777))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, own_output: bool = True) -> None:
    with atomic_path(path, own_output=own_output) as tmp:
        tmp.write_bytes(data)


def _plain(value: object) -> object:
    """JSON for NumPy scalars and arrays (e.g. attributes read back from NetCDF)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_plain) + "\n").encode())


def read_json(path: str | os.PathLike) -> object:
    return json.loads(Path(path).read_text())


def encode_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """NumPy arrays as the bytes of an ``.npz`` file (no pickled objects)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def decode_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of :func:`encode_arrays`' bytes, loaded without pickling."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def write_arrays(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    write_bytes_atomic(path, encode_arrays(arrays))


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    return decode_arrays(Path(path).read_bytes())
