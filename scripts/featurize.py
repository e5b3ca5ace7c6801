"""Rule featurize: one shard -> padded arrays through the feature cache (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.featurize import featurize_shard
    from cmcflow.models import get_model

    featurize_shard(
        snakemake.input.shards,
        int(snakemake.wildcards.shard),
        snakemake.output.features,
        snakemake.output.info,
        spec=get_model(snakemake.params.model),
        columns=snakemake.params.columns,
        pad_multiple=snakemake.params.featurize["pad_multiple"],
        cache_dir=snakemake.params.cache_dir,
    )
