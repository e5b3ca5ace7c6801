"""Several shards per sample job (issue 13 c): ``sample.shards_per_job`` n against 1.

64 logistic shards of 2,000 rows (10 features, NUTS 500 + 500, 4 chains): the sample
stage's CPU seconds (Snakemake's ``benchmark:`` files, every sample job summed), its jobs,
and the CPU seconds per job that are not per shard (what a job spends once: imports, JAX
set-up, the first compile), for n = 1, 8 and 64. Every run starts from the same features
and a warm compilation cache (one run beforehand warms it), as on a cluster after the
first job; the runs differ only in ``shards_per_job``, the sizes interleaved in each
repeat. Then the dry run of 10,000 shards.

    python bench/shards_per_job.py [--repeats 3] [--workdir /tmp/cmcflow-bench/shards-per-job]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import pandas as pd
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

NUM_SHARDS, ROWS_PER_SHARD = 64, 2_000
SIZES = (1, 8, 64)
CPU_TARGET = 0.5  # sample-stage CPU seconds, n shards per job / one job per shard
DRY_RUN_SHARDS, DRY_RUN_TARGET = 10_000, 20.0


def analysis(shards_per_job: int, num_shards: int = NUM_SHARDS, rows_per_shard: int = ROWS_PER_SHARD) -> dict:
    settings = logistic_analysis(num_shards * rows_per_shard, 10, num_shards, num_warmup=500, num_samples=500)
    settings["sample"]["shards_per_job"] = shards_per_job
    settings["correct"] = {"enabled": False}
    return settings


def sample_stage(workdir: Path, shards_per_job: int) -> dict:
    """One run of the sample stage (features already built): CPU and wall seconds summed
    over its jobs, and its job count."""
    results = workdir / "results" / "bench"
    shutil.rmtree(results / "samples", ignore_errors=True)
    shutil.rmtree(results / "benchmarks" / "sample", ignore_errors=True)
    config = workflow_config({"bench": analysis(shards_per_job)}, workdir)
    _, output = snakemake(workdir, config, "--cores", "2", "--until", "sample", "sample_batch")
    frames = [pd.read_csv(path, sep="\t") for path in sorted((results / "benchmarks" / "sample").glob("*.tsv"))]
    jobs = job_counts(output)
    return {
        "jobs": jobs.get("sample", 0) + jobs.get("sample_batch", 0),
        "cpu_seconds": float(sum(frame["cpu_time"].iloc[0] for frame in frames)),
        "wall_seconds": float(sum(frame["s"].iloc[0] for frame in frames)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/shards-per-job"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    sample_stage(args.workdir, max(SIZES))  # builds the features and warms the compilation cache
    runs = {size: [] for size in SIZES}
    for _ in range(args.repeats):
        for size in SIZES:
            runs[size].append(sample_stage(args.workdir, size))
    by_size = {
        size: {
            "jobs": entries[0]["jobs"],
            "cpu_seconds": spread([entry["cpu_seconds"] for entry in entries]),
            "wall_seconds": spread([entry["wall_seconds"] for entry in entries]),
        }
        for size, entries in runs.items()
    }
    one = by_size[1]["cpu_seconds"]["median"]
    # CPU(n) = jobs(n) * per_job + K * per_shard: two sizes give both
    many = max(SIZES)
    per_job = (one - by_size[many]["cpu_seconds"]["median"]) / (by_size[1]["jobs"] - by_size[many]["jobs"])
    per_shard = (one - by_size[1]["jobs"] * per_job) / NUM_SHARDS

    probe = slurm_probe()
    dry_seconds, dry_jobs = [], {}
    dry_dir = args.workdir / "dry-run"
    for _ in range(args.repeats):
        shutil.rmtree(dry_dir, ignore_errors=True)
        config = workflow_config({"scale": analysis(64, DRY_RUN_SHARDS, 100)}, dry_dir)
        wall, output = snakemake(dry_dir, config, "-n", "--quiet", "rules")
        dry_seconds.append(wall)
        dry_jobs = job_counts(output)
    dry = spread(dry_seconds)

    targets = []
    for size in SIZES[1:]:
        ratio = by_size[size]["cpu_seconds"]["median"] / one
        targets.append(
            target(
                "13c",
                f"sample-stage CPU seconds, {size} shards per job / 1 ({NUM_SHARDS} shards of {ROWS_PER_SHARD:,} rows)",
                f"{ratio:.2f} ({by_size[size]['jobs']} jobs)",
                f"<= {CPU_TARGET} (jobs = ceil(K / n) = {-(-NUM_SHARDS // size)})",
                ratio <= CPU_TARGET and by_size[size]["jobs"] == -(-NUM_SHARDS // size),
                bound=(
                    f"a job's own CPU (imports, JAX set-up, first compile) is {per_job:.1f} s and a shard's "
                    f"{per_shard:.1f} s, so no n can go below {per_shard / (per_job + per_shard):.2f}"
                ),
            )
        )
    targets.append(
        target(
            "13c",
            f"dry run of {DRY_RUN_SHARDS:,} shards (64 per sample job, no correction)",
            f"{dry['median']:.1f} s ({sum(dry_jobs.values()):,} jobs)",
            f"<= {DRY_RUN_TARGET:.0f} s",
            dry["median"] <= DRY_RUN_TARGET,
            bound=(
                f"Snakemake plans {sum(dry_jobs.values()):,} jobs; every start also pays the SLURM plugin's "
                f"`scontrol show config` probe ({probe['seconds']:.1f} s here)"
            ),
        )
    )
    table = [
        f"# Several shards per sample job (issue 13 c): {NUM_SHARDS} logistic shards of {ROWS_PER_SHARD:,} rows",
        "",
        f"Sample stage only (features built, compilation cache warm), `--cores 2`; CPU and wall seconds summed over "
        f"the sample jobs (Snakemake `benchmark:` files); median (min–max) of {args.repeats}.",
        "",
        "| shards per job | jobs | CPU s | CPU / one per job | job wall s (sum) |",
        "|---|---|---|---|---|",
    ]
    for size, entry in by_size.items():
        table.append(
            f"| {size} | {entry['jobs']} | {cell(entry['cpu_seconds'], 1)} | "
            f"{entry['cpu_seconds']['median'] / one:.2f} | {cell(entry['wall_seconds'], 1)} |"
        )
    table += [
        "",
        f"Per job (imports, JAX set-up, first compile): {per_job:.2f} CPU s; per shard (NUTS, Hessian and third "
        f"derivatives, writing): {per_shard:.2f} CPU s (fitted from n = 1 and n = {many}).",
        "",
        f"Dry run of {DRY_RUN_SHARDS:,} shards, 64 per sample job: {cell(dry, 1)} s; jobs by rule: {dry_jobs}. "
        f"Every Snakemake start imports the SLURM executor plugin, which runs `scontrol show config`: here "
        f"{probe['seconds']:.2f} s (scontrol installed: {probe['scontrol']}, a controller answered: "
        f"{probe['answers']}); where a slurm.conf names a controller that is down it waits about 9 s.",
    ]
    write_results(
        "shards_per_job",
        {
            "benchmark": "13c shards per job",
            "repeats": args.repeats,
            "by_size": {str(size): entry for size, entry in by_size.items()},
            "per_job_cpu_seconds": per_job,
            "per_shard_cpu_seconds": per_shard,
            "dry_run": {"shards": DRY_RUN_SHARDS, "seconds": dry, "jobs": dry_jobs, "slurm_probe": probe},
            "targets": targets,
        },
        table,
    )


if __name__ == "__main__":
    main()
