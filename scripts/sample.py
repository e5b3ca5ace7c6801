"""Rule sample: NUTS on one shard. The XLA/JAX environment is set before JAX is imported."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import logging

    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.runs import failed_run, is_transient, write_run
    from cmcflow.sample import NutsSettings, sample_features

    settings = dict(snakemake.params.sample)
    seed = settings.pop("seed")
    shard = int(snakemake.wildcards.shard)
    features = load_features(snakemake.input.features)
    try:
        idata, report = sample_features(
            get_model(snakemake.params.model["name"]),
            features,
            snakemake.params.model["options"],
            num_shards=snakemake.params.num_shards,
            shard=shard,
            seed=seed,
            settings=NutsSettings(**settings),
            devices=snakemake.params.jax["devices"],
        )
    except Exception as error:  # recorded, not raised: combine applies combine.on_failed_shard
        if is_transient(error):  # out of memory, I/O: fail the job, and the profile's retries resubmit it
            raise
        logging.getLogger("cmcflow.sample").exception("NUTS failed on shard %d; writing a failure record", shard)
        idata, report = failed_run(shard, f"{type(error).__name__}: {error}")
    write_run(idata, report, snakemake.output.posterior, snakemake.output.diagnostics)
