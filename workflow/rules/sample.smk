rule preflight:
    """The model on the first shard's features, once, before any sample job: its initial
    point, and the log density and gradient there. A model that raises or is not finite
    there stops the run with one line naming the site."""
    input:
        features=first_shard_features(feature_target),
    output:
        PREFLIGHT,
    params:
        model=model_params,
        features=first_shard_features(feature_file),
        num_shards=num_shards_param,
        seed=setting_param("sample", "seed"),
        jax=jax_param(1),
    log:
        f"{LOGS}/preflight.log",
    benchmark:
        f"{BENCHMARKS}/preflight.tsv"
    threads: 1
    resources:
        mem_mb=sample_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/jax-devices.yaml"
    script:
        "../../scripts/preflight.py"


rule sample:
    """NUTS on one shard: one chain per virtual JAX device, priors tempered to the power 1/K."""
    input:
        features=owned(FEATURES),
        preflight=PREFLIGHT,
    output:
        posterior=SHARD_POSTERIOR,
        diagnostics=SHARD_DIAGNOSTICS,
    params:
        model=model_params,
        num_shards=num_shards_param,
        sample=nuts_param,
        second_order=setting_param("combine", "second_order"),
        checkpoints=checkpoints_param,
        chains=config["jax"]["devices"],
        jax=jax_param(config["jax"]["devices"], "sample"),
    log:
        f"{LOGS}/sample/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/sample/shard-{{shard}}.tsv"
    threads: job_threads("sample")
    resources:
        gpu=job_gpus("sample"),
        mem_mb=sample_mem,
        runtime=runtime_minutes(120),
    conda:
        jax_env("sample", "jax-devices")
    script:
        "../../scripts/sample.py"


rule sample_batch:
    """sample.shards_per_job > 1: NUTS on consecutive shards one after another in one process
    (JAX imported once, each program compiled once), each shard's files in the batch's
    directory, the same draws as one job per shard."""
    input:
        features=owned(FEATURE_BATCH),
        preflight=PREFLIGHT,
    output:
        batch=directory(SAMPLE_BATCH),
    params:
        shards=batch_shards,
        features=batch_feature_files,
        model=model_params,
        num_shards=num_shards_param,
        sample=nuts_param,
        second_order=setting_param("combine", "second_order"),
        checkpoints=checkpoints_param,
        chains=config["jax"]["devices"],
        jax=jax_param(config["jax"]["devices"], "sample"),
    log:
        f"{LOGS}/sample/batch-{{batch}}.log",
    benchmark:
        f"{BENCHMARKS}/sample/batch-{{batch}}.tsv"
    threads: job_threads("sample")
    resources:
        gpu=job_gpus("sample"),
        mem_mb=batch_mem,
        runtime=runtime_minutes(120),
    conda:
        jax_env("sample", "jax-devices")
    script:
        "../../scripts/sample.py"
