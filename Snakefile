# cmcflow: Consensus Monte Carlo on HPC clusters (Snakemake + JAX + NumPyro).
# Stages: simulate (demo data) -> shard -> featurize -> sample -> [align] -> combine -> report.


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/simulate.smk"
include: "workflow/rules/shard.smk"
include: "workflow/rules/featurize.smk"
include: "workflow/rules/sample.smk"
include: "workflow/rules/align.smk"
include: "workflow/rules/combine.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/fulldata.smk"


# Light, short jobs run on the submitting host, so a run of 1,000 shards sends the
# scheduler only its sample, align and combine jobs.
localrules:
    all,
    fulldata,
    simulate,
    shard,
    featurize,
    report,


rule all:
    default_target: True
    input:
        all_reports(),


rule fulldata:
    input:
        all_fulldata_summaries(),
