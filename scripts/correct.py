"""Rule correct: importance-corrected combination, its Pareto k-hat and verdict."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    from cmcflow.correct import write_correction
    from cmcflow.featurize import load_features
    from cmcflow.models import get_model
    from cmcflow.transforms import model_kwargs

    spec = get_model(snakemake.params.model["name"])
    write_correction(
        spec.numpyro_model,
        model_kwargs(load_features(snakemake.params.features), snakemake.params.model["options"]),
        snakemake.input,
        snakemake.output,
        snakemake.params.correct,
    )
