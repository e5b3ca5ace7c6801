rule simulate:
    """Demo data: the model's simulator writes a seeded table and the true parameters."""
    output:
        table=SIMULATED_TABLE,
        truth=SIMULATED_TRUTH,
    params:
        model=model_name_param,
        simulate=setting_param("input", "simulate"),
    log:
        f"{LOGS}/simulate.log",
    benchmark:
        f"{BENCHMARKS}/simulate.tsv"
    threads: 1
    resources:
        mem_mb=light_mem,
        runtime=runtime_minutes(10),
    conda:
        "../../envs/light.yaml"
    script:
        "../../scripts/simulate.py"
