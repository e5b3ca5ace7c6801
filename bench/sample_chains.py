"""P1 — NUTS chains in parallel over 4 virtual devices vs sequential vs vectorized, on the
same shard with the same draws (target: parallel >= 1.8x faster than sequential).

The shard is one of the logistic demo's (25,000 rows x 10 features, 4 chains x (500 + 500)
draws). Each repeat is a fresh ``sample_features`` call (new MCMC, so compiling again) in
one process whose JAX sees 4 CPU devices, as in a sample job; the persistent compilation
cache is off. Recorded per method: NUTS wall (tracing + compile + sampling: what the job
pays) and the sampling part alone. The target is judged on NUTS wall. Sequential chains also
compile longer (NumPyro's sequential path loops over the chains in Python; its compile
time here is about 4x the parallel one), which is part of what they cost.

Usage: python bench/sample_chains.py [--repeats 3]
Writes bench/results/sample_chains.json and .md.
"""

from __future__ import annotations

import argparse
import sys

from common import REPO, cell, spread, target, write_results

sys.path.insert(0, str(REPO / "workflow"))
from cmcflow.jaxenv import configure_jax  # noqa: E402

DEVICES = 4
ROWS, FEATURES, NUM_SHARDS = 25_000, 10, 8
METHODS = ("parallel", "sequential", "vectorized")
TARGET = 1.8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_jax(devices=DEVICES, precision="float64", compilation_cache_dir=None)
    import jax

    from cmcflow.featurize import padded_size
    from cmcflow.models import get_model, resolve_options
    from cmcflow.sample import NutsSettings, job_sampler, sample_features

    spec = get_model("logistic")
    options = resolve_options(spec, {})
    table, _ = spec.simulate(ROWS, 1, features=FEATURES)
    columns = {"features": table[[f"x{i}" for i in range(FEATURES)]].to_numpy(), "label": table["y"].to_numpy()}
    features = spec.featurize(columns, padded_size([ROWS], 64), {})
    settings = NutsSettings(
        num_warmup=500, num_samples=500, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )
    rows = []
    for method in METHODS:
        walls, sampling, r_hats = [], [], []
        for _ in range(args.repeats):
            # each repeat a job's first shard: no program kept from the last repeat
            job_sampler.cache_clear()
            jax.clear_caches()
            idata, report = sample_features(
                spec,
                features,
                options,
                num_shards=NUM_SHARDS,
                shard=0,
                seed=0,
                settings=settings,
                chains=DEVICES,
                chain_method=method,
            )
            walls.append(report["compile_seconds"] + report["tracing_seconds"] + report["sampling_seconds"])
            sampling.append(report["sampling_seconds"])
            r_hats.append(report["max_r_hat"])
        rows.append(
            {
                "method": method,
                "nuts_seconds": spread(walls),
                "sampling_seconds": spread(sampling),
                "max_r_hat": max(r_hats),
            }
        )
        print(rows[-1], flush=True)
    by_method = {row["method"]: row for row in rows}
    for row in rows:
        row["speedup_vs_sequential"] = by_method["sequential"]["nuts_seconds"]["median"] / row["nuts_seconds"]["median"]
        row["sampling_speedup_vs_sequential"] = (
            by_method["sequential"]["sampling_seconds"]["median"] / row["sampling_seconds"]["median"]
        )
    speedup = by_method["parallel"]["speedup_vs_sequential"]
    targets = [
        target(
            "P1",
            "NUTS wall, 4 chains parallel over 4 devices vs sequential",
            f"{speedup:.2f}x",
            f">= {TARGET}x",
            speedup >= TARGET,
        )
    ]
    table_lines = [
        f"# P1 chain methods ({ROWS:,} rows x {FEATURES} features, 4 chains x (500 + 500) draws, median "
        f"(min–max) of {args.repeats})",
        "",
        "| chain method | NUTS s (tracing + compile + sampling) | sampling s | × sequential (NUTS) | × sequential "
        "(sampling) | max R-hat |",
        "|---|---|---|---|---|---|",
        *[
            f"| {row['method']} | {cell(row['nuts_seconds'], 1)} | {cell(row['sampling_seconds'], 1)} | "
            f"{row['speedup_vs_sequential']:.2f} | {row['sampling_speedup_vs_sequential']:.2f} | "
            f"{row['max_r_hat']:.3f} |"
            for row in rows
        ],
    ]
    write_results(
        "sample_chains",
        {"benchmark": "P1 chain methods", "repeats": args.repeats, "rows": rows, "targets": targets},
        table_lines,
    )


if __name__ == "__main__":
    main()
