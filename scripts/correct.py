"""Rule correct: importance-corrected combination, its Pareto k-hat and verdict (no JAX)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import collect_cycles_rarely, open_log, reported_errors

collect_cycles_rarely()
open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.correct import write_correction

    write_correction(snakemake.input, snakemake.output, snakemake.params.correct)
