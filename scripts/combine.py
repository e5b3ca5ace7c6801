"""Rule combine: consensus Monte Carlo over the shards' posterior draws."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import arviz as az
    import numpy as np

    from cmcflow.combine import combine_runs, write_combined
    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.sample import model_kwargs

    spec = get_model(snakemake.params.model["name"])
    options = snakemake.params.model["options"]
    settings = snakemake.params.combine
    runs = [az.from_netcdf(path) for path in snakemake.input.posteriors]
    point_pairs = None
    if spec.observed_pairs is not None and settings["point_location"] == "distances":
        shard_pairs = [spec.observed_pairs(load_features(path)) for path in snakemake.input.pair_features]
        point_pairs = np.unique(np.concatenate(shard_pairs), axis=0)
    combined = combine_runs(
        runs,
        spec.numpyro_model,
        model_kwargs(load_features(snakemake.input.features), options),
        method=settings["method"],
        seed=settings["seed"],
        point_site=spec.point_site,
        point_pairs=point_pairs,
    )
    shards = {
        "method": settings["method"],
        "covariance": combined.posterior.attrs["covariance"],
        **{key: combined.posterior.attrs[key] for key in ("location", "location_shift_rmsd") if key in combined.posterior.attrs},
        "used": [int(run.posterior.attrs["shard"]) for run in runs],
        "excluded": [],
    }
    write_combined(combined, shards, snakemake.output.posterior, snakemake.output.summary, snakemake.output.shards)
