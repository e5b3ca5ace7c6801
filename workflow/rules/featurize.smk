rule featurize:
    """One shard -> the model's padded arrays, through the content-addressed feature cache."""
    input:
        shards=owned(SHARD_DIR),
    output:
        features=FEATURES,
        info=FEATURES_INFO,
    params:
        model=model_name_param,
        featurizer=featurizer_param,
        columns=columns_param,
        featurize=setting_param("featurize"),
        cache_dir=config["feature_cache_dir"],
    log:
        f"{LOGS}/featurize/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/featurize/shard-{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=light_base_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/featurize.py"


rule featurize_batch:
    """sample.shards_per_job > 1: the shards of one sample batch featurized in one job (the
    same arrays as one job per shard), their files in the batch's directory."""
    input:
        shards=owned(SHARD_DIR),
    output:
        batch=directory(FEATURE_BATCH),
    params:
        shards=batch_shards,
        files=batch_feature_files,
        model=model_name_param,
        featurizer=featurizer_param,
        columns=columns_param,
        featurize=setting_param("featurize"),
        cache_dir=config["feature_cache_dir"],
    log:
        f"{LOGS}/featurize/batch-{{batch}}.log",
    benchmark:
        f"{BENCHMARKS}/featurize/batch-{{batch}}.tsv"
    threads: 1
    resources:
        mem_mb=light_base_mem,
        runtime=runtime_minutes(30),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/featurize.py"
