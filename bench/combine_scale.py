"""P5 (combine part) — combine wall time and peak memory for many shards (issue 5: 10,000
shards in <= 1 GB).

Writes K shard posteriors as the sample stage does (NetCDF, 4 chains x 250 draws of the
linear-Gaussian model's 10 coefficients, exact Gaussian subposteriors), then runs the
combine stage's own function (screening on, streaming above 500 shards, the schema's default
covariance shrinkage) in a fresh process per K and records its wall time and peak resident
memory (``ru_maxrss``, which includes the ~0.3 GB of an imported JAX).

Usage: python bench/combine_scale.py [--shards 1000 10000] [--repeats 3] [--workdir /tmp/cmcflow-bench/combine-scale]
Writes bench/results/combine_scale.json and .md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, cell, schema_default, spread, target, write_results

sys.path.insert(0, str(REPO / "workflow"))

FEATURES, CHAINS, DRAWS = 10, 4, 250
HEALTHY = {"max_r_hat": 1.0, "min_ess_bulk": 1000.0, "divergence_rate": 0.0}
THRESHOLDS = {"max_divergence_rate": 0.05, "max_r_hat": 1.1, "min_ess": 40, "max_outlier_z": 5.0}


def write_shards(directory: Path, num_shards: int) -> list[Path]:
    """K NetCDF shard posteriors with posterior and unconstrained_posterior groups."""
    import arviz as az
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for shard in range(num_shards):
        path = directory / f"shard-{shard:05d}.nc"
        paths.append(path)
        if path.exists():
            continue
        beta = rng.normal(scale=0.05, size=FEATURES) + rng.normal(scale=0.05, size=(CHAINS, DRAWS, FEATURES))
        idata = az.from_dict(posterior={"beta": beta})
        idata.add_groups(unconstrained_posterior=idata.posterior.copy())
        idata.posterior.attrs["shard"] = shard
        idata.to_netcdf(str(path), engine="h5netcdf")
    return paths


def measure(directory: Path, num_shards: int) -> dict:
    """In this (fresh) process: combine the K shards; wall seconds and peak RSS."""
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=1, precision="float64", compilation_cache_dir=None)
    import numpy as np

    from cmcflow.combine import CombineSettings, combine_shards
    from cmcflow.models import get_model, resolve_options
    from cmcflow.runs import read_run
    from cmcflow.transforms import model_kwargs

    spec = get_model("linear_gaussian")
    features = spec.featurize({"features": np.zeros((8, FEATURES)), "label": np.zeros(8)}, 8, {})
    paths = sorted(directory.glob("shard-*.nc"))[:num_shards]
    started = time.perf_counter()
    idata, record, _, _ = combine_shards(
        lambda shard: read_run(paths[shard]),
        num_shards,
        spec.numpyro_model,
        model_kwargs(features, resolve_options(spec, {})),
        CombineSettings(
            "consensus",
            0,
            schema_default("combine", "covariance_shrinkage"),
            screen=THRESHOLDS,
            min_shards_fraction=0.5,
            on_failed_shard="fail",
            weights="draws",  # the synthetic runs have draws only
            second_order=False,
        ),
        diagnostics=[HEALTHY] * num_shards,
    )
    seconds = time.perf_counter() - started
    return {
        "shards": num_shards,
        "streaming": record["streaming"],
        "covariance_shrinkage": record["covariance_shrinkage"],
        "excluded": len(record["excluded"]),
        "combine_seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "combined_draws": int(idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/combine-scale"))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.workdir, args.measure)))
        return
    started = time.perf_counter()
    write_shards(args.workdir, max(args.shards))
    print(f"shards written in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for num_shards in args.shards:
        runs = []
        for _ in range(args.repeats):
            output = subprocess.run(
                [sys.executable, __file__, "--measure", str(num_shards), "--workdir", str(args.workdir)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
        rows.append(
            {
                "shards": num_shards,
                "streaming": runs[0]["streaming"],
                "covariance_shrinkage": runs[0]["covariance_shrinkage"],
                "excluded": runs[0]["excluded"],
                "combine_seconds": spread([run["combine_seconds"] for run in runs]),
                "peak_rss_mb": spread([run["peak_rss_mb"] for run in runs]),
            }
        )
    targets = [
        target(
            "P5",
            f"combine peak RSS, {row['shards']:,} shards",
            f"{row['peak_rss_mb']['median']:.0f} MB",
            "<= 1 GB",
            row["peak_rss_mb"]["median"] <= 1024,
        )
        for row in rows
        if row["shards"] >= 10_000
    ]
    table = [
        f"# P5 combine at scale ({CHAINS}x{DRAWS} draws of {FEATURES} parameters per shard, screening on; median "
        f"(min–max) of {args.repeats})",
        "",
        "| shards | streaming | covariance shrinkage | combine s | peak RSS (MB) |",
        "|---|---|---|---|---|",
        *[
            f"| {r['shards']:,} | {r['streaming']} | {r['covariance_shrinkage']} | "
            f"{cell(r['combine_seconds'], 1)} | {cell(r['peak_rss_mb'], 0)} |"
            for r in rows
        ],
    ]
    record = {
        "benchmark": "P5 combine scale",
        "repeats": args.repeats,
        "shard_draws": CHAINS * DRAWS,
        "parameters": FEATURES,
        "rows": rows,
        "targets": targets,
    }
    write_results("combine_scale", record, table)


if __name__ == "__main__":
    main()
