"""P5 (dry-run part) — how long ``snakemake --profile profiles/slurm -n`` takes to plan an
analysis of 100 / 1,000 / 5,000 shards, as a user does before spending an allocation.

Each run is a fresh working directory with nothing built yet, so the dry run plans every
job (simulate, shard, then featurize, sample, combine inputs per shard, combine, report).
No job is submitted: a dry run submits nothing. But importing the SLURM executor plugin
runs ``scontrol show config`` (for MinJobAge), which waits ~9 s when ``scontrol`` is
installed and no controller answers. On a cluster's login node the controller answers;
here start one first (``bash scripts/start_slurm.sh``). Whether it answered is recorded.

Usage: python bench/dry_run_scale.py [--shards 100 1000 5000] [--repeats 3] [--workdir /tmp/cmcflow-bench/dry-run]
Writes bench/results/dry_run_scale.json and .md.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from common import (
    cell,
    job_counts,
    logistic_analysis,
    slurm_probe,
    snakemake,
    spread,
    target,
    workflow_config,
    write_results,
)

TARGET_SECONDS = 20.0  # issue 6: 1,000-shard dry run <= 20 s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/dry-run"))
    args = parser.parse_args()
    rows = []
    controller = slurm_probe()["answers"]
    for num_shards in args.shards:
        seconds, jobs = [], {}
        for _ in range(args.repeats):
            shutil.rmtree(args.workdir, ignore_errors=True)
            analysis = logistic_analysis(
                rows=100 * num_shards, features=10, num_shards=num_shards, num_warmup=500, num_samples=500
            )
            wall, output = snakemake(
                args.workdir,
                workflow_config({"scale": analysis}, args.workdir),
                "--profile",
                "profiles/slurm",
                "-n",
                "--quiet",
                "rules",
            )
            seconds.append(wall)
            jobs = job_counts(output)
        rows.append(
            {"shards": num_shards, "jobs": sum(jobs.values()), "jobs_by_rule": jobs, "seconds": spread(seconds)}
        )
        print(rows[-1], flush=True)
    thousand = next((row for row in rows if row["shards"] == 1000), None)
    targets = []
    if thousand is not None:
        median = thousand["seconds"]["median"]
        targets.append(
            target(
                "P5",
                "1,000-shard dry run (SLURM profile)",
                f"{median:.1f} s",
                f"<= {TARGET_SECONDS:.0f} s",
                median <= TARGET_SECONDS,
            )
        )
    table = [
        f"# P5 dry-run time (`snakemake --profile profiles/slurm -n`, fresh directory, median (min–max) of "
        f"{args.repeats})",
        "",
        f"SLURM controller answering: {controller}.",
        "",
        "| shards | jobs planned | seconds |",
        "|---|---|---|",
        *[f"| {row['shards']:,} | {row['jobs']:,} | {cell(row['seconds'], 1)} |" for row in rows],
    ]
    write_results(
        "dry_run_scale",
        {
            "benchmark": "P5 dry-run scale",
            "repeats": args.repeats,
            "slurm_controller_answers": controller,
            "rows": rows,
            "targets": targets,
        },
        table,
    )


if __name__ == "__main__":
    main()
