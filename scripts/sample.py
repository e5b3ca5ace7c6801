"""Rules sample and sample_batch: NUTS on one shard, or on the consecutive shards of a batch
one after another in this one process. The XLA/JAX environment is set before JAX is imported."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import collect_cycles_rarely, open_log, reported_errors

collect_cycles_rarely()
open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import chain_layout, configure_jax

    configure_jax(**snakemake.params.jax)

    import logging
    import os

    from cmcflow.featurize import load_features
    from cmcflow.fused import enable_in_job
    from cmcflow.models import get_model
    from cmcflow.sample import NutsSettings, sample_shard_files
    from cmcflow.shard import shard_id

    settings = dict(snakemake.params.sample)
    seed = settings.pop("seed")
    enable_in_job(settings.pop("fused_likelihood"), snakemake.params.jax["compilation_cache_dir"])
    if snakemake.rule == "sample_batch":
        os.makedirs(snakemake.output.batch, exist_ok=True)
        outputs = [
            (f"{snakemake.output.batch}/shard-{shard}.nc", f"{snakemake.output.batch}/shard-{shard}.diagnostics.json")
            for shard in snakemake.params.shards
        ]
        shards = [int(shard) for shard in snakemake.params.shards]
        feature_paths = [features for features, _ in snakemake.params.features]
    else:
        outputs = [(snakemake.output.posterior, snakemake.output.diagnostics)]
        shards = [int(snakemake.wildcards.shard)]
        feature_paths = [snakemake.input.features]
    spec = get_model(snakemake.params.model["name"])
    _, chain_method = chain_layout(snakemake.params.jax["platform"], snakemake.params.chains)
    for shard, features_path, (posterior_path, diagnostics_path) in zip(shards, feature_paths, outputs):
        logging.getLogger("cmcflow.sample").info("shard %d", shard)
        sample_shard_files(
            spec,
            load_features(features_path),
            snakemake.params.model["options"],
            posterior_path,
            diagnostics_path,
            num_shards=snakemake.params.num_shards,
            shard=shard,
            seed=seed,
            settings=NutsSettings(**settings),
            chains=snakemake.params.chains,
            chain_method=chain_method,
            checkpoint_path=f"{snakemake.params.checkpoints}/shard-{shard_id(shard)}.pkl",
            third_derivatives=snakemake.params.second_order,
        )
