"""13b — the logistic likelihood's one-pass kernel (``sample.fused_likelihood``) against XLA.

XLA's reverse-mode gradient of the logistic log-likelihood reads XT twice (β·XT, then XT r:
two XLA loops; bench/results/roofline.md). :mod:`cmcflow.fused` computes value and gradient
in one pass (``workflow/cmcflow/kernels/logistic.cc`` through the XLA FFI, on XLA's thread
pool, in every precision). This bench measures, with the kernel on and off in the same fresh
process (``jax.precision: mixed``, the default; roofline.py times it in every precision):

* **gradient**: one jitted value and gradient of the logistic model's potential, its data
  the program's arguments as in the sample program (the kernel's laid out as a sample job
  lays them out: ``XT`` as its tiles; and the kernel on ``XT (P, R)`` untiled, what the tiles
  are worth), at 10^5 and 10^6 rows of 20 features, one JAX device; against the bandwidth
  bound (the data's bytes ÷ the machine's copy bandwidth over every core, roofline.py's);
* **NUTS**: one sample run as a sample job makes it on a shard of P4's size (125,000 rows x
  20 features, 4 chains x (500 + 500), one per device, priors tempered to 1/8): sampling
  seconds (compiling excluded), leapfrog steps, and the two posteriors' largest difference
  of means in posterior sd (another rounding: NUTS's paths part, as with another seed);
* **reweight**: the shard's log-likelihood at P4's 4,096 proposal draws as a reweight job
  computes it (:func:`cmcflow.likelihood.log_likelihood_at`, one device; the kernel's values
  at a batch of coefficients), seconds (compiled first) and the largest relative difference;
* **AVX2 code** (CPUs without AVX-512, as many clusters' AMD EPYC Rome and Milan nodes), where
  this CPU has AVX-512: the gradient again, both compilers held to AVX2 (XLA's
  ``--xla_cpu_max_isa=AVX2``; the kernel built with ``-mno-avx512f`` through a ``$CXX``
  wrapper), on this machine's cores and memory.

The measurement that chose ``sample.fused_likelihood: true``.

Usage: python bench/fused_gradient.py [--repeats 3] [--from-results]
Needs a C++17 compiler (``g++``, or ``$CXX``). Writes bench/results/fused_gradient.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS, cell, spread, target, write_results
from roofline import FEATURES, call_times, copy_bandwidth, gradient_times, logistic_kwargs

ROWS = (100_000, 1_000_000)
NUTS_ROWS, NUTS_SHARDS, NUTS_CHAINS, NUTS_ITERATIONS = 125_000, 8, 4, 500
#: P4's proposal draws (``correct.draws``), at which a reweight job evaluates its shard
REWEIGHT_DRAWS = 4096


def switch(on: bool) -> None:
    """The kernel on or off for what is traced next (programs traced before are dropped)."""
    import jax

    from cmcflow import fused
    from cmcflow.sample import job_sampler

    fused._state["enabled"] = on
    fused._state["used"] = False
    job_sampler.cache_clear()
    jax.clear_caches()


def gradient_worker(build_dir: str) -> dict:
    """One process, one device: per size, the data's bytes and the gradient's seconds, XLA's
    and the kernel's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workflow"))
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=1, precision="mixed", compilation_cache_dir=None)
    import jax
    import jax.numpy as jnp

    from cmcflow import fused
    from cmcflow.models import get_model

    assert fused.enable(build_dir), "the kernel did not build: see the warning above"
    spec = get_model("logistic")
    results = {}
    for rows in ROWS:
        kwargs, _ = logistic_kwargs(spec, rows)
        entry = {"data_bytes": sum(int(value.nbytes) for value in kwargs.values() if hasattr(value, "nbytes"))}
        for name, on in (("xla", False), ("fused", True)):
            switch(on)
            laid_out = spec.device_layout(kwargs)  # the kernel's: XT as its tiles
            entry[f"{name}_seconds"] = float(np.median(gradient_times(spec.numpyro_model, laid_out)))
            assert fused.used() == on
        # the same kernel on the features untiled, XT (P, R): what the tiles are worth
        entry["untiled_seconds"] = float(np.median(gradient_times(spec.numpyro_model, kwargs)))
        # the kernel alone: the likelihood's value and gradient, without the rest of the
        # potential's program (priors, the parameters' assembly)
        data = [jnp.asarray(laid_out[name]) for name in ("XT", "y", "offset", "mask")]
        program = jax.jit(jax.value_and_grad(fused.logistic_log_likelihood))
        coefficients = jnp.zeros(FEATURES + 1)
        entry["kernel_seconds"] = float(np.median(call_times(lambda coef: program(coef, *data), coefficients)))
        results[str(rows)] = entry
    return results


def nuts_worker(build_dir: str) -> dict:
    """One process, 4 devices: a P4-sized shard sampled as a sample job does, XLA's
    likelihood then the kernel's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workflow"))
    from cmcflow.jaxenv import COMPILE_CLOCK, configure_jax

    configure_jax(devices=NUTS_CHAINS, precision="mixed", compilation_cache_dir=None)
    import jax

    from cmcflow import fused
    from cmcflow.models import get_model
    from cmcflow.sample import NutsSettings, run_nuts

    assert fused.enable(build_dir), "the kernel did not build: see the warning above"
    spec = get_model("logistic")
    kwargs, _ = logistic_kwargs(spec, NUTS_ROWS)
    settings = NutsSettings(
        num_warmup=NUTS_ITERATIONS,
        num_samples=NUTS_ITERATIONS,
        target_accept_prob=0.8,
        max_tree_depth=10,
        dense_mass=False,
    )
    results, draws = {}, {}
    for name, on in (("xla", False), ("fused", True)):
        switch(on)
        laid_out = spec.device_layout(kwargs)
        compiled_before, started = COMPILE_CLOCK.seconds, time.perf_counter()
        run = run_nuts(
            spec.numpyro_model,
            laid_out,
            prior_power=1 / NUTS_SHARDS,
            settings=settings,
            num_chains=NUTS_CHAINS,
            rng_key=jax.random.PRNGKey(0),
        )
        results[f"{name}_seconds"] = time.perf_counter() - started - (COMPILE_CLOCK.seconds - compiled_before)
        results[f"{name}_steps"] = int(np.sum(run.stats["num_steps"]))
        draws[name] = np.concatenate(
            [np.reshape(run.samples[site], (NUTS_CHAINS * NUTS_ITERATIONS, -1)) for site in ("beta", "intercept")], 1
        )
        assert fused.used() == on
    sd = draws["xla"].std(axis=0)
    results["largest_mean_difference_sd"] = float(np.max(np.abs(draws["fused"].mean(0) - draws["xla"].mean(0)) / sd))
    results["sd_ratio_range"] = [float(np.min(draws["fused"].std(0) / sd)), float(np.max(draws["fused"].std(0) / sd))]
    return results


def reweight_worker(build_dir: str) -> dict:
    """One process, one device: a P4-sized shard's log-likelihood at ``REWEIGHT_DRAWS``
    coefficients near the truth, XLA's then the kernel's."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "workflow"))
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=1, precision="mixed", compilation_cache_dir=None)
    from cmcflow import fused
    from cmcflow.likelihood import log_likelihood_at
    from cmcflow.models import get_model

    assert fused.enable(build_dir), "the kernel did not build: see the warning above"
    spec = get_model("logistic")
    kwargs, rng = logistic_kwargs(spec, NUTS_ROWS)
    draws = {
        "beta": rng.normal(0, 0.5, (REWEIGHT_DRAWS, FEATURES)),
        "intercept": rng.normal(0, 0.1, REWEIGHT_DRAWS),
    }
    results, values = {}, {}
    for name, on in (("xla", False), ("fused", True)):
        switch(on)
        laid_out = spec.device_layout(kwargs)
        times = call_times(lambda d: log_likelihood_at(spec.numpyro_model, laid_out, d, rows=NUTS_ROWS), draws)
        results[f"{name}_seconds"] = float(np.median(times))
        values[name] = log_likelihood_at(spec.numpyro_model, laid_out, draws, rows=NUTS_ROWS)
        assert fused.used() == on
    results["largest_relative_difference"] = float(np.max(np.abs(values["fused"] / values["xla"] - 1)))
    return results


def where_the_time_goes(sizes: dict) -> str:
    """What the fused gradient is made of at the size where it is furthest from the bound:
    the kernel alone, the rest of the potential's program, and the kernel's time a row with
    the data in cache (the smallest size) scaled to that size."""
    rows, entry = max(sizes.items(), key=lambda item: item[1]["fused_over_bound"]["median"])
    fused_ms, kernel_ms = entry["fused_seconds"]["median"] * 1e3, entry["kernel_seconds"]["median"] * 1e3
    small_rows, small = min(sizes.items(), key=lambda item: int(item[0]))
    in_cache_ms = small["kernel_seconds"]["median"] * 1e3 * int(rows) / int(small_rows)
    return (
        f"at {int(rows):,} rows ({entry['data_bytes'] / 1e6:.1f} MB) the kernel alone takes {kernel_ms:.3f} ms "
        f"({entry['kernel_over_bound']['median']:.2f}x the bound) and the rest of the potential's program (the "
        f"priors, the parameters' assembly: small XLA operations) {fused_ms - kernel_ms:.3f} ms of the gradient's "
        f"{fused_ms:.3f} ms. The kernel reads the data once; at {int(small_rows):,} rows "
        f"({small['data_bytes'] / 1e6:.1f} MB, in cache) its time a row, scaled to {int(rows):,} rows, is "
        f"{in_cache_ms:.3f} ms ({in_cache_ms / 1e3 / entry['bandwidth_bound_seconds']:.2f}x the bound), an upper "
        "bound on its arithmetic (each call's fixed cost, the helper thread's start and XLA's dispatch, is scaled "
        f"too): its per-row arithmetic (exp, log and 2 x {FEATURES} multiply-adds a row) and the data's stream "
        "from memory each take up to about the bound's time, and overlap only in part."
    )


def avx2_text(avx2: dict) -> str:
    """The gradient held to AVX2 code (``avx2``, by rows; empty where this CPU has no AVX-512)."""
    if not avx2:
        return "this CPU has no AVX-512, so the gradients above are AVX2 code already."
    return (
        "the gradient again, both compilers held to AVX2 (XLA's `--xla_cpu_max_isa=AVX2`, the kernel built with "
        "`-mno-avx512f`), on this machine's cores and memory:\n\n"
        "| rows | XLA (ms) | fused (ms) | XLA / fused |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {int(rows):,} | {cell({k: v * 1e3 for k, v in entry['xla_seconds'].items() if k != 'runs'}, 3)} | "
            f"{cell({k: v * 1e3 for k, v in entry['fused_seconds'].items() if k != 'runs'}, 3)} | "
            f"{cell(entry['xla_over_fused'])} |"
            for rows, entry in avx2.items()
        )
    )


def run_worker(kind: str, build_dir: str, environment: dict | None = None) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--build-dir", build_dir],
        capture_output=True,
        text=True,
        env=environment,
    )
    if output.returncode:
        raise RuntimeError(f"the {kind} worker failed:\n{output.stderr[-3000:]}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def has_avx512() -> bool:
    """Whether this CPU has AVX-512 (``avx512f`` among /proc/cpuinfo's flags)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512f" in cpuinfo.read_text().split()


def avx2_environment(directory: str) -> dict:
    """The environment of a worker held to AVX2 code: XLA's ``--xla_cpu_max_isa=AVX2`` and,
    as ``$CXX``, a compiler wrapper (written in ``directory``) that adds ``-mno-avx512f``."""
    wrapper = Path(directory) / "cxx-avx2"
    wrapper.write_text(f'#!/bin/sh\nexec {os.environ.get("CXX", "g++")} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_max_isa=AVX2".strip()
    return os.environ | {"CXX": str(wrapper), "XLA_FLAGS": flags}


def main(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as build_dir, tempfile.TemporaryDirectory() as avx2_dir:
        avx2 = avx2_environment(avx2_dir) if has_avx512() else None
        runs = {"bandwidths": [], "gradient": [], "nuts": [], "reweight": [], "gradient_avx2": []}
        for _ in range(repeats):
            runs["bandwidths"].append(copy_bandwidth(os.cpu_count()))
            for kind in ("gradient", "nuts", "reweight"):
                runs[kind].append(run_worker(kind, build_dir))
            if avx2:  # its own build directory: the library's name does not say which compiler built it
                runs["gradient_avx2"].append(run_worker("gradient", os.path.join(avx2_dir, "build"), avx2))
    write_report(runs)


def write_report(runs: dict, measured: str | None = None) -> None:
    """The JSON (with every process's ``runs``) and the tables, from the measurements."""
    bandwidths, gradient_runs, nuts_runs = runs["bandwidths"], runs["gradient"], runs["nuts"]
    repeats = len(bandwidths)
    bandwidth = spread(bandwidths)
    sizes = {}
    for rows in map(str, ROWS):
        entries = [run[rows] for run in gradient_runs]
        bound = entries[0]["data_bytes"] / bandwidth["median"]
        sizes[rows] = {
            "data_bytes": entries[0]["data_bytes"],
            "bandwidth_bound_seconds": bound,
            **{
                f"{name}_seconds": spread([entry[f"{name}_seconds"] for entry in entries])
                for name in ("xla", "fused", "untiled", "kernel")
            },
            **{
                f"{name}_over_bound": spread([entry[f"{name}_seconds"] / bound for entry in entries])
                for name in ("xla", "fused", "kernel")
            },
            "xla_over_fused": spread([entry["xla_seconds"] / entry["fused_seconds"] for entry in entries]),
            "untiled_over_fused": spread([entry["untiled_seconds"] / entry["fused_seconds"] for entry in entries]),
        }
    nuts = {
        key: spread([run[key] for run in nuts_runs])
        for key in ("xla_seconds", "fused_seconds", "xla_steps", "fused_steps", "largest_mean_difference_sd")
    }
    nuts["xla_over_fused"] = spread([run["xla_seconds"] / run["fused_seconds"] for run in nuts_runs])
    ratios = [run["sd_ratio_range"] for run in nuts_runs]
    nuts["sd_ratio_range"] = [min(low for low, _ in ratios), max(high for _, high in ratios)]
    reweight = {
        key: spread([run[key] for run in runs["reweight"]])
        for key in ("xla_seconds", "fused_seconds", "largest_relative_difference")
    }
    reweight["xla_over_fused"] = spread([run["xla_seconds"] / run["fused_seconds"] for run in runs["reweight"]])
    avx2 = {
        rows: {
            f"{name}_seconds": spread([run[rows][f"{name}_seconds"] for run in runs["gradient_avx2"]])
            for name in ("xla", "fused")
        }
        | {
            "xla_over_fused": spread(
                [run[rows]["xla_seconds"] / run[rows]["fused_seconds"] for run in runs["gradient_avx2"]]
            )
        }
        for rows in map(str, ROWS)
        if runs["gradient_avx2"]
    }
    # the gradient against the bandwidth bound is roofline.py's target (every precision, copies at the same
    # moments); this bench chose the default: the faster likelihood, the posteriors within Monte Carlo error
    speedup = nuts["xla_over_fused"]["median"]
    targets = [
        target(
            "13b",
            "sample.fused_likelihood's default: a P4 shard's sampling, XLA's likelihood / the kernel's, mixed",
            f"{speedup:.2f}x (means within {nuts['largest_mean_difference_sd']['max']:.3f} sd)",
            "the default is the faster (> 1x)",
            speedup > 1,
            "the kernel samples slower than XLA's sum here: turn sample.fused_likelihood off by default",
        ),
    ]
    if avx2:
        slowest = min(avx2.values(), key=lambda entry: entry["xla_over_fused"]["median"])["xla_over_fused"]["median"]
        targets.append(
            target(
                "13b",
                "sample.fused_likelihood's default on AVX2 code (no AVX-512): the gradient, XLA / the kernel, mixed "
                "(smallest over sizes)",
                f"{slowest:.2f}x",
                "the default is the faster (> 1x)",
                slowest > 1,
                "on AVX2 code XLA's gradient is the faster: the kernel should not be the default there",
            )
        )
    table = [
        "# 13b the logistic likelihood's one-pass kernel (sample.fused_likelihood) against XLA",
        "",
        f"jax.precision mixed; {FEATURES} features. Bound = the data's bytes ÷ {bandwidth['median'] / 1e9:.1f} GB/s "
        f"(copy over every core). Median (min–max) of {repeats} fresh processes, kernel and XLA in each.",
        "",
        "Gradient (one device; the data the program's arguments, as in the sample program; fused: the features as "
        "the kernel's tiles, as a sample job lays them out; XT untiled: the same kernel on XT (P, R)):",
        "",
        "| rows | data read (MB) | bound (ms) | XLA (ms) | XLA / bound | fused (ms) | fused / bound | XLA / fused "
        "| XT untiled (ms) | untiled / fused | the kernel alone (ms) | kernel / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rows, entry in sizes.items():
        xla_ms = {key: value * 1e3 for key, value in entry["xla_seconds"].items() if key != "runs"}
        fused_ms = {key: value * 1e3 for key, value in entry["fused_seconds"].items() if key != "runs"}
        kernel_ms = {key: value * 1e3 for key, value in entry["kernel_seconds"].items() if key != "runs"}
        untiled_ms = {key: value * 1e3 for key, value in entry["untiled_seconds"].items() if key != "runs"}
        table.append(
            f"| {int(rows):,} | {entry['data_bytes'] / 1e6:.1f} | {entry['bandwidth_bound_seconds'] * 1e3:.3f} | "
            f"{cell(xla_ms, 3)} | {cell(entry['xla_over_bound'])} | {cell(fused_ms, 3)} | "
            f"{cell(entry['fused_over_bound'])} | {cell(entry['xla_over_fused'])} | {cell(untiled_ms, 3)} | "
            f"{cell(entry['untiled_over_fused'])} | {cell(kernel_ms, 3)} | "
            f"{cell(entry['kernel_over_bound'])} |"
        )
    table += [
        "",
        "AVX2 code, for CPUs without AVX-512 (many clusters' AMD EPYC Rome and Milan nodes): " + avx2_text(avx2),
    ]
    table += [
        "",
        f"NUTS on a shard of P4's size ({NUTS_ROWS:,} rows, {NUTS_CHAINS} chains x ({NUTS_ITERATIONS} + "
        f"{NUTS_ITERATIONS}), one per device, as a sample job runs it; compiling excluded):",
        "",
        "| likelihood | sampling (s) | leapfrog steps | ms per step and chain |",
        "|---|---|---|---|",
    ]
    for name in ("xla", "fused"):
        per_step = spread([run[f"{name}_seconds"] / run[f"{name}_steps"] * NUTS_CHAINS * 1e3 for run in nuts_runs])
        table.append(
            f"| {name} | {cell(nuts[f'{name}_seconds'], 1)} | {cell(nuts[f'{name}_steps'], 0)} | {cell(per_step)} |"
        )
    table += [
        "",
        f"Sampling XLA / fused: {cell(nuts['xla_over_fused'])}. The two posteriors: largest difference of means "
        f"{cell(nuts['largest_mean_difference_sd'], 3)} posterior sd, sd ratios "
        f"{nuts['sd_ratio_range'][0]:.3f}–{nuts['sd_ratio_range'][1]:.3f} (Monte Carlo error of two runs of "
        f"{NUTS_CHAINS * NUTS_ITERATIONS:,} draws).",
        "",
        f"Reweight: the same shard's log-likelihood at {REWEIGHT_DRAWS:,} draws (one device, as a reweight job; "
        f"compiled first): XLA {cell(reweight['xla_seconds'], 2)} s, the kernel's values at a batch "
        f"{cell(reweight['fused_seconds'], 2)} s, XLA / kernel {cell(reweight['xla_over_fused'])}; largest relative "
        f"difference {reweight['largest_relative_difference']['max']:.1e} (XLA sums in float32).",
        "",
        f"Where the fused gradient's time goes: {where_the_time_goes(sizes)}",
    ]
    write_results(
        "fused_gradient",
        {
            "benchmark": "13b fused likelihood",
            "repeats": repeats,
            "bandwidth": bandwidth,
            "sizes": sizes,
            "nuts": nuts,
            "reweight": reweight,
            "avx2": avx2,
            "targets": targets,
            "runs": runs,
        },
        table,
        measured=measured,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=("gradient", "nuts", "reweight"), help="(internal) one measuring process")
    parser.add_argument("--build-dir", help="(internal) where the kernel is built")
    parser.add_argument(
        "--from-results",
        action="store_true",
        help="measure nothing: rewrite the tables from bench/results/fused_gradient.json",
    )
    arguments = parser.parse_args()
    if arguments.from_results:
        record = json.loads((RESULTS / "fused_gradient.json").read_text())
        write_report(record["runs"], measured=record["written"])
    elif arguments.worker:
        worker = {"gradient": gradient_worker, "nuts": nuts_worker, "reweight": reweight_worker}[arguments.worker]
        print(json.dumps(worker(arguments.build_dir)))
    else:
        main(arguments.repeats)
