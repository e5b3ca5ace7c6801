rule report:
    """What the scientist reads: combined summary, per-shard diagnostics, time per stage."""
    input:
        summary=COMBINED_SUMMARY,
        shards=COMBINED_SHARDS,
        diagnostics=shard_diagnostics_inputs,
        features_info=per_shard(FEATURES_INFO),
        benchmarks=stage_benchmarks,
    output:
        report=REPORT,
    params:
        model=model_name_param,
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCHMARKS}/report.tsv"
    threads: 1
    resources:
        mem_mb=light_base_mem,
        runtime=10,
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/report.py"
