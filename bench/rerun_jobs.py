"""P6 — jobs executed after a sampling-only config edit (target: 0 shard and 0 featurize
jobs).

Runs a small logistic analysis to completion, then applies three sampling-only edits one
after another (``sample.num_samples``, ``sample.target_accept_prob``, ``sample.num_warmup``)
and runs the workflow again after each, for real, counting the jobs Snakemake executed per
rule. Snakemake decides what to rerun from the rules' ``params:`` (its default rerun
triggers), so this measures that config reaches code only through them.

Usage: python bench/rerun_jobs.py [--workdir /tmp/cmcflow-bench/rerun]
Writes bench/results/rerun_jobs.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

from common import job_counts, logistic_analysis, snakemake, target, workflow_config, write_results

EDITS = (("num_samples", 250), ("target_accept_prob", 0.9), ("num_warmup", 250))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/rerun"))
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    analysis = logistic_analysis(rows=8000, features=5, num_shards=4, num_warmup=200, num_samples=200)
    config = workflow_config({"rerun": analysis}, args.workdir)
    _, output = snakemake(args.workdir, config, "--cores", "2")
    first = job_counts(output)
    print("first run:", first, flush=True)
    rows = []
    for key, value in EDITS:
        config = copy.deepcopy(config)
        config["analyses"]["rerun"]["sample"][key] = value
        seconds, output = snakemake(args.workdir, config, "--cores", "2")
        jobs = job_counts(output)
        rows.append({"edit": f"sample.{key}: {value}", "jobs_by_rule": jobs, "seconds": seconds})
        print(rows[-1], flush=True)
    upstream = max(row["jobs_by_rule"].get(rule, 0) for row in rows for rule in ("simulate", "shard", "featurize"))
    targets = [
        target(
            "P6",
            "shard + featurize jobs after a sampling-only edit",
            f"{upstream} (of {first.get('featurize', 0)} featurize, {first.get('shard', 0)} shard in the first run)",
            "0",
            upstream == 0,
        )
    ]
    rules = sorted(
        {rule for row in rows for rule in row["jobs_by_rule"]} | {"shard", "featurize"}, key=list(first).index
    )
    table = [
        f"# P6 jobs executed after a sampling-only config edit ({analysis['shard']['num_shards']} shards; first run: "
        + ", ".join(f"{rule} {count}" for rule, count in first.items())
        + ")",
        "",
        "| edit | " + " | ".join(rules) + " | seconds |",
        "|---|" + "---|" * (len(rules) + 1),
        *[
            f"| `{row['edit']}` | "
            + " | ".join(str(row["jobs_by_rule"].get(rule, 0)) for rule in rules)
            + f" | {row['seconds']:.0f} |"
            for row in rows
        ],
    ]
    write_results("rerun_jobs", {"benchmark": "P6 reruns", "first_run": first, "rows": rows, "targets": targets}, table)


if __name__ == "__main__":
    main()
