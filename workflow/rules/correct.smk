# Importance correction of the combination (not for rigid models; see Analysis.corrected):
# combine draws a proposal from the kept shards' Gaussian product (half from every shard's,
# the screened-out ones too, where screening left shards out); every shard's
# log-likelihood at its draws, and Pareto-smoothed importance weights that measure and
# remove CMC's error.


rule reweight:
    """One shard's own, untempered log-likelihood at every proposal draw (combine drew them)."""
    input:
        proposal=owned(COMBINED_GAUSSIAN),
        features=shard_features(feature_target),
    output:
        log_likelihood=SHARD_LOG_LIKELIHOOD,
    params:
        model=model_params,
        features=shard_features(feature_file),
        # the sample jobs' one-pass kernel, here at batches of draws (cmcflow.fused)
        fused_likelihood=setting_param("sample", "fused_likelihood"),
        jax=jax_param(1),
    log:
        f"{LOGS}/reweight/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/reweight/shard-{{shard}}.tsv"
    # a CPU job with a CPU sample job's cores: the same rows, the same kind of work (the model
    # at many draws), which XLA spreads over the cores it is given
    threads: config["jax"]["devices"]
    resources:
        mem_mb=sample_mem,
        runtime=runtime_minutes(60),
    conda:
        "../../envs/jax-single.yaml"
    script:
        "../../scripts/reweight.py"


rule correct:
    """PSIS weights of the proposal against the exact posterior of all unfailed shards: k-hat, ESS, corrected draws."""
    input:
        proposal=owned(COMBINED_GAUSSIAN),
        log_likelihoods=per_shard(SHARD_LOG_LIKELIHOOD),
        shards=owned(COMBINED_SHARDS),
        combined=owned(COMBINED_POSTERIOR),
        combined_summary=owned(COMBINED_SUMMARY),
    output:
        posterior=CORRECTED_POSTERIOR,
        summary=CORRECTED_SUMMARY,
        importance=IMPORTANCE,
    params:
        correct=setting_param("correct"),
    log:
        f"{LOGS}/correct.log",
    benchmark:
        f"{BENCHMARKS}/correct.tsv"
    threads: 1
    resources:
        mem_mb=draws_mem,
        runtime=runtime_minutes(30),
    conda:
        "../../envs/jax-single.yaml"
    script:
        "../../scripts/correct.py"
