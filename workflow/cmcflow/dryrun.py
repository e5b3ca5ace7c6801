"""Snakemake's job table, read back: how many jobs of each rule a run or dry run plans."""

from __future__ import annotations


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the ``Job stats`` table Snakemake prints (run or dry run)."""
    jobs, in_table = {}, False
    for line in output.splitlines():
        fields = line.split()
        if fields[:2] == ["job", "count"]:
            in_table = True
        elif in_table and len(fields) == 2 and fields[1].isdigit() and fields[0] != "total":
            jobs[fields[0]] = int(fields[1])
        elif in_table and fields and fields[0] == "total":
            break
    return jobs
