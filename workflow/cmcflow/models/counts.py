"""Regression of counts, with an optional offset (the log of each row's exposure):

    intercept ~ Normal(0, prior_sd),  beta_p ~ Normal(0, prior_sd)   (p = 1..P),
    log μ_n = intercept + x_n . beta + offset_n,

``poisson``:            y_n ~ Poisson(μ_n);
``negative_binomial``:  y_n ~ NegativeBinomial(mean μ_n, concentration φ),
                        φ ~ HalfNormal(concentration_scale)  (Var y_n = μ_n + μ_n² / φ).

Features of order one suit the default ``prior_sd`` (a factor of e^2.5 ≈ 12 per unit).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cmcflow.models import POSITIVE, ModelSpec, Role
from cmcflow.models.rows import correlated_features, in_data_precision, offset_regression_features

if TYPE_CHECKING:
    import pandas as pd

#: Intercept, and the negative binomial's concentration, of simulated data.
SIMULATED_INTERCEPT = 1.0
SIMULATED_CONCENTRATION = 5.0

ROLES = (
    Role("features", "real", multiple=True, description="the regression's feature columns"),
    Role("label", "count", default="y", description="the count outcome"),
    Role("offset", "real", optional=True, description="log exposure of each row (none: 0)"),
)


def poisson_model(XT, y, offset, mask, prior_sd):
    """``XT (P, R)`` (the features transposed: one row per feature), ``y (R,)`` counts,
    ``offset (R,)``, ``mask (R,)`` bool (False on padding rows)."""
    import numpyro
    import numpyro.distributions as dist

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([XT.shape[0]]).to_event(1))
    with numpyro.plate("rows", XT.shape[1]):
        numpyro.sample("y", dist.Poisson(rate=_mean(intercept, XT, beta, offset)).mask(mask), obs=y)


def negative_binomial_model(XT, y, offset, mask, prior_sd, concentration_scale):
    """As :func:`poisson_model`, with the overdispersion of a negative binomial."""
    import numpyro
    import numpyro.distributions as dist

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([XT.shape[0]]).to_event(1))
    concentration = numpyro.sample("concentration", dist.HalfNormal(concentration_scale))
    mean = _mean(intercept, XT, beta, offset)
    concentration = in_data_precision(XT, concentration)
    with numpyro.plate("rows", XT.shape[1]):
        numpyro.sample("y", dist.NegativeBinomial2(mean, concentration).mask(mask), obs=y)


def _mean(intercept, XT, beta, offset):
    """exp(intercept + x_n . beta + offset_n) ``(R,)`` from ``XT (P, R)``, in the data's precision."""
    import jax.numpy as jnp

    intercept, beta = in_data_precision(XT, intercept, beta)
    return jnp.exp(intercept + beta @ XT + offset)


def simulated_table(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Correlated features of sd 0.5, coefficients from Normal(0, 0.5), and each row's mean."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 0.5, size=features)
    X = 0.5 * correlated_features(rng, rows, features)
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    return table, beta, np.exp(SIMULATED_INTERCEPT + X @ beta)


def simulate_poisson(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    table, beta, mean = simulated_table(rows, seed, features)
    table["y"] = np.random.default_rng([seed, 1]).poisson(mean)
    return table, {"intercept": SIMULATED_INTERCEPT, "beta": beta.tolist()}


def simulate_negative_binomial(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    table, beta, mean = simulated_table(rows, seed, features)
    rng = np.random.default_rng([seed, 1])
    table["y"] = rng.poisson(rng.gamma(SIMULATED_CONCENTRATION, mean / SIMULATED_CONCENTRATION))
    truth = {"intercept": SIMULATED_INTERCEPT, "beta": beta.tolist(), "concentration": SIMULATED_CONCENTRATION}
    return table, truth


POISSON = ModelSpec(
    name="poisson",
    numpyro_model=poisson_model,
    featurize=offset_regression_features,
    featurizer_version="2",
    intercept=True,
    roles=ROLES,
    options={"prior_sd": 2.5},
    option_ranges={"prior_sd": POSITIVE},
    simulate=simulate_poisson,
)

NEGATIVE_BINOMIAL = ModelSpec(
    name="negative_binomial",
    numpyro_model=negative_binomial_model,
    featurize=offset_regression_features,
    featurizer_version="2",
    intercept=True,
    roles=ROLES,
    options={"prior_sd": 2.5, "concentration_scale": 10.0},
    option_ranges={"prior_sd": POSITIVE, "concentration_scale": POSITIVE},
    simulate=simulate_negative_binomial,
)
