"""Rule combine: consensus Monte Carlo over the shards' posterior draws."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import json
    from pathlib import Path

    import numpy as np

    from cmcflow.combine import combine_shards, write_combined
    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.sample import model_kwargs, read_run

    spec = get_model(snakemake.params.model["name"])
    options = snakemake.params.model["options"]
    settings = snakemake.params.combine
    point_pairs = None
    if spec.observed_pairs is not None and settings["point_location"] == "distances":
        shard_pairs = [spec.observed_pairs(load_features(path)) for path in snakemake.input.pair_features]
        point_pairs = np.unique(np.concatenate(shard_pairs), axis=0)
    paths = list(snakemake.input.posteriors)
    combined, shards, moments = combine_shards(
        lambda shard: read_run(paths[shard]),
        len(paths),
        spec.numpyro_model,
        model_kwargs(load_features(snakemake.input.features), options),
        method=settings["method"],
        seed=settings["seed"],
        shrinkage=settings["covariance_shrinkage"],
        diagnostics=[json.loads(Path(path).read_text()) for path in snakemake.input.diagnostics],
        screen_thresholds=settings["screen"],
        min_shards_fraction=settings["min_shards_fraction"],
        on_failed_shard=settings["on_failed_shard"],
        point_site=spec.point_site,
        point_pairs=point_pairs,
    )
    write_combined(
        combined, shards, moments, snakemake.output.posterior, snakemake.output.summary, snakemake.output.shards,
        snakemake.output.moments,
    )
