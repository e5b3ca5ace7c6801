rule shard:
    """Validate the input table against the model's columns; split it into K shards."""
    input:
        table=table_input,
    output:
        shards=directory(SHARD_DIR),
    params:
        model=model_name_param,
        columns=columns_param,
        num_shards=num_shards_param,
        seed=setting_param("shard", "seed"),
        strata=strata_param,
    log:
        f"{LOGS}/shard.log",
    benchmark:
        f"{BENCHMARKS}/shard.tsv"
    threads: 1
    # its errors are the input's or the shards' (validation, screening): a retry cannot help
    retries: 0
    resources:
        mem_mb=light_mem,
        runtime=runtime_minutes(30),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/shard.py"
