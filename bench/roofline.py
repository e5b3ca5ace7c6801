"""Roofline of the logistic model's gradient and of NUTS (issue 13 b).

For 10^4, 10^5 and 10^6 rows of 20 features, in each ``jax.precision``, on one JAX device:

* **gradient**: the median time of one jitted value-and-gradient of the potential energy
  (and, for what bounds it, of the two matrix-vector products X β and Xᵀ r alone, and of
  a one-pass value and gradient written as a scan over row blocks),
  against the memory-bandwidth bound: the bytes of every data array the gradient must read
  once (X, y, offset, weight, mask) ÷ this machine's bandwidth. The bandwidth is measured
  here with a STREAM-style copy (``numpy.copyto`` of 512 MiB, read + write bytes counted,
  with 1 and with all cores; the larger is the machine's);
* **NUTS**: the wall time of one chain (warmup and sampling, compilation excluded) against
  the leapfrog steps it took × the gradient time: what NUTS adds to the gradients.

Each precision runs in its own process (JAX's x64 mode is fixed at start-up), repeated.

    python bench/roofline.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from common import cell, spread, target, write_results

ROWS = (10_000, 100_000, 1_000_000)
FEATURES = 20
PRECISIONS = ("float64", "float32", "mixed")
#: One NUTS chain per size: few iterations, enough to weigh NUTS' own work against its gradients.
NUTS_ITERATIONS = 150
COPY_BYTES = 512 * 2**20
#: Targets (issue 13 b).
GRADIENT_TARGET = 1.5
NUTS_TARGET = 1.3


def copy_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes per second of a STREAM-style copy of ``COPY_BYTES`` (read + write counted),
    split over ``threads`` threads (NumPy releases the GIL while copying); best of ``repeats``."""
    source = np.ones(COPY_BYTES // 8)
    target_array = np.empty_like(source)
    parts = np.array_split(np.arange(source.size), threads)
    slices = [slice(part[0], part[-1] + 1) for part in parts]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda part: np.copyto(target_array[part], source[part]), slices))
            best = min(best, time.perf_counter() - started)
    return 2 * COPY_BYTES / best


def worker(precision: str) -> dict:
    """One process: gradient and NUTS timings of every size in ``precision``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workflow"))
    from cmcflow.jaxenv import COMPILE_CLOCK, configure_jax

    configure_jax(devices=1, precision=precision, compilation_cache_dir=None)
    import jax
    from numpyro.infer import MCMC, NUTS
    from numpyro.infer.util import initialize_model

    from cmcflow.models import get_model
    from cmcflow.models.rows import correlated_features
    from cmcflow.transforms import model_kwargs

    spec = get_model("logistic")
    results = {}
    for rows in ROWS:
        rng = np.random.default_rng(0)
        X = correlated_features(rng, rows, FEATURES)
        y = (rng.random(rows) < 1 / (1 + np.exp(-(X @ rng.normal(0, 0.5, FEATURES))))).astype(float)
        features = spec.featurize({"features": X, "label": y}, rows, {})
        kwargs = model_kwargs(features, {"prior_sd": 2.5})
        data_bytes = sum(int(value.nbytes) for value in kwargs.values() if hasattr(value, "nbytes"))
        setup = initialize_model(jax.random.PRNGKey(0), spec.numpyro_model, model_kwargs=kwargs)
        gradient = jax.jit(jax.value_and_grad(setup.potential_fn))
        times = call_times(gradient, setup.param_info.z)
        # the two products the gradient cannot do without, each alone: X beta and X^T r
        X, beta, residual = kwargs["X"], jax.numpy.ones(FEATURES, kwargs["X"].dtype), kwargs["y"]
        forward_times = call_times(jax.jit(lambda X, beta: X @ beta), X, beta)
        backward_times = call_times(jax.jit(lambda X, residual: X.T @ residual), X, residual)
        fused_times = call_times(jax.jit(jax.value_and_grad(fused_log_likelihood)), beta, X, kwargs["y"])

        mcmc = MCMC(
            NUTS(spec.numpyro_model),
            num_warmup=NUTS_ITERATIONS,
            num_samples=NUTS_ITERATIONS,
            progress_bar=False,
        )
        compiled_before = COMPILE_CLOCK.seconds
        started = time.perf_counter()
        mcmc.warmup(jax.random.PRNGKey(1), collect_warmup=True, extra_fields=("num_steps",), **kwargs)
        warmup_steps = int(np.sum(mcmc.get_extra_fields()["num_steps"]))
        mcmc.run(mcmc.post_warmup_state.rng_key, extra_fields=("num_steps",), **kwargs)
        jax.block_until_ready(mcmc.get_samples())
        steps = warmup_steps + int(np.sum(mcmc.get_extra_fields()["num_steps"]))
        nuts_seconds = time.perf_counter() - started - (COMPILE_CLOCK.seconds - compiled_before)
        results[str(rows)] = {
            "data_bytes": data_bytes,
            "gradient_seconds": float(np.median(times)),
            "gradient_calls": len(times),
            "forward_product_seconds": float(np.median(forward_times)),
            "backward_product_seconds": float(np.median(backward_times)),
            "fused_seconds": float(np.median(fused_times)),
            "leapfrog_steps": steps,
            "nuts_seconds": nuts_seconds,
        }
    return results


#: Rows per block of :func:`fused_log_likelihood`: 2,000 x 20 float32 is 160 kB, within a
#: core's L2 cache, so the block is read from memory once for both products.
FUSED_BLOCK_ROWS = 2_000


def fused_log_likelihood(beta, X, y):
    """Σ_n y_n η_n − log(1 + e^η_n), η = X β, and its gradient Xᵀ(y − σ(η)) in one pass over
    X (``lax.scan`` over blocks of :data:`FUSED_BLOCK_ROWS` rows; a custom VJP returns the
    gradient the forward pass accumulated): the one-pass program the bound assumes, built
    from XLA's own operations."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def log_likelihood(beta, X, y):
        return forward(beta, X, y)[0]

    def forward(beta, X, y):
        blocks = (X.reshape(-1, FUSED_BLOCK_ROWS, X.shape[1]), y.reshape(-1, FUSED_BLOCK_ROWS))

        def block(total, rows):
            X_block, y_block = rows
            eta = X_block @ beta
            value, gradient = total
            value = value + jnp.sum(y_block * eta - jax.nn.softplus(eta))
            return (value, gradient + X_block.T @ (y_block - jax.nn.sigmoid(eta))), None

        zero = (jnp.zeros((), X.dtype), jnp.zeros_like(beta))
        (value, gradient), _ = jax.lax.scan(block, zero, blocks)
        return value, gradient

    log_likelihood.defvjp(forward, lambda gradient, tangent: (tangent * gradient, None, None))
    return log_likelihood(beta, X, y)


def call_times(function, *arguments) -> list[float]:
    """Seconds of each call of the compiled ``function(*arguments)`` (after one warm-up call):
    at least 20 calls, more for up to 2 s."""
    import jax

    jax.block_until_ready(function(*arguments))
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 20 or (time.perf_counter() < deadline and len(times) < 2000):
        started = time.perf_counter()
        jax.block_until_ready(function(*arguments))
        times.append(time.perf_counter() - started)
    return times


def main(repeats: int) -> None:
    bandwidths = {"1 thread": [], f"{os.cpu_count()} threads": []}
    runs = {precision: [] for precision in PRECISIONS}
    for _ in range(repeats):
        bandwidths["1 thread"].append(copy_bandwidth(1))
        bandwidths[f"{os.cpu_count()} threads"].append(copy_bandwidth(os.cpu_count()))
        for precision in PRECISIONS:
            output = subprocess.run(
                [sys.executable, __file__, "--worker", precision], capture_output=True, text=True, check=True
            ).stdout
            runs[precision].append(json.loads(output.strip().splitlines()[-1]))
    bandwidth = {name: spread(values) for name, values in bandwidths.items()}
    machine_bandwidth = max(entry["median"] for entry in bandwidth.values())

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
                "products_seconds": spread(
                    [entry["forward_product_seconds"] + entry["backward_product_seconds"] for entry in entries]
                ),
                "fused_seconds": spread([entry["fused_seconds"] for entry in entries]),
                "leapfrog_steps": spread([entry["leapfrog_steps"] for entry in entries]),
                "nuts_seconds": spread([entry["nuts_seconds"] for entry in entries]),
                "nuts_over_steps_times_gradient": spread(
                    [entry["nuts_seconds"] / (entry["leapfrog_steps"] * entry["gradient_seconds"]) for entry in entries]
                ),
            }

    targets = []
    for precision in PRECISIONS:
        large = [sizes[f"{precision} {rows}"] for rows in ROWS if rows >= 100_000]
        worst = max(entry["gradient_over_bound"]["median"] for entry in large)
        targets.append(
            target(
                "13b",
                f"logistic gradient / bandwidth bound, >= 10^5 rows, {precision} (largest)",
                f"{worst:.2f}x",
                f"<= {GRADIENT_TARGET}x",
                worst <= GRADIENT_TARGET,
                bound=gradient_bound(sizes, precision),
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
                bound="NUTS' own work per step (tree building, momentum, energy) on small shards: see the table",
            )
        )
    measured = ", ".join(
        f"{name} {cell({k: v / 1e9 for k, v in entry.items() if k != 'runs'}, 1)} GB/s"
        for name, entry in bandwidth.items()
    )
    table = [
        "# Roofline: logistic gradient and NUTS against the memory-bandwidth bound (issue 13 b)",
        "",
        f"Bandwidth (STREAM-style copy of 512 MiB, read + write): {measured}"
        f"; bound uses {machine_bandwidth / 1e9:.1f} GB/s. {repeats} runs per row; one JAX device, one chain;"
        f" {FEATURES} features; NUTS {NUTS_ITERATIONS} warmup + {NUTS_ITERATIONS} draws.",
        "",
        "| precision | rows | data read (MB) | bound (ms) | gradient (ms) | gradient / bound | X beta + X^T r "
        "alone (ms) | one pass, fused scan (ms) | leapfrog steps | NUTS (s) | NUTS / (steps x gradient) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in sizes.values():
        ms = {k: v * 1e3 for k, v in entry["gradient_seconds"].items() if k != "runs"}
        table.append(
            f"| {entry['precision']} | {entry['rows']:,} | {entry['data_bytes'] / 1e6:.1f} | "
            f"{entry['bandwidth_bound_seconds'] * 1e3:.3f} | {cell(ms, 3)} | {cell(entry['gradient_over_bound'])} | "
            f"{cell({k: v * 1e3 for k, v in entry['products_seconds'].items() if k != 'runs'}, 3)} | "
            f"{cell({k: v * 1e3 for k, v in entry['fused_seconds'].items() if k != 'runs'}, 3)} | "
            f"{entry['leapfrog_steps']['median']:.0f} | {cell(entry['nuts_seconds'])} | "
            f"{cell(entry['nuts_over_steps_times_gradient'])} |"
        )
    write_results(
        "roofline",
        {
            "benchmark": "13b roofline",
            "repeats": repeats,
            "bandwidth": bandwidth,
            "machine_bandwidth": machine_bandwidth,
            "sizes": sizes,
            "targets": targets,
        },
        table,
    )


def gradient_bound(sizes: dict, precision: str) -> str:
    """What bounds the gradient, from the table: the two matrix-vector products it needs
    (X β, and Xᵀ r for the gradient: XLA compiles them as separate loops, each reading X),
    timed alone with XLA's own kernels."""
    large = sizes[f"{precision} {ROWS[-1]}"]
    products = large["products_seconds"]["median"]
    return (
        f"at 10^6 rows the gradient takes {large['gradient_over_bound']['median']:.2f}x the one-pass bound; the "
        f"two matrix-vector products it cannot do without (X beta, then X^T r: separate XLA loops, each reading "
        f"X), timed alone, already take {products * 1e3:.2f} ms = "
        f"{products / large['bandwidth_bound_seconds']:.2f}x the bound and "
        f"{products / large['gradient_seconds']['median']:.0%} of the gradient; the per-row terms (log1p(exp), "
        "their derivative) take the rest. Under the target needs one pass over X, which XLA does not generate: "
        f"written as a scan over row blocks it takes {large['fused_seconds']['median'] * 1e3:.2f} ms "
        f"({large['fused_seconds']['median'] / large['bandwidth_bound_seconds']:.2f}x the bound)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(worker(arguments.worker)))
    else:
        main(arguments.repeats)
