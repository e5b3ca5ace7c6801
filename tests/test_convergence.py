"""cmcflow.convergence against ArviZ, whose estimators it writes again without importing
ArviZ (a sample job's import time): the same figures to 1e-8 on draws that stress each part
of the estimators (autocorrelated chains, a chain stuck apart, ties, an odd draw count)."""

from __future__ import annotations

import subprocess
import sys

import arviz as az
import numpy as np
import pytest
from conftest import REPO

from cmcflow import convergence


def ar1(chains: int, draws: int, phi: float, seed: int) -> np.ndarray:
    """``(chains, draws)`` of a stationary AR(1) process with autocorrelation ``phi``."""
    rng = np.random.default_rng(seed)
    x = np.empty((chains, draws))
    x[:, 0] = rng.normal(size=chains) / np.sqrt(1 - phi**2)
    for t in range(1, draws):
        x[:, t] = phi * x[:, t - 1] + rng.normal(size=chains)
    return x


CASES = {
    "independent": ar1(4, 500, 0.0, 0),
    "autocorrelated": ar1(4, 500, 0.9, 1),
    "anticorrelated": ar1(4, 500, -0.5, 2),
    "odd draw count": ar1(3, 201, 0.6, 3),
    "one chain apart": ar1(4, 300, 0.3, 4) + np.array([[0.0], [0.0], [0.0], [3.0]]),
    "ties": np.round(ar1(4, 400, 0.5, 5), 1),
    "one chain": ar1(1, 400, 0.5, 6),
}


@pytest.mark.parametrize("name", CASES)
def test_each_estimator_gives_arviz_figure(name):
    x = CASES[name]
    ours = convergence.element_diagnostics(x)
    expected = {
        "mcse_mean": az.mcse(x, method="mean"),
        "ess_bulk": az.ess(x, method="bulk"),
        "ess_tail": az.ess(x, method="tail"),
        "r_hat": az.rhat(x, method="rank"),
    }
    for key, value in expected.items():
        np.testing.assert_allclose(ours[key], float(value), rtol=1e-8, equal_nan=True, err_msg=key)


def test_bfmi_and_constant_draws_as_arviz():
    energy = ar1(4, 500, 0.7, 7)
    np.testing.assert_allclose(convergence.bfmi(energy), az.bfmi(energy), rtol=1e-12)
    constant = np.ones((4, 100))
    assert convergence.ess_bulk(constant) == pytest.approx(float(az.ess(constant, method="bulk")))
    assert np.isnan(convergence.rank_rhat(ar1(4, 3, 0.0, 8)))  # too few draws


def test_a_sample_job_imports_no_arviz():
    """What scripts/sample.py imports leaves ArviZ out (the reason for this module), and
    xarray and pandas (a run is held and written as numpy: ``cmcflow.runs.Group``)."""
    code = (
        "from cmcflow.jaxenv import configure_jax; configure_jax(4, 'mixed', None); "
        "import sys, cmcflow.script, cmcflow.featurize, cmcflow.fused, cmcflow.models, cmcflow.sample, "
        "cmcflow.shard; cmcflow.models.get_model('logistic'); "
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'arviz', 'matplotlib', 'xarray', 'pandas'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "workflow")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
