"""Linear regression with an unknown noise scale: the model users try first.

    intercept ~ Normal(0, prior_sd),  beta_p ~ Normal(0, prior_sd)   (p = 1..P),
    sigma ~ HalfNormal(noise_scale),
    y_n | x_n ~ Normal(intercept + x_n . beta, sigma)

The default scales suit features and outcome of order one; rescale your columns (or set
``model_options``) otherwise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cmcflow.models import POSITIVE, ModelSpec, Role
from cmcflow.models.rows import correlated_features, in_data_precision, regression_features

if TYPE_CHECKING:
    import pandas as pd

#: Noise sd and intercept of simulated data.
SIMULATED_NOISE_SD = 1.5
SIMULATED_INTERCEPT = 1.0


def linear_model(XT, y, mask, prior_sd, noise_scale):
    """``XT (P, R)`` (the features transposed: one row per feature), ``y (R,)``,
    ``mask (R,)`` bool (False on padding rows)."""
    import numpyro
    import numpyro.distributions as dist

    intercept = numpyro.sample("intercept", dist.Normal(0.0, prior_sd))
    beta = numpyro.sample("beta", dist.Normal(0.0, prior_sd).expand([XT.shape[0]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(noise_scale))
    intercept, beta, sigma = in_data_precision(XT, intercept, beta, sigma)
    with numpyro.plate("rows", XT.shape[1]):
        numpyro.sample("y", dist.Normal(intercept + beta @ XT, sigma).mask(mask), obs=y)


def simulate(rows: int, seed: int, features: int) -> tuple[pd.DataFrame, dict]:
    """Correlated Gaussian features; coefficients drawn once from Normal(0, 0.5)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    beta = rng.normal(0.0, 0.5, size=features)
    X = correlated_features(rng, rows, features)
    table = pd.DataFrame(X, columns=[f"x{i}" for i in range(features)])
    table["y"] = SIMULATED_INTERCEPT + X @ beta + rng.normal(0.0, SIMULATED_NOISE_SD, size=rows)
    return table, {"intercept": SIMULATED_INTERCEPT, "beta": beta.tolist(), "sigma": SIMULATED_NOISE_SD}


SPEC = ModelSpec(
    name="linear",
    numpyro_model=linear_model,
    featurize=regression_features,
    featurizer_version="2",
    intercept=True,
    roles=(
        Role("features", "real", multiple=True, description="the regression's feature columns"),
        Role("label", "real", default="y", description="the real-valued outcome"),
    ),
    options={"prior_sd": 10.0, "noise_scale": 10.0},
    option_ranges={"prior_sd": POSITIVE, "noise_scale": POSITIVE},
    simulate=simulate,
)
