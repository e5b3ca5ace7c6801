"""Rule combine: consensus Monte Carlo over the shards' posterior draws."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import arviz as az

    from cmcflow.combine import combine_runs, write_combined
    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.sample import model_kwargs

    spec = get_model(snakemake.params.model["name"])
    options = snakemake.params.model["options"]
    settings = snakemake.params.combine
    runs = [az.from_netcdf(path) for path in snakemake.input.posteriors]
    combined = combine_runs(
        runs,
        spec.numpyro_model,
        model_kwargs(load_features(snakemake.input.features), options),
        method=settings["method"],
        seed=settings["seed"],
        point_site=spec.point_site,
    )
    shards = {
        "method": settings["method"],
        "covariance": combined.posterior.attrs["covariance"],
        "used": [int(run.posterior.attrs["shard"]) for run in runs],
        "excluded": [],
    }
    write_combined(combined, shards, snakemake.output.posterior, snakemake.output.summary, snakemake.output.shards)
