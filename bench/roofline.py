"""Roofline of the logistic model's gradient and of NUTS (issue 13 b).

For 10^4, 10^5 and 10^6 rows of 20 features, in each ``jax.precision``, on one JAX device:

* **gradient**: the median time of one jitted value-and-gradient of the potential energy
  (its data the program's arguments, as in the sample program; the fused likelihood,
  ``sample.fused_likelihood``'s default, in every precision, reading the features as its
  tiles, as a sample job lays them out), against the memory-bandwidth bound: the bytes of
  every data array the gradient must read once (X, y, offset, weight, mask) ÷ this machine's
  bandwidth. The bandwidth is measured here with a STREAM-style copy (``numpy.copyto`` of 512
  MiB, read + write bytes counted, over all cores), at the same moments as the gradient:
  rounds of one copy then the gradient's calls, in the worker's process, the ratio taken per
  round and its median reported, so that both are of one moment (the copy's rate moves
  between minutes: roofline.md, the copies' median against their best); the table also
  shows the gradient against the best of 5 copies of the main process, with 1 and with all
  cores, and against the best of 5 plain reads (NumPy's sum of the copy's source, next to
  no arithmetic a byte): how fast this machine reads, where the copy counts reads and writes;
* **NUTS**: the wall time of one chain (warmup and sampling) against the leapfrog steps it
  took × the gradient time: what NUTS adds to the gradients. The chain is one compiled
  program (NumPyro's NUTS kernel, initialised and stepped in one ``jax.jit``, as each chain
  of a sample job's ``pmap``) timed once built, so neither tracing nor XLA's compilation is
  in its time.

Beside the gradient it times, in the same process, the least an XLA program that reads the
data needs (one jitted sum over every data array: one read), and the gradient of the same
model with the features stored rows-major, ``X (R, P)``, the layout before ``XT (P, R)``
(:func:`cmcflow.models.rows.regression_features`), computed by XLA (the fused likelihood
takes ``XT``): what the layout and the kernel are worth together;
and the gradient called back to back inside one compiled loop, as NUTS calls it, without
the dispatch a call from Python pays: what NUTS' own work per step is measured against.
Where a target is missed, its bound splits the gradient's time in the loop at the largest
size into the read of its data at the machine's best read and the part of the kernel's own
work that the read does not hide (the work: its time in the loop at the largest size whose
data fit in the last-level cache, where memory's rate does not bound it, scaled by rows).

Each precision runs in its own process (JAX's x64 mode is fixed at start-up), repeated.

    python bench/roofline.py [--repeats 3] [--from-results]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from common import RESULTS, cell, spread, target, write_results

ROWS = (10_000, 100_000, 1_000_000)
FEATURES = 20
PRECISIONS = ("float64", "float32", "mixed")
#: One NUTS chain per size: few iterations, enough to weigh NUTS' own work against its gradients.
NUTS_ITERATIONS = 150
COPY_BYTES = 512 * 2**20
#: Rounds of a copy then gradient calls, per size (:func:`paired_gradient_over_bound`).
PAIRED_ROUNDS = 15
#: Targets (issue 13 b).
GRADIENT_TARGET = 1.5
NUTS_TARGET = 1.3


class StreamCopy:
    """A STREAM-style copy of ``COPY_BYTES`` split over ``threads`` threads (NumPy releases
    the GIL while copying), its arrays written once beforehand; each call copies once and
    returns the bytes per second, read + write counted."""

    def __init__(self, threads: int):
        self.source = np.ones(COPY_BYTES // 8)
        self.target = np.zeros_like(self.source)
        parts = np.array_split(np.arange(self.source.size), threads)
        self.slices = [slice(part[0], part[-1] + 1) for part in parts]
        self.pool = ThreadPoolExecutor(threads)

    def __call__(self) -> float:
        started = time.perf_counter()
        list(self.pool.map(lambda part: np.copyto(self.target[part], self.source[part]), self.slices))
        return 2 * COPY_BYTES / (time.perf_counter() - started)


class StreamRead(StreamCopy):
    """A read of :class:`StreamCopy`'s source split over ``threads`` threads (NumPy's sum,
    which releases the GIL), with next to no arithmetic per byte; each call reads once and
    returns the bytes per second."""

    def __call__(self) -> float:
        started = time.perf_counter()
        list(self.pool.map(lambda part: np.add.reduce(self.source[part]), self.slices))
        return COPY_BYTES / (time.perf_counter() - started)


def best_rate(stream: StreamCopy, repeats: int = 5) -> float:
    """Bytes per second of ``stream`` (a :class:`StreamCopy` or :class:`StreamRead`), best of
    ``repeats`` calls; its threads are shut down after."""
    best = max(stream() for _ in range(repeats))
    stream.pool.shutdown()
    return best


def last_level_cache_bytes() -> int:
    """Bytes of the largest cache level of CPU 0 (Linux sysfs: ``cache/index*/size``)."""
    caches = Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")
    levels = {int((cache / "level").read_text()): (cache / "size").read_text().strip() for cache in caches}
    size = levels[max(levels)]
    return int(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else int(size)


def copy_bandwidth(threads: int) -> float:
    """Bytes per second of :class:`StreamCopy` over ``threads`` threads, best of 5."""
    return best_rate(StreamCopy(threads))


def paired_gradient_over_bound(function, argument, data_bytes: int, copy: StreamCopy) -> tuple[list, list]:
    """``PAIRED_ROUNDS`` rounds of one ``copy``, then calls of the compiled ``function(argument)``
    (at least 5, and 0.05 s): per round, the calls' median time over the bound at that copy's
    bandwidth (``data_bytes`` ÷ bytes per second), and the copy's bytes per second."""
    ratios, bandwidths = [], []
    for _ in range(PAIRED_ROUNDS):
        bandwidth = copy()
        times = call_times(function, argument, calls=5, seconds=0.05, compile_first=False)
        ratios.append(float(np.median(times)) * bandwidth / data_bytes)
        bandwidths.append(bandwidth)
    return ratios, bandwidths


def worker(precision: str) -> dict:
    """One process: gradient and NUTS timings of every size in ``precision``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workflow"))
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=1, precision=precision, compilation_cache_dir=None)
    import jax
    import jax.numpy as jnp

    from cmcflow.fused import enable_in_job
    from cmcflow.models import get_model

    enable_in_job(True, None)  # the default sample.fused_likelihood: the kernel, in every precision

    spec = get_model("logistic")
    copy = StreamCopy(os.cpu_count())
    results = {}
    for rows in ROWS:
        kwargs, _ = logistic_kwargs(spec, rows)
        data_bytes = sum(int(value.nbytes) for value in kwargs.values() if hasattr(value, "nbytes"))
        laid_out = spec.device_layout(kwargs)  # as a sample job lays them out (the kernel's tiles)
        call, z = gradient_call(spec.numpyro_model, laid_out)
        times = call_times(call, z)
        paired_ratios, paired_bandwidths = paired_gradient_over_bound(call, z, data_bytes, copy)
        in_loop = loop_gradient_seconds(spec.numpyro_model, laid_out, calls=max(10, int(0.05 / np.median(times))))
        rows_major_kwargs = {key: value for key, value in kwargs.items() if key != "XT"} | {"X": kwargs["XT"].T.copy()}
        read_once = jax.jit(lambda arrays: sum(jnp.sum(array) for array in arrays))
        arrays = [value for value in kwargs.values() if hasattr(value, "nbytes")]

        nuts_times, steps = nuts_run_times(spec.numpyro_model, laid_out)
        results[str(rows)] = {
            "data_bytes": data_bytes,
            "gradient_seconds": float(np.median(times)),
            "gradient_calls": len(times),
            "paired_gradient_over_bound": float(np.median(paired_ratios)),
            "paired_copy_bandwidth": float(np.median(paired_bandwidths)),
            "paired_copy_bandwidth_best": max(paired_bandwidths),
            "loop_gradient_seconds": in_loop,
            "rows_major_gradient_seconds": float(np.median(gradient_times(rows_major_logistic, rows_major_kwargs))),
            "read_once_seconds": float(np.median(call_times(read_once, arrays))),
            "leapfrog_steps": steps,
            "nuts_seconds": float(np.median(nuts_times)),
            "nuts_runs": len(nuts_times),
        }
    return results


def logistic_kwargs(spec, rows: int):
    """The logistic model's keyword arguments for ``rows`` synthetic rows of ``FEATURES``
    correlated features (seed 0), and the generator, to draw more from after the data."""
    from cmcflow.models.rows import correlated_features
    from cmcflow.transforms import model_kwargs

    rng = np.random.default_rng(0)
    X = correlated_features(rng, rows, FEATURES)
    y = (rng.random(rows) < 1 / (1 + np.exp(-(X @ rng.normal(0, 0.5, FEATURES))))).astype(float)
    return model_kwargs(spec.featurize({"features": X, "label": y}, rows, {}), {"prior_sd": 2.5}), rng


def split_data(kwargs: dict) -> tuple[dict, dict]:
    """The model's keyword arguments split into its data arrays (as JAX arrays: a program's
    arguments, as in the sample program) and the rest (static options)."""
    import jax
    import jax.numpy as jnp

    arrays = {name: jnp.asarray(value) for name, value in kwargs.items() if isinstance(value, np.ndarray | jax.Array)}
    return arrays, {name: value for name, value in kwargs.items() if name not in arrays}


def potential_gradient(model, kwargs: dict):
    """The value and gradient of ``model``'s potential energy as a function of ``(z, data)``,
    the data arrays (JAX arrays: the program's arguments, as in the sample program) and the
    model's initial point ``z``."""
    import jax
    from numpyro.infer.util import initialize_model, potential_energy

    setup = initialize_model(jax.random.PRNGKey(0), model, model_kwargs=kwargs)
    arrays, static = split_data(kwargs)
    gradient = jax.value_and_grad(lambda z, data: potential_energy(model, (), {**data, **static}, z))
    return gradient, arrays, setup.param_info.z


def gradient_call(model, kwargs: dict):
    """The jitted value and gradient of ``model``'s potential energy as a function of the
    position alone, and the model's initial point: the data arrays the program's arguments,
    as in the sample program (closed over, they are the program's constants, which XLA
    copies before a custom call such as the fused likelihood's)."""
    import jax

    gradient, arrays, z = potential_gradient(model, kwargs)
    program = jax.jit(gradient)
    return (lambda z: program(z, arrays)), z


def gradient_times(model, kwargs: dict) -> list[float]:
    """Seconds of each call (:func:`call_times`) of :func:`gradient_call` at the initial point."""
    return call_times(*gradient_call(model, kwargs))


def loop_gradient_seconds(model, kwargs: dict, calls: int) -> float:
    """Seconds per gradient of ``calls`` gradients one after another inside one compiled
    ``fori_loop``, as NUTS calls them (each at a point moved by the last gradient, so none
    can be skipped or hoisted); the median over :func:`call_times`' calls of the loop. A call
    from Python (:func:`gradient_times`) also pays JAX's dispatch and the wait for its
    result, which back-to-back gradients in one program do not."""
    import jax

    gradient, arrays, z = potential_gradient(model, kwargs)

    @jax.jit
    def loop(z, data):
        def step(_, carry):
            z, total = carry
            value, grad = gradient(z, data)
            return jax.tree.map(lambda position, g: position - 1e-9 * g, z, grad), total + value

        return jax.lax.fori_loop(0, calls, step, (z, 0.0))

    return float(np.median(call_times(lambda z: loop(z, arrays), z))) / calls


def nuts_run_times(model, kwargs: dict) -> tuple[list[float], int]:
    """Seconds of each run of one NUTS chain of ``NUTS_ITERATIONS`` warmup and as many
    sampling iterations (NumPyro's kernel with its defaults, initialised at a fixed key and
    stepped in one ``jax.jit``, the data arrays the program's arguments), compiled before the
    first is timed; repeated while the runs have taken under 2 s (at most 10). And the
    leapfrog steps of a run: the same in every run (same key)."""
    import jax
    import jax.numpy as jnp
    from numpyro.infer import NUTS

    arrays, static = split_data(kwargs)
    kernel = NUTS(model)

    @jax.jit
    def chain(key, data):
        model_kwargs = {**data, **static}
        state = kernel.init(key, NUTS_ITERATIONS, None, (), model_kwargs)

        def iteration(state, _):
            state = kernel.sample(state, (), model_kwargs)
            return state, state.num_steps

        _, steps = jax.lax.scan(iteration, state, length=2 * NUTS_ITERATIONS)
        return jnp.sum(steps)

    program = chain.lower(jax.random.PRNGKey(1), arrays).compile()
    times = []
    while not times or (sum(times) < 2.0 and len(times) < 10):
        started = time.perf_counter()
        steps = int(jax.block_until_ready(program(jax.random.PRNGKey(1), arrays)))
        times.append(time.perf_counter() - started)
    return times, steps


def call_times(function, argument, calls: int = 20, seconds: float = 2.0, compile_first: bool = True) -> list[float]:
    """Seconds of each of at least ``calls`` calls of ``function(argument)`` (``seconds`` at
    most beyond that, at most 2,000), after a first call that compiles it (``compile_first``)."""
    import jax

    if compile_first:
        jax.block_until_ready(function(argument))
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < calls or (time.perf_counter() < deadline and len(times) < 2000):
        started = time.perf_counter()
        jax.block_until_ready(function(argument))
        times.append(time.perf_counter() - started)
    return times


def rows_major_logistic(X, y, offset, mask, prior_sd):
    """The logistic model with the features as ``X (R, P)`` (no weights): the layout the
    built-in models used before ``XT``, timed beside them."""
    import numpyro
    import numpyro.distributions as dist

    from cmcflow.models.rows import in_data_precision

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([X.shape[1]]).to_event(1))
    intercept, beta = in_data_precision(X, intercept, beta)
    with numpyro.plate("rows", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=intercept + X @ beta + offset).mask(mask), obs=y)


def main(repeats: int) -> None:
    bandwidths = {"1 thread": [], f"{os.cpu_count()} threads": []}
    reads = {"1 thread": [], f"{os.cpu_count()} threads": []}
    runs = {precision: [] for precision in PRECISIONS}
    for _ in range(repeats):
        bandwidths["1 thread"].append(copy_bandwidth(1))
        bandwidths[f"{os.cpu_count()} threads"].append(copy_bandwidth(os.cpu_count()))
        reads["1 thread"].append(best_rate(StreamRead(1)))
        reads[f"{os.cpu_count()} threads"].append(best_rate(StreamRead(os.cpu_count())))
        for precision in PRECISIONS:
            output = subprocess.run(
                [sys.executable, __file__, "--worker", precision], capture_output=True, text=True, check=True
            ).stdout
            runs[precision].append(json.loads(output.strip().splitlines()[-1]))
    write_report(bandwidths, runs, reads, last_level_cache_bytes())


def write_report(bandwidths: dict, runs: dict, reads: dict, cache_bytes: int, measured: str | None = None) -> None:
    """The JSON (with every process's ``runs``) and the tables, from the measurements:
    ``bandwidths`` {threads: [copy bytes/s per repeat]}, ``runs`` {precision: [worker
    results]}, ``reads`` {threads: [read bytes/s per repeat]}, ``cache_bytes`` the machine's
    last-level cache."""
    repeats = len(next(iter(runs.values())))
    bandwidth = {name: spread(values) for name, values in bandwidths.items()}
    machine_bandwidth = max(entry["median"] for entry in bandwidth.values())
    read = {name: spread(values) for name, values in reads.items()}
    machine_read = max(entry["median"] for entry in read.values())

    sizes = {}
    for precision in PRECISIONS:
        for rows in map(str, ROWS):
            entries = [run[rows] for run in runs[precision]]
            data_bytes = entries[0]["data_bytes"]
            gradient = spread([entry["gradient_seconds"] for entry in entries])
            bound = data_bytes / machine_bandwidth
            sizes[f"{precision} {rows}"] = {
                "precision": precision,
                "rows": int(rows),
                "data_bytes": data_bytes,
                "bandwidth_bound_seconds": bound,
                "gradient_seconds": gradient,
                "gradient_over_bound": spread([entry["gradient_seconds"] / bound for entry in entries]),
                "paired_gradient_over_bound": spread([entry["paired_gradient_over_bound"] for entry in entries]),
                "paired_copy_bandwidth": spread([entry["paired_copy_bandwidth"] for entry in entries]),
                "paired_copy_bandwidth_best": spread([entry["paired_copy_bandwidth_best"] for entry in entries]),
                "read_once_seconds": spread([entry["read_once_seconds"] for entry in entries]),
                "gradient_over_read_once": spread(
                    [entry["gradient_seconds"] / entry["read_once_seconds"] for entry in entries]
                ),
                "rows_major_gradient_seconds": spread([entry["rows_major_gradient_seconds"] for entry in entries]),
                "rows_major_over_gradient": spread(
                    [entry["rows_major_gradient_seconds"] / entry["gradient_seconds"] for entry in entries]
                ),
                "loop_gradient_seconds": spread([entry["loop_gradient_seconds"] for entry in entries]),
                "leapfrog_steps": spread([entry["leapfrog_steps"] for entry in entries]),
                "nuts_seconds": spread([entry["nuts_seconds"] for entry in entries]),
                "nuts_over_steps_times_gradient": spread(
                    [entry["nuts_seconds"] / (entry["leapfrog_steps"] * entry["gradient_seconds"]) for entry in entries]
                ),
            }

    targets = []
    for precision in PRECISIONS:
        large = [sizes[f"{precision} {rows}"] for rows in ROWS if rows >= 100_000]
        worst = max(large, key=lambda entry: entry["paired_gradient_over_bound"]["median"])
        ratio = worst["paired_gradient_over_bound"]["median"]
        targets.append(
            target(
                "13b",
                f"logistic gradient / bandwidth bound (copies at the same moments), >= 10^5 rows, {precision}"
                f"{' (the default)' if precision == 'mixed' else ''} (largest)",
                f"{ratio:.2f}x ({worst['gradient_over_bound']['median']:.2f}x against the best copy)",
                f"<= {GRADIENT_TARGET}x",
                ratio <= GRADIENT_TARGET,
                bound=gradient_bound(sizes, precision, machine_read, cache_bytes),
            )
        )
        nuts = max(sizes[f"{precision} {rows}"]["nuts_over_steps_times_gradient"]["median"] for rows in ROWS)
        targets.append(
            target(
                "13b",
                f"NUTS wall / (leapfrog steps x gradient), {precision} (largest over sizes)",
                f"{nuts:.2f}x",
                f"<= {NUTS_TARGET}x",
                nuts <= NUTS_TARGET,
                bound=nuts_bound(sizes, precision),
            )
        )
    bandwidth_text, read_text = (
        ", ".join(
            f"{name} {cell({k: v / 1e9 for k, v in entry.items() if k != 'runs'}, 1)} GB/s"
            for name, entry in rates.items()
        )
        for rates in (bandwidth, read)
    )
    table = [
        "# Roofline: logistic gradient and NUTS against the memory-bandwidth bound (issue 13 b)",
        "",
        f"Bandwidth (STREAM-style copy of 512 MiB, read + write), best of 5 in the main process before each "
        f"run: {bandwidth_text}; the best copy's bound uses {machine_bandwidth / 1e9:.1f} GB/s. Gradient / bound: "
        f"per round of one copy over all cores then the gradient's calls ({PAIRED_ROUNDS} rounds a size, in the "
        "worker), the gradient's median time over the bound at that copy's bandwidth; the median over rounds "
        "(the target's figure; the copies' median and best over those rounds beside it). "
        f"{repeats} runs per row; one JAX device, one chain; {FEATURES} features; NUTS {NUTS_ITERATIONS} warmup + "
        f"{NUTS_ITERATIONS} draws; the fused likelihood in every precision.",
        "",
        f"Read bandwidth (NumPy's sum of the same 512 MiB, next to no arithmetic a byte), best of 5 beside "
        f"each run's copies: {read_text}. Against the best read's bound ({machine_read / 1e9:.1f} GB/s): "
        + ", ".join(
            f"{precision} "
            + " / ".join(f"{over_read_bound(sizes[f'{precision} {rows}'], machine_read):.2f}x" for rows in ROWS)
            for precision in PRECISIONS
        )
        + " (gradient / read bound at "
        + ", ".join(f"{rows:,}" for rows in ROWS)
        + " rows).",
        "",
        "| precision | rows | data read (MB) | gradient (ms) | gradient / bound | copies beside it (GB/s): median, "
        "best | best copy's bound (ms) | gradient / best copy's bound | leapfrog steps | NUTS (s) "
        "| NUTS / (steps x gradient) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes.values():
        ms = {k: v * 1e3 for k, v in entry["gradient_seconds"].items() if k != "runs"}
        table.append(
            f"| {entry['precision']} | {entry['rows']:,} | {entry['data_bytes'] / 1e6:.1f} | {cell(ms, 3)} | "
            f"{cell(entry['paired_gradient_over_bound'])} | {entry['paired_copy_bandwidth']['median'] / 1e9:.1f}, "
            f"{entry['paired_copy_bandwidth_best']['median'] / 1e9:.1f} | "
            f"{entry['bandwidth_bound_seconds'] * 1e3:.3f} | {cell(entry['gradient_over_bound'])} | "
            f"{entry['leapfrog_steps']['median']:.0f} | {cell(entry['nuts_seconds'])} | "
            f"{cell(entry['nuts_over_steps_times_gradient'])} |"
        )
    table += [
        "",
        "Where the gradient's time goes: one read of the data in XLA (a jitted sum over every data array), "
        "the same model's gradient with the features stored rows-major, X (R, P), the layout before XT (P, R), "
        "computed by XLA (the fused likelihood takes XT), and the gradient called back to back inside one "
        "compiled loop, as NUTS calls it (the table above times one call from Python).",
        "",
        "| precision | rows | one read (ms) | one read / bound | gradient / one read "
        "| gradient, rows-major X, XLA (ms) | rows-major / the gradient | gradient in a compiled loop (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes.values():
        read_ms = {k: v * 1e3 for k, v in entry["read_once_seconds"].items() if k != "runs"}
        rows_major_ms = {k: v * 1e3 for k, v in entry["rows_major_gradient_seconds"].items() if k != "runs"}
        loop_ms = {k: v * 1e3 for k, v in entry["loop_gradient_seconds"].items() if k != "runs"}
        table.append(
            f"| {entry['precision']} | {entry['rows']:,} | {cell(read_ms, 3)} | "
            f"{entry['read_once_seconds']['median'] / entry['bandwidth_bound_seconds']:.2f} | "
            f"{cell(entry['gradient_over_read_once'])} | {cell(rows_major_ms, 3)} | "
            f"{cell(entry['rows_major_over_gradient'])} | {cell(loop_ms, 3)} |"
        )
    write_results(
        "roofline",
        {
            "benchmark": "13b roofline",
            "repeats": repeats,
            "bandwidth": bandwidth,
            "machine_bandwidth": machine_bandwidth,
            "read_bandwidth": read,
            "machine_read_bandwidth": machine_read,
            "last_level_cache_bytes": cache_bytes,
            "sizes": sizes,
            "targets": targets,
            "runs": {"bandwidths": bandwidths, "reads": reads, "workers": runs},
        },
        table,
        measured=measured,
    )


def gradient_bound(sizes: dict, precision: str, machine_read: float, cache_bytes: int) -> str:
    """What bounds the gradient, from the table, at the size >= 10^5 rows where it is furthest
    from the bound: the fused likelihood's one read of the data against XLA's plain read and
    against the machine's best read (``machine_read`` bytes per second), and its time split
    into that read and the part of the kernel's own work the read does not hide, in a compiled
    loop as NUTS calls it. The work: the gradient's time in a compiled loop at the largest size
    whose data fit in the ``cache_bytes`` of the last-level cache (where memory's rate does not
    bound it), scaled by rows."""
    worst = max(
        (sizes[f"{precision} {rows}"] for rows in ROWS if rows >= 100_000),
        key=lambda entry: entry["paired_gradient_over_bound"]["median"],
    )
    cached = max(
        (entry for entry in sizes.values() if entry["precision"] == precision and entry["data_bytes"] < cache_bytes),
        key=lambda entry: entry["rows"],
    )
    paired_bandwidth = worst["paired_copy_bandwidth"]["median"]
    read_over_bound = worst["read_once_seconds"]["median"] * paired_bandwidth / worst["data_bytes"]
    read = worst["data_bytes"] / machine_read
    loop = worst["loop_gradient_seconds"]["median"]
    work = cached["loop_gradient_seconds"]["median"] * worst["rows"] / cached["rows"]
    unhidden = (
        f"the read and {(loop - read) / work:.2f} of that work, which the stream hides only in part"
        if loop > read
        else "no more than the read: the work is hidden behind it"
    )
    return (
        f"at {worst['rows']:,} rows the gradient takes {worst['paired_gradient_over_bound']['median']:.2f}x the "
        f"bound; a plain read of the same data (XLA's jitted sum over every data array, next to no arithmetic) "
        f"takes about {read_over_bound:.2f}x it at the copies' median bandwidth, and the gradient "
        f"{worst['gradient_over_read_once']['median']:.2f}x that read. "
        + read_bound_sentence(worst, machine_read, paired_bandwidth)
        + "The fused likelihood reads the data once, in one stream of tiles, on all cores: that read is its floor. "
        f"Its own work, timed where its data sit in the {cache_bytes / 2**20:.0f} MiB last-level cache "
        f"({cached['rows']:,} rows, {cached['data_bytes'] / 1e6:.1f} MB, in a compiled loop), would take "
        f"{work * 1e3:.2f} ms for {worst['rows']:,} rows, {work / read:.2f} of that read; inside a compiled loop, "
        f"as NUTS calls it, the gradient takes {loop * 1e3:.2f} ms ({worst['gradient_seconds']['median'] * 1e3:.2f} "
        f"ms called from Python): {unhidden}. (Its exp, log1p and divisions are a small part of that work: "
        "without them a probe was 7% faster in float64, README.)"
    )


def read_bound_sentence(entry: dict, machine_read: float, copy_bandwidth: float) -> str:
    """How the machine's best read compares with the copy, and the gradient against it."""
    faster = machine_read > copy_bandwidth
    return (
        f"This machine reads at up to {machine_read / 1e9:.1f} GB/s (NumPy's sum, the best over 1 and all threads), "
        f"{'faster' if faster else 'slower'} than the copy's {copy_bandwidth / 1e9:.1f} GB/s of read + write "
        f"counted{', so the read does not bound the gradient' if faster else ''}: at that rate its data take "
        f"{entry['data_bytes'] / machine_read * 1e3:.2f} ms, and the gradient "
        f"{over_read_bound(entry, machine_read):.2f}x that. "
    )


def over_read_bound(entry: dict, machine_read: float) -> float:
    """A size's median gradient time over its data's bytes read at ``machine_read`` bytes/s."""
    return entry["gradient_seconds"]["median"] * machine_read / entry["data_bytes"]


def nuts_bound(sizes: dict, precision: str) -> str:
    """What NUTS adds to its gradients at the size where it adds most, from the table."""
    worst = max(
        (sizes[f"{precision} {rows}"] for rows in ROWS),
        key=lambda entry: entry["nuts_over_steps_times_gradient"]["median"],
    )
    step_ms = worst["nuts_seconds"]["median"] / worst["leapfrog_steps"]["median"] * 1e3
    gradient_ms = worst["gradient_seconds"]["median"] * 1e3
    loop_ms = worst["loop_gradient_seconds"]["median"] * 1e3
    return (
        f"at {worst['rows']:,} rows a NUTS step takes {step_ms:.3f} ms against one gradient's {gradient_ms:.3f} ms "
        f"called from Python, {loop_ms:.3f} ms inside a compiled loop as NUTS calls it: {step_ms - loop_ms:.3f} ms "
        "a step is NUTS' own work (the tree, momenta, energies), which does not shrink with the data, so the "
        "smaller and faster the gradient, the larger the ratio"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="measure nothing: rewrite the tables from bench/results/roofline.json",
    )
    arguments = parser.parse_args()
    if arguments.from_results:
        record = json.loads((RESULTS / "roofline.json").read_text())
        runs = record["runs"]
        write_report(
            runs["bandwidths"], runs["workers"], runs["reads"], record["last_level_cache_bytes"], record["written"]
        )
    elif arguments.worker:
        print(json.dumps(worker(arguments.worker)))
    else:
        main(arguments.repeats)
