rule combine:
    """Screen the shards, then consensus Monte Carlo over the kept ones, in the unconstrained space, all sites jointly."""
    input:
        # each shard's run and its diagnostics (on aligned draws for rigid models, for screening)
        runs=run_targets,
        # any shard's features: combine traces the model to learn its support transforms (and the
        # prior at the proposal's draws)
        features=first_shard_features(feature_target),
        # a rigid model's observed point pairs, every shard's
        pair_features=every_shard_features(feature_target, rigid_only=True),
    output:
        posterior=COMBINED_POSTERIOR,
        summary=COMBINED_SUMMARY,
        shards=COMBINED_SHARDS,
        moments=COMBINED_MOMENTS,
        gaussian=COMBINED_GAUSSIAN,
    params:
        model=model_params,
        features=first_shard_features(feature_file),
        pair_features=every_shard_features(feature_file, rigid_only=True),
        combine=setting_param("combine"),
        # where the importance correction runs, combine draws its proposal (else None)
        correct=correct_param,
        posteriors=run_files("posterior"),
        diagnostics=run_files("diagnostics"),
        # named in the message that stops the run on failed shards (to sample them again)
        sample_paths=sample_rerun_targets,
        jax=jax_param(1),
    log:
        f"{LOGS}/combine.log",
    benchmark:
        f"{BENCHMARKS}/combine.tsv"
    threads: 1
    # its errors are the input's or the shards' (validation, screening): a retry cannot help
    retries: 0
    resources:
        mem_mb=draws_mem,
        runtime=runtime_minutes(60),
    conda:
        "../../envs/jax-single.yaml"
    script:
        "../../scripts/combine.py"
