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
        checkpoints=checkpoints_param,
        jax=jax_param(config["jax"]["devices"]),
    log:
        f"{LOGS}/sample_fulldata.log",
    benchmark:
        f"{BENCHMARKS}/sample_fulldata.tsv"
    threads: config["jax"]["devices"]
    resources:
        mem_mb=fulldata_mem,
        runtime=runtime_minutes(600),
    conda:
        "../../envs/jax-devices.yaml"
    script:
        "../../scripts/sample_fulldata.py"
