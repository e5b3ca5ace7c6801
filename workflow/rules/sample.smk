rule sample:
    """NUTS on one shard: one chain per virtual JAX device, priors tempered to the power 1/K."""
    input:
        features=FEATURES,
    output:
        posterior=SHARD_POSTERIOR,
        diagnostics=SHARD_DIAGNOSTICS,
    params:
        model=model_params,
        num_shards=num_shards_param,
        sample=setting_param("sample"),
        jax=jax_param(config["jax"]["devices"]),
    log:
        f"{LOGS}/sample/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/sample/shard-{{shard}}.tsv"
    threads: config["jax"]["devices"]
    resources:
        mem_mb=sample_mem,
        runtime=runtime_minutes(120),
    conda:
        "../../envs/jax-devices.yaml"
    script:
        "../../scripts/sample.py"
