"""What every benchmark shares: the machine's facts, repeated measurements summarised as
median and spread, and results written as JSON plus a markdown table under
``bench/results/``.

A benchmark's JSON holds ``benchmark``, ``machine``, its own measurements, and
``targets``: one entry per issue target it measures (``id``, ``measure``, ``figure``,
``target``, ``met``), which ``bench/run.py`` gathers into ``bench/results/summary.md``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from cmcflow.config import schema_default  # noqa: F401  (the benchmarks' one way to the schema's defaults)
from cmcflow.dryrun import job_counts  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent


def machine() -> dict:
    """Cores, memory (GiB), Python, platform and the JAX/NumPyro versions (read from the
    installed metadata, so JAX is not imported here)."""
    versions = {}
    for package in ("jax", "numpyro", "snakemake"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        **versions,
    }


def spread(values: Sequence[float]) -> dict:
    """``{"runs": values, "median": …, "min": …, "max": …}`` of repeated measurements."""
    values = [float(value) for value in values]
    return {"runs": values, "median": statistics.median(values), "min": min(values), "max": max(values)}


def timed(call: Callable[[], object], repeats: int) -> tuple[list[float], list[float], object]:
    """Wall seconds and CPU seconds (this process, all its threads) of ``repeats`` calls of
    ``call``, and the last call's result."""
    seconds, cpu_seconds, result = [], [], None
    for _ in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        result = call()
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
    return seconds, cpu_seconds, result


def import_seconds(statement: str, repeats: int = 3) -> dict:
    """Wall seconds of ``statement`` in fresh Python processes (interpreter start excluded)."""
    return fresh_process_seconds(
        f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)", repeats
    )


def fresh_process_seconds(code: str, repeats: int = 3) -> dict:
    """The seconds ``code`` prints, run in ``repeats`` fresh Python processes."""
    import subprocess

    runs = [
        float(
            subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO / "workflow"
            ).stdout
        )
        for _ in range(repeats)
    ]
    return spread(runs)


def cell(summary: dict, digits: int = 2) -> str:
    """A markdown cell ``median (min–max)``."""
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}–{summary['max']:.{digits}f})"


def write_results(name: str, record: dict, table: Sequence[str], measured: str | None = None) -> None:
    """``bench/results/<name>.json`` (``record`` plus the machine and when it was measured:
    now, unless ``measured`` says otherwise) and ``<name>.md`` (``table``, a list of markdown
    lines, headed by the machine); prints the table."""
    record = {**record, "machine": machine(), "written": measured or time.strftime("%Y-%m-%d %H:%M:%S")}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    facts = record["machine"]
    header = (
        f"Machine: {facts['cores']} cores, {facts['memory_gib']} GiB, Python {facts['python']}, JAX {facts['jax']}."
    )
    text = "\n".join([table[0], "", header, *table[1:]]) + "\n"
    (RESULTS / f"{name}.md").write_text(text)
    print(text, flush=True)


def target(identifier: str, measure: str, figure: str, goal: str, met: bool, bound: str | None = None) -> dict:
    """One issue target's outcome, for the summary table; ``bound``: for a missed target,
    what bounds the figure, stated from the benchmark's own measurements."""
    outcome = {"id": identifier, "measure": measure, "figure": figure, "target": goal, "met": bool(met)}
    return outcome | ({"bound": bound} if bound and not met else {})


def snakemake(workdir: Path, config: dict, *args: str, timeout: float = 3600) -> tuple[float, str]:
    """Run this checkout's workflow with ``config`` in ``workdir``; wall seconds and stdout.

    The environment is the caller's minus any JAX/XLA settings, as a user's shell would be;
    jobs set up JAX themselves.
    """
    import subprocess

    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config_path),
        *args,
    ]
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return seconds, result.stdout + result.stderr


def logistic_analysis(rows: int, features: int, num_shards: int, num_warmup: int, num_samples: int) -> dict:
    """An analysis of the simulated logistic model: the demo's, at another size."""
    return {
        "model": "logistic",
        "input": {"simulate": {"rows": rows, "features": features, "seed": 1}},
        "shard": {"num_shards": num_shards, "seed": 0},
        "sample": {"num_warmup": num_warmup, "num_samples": num_samples},
    }


def workflow_config(analyses: dict, workdir: Path) -> dict:
    """A config running ``analyses`` with every output and cache inside ``workdir``."""
    return {
        "results_dir": str(workdir / "results"),
        "feature_cache_dir": str(workdir / "cache" / "features"),
        "jax": {"compilation_cache_dir": str(workdir / "cache" / "jax")},
        "analyses": analyses,
    }


def slurm_probe() -> dict:
    """What importing the SLURM executor plugin costs every Snakemake start here: it runs
    ``scontrol show config`` (for MinJobAge), which fails at once where SLURM is not
    installed or not configured, answers at once where a controller runs, and waits ~9 s
    where a slurm.conf names a controller that is down. ``{"scontrol": installed,
    "answers": a controller answered, "seconds": the probe's wall time}``."""
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return {"scontrol": False, "answers": False, "seconds": 0.0}
    started = time.perf_counter()
    try:
        answers = subprocess.run(["scontrol", "show", "config"], capture_output=True, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        answers = False
    return {"scontrol": True, "answers": answers, "seconds": time.perf_counter() - started}
