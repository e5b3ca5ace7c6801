# The align stage exists in the DAG only for rigid models (see run_targets).


rule align_reference:
    """One reference structure for the analysis: GPA within shards, then over shard means."""
    input:
        runs=sample_targets,
    output:
        reference=ALIGN_REFERENCE,
    params:
        posteriors=sample_files("posterior"),
        model=model_name_param,
        align=setting_param("align"),
        jax=jax_param(config["jax"]["devices"], "align"),
    log:
        f"{LOGS}/align_reference.log",
    benchmark:
        f"{BENCHMARKS}/align_reference.tsv"
    threads: job_threads("align")
    resources:
        gpu=job_gpus("align"),
        mem_mb=draws_mem,
        runtime=runtime_minutes(30),
    conda:
        jax_env("align", "jax-devices")
    script:
        "../../scripts/align_reference.py"


rule align:
    """Every draw of one shard aligned to the reference, distributed over the JAX devices."""
    input:
        run=lambda wildcards: sample_target(wildcards.analysis, wildcards.shard),
        reference=ALIGN_REFERENCE,
    output:
        posterior=ALIGNED_POSTERIOR,
        diagnostics=ALIGNED_DIAGNOSTICS,
    params:
        posterior=lambda wildcards: sample_file(wildcards.analysis, wildcards.shard, "posterior"),
        diagnostics=lambda wildcards: sample_file(wildcards.analysis, wildcards.shard, "diagnostics"),
        model=model_name_param,
        align=setting_param("align"),
        jax=jax_param(config["jax"]["devices"], "align"),
    log:
        f"{LOGS}/align/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/align/shard-{{shard}}.tsv"
    threads: job_threads("align")
    resources:
        gpu=job_gpus("align"),
        mem_mb=draws_mem,
        runtime=runtime_minutes(60),
    conda:
        jax_env("align", "jax-devices")
    script:
        "../../scripts/align.py"
