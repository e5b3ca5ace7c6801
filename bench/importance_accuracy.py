"""Importance correction against full-data NUTS: an easy case and hard ones (targets: the easy
case gets k̂ < 0.5; on a hard case where plain CMC is off by more than 0.2 full-data sd,
the corrected posterior is within 0.05 sd or k̂ >= 0.7 says so: never a silently wrong
answer).

Runs the workflow itself (``snakemake --cores 2 all fulldata``) on three analyses:

- ``easy``: linear_gaussian, 8,000 rows, 5 correlated features, K = 8;
- ``few_rows``: logistic, 6,400 rows, 5 features, K = 32 (200 rows per shard);
- ``rare_events``: logistic with about 4% events, 8,000 rows, 4 features, K = 16 (about 20
  events per shard): skewed subposteriors.

Three passes: the defaults (the Gaussian proposal, the second-order term in combine), the
Student-t proposal, and the Gaussian proposal from the first-order combination
(``combine.second_order: false``: samples again, without the third derivatives). For
every parameter: the combined and the corrected means' distance from full-data NUTS in
full-data posterior sd, and their sd ratios; k̂, the effective sample size and the
correction's wall time (reweight jobs summed, and correct) against one sample job.

Usage: python bench/importance_accuracy.py [--workdir /tmp/cmcflow-bench/importance]
Writes bench/results/importance_accuracy.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
from common import snakemake, target, workflow_config, write_results

from cmcflow.models.rows import correlated_features

#: the passes, each a set of config edits over every analysis: the proposal (a correct.* edit
#: reruns combine, reweight and correct only) and the second-order term (samples again)
PASSES = {
    "gaussian": {"correct": {"proposal": "gaussian"}},
    "student_t": {"correct": {"proposal": "student_t"}},
    "gaussian, first order": {"correct": {"proposal": "gaussian"}, "combine": {"second_order": False}},
}
SAMPLE = {"num_warmup": 500, "num_samples": 1000}


def rare_events_table(path: Path) -> None:
    """8,000 rows, 4 correlated features, intercept −3.5: about 4% of labels are 1."""
    rng = np.random.default_rng(3)
    X = correlated_features(rng, 8000, 4)
    beta = np.array([0.8, -0.5, 0.3, 0.0])
    y = rng.random(8000) < 1 / (1 + np.exp(-(-3.5 + X @ beta)))
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(4)])
    table["y"] = y.astype(int)
    table.to_parquet(path, index=False)


def analyses(workdir: Path) -> dict:
    rare = workdir / "rare_events.parquet"
    rare_events_table(rare)
    return {
        "easy": {
            "model": "linear_gaussian",
            "input": {"simulate": {"rows": 8000, "features": 5, "seed": 2}},
            "shard": {"num_shards": 8},
            "sample": SAMPLE,
        },
        "few_rows": {
            "model": "logistic",
            "input": {"simulate": {"rows": 6400, "features": 5, "seed": 2}},
            "shard": {"num_shards": 32},
            "sample": SAMPLE,
        },
        "rare_events": {
            "model": "logistic",
            "input": {"path": str(rare)},
            "columns": {"features": [f"x{i}" for i in range(4)], "label": "y"},
            "shard": {"num_shards": 16},
            "sample": SAMPLE,
        },
    }


def errors(summary: pd.DataFrame, full: pd.DataFrame) -> dict:
    """Largest |mean − full mean| / full sd and the sd ratios' range, over the parameters."""
    common = full.index.intersection(summary.index)
    error = ((summary.loc[common, "mean"] - full.loc[common, "mean"]) / full.loc[common, "sd"]).abs()
    ratio = summary.loc[common, "sd"] / full.loc[common, "sd"]
    return {"max_mean_error_sd": float(error.max()), "sd_ratio": [float(ratio.min()), float(ratio.max())]}


def seconds(path: Path) -> float:
    with open(path) as handle:
        return float(next(csv.DictReader(handle, delimiter="\t"))["s"])


def measure(results: Path) -> dict:
    full = pd.read_csv(results / "fulldata/summary.csv", index_col="parameter")
    importance = json.loads((results / "corrected/importance.json").read_text())
    samples = [seconds(path) for path in (results / "benchmarks/sample").glob("shard-*.tsv")]
    reweights = [seconds(path) for path in (results / "benchmarks/reweight").glob("shard-*.tsv")]
    return {
        "combined": errors(pd.read_csv(results / "combined/summary.csv", index_col="parameter"), full),
        "corrected": errors(pd.read_csv(results / "corrected/summary.csv", index_col="parameter"), full),
        "khat": importance["khat"],
        "effective_sample_size": importance["effective_sample_size"],
        "largest_combined_shift_sd": importance["largest_combined_shift_sd"],
        "median_sample_job_s": float(np.median(samples)),
        "median_reweight_job_s": float(np.median(reweights)),
        "correct_job_s": seconds(results / "benchmarks/correct.tsv"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/importance"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = workflow_config(analyses(args.workdir), args.workdir)
    cases = {}
    for label, edits in PASSES.items():
        for analysis in config["analyses"].values():
            analysis.update(edits)
        snakemake(args.workdir, config, "--cores", "2", "all", "fulldata", timeout=4 * 3600)
        cases[label] = {name: measure(args.workdir / "results" / name) for name in config["analyses"]}
    targets = []
    for proposal, measured in cases.items():
        easy = measured["easy"]["khat"]
        targets.append(
            target("I1", f"easy case (linear-Gaussian, K = 8), {proposal}: k-hat", f"{easy:.2f}", "< 0.5", easy < 0.5)
        )
        for name in ("few_rows", "rare_events"):
            case = measured[name]
            honest = case["corrected"]["max_mean_error_sd"] <= 0.05 or case["khat"] >= 0.7
            figure = (
                f"plain CMC {case['combined']['max_mean_error_sd']:.3f} sd; corrected "
                f"{case['corrected']['max_mean_error_sd']:.3f} sd; k-hat {case['khat']:.2f}"
            )
            goal = "corrected <= 0.05 sd or k-hat >= 0.7"
            targets.append(target("I2", f"hard case {name}, {proposal}", figure, goal, honest))
    table = [
        "# Importance correction against full-data NUTS (4 chains x (500 + 1000) draws; one run)",
        "",
        "| pass | case | plain CMC: max mean error (sd) | corrected: max mean error (sd) | corrected sd ratio | "
        "k-hat | ESS | reweight job s | correct job s | sample job s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {proposal} | {name} | {c['combined']['max_mean_error_sd']:.3f} | "
            f"{c['corrected']['max_mean_error_sd']:.3f} | "
            f"{c['corrected']['sd_ratio'][0]:.3f}–{c['corrected']['sd_ratio'][1]:.3f} | {c['khat']:.2f} | "
            f"{c['effective_sample_size']:.0f} | {c['median_reweight_job_s']:.1f} | {c['correct_job_s']:.1f} | "
            f"{c['median_sample_job_s']:.1f} |"
            for proposal, measured in cases.items()
            for name, c in measured.items()
        ],
        "",
        "pass: gaussian, student_t: `correct.proposal`, with the default combination (Hessian weights and the "
        "second-order term); first order: `combine.second_order: false`. Plain CMC: the combination, "
        "uncorrected.",
    ]
    record = {"benchmark": "importance correction", "cases": cases, "targets": targets}
    write_results("importance_accuracy", record, table)


if __name__ == "__main__":
    main()
