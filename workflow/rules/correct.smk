# Importance correction of the combination (not for rigid models; see Analysis.corrected):
# a proposal from the kept shards' Gaussian product, every shard's log-likelihood at its
# draws, and Pareto-smoothed importance weights that measure and remove CMC's error.


rule propose:
    """Draws from the Gaussian product of the kept shards (or a Student-t of its location and scale)."""
    input:
        gaussian=owned(COMBINED_GAUSSIAN),
    output:
        proposal=PROPOSAL,
    params:
        correct=setting_param("correct"),
    log:
        f"{LOGS}/propose.log",
    benchmark:
        f"{BENCHMARKS}/propose.tsv"
    threads: 1
    resources:
        mem_mb=light_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/jax-single.yaml"
    script:
        "../../scripts/propose.py"


rule reweight:
    """One shard's own, untempered log-likelihood at every proposal draw."""
    input:
        proposal=PROPOSAL,
        features=shard_features(feature_target),
    output:
        log_likelihood=SHARD_LOG_LIKELIHOOD,
    params:
        model=model_params,
        features=shard_features(feature_file),
        jax=jax_param(1),
    log:
        f"{LOGS}/reweight/shard-{{shard}}.log",
    benchmark:
        f"{BENCHMARKS}/reweight/shard-{{shard}}.tsv"
    threads: 1
    resources:
        mem_mb=sample_mem,
        runtime=runtime_minutes(60),
    conda:
        "../../envs/jax-single.yaml"
    script:
        "../../scripts/reweight.py"


rule correct:
    """PSIS weights of the proposal against the exact posterior of the kept shards: k-hat, ESS, corrected draws."""
    input:
        proposal=PROPOSAL,
        log_likelihoods=per_shard(SHARD_LOG_LIKELIHOOD),
        shards=owned(COMBINED_SHARDS),
        combined=owned(COMBINED_POSTERIOR),
        combined_summary=owned(COMBINED_SUMMARY),
        features=first_shard_features(feature_target),
    output:
        posterior=CORRECTED_POSTERIOR,
        summary=CORRECTED_SUMMARY,
        importance=IMPORTANCE,
    params:
        model=model_params,
        features=first_shard_features(feature_file),
        correct=setting_param("correct"),
        jax=jax_param(1),
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
