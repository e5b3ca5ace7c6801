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
