"""Bayesian logistic regression: the canonical consensus Monte Carlo benchmark.

intercept ~ Normal(0, prior_sd),  beta_p ~ Normal(0, prior_sd)   (p = 1..P)
y_n | x_n ~ Bernoulli(sigmoid(intercept + x_n . beta + offset_n)),  each row's log-likelihood
times its weight w_n

``offset`` (default 0) is a known term on the log-odds scale (e.g. the log odds of a
baseline risk); ``weight`` (default 1) counts a row w_n times (frequency weights, e.g. rows
that stand for w_n identical observations).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cmcflow import fused
from cmcflow.models import POSITIVE, ModelSpec, Role
from cmcflow.models.rows import correlated_features, in_data_precision, weighted_regression_features

if TYPE_CHECKING:
    import pandas as pd


def logistic_model(XT, y, offset, mask, prior_sd, weight=None):
    """``XT (P, R)`` (the features transposed: one row per feature), ``y (R,)`` in {0, 1},
    ``offset (R,)``, ``mask (R,)`` bool (False on padding rows), and ``weight (R,)`` >= 0
    where the table has a weight column
    (:func:`~cmcflow.models.rows.weighted_regression_features`). In a job whose likelihood
    the fused kernel computes, ``XT`` comes as the kernel's tiles ``(R_t, P, T)``
    (:func:`cmcflow.fused.device_layout`).

    Without weights each row is a Bernoulli observation. A row of weight w counts as w
    identical rows: w y events in w trials, Binomial(w, sigmoid(η)).log_prob(w y) =
    w (y η − log(1 + e^η)) = w · Bernoulli(sigmoid(η)).log_prob(y) for y in {0, 1} and any
    real w >= 0 (the binomial coefficient is 1). (NumPyro's ``scale`` handler would put the
    weights into the trace's metadata, which ArviZ's ``from_numpyro`` cannot compare from
    one run to the next in one process.) The binomial form costs three log-gamma functions
    per row, in float64 under x64, so the Bernoulli form serves tables without weights.

    In a sample job (``sample.fused_likelihood``) the Bernoulli sum is one factor computed
    by :mod:`cmcflow.fused`, which reads ``XT`` once per gradient where XLA reads it twice;
    the same log density, another rounding. A model of your own leaves this out.
    """
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([fused.feature_count(XT)]).to_event(1))
    if weight is None and fused.applies(XT, y, offset, mask):
        numpyro.factor("y", fused.logistic_log_likelihood(jnp.append(beta, intercept), XT, y, offset, mask))
        return
    if XT.ndim != 2:
        raise ValueError("the features as the fused kernel's tiles, but the kernel does not compute this likelihood")
    intercept, beta = in_data_precision(XT, intercept, beta)
    logits = intercept + beta @ XT + offset
    with numpyro.plate("rows", XT.shape[1]):
        if weight is None:
            numpyro.sample("y", dist.Bernoulli(logits=logits).mask(mask), obs=y)
        else:
            numpyro.sample("y", dist.Binomial(weight, logits=logits).mask(mask), obs=weight * y)


def simulate(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    """Correlated Gaussian features; true coefficients drawn once from Normal(0, 0.5)."""
    import pandas as pd

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
    featurize=weighted_regression_features,
    featurizer_version="4",
    intercept=True,
    device_layout=fused.device_layout,
    roles=(
        Role("features", "real", multiple=True, description="the regression's feature columns"),
        Role("label", "binary", default="y", description="the 0/1 outcome"),
        Role("offset", "real", optional=True, description="a known term on the log-odds scale (none: 0)"),
        Role("weight", "weight", optional=True, description="each row's weight on the log-likelihood (none: 1)"),
    ),
    options={"prior_sd": 2.5},
    option_ranges={"prior_sd": POSITIVE},
    simulate=simulate,
)
