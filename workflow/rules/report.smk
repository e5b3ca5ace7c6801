import time

from snakemake.logging import logger


rule report:
    """What the scientist reads: figures of shards and combination, diagnostics, exclusions, time per stage."""
    input:
        summary=owned(COMBINED_SUMMARY),
        shards=owned(COMBINED_SHARDS),
        moments=owned(COMBINED_MOMENTS),
        runs=run_targets,
        features_info=every_shard_features(feature_target, "info"),
        benchmarks=stage_benchmarks,
        importance=importance_input,
        corrected_summary=corrected_summary_input,
        shard_dir=owned(SHARD_DIR),
    output:
        report=REPORT,
        shards_figure=report(REPORT_SHARDS_FIGURE, caption="../report/shards.rst", category="{analysis}"),
        posterior_figure=report(REPORT_POSTERIOR_FIGURE, caption="../report/posterior.rst", category="{analysis}"),
    params:
        model=model_name_param,
        diagnostics=run_files("diagnostics"),
        features_info=every_shard_features(feature_file, "info"),
    log:
        f"{LOGS}/report.log",
    benchmark:
        f"{BENCHMARKS}/report.tsv"
    threads: 1
    resources:
        mem_mb=light_base_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/report.py"


RUN_STARTED = time.time()


onsuccess:
    # where this run's reports are, and what to read first in each (cmcflow.run_summary)
    from cmcflow.run_summary import run_summary
    from cmcflow.shard import MANIFEST_NAME

    summary = run_summary(
        [
            {
                "report": path_of(REPORT, name),
                "shards": path_of(COMBINED_SHARDS, name),
                "manifest": f"{path_of(SHARD_DIR, name)}/{MANIFEST_NAME}",
                "importance": path_of(IMPORTANCE, name) if analysis.corrected else None,
            }
            for name, analysis in ANALYSES.items()
            if analysis.sweep is None
        ],
        [(SWEEP_REPORT.format(sweep=sweep), SWEEP_COMPARISON.format(sweep=sweep)) for sweep in SWEEPS],
        RUN_STARTED,
    )
    if summary:
        logger.info(summary)
