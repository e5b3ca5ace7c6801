"""Rule simulate: write the demo table and its true parameters (jax-free)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.io import atomic_path, write_json_atomic
    from cmcflow.models import get_model

    settings = dict(snakemake.params.simulate)
    spec = get_model(snakemake.params.model)
    table, truth = spec.simulate(settings.pop("rows"), settings.pop("seed"), **settings)
    with atomic_path(snakemake.output.table) as tmp:
        table.to_parquet(tmp, index=False)
    write_json_atomic(snakemake.output.truth, truth)
