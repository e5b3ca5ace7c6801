"""Calibration of consensus Monte Carlo over 200 seeded repeats, with exact subposteriors.

Conjugate linear-Gaussian model (the built-in ``linear_gaussian``: y = X β + ε, ε ~ N(0, σ²),
β ~ N(0, τ² I)). With its prior tempered to the power 1/K, shard s's subposterior is exactly
Gaussian with precision P_s = X_sᵀ X_s / σ² + I / (K τ²) and mean P_s⁻¹ X_sᵀ y_s / σ²; the
product of the K subposteriors is the full posterior. Each repeat draws β from its prior
and new data, draws S exact samples from every subposterior (no MCMC error), and combines
them with the combine stage's own function. Because β comes from the prior, a calibrated
90% interval covers it with probability exactly 0.9.

Tolerances (issue 5): coverage 0.90 ± 0.03 over 200 repeats × 3 parameters (600 Bernoulli
trials, sd ≈ 0.012, so ± 0.03 is 2.5 sd); the mean |error| of the combined mean, ≤ 0.05
posterior sd (its Monte Carlo error alone is N(0, 1/S) in sd units: E|·| ≈ 0.013 at
S = 4000, and weights estimated from the draws add to it); the mean over repeats of the
largest correlation error, ≤ 0.05 (sampling error of a correlation from 4000 draws ≈ 0.016).
Combined with the workflow's default covariance shrinkage (``auto``). Measured, the same
with and without it here (3 parameters, 4,000 draws: little noise to shrink): coverage
0.903 (equal and unequal shards), mean |error| 0.023–0.032 sd, mean largest correlation
error 0.018.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_statistics import unequal_parts

from cmcflow.combine import combine_draws
from cmcflow.config import schema_default
from cmcflow.models.linear_gaussian import exact_posterior
from cmcflow.models.rows import correlated_features
from cmcflow.shard import split_rows

REPEATS = 200
ROWS, FEATURES, NUM_SHARDS, DRAWS = 400, 3, 8, 4000
PRIOR_SD, NOISE_SD = 1.0, 1.0
SHRINKAGE = schema_default("combine", "covariance_shrinkage")  # what the workflow uses


def exact_subposterior_draws(rng, X, y, num_shards):
    """``(DRAWS, FEATURES)`` exact draws of the tempered subposterior of one shard."""
    precision = X.T @ X / NOISE_SD**2 + np.eye(X.shape[1]) / (num_shards * PRIOR_SD**2)
    covariance = np.linalg.inv(precision)
    mean = covariance @ X.T @ y / NOISE_SD**2
    return mean + rng.normal(size=(DRAWS, X.shape[1])) @ np.linalg.cholesky(covariance).T


def correlation(covariance):
    sd = np.sqrt(np.diag(covariance))
    return covariance / np.outer(sd, sd)


@pytest.mark.parametrize("shard_sizes", ["equal", "unequal"])
def test_consensus_is_calibrated_over_200_repeats(shard_sizes):
    covered, mean_errors, correlation_errors = [], [], []
    for repeat in range(REPEATS):
        rng = np.random.default_rng([7, repeat])
        beta = rng.normal(scale=PRIOR_SD, size=FEATURES)
        X = correlated_features(rng, ROWS, FEATURES)
        y = X @ beta + rng.normal(scale=NOISE_SD, size=ROWS)
        parts = (
            split_rows(ROWS, NUM_SHARDS, seed=repeat)
            if shard_sizes == "equal"
            else unequal_parts(ROWS, NUM_SHARDS, repeat)
        )
        subposteriors = [{"beta": exact_subposterior_draws(rng, X[rows], y[rows], NUM_SHARDS)} for rows in parts]
        draws = combine_draws(subposteriors, "consensus", jax.random.PRNGKey(repeat), shrinkage=SHRINKAGE, chains=4)[
            "beta"
        ]
        mean, covariance = exact_posterior(X, y, PRIOR_SD, NOISE_SD)
        low, high = np.quantile(draws, [0.05, 0.95], axis=0)
        covered.append((low <= beta) & (beta <= high))
        mean_errors.append(np.abs(draws.mean(axis=0) - mean) / np.sqrt(np.diag(covariance)))
        correlation_errors.append(np.max(np.abs(np.corrcoef(draws.T) - correlation(covariance))))
    coverage = float(np.mean(covered))
    assert 0.87 <= coverage <= 0.93, coverage
    assert np.all(np.mean(mean_errors, axis=0) <= 0.05), np.mean(mean_errors, axis=0)
    assert np.mean(correlation_errors) <= 0.05, np.mean(correlation_errors)
