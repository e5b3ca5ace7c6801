"""K-stability of the demo's two models (issue 15): ``config/sweep.yaml`` run through the
workflow, and for each K the sweep page's largest mean shift (reference sd) and sd change
against the reference (full-data NUTS for the logistic demo, K = 4 for the structure),
with the verdict, the shards screening left out and the sample stage's summed job time.

    python bench/k_stability.py [--workdir /tmp/cmcflow-bench/k-stability]
    python bench/k_stability.py --tabulate DIR --wall-seconds S   # a run made by hand in DIR

One run (no repeats): the figures are posterior distances, whose Monte Carlo error the
tests bound (tests/test_sweep.py), not timings.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd
import yaml
from common import REPO, snakemake, write_results

CONFIG = REPO / "config" / "sweep.yaml"


def sample_seconds(point: Path) -> float:
    """Wall seconds of a grid point's sample jobs, summed (Snakemake ``benchmark:`` files)."""
    return float(sum(pd.read_csv(path, sep="\t")["s"].iloc[0] for path in (point / "benchmarks/sample").glob("*.tsv")))


def tabulate(results: Path, wall_seconds: float) -> dict:
    """Every swept analysis of ``config/sweep.yaml`` in ``results``: its K-stability rows."""
    config = yaml.safe_load(CONFIG.read_text())
    analyses = {}
    for name, settings in config["analyses"].items():
        comparison = json.loads((results / name / "sweep" / "comparison.json").read_text())
        (series,) = comparison["stability"]["series"]
        rows = []
        for row in series["rows"]:
            point = results / row["point"]
            shards = json.loads((point / "combined" / "shards.json").read_text())
            rows.append(
                {
                    **row,
                    "rows_per_shard": settings["input"]["simulate"]["rows"] // row["num_shards"],
                    "excluded": len(shards["excluded"]),
                    "sample_job_seconds": sample_seconds(point),
                }
            )
        analyses[name] = {
            "model": settings["model"],
            "reference": series["reference"],
            "stable_up_to": series["stable_up_to"],
            "verdict": series["verdict"],
            "thresholds": comparison["stability"]["thresholds"],
            "rows": rows,
        }
    return {
        "benchmark": "k_stability",
        "config": str(CONFIG.relative_to(REPO)),
        "wall_seconds": wall_seconds,
        "analyses": analyses,
    }


def table(record: dict) -> list[str]:
    lines = [
        "# K-stability of the demo's models (issue 15)",
        "",
        f"`snakemake --cores 2 --configfile {record['config']}`: {record['wall_seconds'] / 60:.0f} min wall on "
        "2 cores, every grid point, full-data run and sweep page. Shift: |combined mean − reference mean| in "
        "reference sd, the largest and the median over all parameters (point clouds: in the reference's frame, "
        "per-point isotropic sd); sd change: the largest |sd / reference sd − 1|.",
    ]
    for name, analysis in record["analyses"].items():
        limits = analysis["thresholds"]
        lines += [
            "",
            f"## {name} ({analysis['model']}): {analysis['verdict']}",
            "",
            f"Reference: {analysis['reference']}; stable: shift ≤ {limits['max_mean_shift']} and sd change ≤ "
            f"{limits['max_sd_change']}.",
            "",
            "| K | rows per shard | largest shift (sd) | parameter | median shift (sd) | sd change | stable "
            "| excluded shards | sample jobs (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {row['num_shards']} | {row['rows_per_shard']:,} | {row['max_mean_shift']:.3f} | "
            f"`{row['worst_parameter']}` | {row['median_mean_shift']:.3f} | {row['max_sd_change']:.3f} | "
            f"{'yes' if row['stable'] else '**no**'} | {row['excluded']} | {row['sample_job_seconds']:.0f} |"
            for row in analysis["rows"]
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/k-stability"))
    parser.add_argument("--tabulate", type=Path, help="a directory where config/sweep.yaml has run")
    parser.add_argument("--wall-seconds", type=float, help="with --tabulate: that run's wall time")
    args = parser.parse_args()
    if args.tabulate:
        record = tabulate(args.tabulate / "results", args.wall_seconds)
    else:
        shutil.rmtree(args.workdir, ignore_errors=True)
        config = yaml.safe_load(CONFIG.read_text())
        config |= {
            "results_dir": str(args.workdir / "results"),
            "feature_cache_dir": str(args.workdir / "cache/features"),
            "jax": {"compilation_cache_dir": str(args.workdir / "cache/jax")},
        }
        seconds, _ = snakemake(args.workdir, config, "--cores", "2", timeout=4 * 3600)
        record = tabulate(args.workdir / "results", seconds)
    write_results("k_stability", record, table(record))


if __name__ == "__main__":
    main()
