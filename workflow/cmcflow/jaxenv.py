"""JAX process set-up for the heavy stages: environment first, then ``import jax``.

XLA reads ``XLA_FLAGS`` once, when JAX first initialises its backend, so the number of
virtual CPU devices must be in the environment before anything imports JAX. Every heavy
rule script calls :func:`configure_jax` before importing a JAX-using module, and the job
fails loudly if JAX does not then see exactly the requested devices.

A job runs on one of two platforms (the analysis' ``platform`` setting):

* ``cpu``: ``devices`` virtual CPU devices (``--xla_force_host_platform_device_count``),
  one NUTS chain or alignment slice each;
* ``gpu``: the one GPU the scheduler gave the job (CUDA), every chain on it
  (:func:`chain_layout`), with XLA allocating GPU memory as it needs it rather than 75% of
  it up front (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), so that jobs can share a node.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

#: The ``platform`` settings, and the JAX platform each runs on (``JAX_PLATFORMS``).
PLATFORMS = {"cpu": "cpu", "gpu": "cuda"}


def chain_layout(platform: str, chains: int) -> tuple[int, str]:
    """(JAX devices a job needs, NumPyro ``chain_method``) to run ``chains`` chains on
    ``platform``: on ``cpu`` one virtual device per chain, the chains in parallel
    (``pmap``); on ``gpu`` the job's one device, the chains vectorised (``vmap``: one
    program whose arrays carry a chain axis, which keeps a GPU busy where one chain
    cannot)."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, not {platform!r}")
    return (chains, "parallel") if platform == "cpu" else (1, "vectorized")


#: ``jax.precision`` settings: the floating type of the model's data (and of the products
#: that read them: :func:`cmcflow.models.rows.in_data_precision`), and of everything else
#: (parameters, the sampler's state, NumPyro's distributions). ``mixed``: data float32, the
#: rest float64 (JAX's x64 mode).
PRECISIONS = {"float64": ("float64", "float64"), "float32": ("float32", "float32"), "mixed": ("float32", "float64")}


@dataclass
class CompileClock:
    """Time JAX spent building XLA programs: tracing Python functions into jaxprs, then
    lowering and compiling them (or fetching them from the persistent cache, which removes
    the compiling but not the tracing).

    Fed by a ``jax.monitoring`` time-span listener installed by :func:`configure_jax`.
    ``seconds``: lowering and compiling, whose spans do not overlap. ``building_seconds``:
    the union of those spans and the traces'; a nested ``jit``'s trace lies inside its
    caller's, so the union, not the sum, is the time spent (tracing alone: the difference).
    """

    spans: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0
    persistent_cache_hits: int = 0

    def on_span(self, event: str, start: float, end: float, **_metadata) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += end - start
        if event in COMPILE_EVENTS or event == TRACE_EVENT:
            self.spans.append((start, end))

    def on_event(self, event: str, **_metadata) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.persistent_cache_hits += 1

    @property
    def building_seconds(self) -> float:
        total, covered_to = 0.0, -math.inf
        for start, end in sorted(self.spans):
            total += max(0.0, end - max(start, covered_to))
            covered_to = max(covered_to, end)
        return total


#: Top-level (non-overlapping) compilation events of ``jax._src.dispatch``.
COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
#: A trace of a Python function into a jaxpr (nested in its caller's trace for a nested jit).
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_CLOCK = CompileClock()


def xla_flags_with_devices(flags: str, devices: int) -> str:
    """``flags`` with the host-platform device count set to ``devices`` (replacing any)."""
    kept = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", flags).split()
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


@dataclass
class ProcessPrecision:
    """The ``jax.precision`` this process runs in (set by :func:`configure_jax`)."""

    name: str = "float64"

    @property
    def data_dtype(self) -> str:
        """The floating type that :func:`cmcflow.transforms.model_kwargs` gives data arrays."""
        return PRECISIONS[self.name][0]


PRECISION = ProcessPrecision()


def configure_jax(devices: int, precision: str, compilation_cache_dir: str | None, platform: str = "cpu") -> None:
    """Set the XLA/JAX environment, import JAX, and check the devices.

    ``devices``: on ``platform`` ``cpu``, virtual CPU devices to create (one NUTS chain or
    alignment slice each); on ``gpu``, 1 (the job's GPU);
    ``precision``: a key of :data:`PRECISIONS` (x64 mode unless ``float32``);
    ``compilation_cache_dir``: the persistent compilation
    cache shared by all jobs (``None`` disables it), which keeps every program however fast
    it compiled. Raises ``RuntimeError`` if JAX was imported earlier in this process (the
    flags would be ignored), or if JAX does not then see the devices asked for (on ``gpu``:
    no GPU at all, with what JAX said).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"jax.precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    chain_layout(platform, devices)  # checks the platform
    if "jax" in sys.modules:
        raise RuntimeError(
            "jax was imported before cmcflow.jaxenv.configure_jax(); the XLA device flags "
            "would be ignored. Call configure_jax() before importing any JAX-using module."
        )
    if platform == "cpu":
        os.environ["XLA_FLAGS"] = xla_flags_with_devices(os.environ.get("XLA_FLAGS", ""), devices)
    else:  # a real device: no virtual ones, and memory taken as needed
        os.environ["XLA_FLAGS"] = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", os.environ.get("XLA_FLAGS", "")).strip()
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    os.environ["JAX_PLATFORMS"] = PLATFORMS[platform]
    import jax
    import jax.monitoring

    PRECISION.name = precision
    jax.config.update("jax_enable_x64", PRECISIONS[precision][1] == "float64")
    if compilation_cache_dir is not None:
        host_cache = host_cache_dir(compilation_cache_dir, platform=platform)
        os.makedirs(host_cache, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(host_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax.monitoring.register_event_time_span_listener(COMPILE_CLOCK.on_span)
    jax.monitoring.register_event_listener(COMPILE_CLOCK.on_event)
    require_devices(devices, platform)


def cpu_signature(cpuinfo: str | None = None) -> str:
    """A digest (12 hex digits) of this host's CPU: architecture, model name and instruction-
    set flags (from ``cpuinfo``, by default ``/proc/cpuinfo``; the platform's processor
    string where there is none). JAX's persistent-cache key does not include the CPU's
    features, and a program compiled for one CPU type can die with an illegal instruction
    on another."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    first = cpuinfo.split("\n\n", 1)[0]  # the first processor's block
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    described = {key.strip(): value.strip() for key, value in fields.items()}
    parts = [platform.machine(), described.get("model name", platform.processor()), described.get("flags", "")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def host_cache_dir(compilation_cache_dir: str, cpuinfo: str | None = None, platform: str = "cpu") -> str:
    """The persistent compilation cache of this host's CPU type: a subdirectory of the
    shared ``compilation_cache_dir`` per :func:`cpu_signature`, so nodes of different CPU
    types never load each other's programs, while nodes of one type share theirs. GPU
    programs go to a ``gpu-`` subdirectory of the same signature (JAX's cache key holds the
    GPU's model)."""
    return os.path.join(compilation_cache_dir, f"{platform}-{cpu_signature(cpuinfo)}")


def require_devices(devices: int, platform: str = "cpu", found=None) -> None:
    """Raise ``RuntimeError`` unless JAX sees what the job asked for (``found``: the devices
    JAX sees, by default ``jax.devices()``): on ``cpu`` exactly ``devices`` devices; on
    ``gpu`` at least one GPU (the job uses the first; a node that shows more than the job
    was given is the scheduler's to fence)."""
    import jax

    if found is None:
        try:
            found = jax.devices()
        except Exception as error:  # JAX could not start the backend (no CUDA plugin: an AssertionError)
            raise RuntimeError(
                f"this job runs on a GPU (platform: {platform}) but JAX found none "
                f"({type(error).__name__}: {error}). Submit it to a "
                "GPU partition (README, 'GPU nodes') with JAX's CUDA wheels installed (envs/jax-gpu.yaml)"
            ) from None
    if platform == "gpu":
        if not found or any(device.platform != "gpu" for device in found):
            raise RuntimeError(
                f"this job runs on a GPU (platform: gpu) but JAX sees {found}; submit it to a GPU partition "
                "(README, 'GPU nodes') with JAX's CUDA wheels installed (envs/jax-gpu.yaml)"
            )
        return
    if len(found) != devices:
        raise RuntimeError(
            f"this job needs {devices} JAX devices but JAX sees {len(found)} ({found}); "
            f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
        )
