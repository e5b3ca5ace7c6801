"""Rule preflight: the model run once on the first shard's features (its initial point, the
log density and gradient there) before any sample job starts; a model that cannot run stops
the run here with one line naming the site."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    from cmcflow.featurize import load_features
    from cmcflow.io import write_json_atomic
    from cmcflow.models import get_model
    from cmcflow.preflight import preflight

    spec = get_model(snakemake.params.model["name"])
    found = preflight(
        spec,
        load_features(snakemake.params.features),
        snakemake.params.model["options"],
        num_shards=snakemake.params.num_shards,
        seed=snakemake.params.seed,
    )
    write_json_atomic(snakemake.output[0], {"model": spec.name, **found})
