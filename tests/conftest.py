"""Test session set-up.

JAX is configured here, before any test module imports it: 4 virtual CPU devices (one
NUTS chain each, as in a sample job), the config's default ``jax.precision`` (or
``$CMCFLOW_TEST_PRECISION``: ``bench/precision.py`` runs the statistical tests in each
precision), and a persistent compilation cache in a
temporary directory (removed when the session ends) so that programs of one shape compile
once per session. After each
test module every compiled program is released (:func:`release_compiled_programs`).
"""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from cmcflow.config import schema
from cmcflow.dryrun import job_counts
from cmcflow.jaxenv import configure_jax

REPO = Path(__file__).resolve().parents[1]

TIMEOUT = shutil.which("timeout")  # coreutils; absolute, so that a test may replace PATH
DEVICES = 4

JAX_DEFAULTS = schema()["properties"]["jax"]["properties"]
PRECISION = os.environ.get("CMCFLOW_TEST_PRECISION") or JAX_DEFAULTS["precision"]["default"]
COMPILATION_CACHE = tempfile.mkdtemp(prefix="cmcflow-test-jax-cache-")
atexit.register(shutil.rmtree, COMPILATION_CACHE, ignore_errors=True)  # ~50 MB a session
configure_jax(devices=DEVICES, precision=PRECISION, compilation_cache_dir=COMPILATION_CACHE)

import jax  # noqa: E402  (after configure_jax: the XLA flags must come first)
import numpy as np  # noqa: E402

from cmcflow.jaxenv import PRECISION as PROCESS_PRECISION  # noqa: E402

#: Relative rounding of sums over float32 data: float32's machine epsilon (1.2e-7) times
#: sqrt(rows) for the few thousand rows of a test shard, with room.
FLOAT32_DATA_RTOL = 1e-5


def data_rtol(rtol: float) -> float:
    """``rtol`` of a check of exact arithmetic on model data, widened to float32 rounding
    where the suite runs with float32 data (``jax.precision`` float32 or mixed)."""
    return rtol if PROCESS_PRECISION.data_dtype == "float64" else max(rtol, FLOAT32_DATA_RTOL)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Free every compiled XLA program after each test module. Each CPU executable holds
    memory mappings of its own (measured: test_align alone leaves the process 9,085
    mappings, 695 after this; test_models 12,530), and the whole suite in one process
    reached the kernel's limit of 65,530 per process (vm.max_map_count): XLA died with a
    segmentation fault, while compiling or serialising, always at the same late test.
    Programs compiled again come from the persistent cache; the samplers of one-program runs
    (:data:`~cmcflow.sample.job_sampler`) hold theirs, and go too."""
    from cmcflow.sample import job_sampler

    yield
    job_sampler.cache_clear()
    jax.clear_caches()
    gc.collect()


def shard_log_likelihood(model, kwargs, draws, rows: int) -> np.ndarray:
    """A shard's log-likelihood ``(M,)`` at unconstrained draws ``{site: (M, …)}``: the
    reweight job's :func:`cmcflow.likelihood.log_likelihood_at` of the draws constrained (in
    the workflow, combine constrained them)."""
    from cmcflow.likelihood import log_likelihood_at
    from cmcflow.transforms import constrain_draws

    constrained = constrain_draws(model, kwargs, draws, batch_ndims=1)
    return log_likelihood_at(model, kwargs, {name: constrained[name] for name in draws}, rows)


def correction_jobs(num_shards: int) -> dict[str, int]:
    """The importance correction's jobs for an analysis of ``num_shards`` shards (combine draws its
    proposal)."""
    return {"reweight": num_shards, "correct": 1}


def tiny_config(**analysis_overrides) -> dict:
    """A logistic analysis small enough to run end to end in well under a minute."""
    analysis = {
        "model": "logistic",
        "input": {"simulate": {"rows": 3000, "features": 3, "seed": 3}},
        "shard": {"num_shards": 2, "seed": 0},
        "featurize": {"pad_multiple": 64},
        "sample": {"num_warmup": 150, "num_samples": 150},
    }
    analysis.update(analysis_overrides)
    return {
        "results_dir": "results",
        "feature_cache_dir": "cache/features",
        "jax": {"compilation_cache_dir": "cache/jax", "precision": PRECISION},
        "analyses": {"tiny": analysis},
    }


class Workflow:
    """Snakemake run on the project's Snakefile in a working directory of its own."""

    def __init__(self, workdir: Path, config: dict, env: dict[str, str] | None = None):
        self.workdir = workdir
        self.config = config
        self.env = env or {}

    def command(
        self, *args: str, config: dict | None = None, timeout: float = 600, path: str | None = None
    ) -> tuple[list[str], dict[str, str]]:
        """The snakemake command line and environment of :meth:`run` (which see)."""
        config_path = self.workdir / ("config.yaml" if config is None else "config-edited.yaml")
        config_path.write_text(yaml.safe_dump(self.config if config is None else config, sort_keys=False))
        command = [
            TIMEOUT,
            "-s",
            "INT",
            "-k",
            "30",
            str(int(timeout)),
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(REPO / "Snakefile"),
            "--directory",
            str(self.workdir),
            "--configfile",
            str(config_path),
            "--cores",
            "2",
            *args,
        ]
        # jobs must set up JAX themselves: nothing of this test process' JAX set-up leaks in
        env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(self.env)
        if path is not None:
            env["PATH"] = path
        return command, env

    def run(
        self, *args: str, config: dict | None = None, timeout: float = 600, check: bool = True, path: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run snakemake with ``config`` (default: this workflow's) as its config file.

        Past ``timeout`` seconds snakemake gets SIGINT (a hanging snakemake has been seen to
        ignore SIGTERM), then SIGKILL 30 s later. ``path`` replaces PATH.
        """
        command, env = self.command(*args, config=config, timeout=timeout, path=path)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout + 60, env=env)
        if check and result.returncode != 0:
            raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def planned_jobs(self, *targets: str, config: dict | None = None) -> dict[str, int]:
        """Rule -> job count of a dry run (empty when there is nothing to do)."""
        return job_counts(self.run("--dry-run", "--quiet", "rules", *targets, config=config).stdout)
