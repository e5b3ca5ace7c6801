"""Rule report: the analysis' HTML summary (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.io import write_bytes_atomic
    from cmcflow.models import get_model
    from cmcflow.report import render_report
    from cmcflow.shard import MANIFEST_NAME

    page, shards_png, posterior_png = render_report(
        snakemake.wildcards.analysis,
        snakemake.params.model,
        snakemake.input.summary,
        snakemake.input.shards,
        snakemake.input.moments,
        snakemake.params.diagnostics,
        snakemake.params.features_info,
        snakemake.input.benchmarks,
        f"{snakemake.input.shard_dir}/{MANIFEST_NAME}",
        point_site=get_model(snakemake.params.model).point_site,
        importance_path=snakemake.input.importance or None,
        corrected_summary_path=snakemake.input.corrected_summary or None,
    )
    write_bytes_atomic(snakemake.output.shards_figure, shards_png)
    write_bytes_atomic(snakemake.output.posterior_figure, posterior_png)
    write_bytes_atomic(snakemake.output.report, page.encode())
