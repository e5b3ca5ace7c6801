"""Traced programs kept on disk beside the persistent compilation cache (``jax.export``).

JAX's persistent compilation cache skips XLA's compile, but every fresh process still
traces the Python function to a jaxpr and lowers it before it can look the program up:
for the overlay's BFGS loop (vmapped over starts and pairs, inside ``shard_map``)
that is seconds of every align job (bench/results/summary.md, 13d); for the Hessian a
sample job weighs its shard by (the model traced through two derivatives), a tenth of a
second of every sample job (bench/results/compile_cache.md).
:func:`stored_program` traces a function once per argument shape, keeps the serialized
StableHLO (``jax.export``) under ``exported/`` of the compilation cache directory, and later
processes load it instead of tracing; the compile that follows is then a cache hit.

Written by hand because JAX offers no persistent trace cache. What keys a stored program
(:func:`program_key`): the caller's name and settings, the argument shapes and dtypes, the
devices, x64 mode, the versions of JAX and jaxlib, and the digest of cmcflow's own source,
so that an edit to any module retraces rather than loading a stale program.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import uuid
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from jax import export

#: Subdirectory of the host's compilation cache that holds the stored programs.
EXPORTED = "exported"


@functools.cache
def source_digest() -> str:
    """SHA-256 of every module of the cmcflow package, in path order."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def program_key(name: str, settings: object, specs: Sequence[jax.ShapeDtypeStruct], devices: int) -> str:
    """Hex digest naming one stored program: ``name`` and ``repr(settings)`` from the caller,
    the argument ``specs``, ``devices``, the backend, x64 mode, JAX's and jaxlib's versions
    and :func:`source_digest`."""
    facts = [
        name,
        repr(settings),
        *(f"{spec.shape}:{spec.dtype}" for spec in specs),
        f"devices={devices}",
        jax.default_backend(),
        f"x64={jax.config.jax_enable_x64}",
        jax.__version__,
        importlib.metadata.version("jaxlib"),
        source_digest(),
    ]
    return hashlib.sha256("\n".join(facts).encode()).hexdigest()[:32]


def stored_programs_dir() -> Path | None:
    """``exported/`` under the process's persistent compilation cache directory (set by
    :func:`cmcflow.jaxenv.configure_jax`); ``None`` where the cache is off."""
    cache = jax.config.jax_compilation_cache_dir
    return None if not cache else Path(cache) / EXPORTED


def stored_program(
    function: Callable,
    specs: Sequence,
    sharding: jax.sharding.Sharding,
    key: str,
    directory: Path | None,
    custom_calls: Sequence[str] = (),
) -> Callable:
    """``function`` (a ``jax.jit`` function; every argument and result laid out by ``sharding``)
    as a jitted program for arguments of ``specs`` (``jax.ShapeDtypeStruct`` or pytrees of
    them), loaded from ``directory/<key>.jaxexport`` when a readable one is there, else
    traced (``jax.export``) and stored there (written to a temporary file and renamed, so
    concurrent jobs never read half a program; where it cannot be written, with a warning,
    and the job goes on). ``custom_calls``: names of this
    process's own FFI targets the program may call (JAX refuses to export calls without a
    compatibility guarantee; these are registered by the process that loads the program). With
    ``directory`` ``None`` nothing is stored and ``function`` is returned as it is. A stored
    program runs the same StableHLO as a fresh trace: results are identical."""
    if directory is None:
        return function
    path = directory / f"{key}.jaxexport"
    exported = None
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
        except Exception:  # unreadable (truncated, another format): trace it again below
            exported = None
    if exported is None:
        checks = [export.DisabledSafetyCheck.custom_call(name) for name in custom_calls]
        exported = export.export(function, disabled_checks=checks)(*specs)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            temporary = directory / f".{key}.{os.getpid()}.{uuid.uuid4().hex}"
            with open(temporary, "xb") as out:  # the umask's permissions, as JAX's own cache files
                out.write(exported.serialize())
            os.replace(temporary, path)
        except OSError as error:  # a read-only or full cache: this job runs, later ones trace again
            warnings.warn(f"cmcflow: could not store a traced program in {directory} ({error})", stacklevel=2)
    return jax.jit(exported.call, in_shardings=sharding, out_shardings=sharding)
