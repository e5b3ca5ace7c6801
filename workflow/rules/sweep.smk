# A swept analysis (cmcflow.sweep): its grid points are analyses of their own, each with its
# report; this page puts them side by side, with the K-stability check where K is swept.


rule sweep_report:
    """The grid points side by side: combined means and intervals, distances in posterior sd, K-stability."""
    input:
        summaries=sweep_inputs("summary"),
        shards=sweep_inputs("shards"),
        fulldata=sweep_inputs("fulldata"),
    output:
        report=SWEEP_REPORT,
        summary=SWEEP_SUMMARY,
        comparison=SWEEP_COMPARISON,
        figure=report(SWEEP_FIGURE, caption="../report/sweep.rst", category="{sweep}"),
    params:
        model=lambda wildcards: sweep_setting(wildcards, "model"),
        swept_keys=lambda wildcards: list(SWEEPS[wildcards.sweep].keys),
        points=sweep_points,
        stability=lambda wildcards: SWEEPS[wildcards.sweep].options["stability"],
        allow_reflection=lambda wildcards: sweep_setting(wildcards, "align", "allow_reflection"),
    log:
        f"{RESULTS}/{{sweep}}/sweep/sweep_report.log",
    benchmark:
        f"{RESULTS}/{{sweep}}/sweep/sweep_report.tsv"
    threads: 1
    resources:
        mem_mb=light_base_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/sweep_report.py"
