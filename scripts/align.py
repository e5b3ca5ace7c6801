"""Rule align: every draw of one shard aligned to the analysis' reference structure."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import arviz as az
    import numpy as np

    from cmcflow.align import align_run
    from cmcflow.io import read_json
    from cmcflow.models import get_model
    from cmcflow.overlay import OverlaySettings
    from cmcflow.runs import diagnostics, is_failed, run_groups, write_run

    spec = get_model(snakemake.params.model)
    settings = snakemake.params.align
    run = az.from_netcdf(snakemake.params.posterior)
    if is_failed(run):  # a failure record passes through to combine
        diagnostics = read_json(snakemake.params.diagnostics)
        write_run(run, diagnostics, snakemake.output.posterior, snakemake.output.diagnostics)
        sys.exit(0)
    aligned = align_run(
        run,
        np.asarray(read_json(snakemake.input.reference)["coords"]),
        spec.point_site,
        method=settings["method"],
        allow_reflection=settings["allow_reflection"],
        overlay=OverlaySettings(
            iterations=settings["iterations"],
            axis_orders=settings["axis_orders"],
            spread_starts=settings["spread_starts"],
            allow_reflection=settings["allow_reflection"],
            use_correspondence=True,
        ),
    )
    report = {
        **{key: value for key, value in aligned.posterior.attrs.items() if not key.startswith("nuts_")},
        **diagnostics(run_groups(aligned), list(aligned.unconstrained_posterior.data_vars)),
        "mean_align_rmsd": float(aligned.sample_stats["align_rmsd"].mean()),
        "min_align_score": float(aligned.sample_stats["align_score"].min()),
    }
    write_run(aligned, report, snakemake.output.posterior, snakemake.output.diagnostics)
