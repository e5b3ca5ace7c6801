"""Rule sweep_report: a swept analysis' grid points side by side (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.io import atomic_path, write_bytes_atomic, write_json_atomic
    from cmcflow.models import get_model
    from cmcflow.sweep_report import render_sweep_report

    page, figure_png, summary, comparison = render_sweep_report(
        snakemake.wildcards.sweep,
        snakemake.params.model,
        snakemake.params.swept_keys,
        snakemake.params.points,
        snakemake.params.stability,
        point_site=get_model(snakemake.params.model).point_site,
        allow_reflection=snakemake.params.allow_reflection,
    )
    with atomic_path(snakemake.output.summary) as tmp:
        summary.to_csv(tmp, index=False)
    write_json_atomic(snakemake.output.comparison, comparison)
    write_bytes_atomic(snakemake.output.figure, figure_png)
    write_bytes_atomic(snakemake.output.report, page.encode())
