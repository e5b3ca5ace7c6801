"""Rule align_reference: the analysis' reference structure from all shard runs."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.jaxenv import configure_jax

    configure_jax(**snakemake.params.jax)

    import arviz as az

    from cmcflow.align import build_reference
    from cmcflow.io import write_json_atomic
    from cmcflow.models import get_model
    from cmcflow.runs import is_failed

    spec = get_model(snakemake.params.model)
    runs = [run for run in map(az.from_netcdf, snakemake.params.posteriors) if not is_failed(run)]
    reference, record = build_reference(runs, spec.point_site, snakemake.params.align["allow_reflection"])
    write_json_atomic(snakemake.output.reference, {"site": spec.point_site, "coords": reference.tolist(), **record})
