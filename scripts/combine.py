"""Rule combine: consensus Monte Carlo over the shards' posterior draws."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import time

    import numpy as np

    from cmcflow.combine import CombineSettings, combine_shards, draw_proposal
    from cmcflow.featurize import load_features
    from cmcflow.io import read_json, write_arrays
    from cmcflow.models import get_model
    from cmcflow.runs import read_run, write_combined
    from cmcflow.transforms import model_kwargs

    spec = get_model(snakemake.params.model["name"])
    kwargs = model_kwargs(load_features(snakemake.params.features), snakemake.params.model["options"])
    settings = snakemake.params.combine
    point_pairs = None
    if spec.observed_pairs is not None and settings["point_location"] == "distances":
        shard_pairs = [spec.observed_pairs(load_features(path)) for path in snakemake.params.pair_features]
        point_pairs = np.unique(np.concatenate(shard_pairs), axis=0)
    paths = list(snakemake.params.posteriors)
    combination = combine_shards(
        lambda shard: read_run(paths[shard]),
        len(paths),
        spec.numpyro_model,
        kwargs,
        CombineSettings.from_config(settings),
        diagnostics=[read_json(path) for path in snakemake.params.diagnostics],
        point_site=spec.point_site,
        point_pairs=point_pairs,
        sample_paths=snakemake.params.sample_paths,
        corrected=snakemake.params.correct is not None,
    )
    proposal = {}
    if snakemake.params.correct is not None:  # the importance correction runs
        started = time.perf_counter()
        proposal = draw_proposal(
            spec.numpyro_model, kwargs, combination.gaussian, snakemake.params.correct, combination.every_shard
        )
        combination.record["proposal_seconds"] = time.perf_counter() - started
    write_combined(
        combination.idata,
        combination.record,
        combination.moments,
        snakemake.output.posterior,
        snakemake.output.summary,
        snakemake.output.shards,
        snakemake.output.moments,
    )
    write_arrays(snakemake.output.gaussian, {**combination.gaussian, **proposal})
