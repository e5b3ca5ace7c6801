"""P2 — does a sample job find the program another shard's job compiled?

A run's K sample jobs share one persistent compilation cache, but a NUTS program that
closes over its shard's data (NumPyro's own ``"parallel"``) holds those data as constants:
every shard's program is a new one, and every job compiles. A program that takes the data
as arguments (``one_program``, what sample jobs run) is the same for every shard of one
padded size: the first job compiles it and the others load it from the cache. Its data
reach the four devices as one aliased host copy
(:func:`cmcflow.sample.aligned_host_array`); the third program measured gives each device
a copy of its own, as ``jax.pmap`` does with an array of JAX's, which the chains then
cannot share in the caches.

Measured here as a run's jobs meet it: in fresh processes sharing a fresh cache, the job of
shard 0, then the job of shard 1 (another shard of the same size), with each kind of
program, for logistic shards of two sizes (20 features, 4 chains x (500 + 500) draws, the
default precision and likelihood: the fused kernel, which the first job in a fresh cache
builds). A job's seconds are those of :func:`cmcflow.sample.sample_run` (compiling,
sampling, the Hessian); its imports are the same either way.

Usage: python bench/shared_program.py [--repeats 3]
Writes bench/results/shared_program.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import REPO, cell, spread, write_results

FEATURES = 20
SIZES = (25_000, 125_000)
PROGRAMS = {
    "closed over the data": "closed",
    "data as arguments": "aligned",
    "data as arguments, a copy per device": "copies",
}


def job(program: str, shard: int, cache: str, rows: int) -> dict:
    """One sample job in a fresh process, with the ``program`` of :data:`PROGRAMS`: its
    seconds (``wall``, ``compile``, ``sampling``)."""
    from cmcflow.config import schema, schema_default
    from cmcflow.jaxenv import configure_jax

    precision = schema()["properties"]["jax"]["properties"]["precision"]["default"]
    configure_jax(devices=4, precision=precision, compilation_cache_dir=cache)
    import time

    from cmcflow import sample
    from cmcflow.fused import enable_in_job

    # the likelihood a sample job computes by default (its kernel built by the first job, beside the cache)
    enable_in_job(schema_default("sample", "fused_likelihood"), cache)
    from cmcflow.featurize import padded_size
    from cmcflow.models import get_model, resolve_options
    from cmcflow.sample import NutsSettings, sample_run

    if program == "copies":  # the arrays as JAX's: jax.pmap puts a copy on every device
        sample.aligned_host_array = lambda value: value

    spec = get_model("logistic")
    table, _ = spec.simulate(2 * rows, 3, features=FEATURES)
    part = table.iloc[shard * rows : (shard + 1) * rows]
    columns = {"features": part[[f"x{i}" for i in range(FEATURES)]].to_numpy(), "label": part["y"].to_numpy()}
    features = spec.featurize(columns, padded_size([rows], 64), {})
    settings = NutsSettings(
        num_warmup=500, num_samples=500, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )
    started = time.perf_counter()
    _, report = sample_run(
        spec,
        features,
        resolve_options(spec, {}),
        num_shards=8,
        shard=shard,
        seed=0,
        settings=settings,
        chains=4,
        one_program=program != "closed",
    )
    wall = time.perf_counter() - started
    return {"wall": wall, "compile": report["compile_seconds"], "sampling": report["sampling_seconds"]}


def run_job(program: str, shard: int, cache: str, rows: int) -> dict:
    arguments = ["--job", program, str(shard), cache, str(rows)]
    done = subprocess.run(
        [sys.executable, __file__, *arguments], capture_output=True, text=True, check=True, cwd=REPO / "workflow"
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--job", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        program, shard, cache, rows = args.job
        print(json.dumps(job(program, int(shard), cache, int(rows))))
        return

    runs = {rows: {name: {"first": [], "next": []} for name in PROGRAMS} for rows in SIZES}
    for _ in range(args.repeats):
        for rows in SIZES:
            for name, program in PROGRAMS.items():
                with tempfile.TemporaryDirectory(prefix="cmcflow-bench-cache-") as cache:
                    runs[rows][name]["first"].append(run_job(program, 0, cache, rows))
                    runs[rows][name]["next"].append(run_job(program, 1, cache, rows))

    def summary(jobs: list[dict]) -> dict:
        return {part: spread([job[part] for job in jobs]) for part in ("wall", "compile", "sampling")}

    results = {
        str(rows): {name: {order: summary(jobs) for order, jobs in orders.items()} for name, orders in kinds.items()}
        for rows, kinds in runs.items()
    }
    table = [
        f"# P2 a sample job after another shard's job: the program closed over the data vs the data as "
        f"arguments (logistic, {FEATURES} features, 4 x (500 + 500) draws; seconds, median (min–max) of "
        f"{args.repeats})",
        "",
        "Fresh processes sharing a fresh compilation cache: shard 0's job, then shard 1's.",
        "",
        "| rows | program | first job | its compiling | next shard's job | its compiling | its sampling |",
        "|---|---|---|---|---|---|---|",
    ]
    for rows, kinds in results.items():
        for name, orders in kinds.items():
            first, following = orders["first"], orders["next"]
            table.append(
                f"| {int(rows):,} | {name} | {cell(first['wall'], 1)} | {cell(first['compile'], 1)} | "
                f"{cell(following['wall'], 1)} | {cell(following['compile'], 1)} | {cell(following['sampling'], 1)} |"
            )
    ratios = {
        rows: kinds["data as arguments"]["next"]["wall"]["median"]
        / kinds["closed over the data"]["next"]["wall"]["median"]
        for rows, kinds in results.items()
    }
    copies = {
        rows: kinds["data as arguments, a copy per device"]["next"]["sampling"]["median"]
        / kinds["data as arguments"]["next"]["sampling"]["median"]
        for rows, kinds in results.items()
    }
    table += [
        "",
        "Next shard's job, data as arguments / closed over: "
        + ", ".join(f"{ratio:.2f} at {int(rows):,} rows" for rows, ratio in ratios.items())
        + ". Its sampling with a copy of the data per device / one aliased copy: "
        + ", ".join(f"{ratio:.2f} at {int(rows):,} rows" for rows, ratio in copies.items())
        + ".",
    ]
    record = {
        "benchmark": "shared_program",
        "features": FEATURES,
        "results": results,
        "ratios": ratios,
        "copies_per_device": copies,
        "targets": [],
    }
    write_results("shared_program", record, table)


if __name__ == "__main__":
    main()
