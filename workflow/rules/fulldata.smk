rule sample_fulldata:
    """NUTS on all rows at once (untempered prior): the reference that CMC is judged against.

    Not part of the default target; run `snakemake fulldata`.
    """
    input:
        shards=owned(SHARD_DIR),
    output:
        posterior=FULLDATA_POSTERIOR,
        diagnostics=FULLDATA_DIAGNOSTICS,
        summary=FULLDATA_SUMMARY,
    params:
        model=model_params,
        columns=columns_param,
        featurize=setting_param("featurize"),
        sample=nuts_param,
        # rigid models: the draws are aligned into one frame, as the align stage does a shard's
        align=setting_param("align"),
        checkpoints=checkpoints_param,
        chains=config["jax"]["devices"],
        jax=jax_param(config["jax"]["devices"], "fulldata"),
    log:
        f"{LOGS}/sample_fulldata.log",
    benchmark:
        f"{BENCHMARKS}/sample_fulldata.tsv"
    threads: job_threads("fulldata")
    resources:
        gpu=job_gpus("fulldata"),
        mem_mb=fulldata_mem,
        runtime=runtime_minutes(600),
    conda:
        jax_env("fulldata", "jax-devices")
    script:
        "../../scripts/sample_fulldata.py"
