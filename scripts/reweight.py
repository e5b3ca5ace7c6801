"""Rule reweight: one shard's untempered log-likelihood at every proposal draw."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import collect_cycles_rarely, open_log, reported_errors

collect_cycles_rarely()
open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import numpy as np

    from cmcflow.consensus import constrained_sites, layout_sites
    from cmcflow.featurize import load_features
    from cmcflow.fused import enable_in_job
    from cmcflow.io import read_arrays, write_arrays
    from cmcflow.likelihood import log_likelihood_at
    from cmcflow.models import get_model
    from cmcflow.transforms import model_kwargs

    enable_in_job(snakemake.params.fused_likelihood, snakemake.params.jax["compilation_cache_dir"])
    spec = get_model(snakemake.params.model["name"])
    features = load_features(snakemake.params.features)
    proposal = read_arrays(snakemake.input.proposal)
    # combine stored every draw constrained: the latent sites' values are the model's input
    constrained = constrained_sites(proposal)
    log_likelihood = log_likelihood_at(
        spec.numpyro_model,
        spec.device_layout(model_kwargs(features, snakemake.params.model["options"])),
        {name: constrained[name] for name in layout_sites(str(proposal["layout"]))},
        rows=len(features["mask"]),
    )
    write_arrays(
        snakemake.output.log_likelihood,
        {"log_likelihood": log_likelihood, "precision": np.asarray(snakemake.params.jax["precision"])},
    )
