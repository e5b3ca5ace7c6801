"""Rules featurize and featurize_batch: one shard, or the shards of a sample batch one after
another, -> padded arrays through the feature cache (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    import os

    from cmcflow.featurize import featurize_shard
    from cmcflow.models import get_model

    if snakemake.rule == "featurize_batch":
        os.makedirs(snakemake.output.batch, exist_ok=True)
        jobs = [(int(shard), *files) for shard, files in zip(snakemake.params.shards, snakemake.params.files)]
    else:
        jobs = [(int(snakemake.wildcards.shard), snakemake.output.features, snakemake.output.info)]
    spec = get_model(snakemake.params.model)
    for shard, features_path, info_path in jobs:
        featurize_shard(
            snakemake.input.shards,
            shard,
            features_path,
            info_path,
            spec=spec,
            columns=snakemake.params.columns,
            pad_multiple=snakemake.params.featurize["pad_multiple"],
            cache_dir=snakemake.params.cache_dir,
        )
