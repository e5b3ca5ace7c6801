"""Bayesian logistic regression: the canonical consensus Monte Carlo benchmark.

intercept ~ Normal(0, prior_sd),  beta_p ~ Normal(0, prior_sd)   (p = 1..P)
y_n | x_n ~ Bernoulli(sigmoid(intercept + x_n . beta))
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cmcflow.models import ModelSpec, Role
from cmcflow.models.rows import correlated_features, regression_features


def logistic_model(X, y, mask, prior_sd):
    """``X (R, P)``, ``y (R,)`` in {0, 1}, ``mask (R,)`` bool (False on padding rows)."""
    import numpyro
    import numpyro.distributions as dist

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("rows", X.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=intercept + X @ beta).mask(mask), obs=y)


def simulate(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    """Correlated Gaussian features; true coefficients drawn once from Normal(0, 0.5)."""
    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 0.5, size=features)
    intercept = -0.5
    X = correlated_features(rng, rows, features)
    y = rng.random(rows) < 1.0 / (1.0 + np.exp(-(intercept + X @ beta)))
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    table["y"] = y.astype(np.int64)
    return table, {"intercept": intercept, "beta": beta.tolist()}


SPEC = ModelSpec(
    name="logistic",
    numpyro_model=logistic_model,
    featurize=regression_features,
    featurizer_version="1",
    roles=(
        Role("features", "real", multiple=True, description="the regression's feature columns"),
        Role("label", "binary", default="y", description="the 0/1 outcome"),
    ),
    options={"prior_sd": 2.5},
    simulate=simulate,
)
