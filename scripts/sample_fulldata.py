"""Rule sample_fulldata: NUTS on all rows (K = 1, untempered), the reference for CMC. A rigid
model's draws are aligned into one frame (as the align stage aligns a shard's), so that its
summary and diagnostics mean what a shard's do."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import chain_layout, configure_jax

    configure_jax(**snakemake.params.jax)

    from pathlib import Path

    from cmcflow.featurize import all_rows_features
    from cmcflow.fused import enable_in_job
    from cmcflow.io import atomic_path
    from cmcflow.models import get_model
    from cmcflow.runs import summary_table, write_run
    from cmcflow.sample import NutsSettings, sample_features

    spec = get_model(snakemake.params.model["name"])
    checkpoint = Path(snakemake.params.checkpoints) / "fulldata.pkl"
    settings = dict(snakemake.params.sample)
    seed = settings.pop("seed")
    enable_in_job(settings.pop("fused_likelihood"), snakemake.params.jax["compilation_cache_dir"])
    idata, report = sample_features(
        spec,
        all_rows_features(
            snakemake.input.shards, spec, snakemake.params.columns, snakemake.params.featurize["pad_multiple"]
        ),
        snakemake.params.model["options"],
        num_shards=1,
        shard=-1,
        seed=seed,
        settings=NutsSettings(**settings),
        chains=snakemake.params.chains,
        chain_method=chain_layout(snakemake.params.jax["platform"], snakemake.params.chains)[1],
        checkpoint_path=checkpoint,
    )
    if spec.symmetry == "rigid":
        from cmcflow.align import align_run, build_reference
        from cmcflow.overlay import OverlaySettings
        from cmcflow.runs import diagnostics, run_groups

        align = snakemake.params.align
        reference, _ = build_reference([idata], spec.point_site, align["allow_reflection"])
        overlay = OverlaySettings(
            iterations=align["iterations"],
            axis_orders=align["axis_orders"],
            spread_starts=align["spread_starts"],
            allow_reflection=align["allow_reflection"],
            use_correspondence=True,
        )
        idata = align_run(idata, reference, spec.point_site, align["method"], align["allow_reflection"], overlay)
        report |= diagnostics(run_groups(idata), list(idata.unconstrained_posterior.data_vars))
        report["mean_align_rmsd"] = float(idata.sample_stats["align_rmsd"].mean())
    write_run(idata, report, snakemake.output.posterior, snakemake.output.diagnostics)
    with atomic_path(snakemake.output.summary) as tmp:
        summary_table(idata).to_csv(tmp, index_label="parameter")
    checkpoint.unlink(missing_ok=True)
