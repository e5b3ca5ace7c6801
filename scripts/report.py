"""Rule report: the analysis' HTML summary (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.io import write_bytes_atomic
    from cmcflow.report import render_report

    page = render_report(
        snakemake.wildcards.analysis,
        snakemake.params.model,
        snakemake.input.summary,
        snakemake.input.shards,
        snakemake.input.diagnostics,
        snakemake.input.features_info,
        snakemake.input.benchmarks,
    )
    write_bytes_atomic(snakemake.output.report, page.encode())
