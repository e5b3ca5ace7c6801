"""Linear regression with known noise and a Normal prior: its posterior is exact and
Gaussian, so it is the correctness oracle for the whole pipeline.

    beta_p ~ Normal(0, prior_sd)   (p = 1..P),      y_n | x_n ~ Normal(x_n . beta, noise_sd)

Exact posterior: precision  Λ = XᵀX / noise_sd² + I / prior_sd²,
                 mean       μ = Λ⁻¹ Xᵀy / noise_sd².
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cmcflow.models import POSITIVE, ModelSpec, Role
from cmcflow.models.rows import correlated_features, in_data_precision, regression_features

if TYPE_CHECKING:
    import pandas as pd


def linear_gaussian_model(XT, y, mask, prior_sd, noise_sd):
    """``XT (P, R)`` (the features transposed: one row per feature), ``y (R,)``,
    ``mask (R,)`` bool (False on padding rows)."""
    import numpyro
    import numpyro.distributions as dist

    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([XT.shape[0]]).to_event(1))
    with numpyro.plate("rows", XT.shape[1]):
        numpyro.sample("y", dist.Normal(in_data_precision(XT, beta) @ XT, noise_sd).mask(mask), obs=y)


def exact_posterior(X: np.ndarray, y: np.ndarray, prior_sd: float, noise_sd: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior ``(mean (P,), covariance (P, P))`` given all rows ``X (N, P)``, ``y (N,)``."""
    precision = X.T @ X / noise_sd**2 + np.eye(X.shape[1]) / prior_sd**2
    covariance = np.linalg.inv(precision)
    return covariance @ (X.T @ y) / noise_sd**2, covariance


#: Noise sd of simulated data (the model's default ``noise_sd``). Demo data do not depend
#: on the model's options, so editing ``model_options`` reruns sampling, not the data.
SIMULATED_NOISE_SD = 1.0


def simulate(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    """Correlated Gaussian features; true coefficients drawn once from Normal(0, 0.5);
    Gaussian noise of sd ``SIMULATED_NOISE_SD``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 0.5, size=features)
    X = correlated_features(rng, rows, features)
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    table["y"] = X @ beta + rng.normal(0.0, SIMULATED_NOISE_SD, size=rows)
    return table, {"beta": beta.tolist()}


SPEC = ModelSpec(
    name="linear_gaussian",
    numpyro_model=linear_gaussian_model,
    featurize=regression_features,
    featurizer_version="2",
    roles=(
        Role("features", "real", multiple=True, description="the regression's feature columns"),
        Role("label", "real", default="y", description="the real-valued outcome"),
    ),
    options={"prior_sd": 1.0, "noise_sd": SIMULATED_NOISE_SD},
    option_ranges={"prior_sd": POSITIVE, "noise_sd": POSITIVE},
    simulate=simulate,
)
