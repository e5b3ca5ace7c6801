"""Rule propose: the importance correction's proposal draws (NumPy and SciPy; no JAX)."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../workflow")  # this checkout's cmcflow (conda envs lack it)

from cmcflow.script import open_log, reported_errors

open_log(snakemake.log[0])

with reported_errors():
    from cmcflow.importance import propose
    from cmcflow.io import read_arrays, write_arrays

    write_arrays(snakemake.output.proposal, propose(read_arrays(snakemake.input.gaussian), snakemake.params.correct))
