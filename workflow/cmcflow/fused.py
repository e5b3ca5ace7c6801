"""The logistic log-likelihood and its gradient in one pass over the data: a C++ kernel
(``kernels/logistic.cc``) called through the XLA FFI, built on first use for this CPU.

    ℓ(c) = Σ_j m_j (y_j η_j − log(1 + e^{η_j})),   η_j = β · x_j + b + offset_j,
    ∇_β ℓ = Σ_j m_j (y_j − σ(η_j)) x_j,   ∂ℓ/∂b = Σ_j m_j (y_j − σ(η_j)),

with ``c = (β, b)`` ``(P + 1,)``, the data ``XT (P, R)``, ``y``, ``offset`` ``(R,)`` and
``mask (R,)`` bool, in each ``jax.precision`` as the logistic model holds them (:data:`KERNELS`):
``mixed``, data float32 and ``c`` float64; ``float32``; ``float64``. Per-row arithmetic in
the data's type, sums in float64. XLA's reverse-mode gradient of the same sum reads ``XT``
twice (β·XT, then XT r); the kernel reads it once, in row blocks that stay in cache, on XLA's
own thread pool (bench/results/fused_gradient.md).

The kernel also reads ``XT`` as tiles (:func:`feature_tiles`): each block of rows of every
feature one stretch of memory, one stream to read instead of P (bench/results/roofline.md).
Where the kernel computes the logistic model's likelihood, a job lays its features out so
(:func:`device_layout`: the model's ``ModelSpec.device_layout``).

The same library holds the value alone at a batch of coefficients ``(B, P + 1)``: each block
of rows is read once for all B, so reweight's batches of proposal draws cost the per-row
arithmetic, not B reads of the data, nor XLA's ``(B, R)`` intermediates.

Sample and reweight jobs turn it on (:func:`enable`, ``sample.fused_likelihood``); where it
does not apply (:func:`applies`) the model computes the same sum with XLA. A build that
fails (no compiler) leaves XLA's sum in place, with a warning in the job's log.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from cmcflow.jaxenv import cpu_signature, host_cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "logistic.cc"
#: The kernel for each pair of dtypes (data, coefficients): its precision, and its library
#: symbols for the value and gradient, and for the values at a batch of coefficients.
KERNELS = {
    ("float32", "float64"): ("mixed", "Logistic", "LogisticValues"),
    ("float32", "float32"): ("float32", "LogisticF32", "LogisticF32Values"),
    ("float64", "float64"): ("float64", "LogisticF64", "LogisticF64Values"),
}


def target(precision: str, values: bool = False) -> str:
    """The name in XLA's registry of FFI targets of ``precision``'s kernel: value and
    gradient, or (``values``) the values at a batch of coefficients."""
    return f"cmcflow_logistic_{'values_' if values else ''}{precision}"


#: Every kernel's target name (programs stored with them: cmcflow.transforms).
TARGETS = tuple(target(precision, values) for precision, *_ in KERNELS.values() for values in (False, True))
#: Bytes of each feature's rows in a tile of :func:`feature_tiles`: the kernel's step with
#: AVX-512 (a feature's 512 bytes; with AVX2 256, half a tile), so that a step reads its rows
#: of all features as one stretch of memory.
TILE_BYTES = 512
#: g++ flags: the loops over rows vectorise only with -ffast-math; -march=native builds for
#: the CPU it runs on, hence one library per CPU type (:func:`library_path`).
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")

#: ``registered``: the kernel is in XLA's registry (once per process: XLA refuses a second
#: library under one name); ``enabled``: models use it; ``used``: a model has.
_state = {"registered": False, "enabled": False, "used": False}


def library_path(build_dir: str | os.PathLike) -> Path:
    """Where the kernel built for this CPU type, this source, these flags and this JAX lives
    under ``build_dir``."""
    import jax

    key = "|".join([SOURCE.read_text(), " ".join(FLAGS), jax.__version__, cpu_signature()])
    return Path(build_dir) / f"logistic-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def build(build_dir: str | os.PathLike) -> Path:
    """The kernel's shared library under ``build_dir``, compiled (``$CXX``, else ``g++``)
    unless it is there; written under a temporary name and renamed, so that jobs building
    it at once each leave a whole library. Raises ``OSError`` (no compiler) or
    ``subprocess.CalledProcessError`` (its messages in ``stderr``)."""
    import jax.ffi

    library = library_path(build_dir)
    if library.exists():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    compiler = os.environ.get("CXX", "g++")
    command = [compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(partial)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        partial.unlink(missing_ok=True)
    return library


def enable(build_dir: str | os.PathLike) -> bool:
    """Build (or find) the kernel under ``build_dir`` and register it with XLA, so that
    :func:`applies` holds where the data suit it; ``False``, with a warning, where it
    cannot be built or loaded (the model then sums with XLA)."""
    import jax.ffi

    if not _state["registered"]:
        built_here = not library_path(build_dir).exists()
        started = time.perf_counter()
        try:
            library = ctypes.cdll.LoadLibrary(str(build(build_dir)))
        except subprocess.CalledProcessError as error:
            message = error.stderr[-500:]
            log.warning("the fused likelihood kernel did not build (%s); XLA computes the likelihood", message)
            return False
        except OSError as error:
            log.warning("the fused likelihood kernel is not available (%s); XLA computes the likelihood", error)
            return False
        for precision, value_symbol, values_symbol in KERNELS.values():
            for name, symbol in ((target(precision), value_symbol), (target(precision, True), values_symbol)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
        _state["registered"] = True
        if built_here:
            log.info(
                "likelihood: built the fused kernel for this CPU type in %.1f s (once: later jobs load it)",
                time.perf_counter() - started,
            )
        log.info("likelihood: the fused kernel %s", library._name)
    _state["enabled"] = True
    return True


def enable_in_job(wanted: bool, compilation_cache_dir: str | None) -> bool:
    """:func:`enable` where ``wanted`` (``sample.fused_likelihood``), with the library kept
    beside the job's persistent compilation cache (one per CPU type, built by the first
    job); without a cache, in a temporary directory of this process. ``False``, building
    nothing, where not wanted or in a job whose JAX runs on a GPU (the kernel is a CPU one:
    :func:`applies`)."""
    import jax

    if not wanted:
        return False
    if jax.default_backend() != "cpu":
        log.info("likelihood: XLA's (the fused kernel is for CPU jobs; this one runs on %s)", jax.default_backend())
        return False
    if compilation_cache_dir is not None:
        return enable(Path(host_cache_dir(compilation_cache_dir)) / "kernels")
    scratch = tempfile.mkdtemp(prefix="cmcflow-kernels-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    return enable(scratch)


def enabled() -> bool:
    """Whether models traced from now on use the kernel where :func:`applies` holds."""
    return _state["enabled"]


def used() -> bool:
    """Whether a model in this process has computed its likelihood with the kernel."""
    return _state["used"]


def applies(XT, y, offset, mask) -> bool:
    """Whether :func:`logistic_log_likelihood` takes these data: the kernel is enabled, JAX
    runs on the CPU, and the data are all float32 or all float64 with a bool mask (every
    ``jax.precision``). Decided when the model is traced: a program keeps the choice it was
    traced with."""
    suits = _suits(XT, y, offset, mask)
    _state["used"] |= suits
    return suits


def _suits(XT, y, offset, mask) -> bool:
    """:func:`applies`, without recording a use."""
    import jax
    import jax.numpy as jnp

    dtypes = {jnp.dtype(array.dtype).name for array in (XT, y, offset)}
    return (
        _state["enabled"]
        and jax.default_backend() == "cpu"
        and len(dtypes) == 1
        and dtypes <= {"float32", "float64"}
        and jnp.dtype(mask.dtype) == jnp.bool_
    )


def tile_rows(dtype) -> int:
    """Rows a tile of :func:`feature_tiles` holds of features of ``dtype``: :data:`TILE_BYTES`
    of each (128 float32, 64 float64)."""
    return TILE_BYTES // np.dtype(dtype).itemsize


def feature_tiles(XT: np.ndarray) -> np.ndarray:
    """``XT (P, R)`` as the kernel's tiles ``(⌈R / T⌉, P, T)``, ``T`` = :func:`tile_rows`:
    tile ``t`` holds the rows ``[t T, t T + T)`` of feature 0, then of feature 1, …; the
    last tile's rows beyond ``R`` are zeros (the kernel reads ``R`` rows: ``y``'s)."""
    features, rows = XT.shape
    T = tile_rows(XT.dtype)
    full, rest = divmod(rows, T)
    tiles = np.zeros((full + (rest > 0), features, T), dtype=XT.dtype)
    tiles[:full] = XT[:, : full * T].reshape(features, full, T).transpose(1, 0, 2)
    tiles[full:, :, :rest] = XT[:, full * T :]
    return tiles


def feature_count(XT) -> int:
    """P of the features ``XT``: ``(P, R)``, or tiles ``(R_t, P, T)``."""
    return XT.shape[1] if XT.ndim == 3 else XT.shape[0]


def device_layout(kwargs: dict) -> dict:
    """The logistic model's keyword arguments (:func:`cmcflow.transforms.model_kwargs`)
    with ``XT`` as :func:`feature_tiles` where the kernel will compute the likelihood (it
    is enabled, :func:`applies`, no weights), else as they are. One copy of the features
    per job (about ten gradients' time), then every gradient reads one stream of them."""
    import jax.numpy as jnp

    data = [kwargs[name] for name in ("XT", "y", "offset", "mask")]
    if kwargs.get("weight") is not None or kwargs["XT"].ndim != 2 or not _suits(*data):
        return kwargs
    return {**kwargs, "XT": jnp.asarray(feature_tiles(np.asarray(kwargs["XT"])))}


def logistic_log_likelihood(coef, XT, y, offset, mask):
    """ℓ at ``coef (P + 1,)`` (β, then the intercept), a scalar of ``coef``'s dtype: one pass of the
    kernel for the value and, under differentiation, the gradient with it. ``XT``: ``(P,
    R)`` or its :func:`feature_tiles`. Its JVP is
    ∇ℓ · t; differentiated twice (the Hessian the combination weighs a shard by), the
    gradient's JVP is the Hessian-vector product H t = −X̃ᵀ (w ⊙ X̃ t), w_j = m_j σ(η_j)
    (1 − σ(η_j)), X̃ the features with a column of ones, computed by XLA: the Hessian is
    needed once per shard, the gradient at every leapfrog step; differentiated three times (the
    third derivatives of ``combine.second_order``), that rule's own gradient is this function
    again. The data are not differentiated. Under ``vmap`` over ``coef`` alone,
    undifferentiated (reweight's batches of draws), one call of the values kernel for the
    batch ``(B, P + 1)``; differentiated, or with batched data, one kernel call per set of
    parameters."""
    return _differentiable()(coef, XT, y, offset, mask)


@functools.cache
def _differentiable():
    """:func:`logistic_log_likelihood` as JAX functions with their JVPs, made on first use
    (the model modules import this one where JAX is not: the shard stage)."""
    import jax
    import jax.numpy as jnp

    def precision(coef, XT):
        """The kernel's precision for these dtypes (:data:`KERNELS`)."""
        dtypes = (jnp.dtype(XT.dtype).name, jnp.dtype(coef.dtype).name)
        if dtypes not in KERNELS:
            raise TypeError(f"the fused likelihood takes data and coefficients of dtypes {list(KERNELS)}, not {dtypes}")
        return KERNELS[dtypes][0]

    def kernel(coef, XT, y, offset, mask):
        shapes = (jax.ShapeDtypeStruct((), coef.dtype), jax.ShapeDtypeStruct(coef.shape, coef.dtype))
        call = jax.ffi.ffi_call(target(precision(coef, XT)), shapes, vmap_method="sequential")
        return call(XT, y, offset, mask, coef)

    @jax.custom_batching.custom_vmap
    def value(coef, XT, y, offset, mask):
        return kernel(coef, XT, y, offset, mask)[0]

    @value.def_vmap
    def value_batched(axis_size, in_batched, coef, XT, y, offset, mask):
        if in_batched[0] and not any(in_batched[1:]):  # coef (B, P + 1), the data shared
            shape = jax.ShapeDtypeStruct(coef.shape[:1], coef.dtype)
            call = jax.ffi.ffi_call(target(precision(coef, XT), values=True), shape, vmap_method="sequential")
            return call(XT, y, offset, mask, coef), True
        in_axes = [0 if batched else None for batched in in_batched]
        return jax.vmap(lambda *args: kernel(*args)[0], in_axes=in_axes)(coef, XT, y, offset, mask), True

    @jax.custom_jvp
    def value_and_gradient(coef, XT, y, offset, mask):
        return kernel(coef, XT, y, offset, mask)

    @value_and_gradient.defjvp
    def value_and_gradient_jvp(primals, tangents):
        coef, XT, y, offset, mask = primals
        direction = tangents[0]
        # itself, not the kernel: differentiated again (third derivatives), this rule applies again
        value, gradient = value_and_gradient(coef, XT, y, offset, mask)
        eta = times_features(coef[:-1].astype(XT.dtype), XT, len(y)) + coef[-1].astype(XT.dtype) + offset
        probability = jax.nn.sigmoid(eta)
        weights = jnp.where(mask, probability * (1 - probability), 0)
        projected = weights * (
            times_features(direction[:-1].astype(XT.dtype), XT, len(y)) + direction[-1].astype(XT.dtype)
        )
        curvature = jnp.append(features_times(XT, projected), jnp.sum(projected)).astype(gradient.dtype)
        return (value, gradient), (gradient @ direction, -curvature)

    def times_features(vector, XT, rows):
        """``vector (P,)`` · the features: ``(R,)``."""
        if XT.ndim == 2:
            return vector @ XT
        return jnp.einsum("p,tpk->tk", vector, XT).reshape(-1)[:rows]

    def features_times(XT, vector):
        """The features · ``vector (R,)``: ``(P,)``."""
        if XT.ndim == 2:
            return XT @ vector
        padded = jnp.pad(vector, (0, XT.shape[0] * XT.shape[2] - len(vector)))
        return jnp.einsum("tpk,tk->p", XT, padded.reshape(XT.shape[0], XT.shape[2]))

    @jax.custom_jvp
    def log_likelihood(coef, XT, y, offset, mask):
        return value(coef, XT, y, offset, mask)

    @log_likelihood.defjvp
    def log_likelihood_jvp(primals, tangents):
        coef, *data = primals
        value, gradient = value_and_gradient(coef, *data)
        return value, gradient @ tangents[0]

    return log_likelihood
