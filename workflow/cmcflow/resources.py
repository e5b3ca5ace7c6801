"""Resource requests of the jobs: memory (``mem_mb``) from the sizes of their inputs, and
wall time (``runtime``); both grow with the retry attempt.

Measured peak RSS (Snakemake ``benchmark:`` files, 2 cores, x64):
- sample, logistic shard of 25,000 x 10 (2.2 MB of features): 892 MB;
  structure shard of 4,250 distances (0.1 MB): 498 MB; tiny logistic shard: ~460 MB.
  A JAX job starts at ~450 MB (Python, JAX, NumPyro, ArviZ, XLA runtime); the rest grows
  with the features (one copy per device, the model traced for ArviZ, batched transforms
  of the draws): ~200 MB per MB of features on the logistic shard.
- combine, 8 logistic shards: 520 MB.
Each estimate covers these with a margin and grows with the retry attempt, so a job
killed for memory is resubmitted with more (``retries`` in the cluster profiles).
tests/test_workflow.py checks every estimate against the peak RSS of real jobs.
"""

from __future__ import annotations

import math

#: Python + JAX + NumPyro + ArviZ + XLA runtime, with a margin over the ~450 MB measured.
JAX_BASE_MB = 1000
#: Python + pandas/pyarrow, with a margin over the ~190 MB measured.
LIGHT_BASE_MB = 500
#: Peak memory per MB of feature arrays in a sample job (~200 measured, margin 1.5x).
SAMPLE_MB_PER_FEATURE_MB = 300
#: Peak memory per MB of input posterior draws in align and combine (all held at once,
#: plus the aligned or combined copy and its NetCDF encoding).
DRAWS_MB_PER_INPUT_MB = 4
#: Peak memory per MB of input table in the light stages (pandas copies while validating).
LIGHT_MB_PER_INPUT_MB = 10


def _scaled(base_mb: float, per_mb: float, input_mb: float, attempt: int) -> int:
    return math.ceil((base_mb + per_mb * input_mb) * attempt)


def sample_mem_mb(features_mb: float, attempt: int = 1) -> int:
    """A sample (or full-data) job over ``features_mb`` MB of feature arrays."""
    return _scaled(JAX_BASE_MB, SAMPLE_MB_PER_FEATURE_MB, features_mb, attempt)


def draws_mem_mb(draws_mb: float, attempt: int = 1) -> int:
    """An align or combine job reading ``draws_mb`` MB of posterior NetCDF files."""
    return _scaled(JAX_BASE_MB, DRAWS_MB_PER_INPUT_MB, draws_mb, attempt)


def light_mem_mb(input_mb: float, attempt: int = 1) -> int:
    """simulate, shard, featurize, report over ``input_mb`` MB of input."""
    return _scaled(LIGHT_BASE_MB, LIGHT_MB_PER_INPUT_MB, input_mb, attempt)


def runtime_minutes(minutes: int):
    """A ``runtime`` resource of ``minutes`` × the retry attempt: a job killed at its time
    limit is resubmitted with more time, as a job killed for memory gets more memory."""

    def runtime(wildcards, attempt):
        return minutes * attempt

    return runtime
