# cmcflow's entry point is workflow/Snakefile (the Snakemake workflow catalog's layout);
# this file lets `snakemake` run from the repository root.
include: "workflow/Snakefile"


# Snakemake forgets a default target declared inside an included file: name it again.
workflow.default_target = "all"
