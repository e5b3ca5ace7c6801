"""P4 — consensus Monte Carlo (K = 8) against full-data NUTS: logistic regression, 10^6 rows,
20 features (targets: projected cluster wall <= 0.2x full data; mean error <= 0.1
full-data sd; sd ratio 0.9-1.1).

Runs the workflow itself (``snakemake --cores 2 all fulldata``): every sample job is its
own process, one at a time (each takes both cores), as a cluster would run them side by
side. From the rules' ``benchmark:`` files: the projected cluster wall is the slowest
sample job plus the combine job; summed CPU time is over all sample jobs and combine.
Accuracy compares the combined draws with the full-data draws of every coefficient, in
full-data posterior sd. Repeats rerun sample, sample_fulldata and combine with the same
seeds (``--forcerun``), so draws repeat exactly and only the timings vary.

Usage: python bench/cmc_vs_full.py [--repeats 3] [--workdir /tmp/cmcflow-bench/cmc-vs-full] [--more]
(``--more``: add runs to those already made in the working directory.)
Writes bench/results/cmc_vs_full.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import arviz as az
import numpy as np
from common import cell, logistic_analysis, snakemake, spread, target, workflow_config, write_results

ROWS, FEATURES, NUM_SHARDS = 1_000_000, 20, 8
ANALYSIS = "p4"
TARGETS = {"wall_ratio": 0.2, "mean_error": 0.1, "sd_ratio": (0.9, 1.1)}


def benchmark(path: Path) -> dict:
    """Wall and CPU seconds of one job from its ``benchmark:`` file."""
    with open(path) as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {"wall": float(row["s"]), "cpu": float(row["cpu_time"])}


def timings(results: Path) -> dict:
    samples = [benchmark(path) for path in sorted((results / "benchmarks" / "sample").glob("shard-*.tsv"))]
    combine, full = (
        benchmark(results / "benchmarks" / "combine.tsv"),
        benchmark(results / "benchmarks" / "sample_fulldata.tsv"),
    )
    slowest = max(job["wall"] for job in samples)
    return {
        "slowest_shard_wall": slowest,
        "combine_wall": combine["wall"],
        "projected_cluster_wall": slowest + combine["wall"],
        "cmc_cpu": sum(job["cpu"] for job in samples) + combine["cpu"],
        "full_data_wall": full["wall"],
        "full_data_cpu": full["cpu"],
        "wall_ratio": (slowest + combine["wall"]) / full["wall"],
    }


def flat_draws(posterior, name: str) -> np.ndarray:
    """``(chains · draws, elements)`` of one site."""
    values = posterior[name].values
    return values.reshape(values.shape[0] * values.shape[1], -1)


def accuracy(results: Path) -> dict:
    """Largest |mean error| (full-data sd) and the range of sd ratios over all coefficients."""
    combined, full = (
        az.from_netcdf(results / "combined" / "posterior.nc"),
        az.from_netcdf(results / "fulldata" / "posterior.nc"),
    )
    errors, ratios = [], []
    for name in ("intercept", "beta"):
        cmc, reference = flat_draws(combined.posterior, name), flat_draws(full.posterior, name)
        errors.append(np.abs(cmc.mean(axis=0) - reference.mean(axis=0)) / reference.std(axis=0))
        ratios.append(cmc.std(axis=0) / reference.std(axis=0))
    errors, ratios = np.concatenate(errors), np.concatenate(ratios)
    return {
        "max_mean_error_sd": float(errors.max()),
        "mean_mean_error_sd": float(errors.mean()),
        "min_sd_ratio": float(ratios.min()),
        "max_sd_ratio": float(ratios.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/cmc-vs-full"))
    parser.add_argument("--more", action="store_true", help="add --repeats runs to those already in --workdir")
    args = parser.parse_args()
    if not args.more:
        shutil.rmtree(args.workdir, ignore_errors=True)
    analysis = logistic_analysis(rows=ROWS, features=FEATURES, num_shards=NUM_SHARDS, num_warmup=500, num_samples=500)
    config = workflow_config({ANALYSIS: analysis}, args.workdir)
    results = Path(config["results_dir"]) / ANALYSIS
    done = args.workdir / "runs.json"  # every run so far, so that a session can add runs later
    runs = json.loads(done.read_text()) if args.more else []
    for _ in range(args.repeats):
        rerun = ["--forcerun", "sample", "sample_fulldata", "combine"] if (results / "combined").exists() else []
        snakemake(args.workdir, config, "--cores", "2", "all", "fulldata", *rerun, timeout=6 * 3600)
        runs.append(timings(results))
        done.write_text(json.dumps(runs, indent=2))
        print(runs[-1], flush=True)
    figures = {key: spread([run[key] for run in runs]) for key in runs[0]}
    quality = accuracy(results)
    ratio = figures["wall_ratio"]["median"]
    low, high = TARGETS["sd_ratio"]
    targets = [
        target(
            "P4",
            "CMC projected cluster wall / full-data NUTS wall (10^6 x 20 logistic, K = 8)",
            f"{ratio:.3f}",
            f"<= {TARGETS['wall_ratio']}",
            ratio <= TARGETS["wall_ratio"],
        ),
        target(
            "P4",
            "CMC mean error, largest over 21 coefficients",
            f"{quality['max_mean_error_sd']:.3f} sd",
            f"<= {TARGETS['mean_error']} sd",
            quality["max_mean_error_sd"] <= TARGETS["mean_error"],
        ),
        target(
            "P4",
            "CMC / full-data sd ratio, range over 21 coefficients",
            f"{quality['min_sd_ratio']:.3f}–{quality['max_sd_ratio']:.3f}",
            f"{low}–{high}",
            low <= quality["min_sd_ratio"] and quality["max_sd_ratio"] <= high,
        ),
    ]
    labels = {
        "slowest_shard_wall": "slowest sample job (wall s)",
        "combine_wall": "combine job (wall s)",
        "projected_cluster_wall": "projected cluster wall (s)",
        "full_data_wall": "full-data NUTS job (wall s)",
        "wall_ratio": "projected cluster wall / full data",
        "cmc_cpu": "CMC CPU s (all sample jobs + combine)",
        "full_data_cpu": "full-data CPU s",
    }
    table = [
        f"# P4 CMC (K = {NUM_SHARDS}) vs full-data NUTS, logistic, {ROWS:,} rows x {FEATURES} features, 4 chains "
        f"x (500 + 500) draws "
        f"(median (min–max) of {len(runs)} run(s))",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {labels[key]} | {cell(figures[key], 3 if key == 'wall_ratio' else 1)} |" for key in labels],
        f"| largest mean error (full-data sd) | {quality['max_mean_error_sd']:.3f} (mean over coefficients "
        f"{quality['mean_mean_error_sd']:.3f}) |",
        f"| sd ratio CMC / full data | {quality['min_sd_ratio']:.3f}–{quality['max_sd_ratio']:.3f} |",
    ]
    write_results(
        "cmc_vs_full",
        {
            "benchmark": "P4 CMC vs full data",
            "repeats": len(runs),
            "runs": runs,
            "figures": figures,
            "accuracy": quality,
            "targets": targets,
        },
        table,
    )


if __name__ == "__main__":
    main()
