"""Rule sample: NUTS on one shard. The XLA/JAX environment is set before JAX is imported."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.sample import NutsSettings, sample_features, write_run

    settings = dict(snakemake.params.sample)
    seed = settings.pop("seed")
    idata, report = sample_features(
        get_model(snakemake.params.model["name"]),
        load_features(snakemake.input.features),
        snakemake.params.model["options"],
        num_shards=snakemake.params.num_shards,
        shard=int(snakemake.wildcards.shard),
        seed=seed,
        settings=NutsSettings(**settings),
        devices=snakemake.params.jax["devices"],
    )
    write_run(idata, report, snakemake.output.posterior, snakemake.output.diagnostics)
