"""Rule shard: validate the input table, split it into K shards (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.models import get_model
    from cmcflow.shard import shard_table

    shard_table(
        snakemake.input.table,
        snakemake.output.shards,
        num_shards=snakemake.params.num_shards,
        spec=get_model(snakemake.params.model),
        columns=snakemake.params.columns,
        seed=snakemake.params.seed,
        strata=snakemake.params.strata,
    )
