"""The second-order term of consensus (cmcflow.second_order) against exact answers: the term
against the exact mean of skewed posteriors (log-Gamma shards; a linear regression with
unknown noise), and the potential's third derivatives against differences of its Hessian."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
from conftest import data_rtol
from scipy.special import digamma, polygamma
from test_statistics import REPEAT_SETTINGS, shard_runs, simulated

from cmcflow.combine import CombineSettings, combine_shards
from cmcflow.consensus import unflatten_draws
from cmcflow.models import get_model, resolve_options
from cmcflow.second_order import MAX_EXPANSION_RATIO, second_order_shift
from cmcflow.shard import split_rows
from cmcflow.transforms import model_kwargs, potential_derivatives


@pytest.mark.parametrize("scale", [1, 4])
def test_the_term_recovers_the_exact_mean_of_shards_that_disagree(scale):
    """Shard s's posterior of θ = log λ is exactly log-Gamma: U_s(θ) = −a_s θ + b_s e^θ, mean
    ψ(a_s) − log b_s, and U_s'' = U_s''' = b_s e^θ; the full posterior (Σ_s U_s) is log-Gamma
    (Σ a_s, Σ b_s), its mean and sd known. The shards' rates a_s / b_s differ (a misfit, as
    between real data's shards), so the Gaussian product of their means is off by 0.43 sd
    (scale 1) and 1.04 sd (4 times the rows); moved by δ it is within 0.015 and 0.027 sd."""
    a, b = np.array([20.0, 35, 50, 28]) * scale, np.array([1.0, 2, 1.5, 0.8]) * scale
    means = digamma(a) - np.log(b)
    hessians = b * np.exp(means)
    product = np.sum(hessians * means) / np.sum(hessians)
    shards = [
        (np.array([at]), np.array([[1 / hessian]]), np.array([[[hessian]]])) for at, hessian in zip(means, hessians)
    ]
    shift, ratios = second_order_shift(np.array([product]), np.array([[1 / np.sum(hessians)]]), iter(shards))
    exact, sd = digamma(a.sum()) - np.log(b.sum()), np.sqrt(polygamma(1, a.sum()))
    plain, moved = abs(product - exact) / sd, abs(product - shift[0] - exact) / sd
    print(f"scale {scale}: plain {plain:.3f} sd, second order {moved:.3f} sd, ρ {np.round(ratios, 3)}")
    assert plain > 0.4 and moved <= 0.03, (plain, moved)
    # ρ_s = |½ T_s d_s²| / |H_s d_s| = |d_s| / 2 where T_s = H_s
    np.testing.assert_allclose(ratios, np.abs(product - means) / 2, rtol=1e-12)
    assert ratios.max() <= MAX_EXPANSION_RATIO


def linear_shard(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear regression y = X β + ε, ε ~ N(0, e^{2z}), flat priors on β and z: the posterior
    mean of (β, z) (β̂; z's marginal is log-Gamma, E z = ½ log(RSS / 2) − ½ ψ((n − p) / 2)), and
    the potential U = n z + ½ (RSS + (β − β̂)ᵀ A (β − β̂)) e^{−2z}'s Hessian and third
    derivatives there (A = XᵀX; ∂³U/∂z∂β∂β = −2 A e^{−2z}, ∂³U/∂z³ = −4 RSS e^{−2z}, at β̂)."""
    n, p = X.shape
    A = X.T @ X
    beta = np.linalg.solve(A, X.T @ y)
    rss = float(np.sum((y - X @ beta) ** 2))
    z = 0.5 * np.log(rss / 2) - 0.5 * digamma((n - p) / 2)
    scale = np.exp(-2 * z)
    hessian = np.zeros((p + 1, p + 1))
    hessian[:p, :p], hessian[p, p] = A * scale, 2 * rss * scale
    third = np.zeros((p + 1, p + 1, p + 1))
    third[:p, :p, p] = third[:p, p, :p] = third[p, :p, :p] = -2 * A * scale
    third[p, p, p] = -4 * rss * scale
    return np.append(beta, z), hessian, third


def test_the_term_recovers_the_exact_mean_of_a_linear_regression_with_unknown_noise():
    """Linear regression with unknown noise scale (flat priors): every shard's posterior mean,
    and the full posterior's, are known in closed form (:func:`linear_shard`), and the
    coefficients' disagreement is information about log σ through ∂³U/∂z∂β∂β. Over 100 data
    sets (800 rows, 4 coefficients, K = 8: 100 rows per shard), the Gaussian product of the
    exact shard means is off by 0.21 sd RMS on log σ and 0.11–0.13 on the coefficients (its
    noise-free error: no sampling here); moved by δ, by 0.033 and 0.012–0.013."""
    rng = np.random.default_rng(5)
    plain, moved = [], []
    for _ in range(100):
        X = np.column_stack([np.ones(800), rng.normal(size=(800, 3))])
        y = X @ rng.normal(size=4) + 1.5 * rng.normal(size=800)
        shards = [linear_shard(X[part], y[part]) for part in np.array_split(rng.permutation(800), 8)]
        precision = sum(hessian for _, hessian, _ in shards)
        covariance = np.linalg.inv(precision)
        product = covariance @ sum(hessian @ mean for mean, hessian, _ in shards)
        shift, _ = second_order_shift(
            product, covariance, ((mean, np.linalg.inv(hessian), third) for mean, hessian, third in shards)
        )
        exact, _, _ = linear_shard(X, y)
        beta_sd = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * np.sum((y - X @ exact[:4]) ** 2) / (800 - 4 - 2))
        sd = np.append(beta_sd, 0.5 * np.sqrt(polygamma(1, (800 - 4) / 2)))
        plain.append((product - exact) / sd)
        moved.append((product - shift - exact) / sd)
    rms = {name: np.sqrt(np.mean(np.square(errors), axis=0)) for name, errors in (("plain", plain), ("moved", moved))}
    print({name: np.round(value, 3) for name, value in rms.items()})
    assert rms["plain"][-1] > 0.15 and rms["moved"][-1] < 0.05
    assert rms["plain"][:-1].max() > 0.1 and rms["moved"][:-1].max() < 0.025


def test_third_derivatives_are_the_hessians_derivatives():
    """T_ijk = ∂_k H_ij of the logistic model's potential, against central differences of
    the Hessian (error O(h²), and float32 data's rounding over h), and symmetric in its three
    indices."""
    spec = get_model("logistic")
    table, _ = spec.simulate(500, 1, features=3)
    features = spec.featurize(
        {"features": table[["x0", "x1", "x2"]].to_numpy(), "label": table["y"].to_numpy()}, 512, {}
    )
    kwargs = model_kwargs(features, resolve_options(spec, {}))
    position = {"intercept": np.asarray(0.2), "beta": np.asarray([0.5, -0.3, 0.1])}
    hessian, third = potential_derivatives(spec.numpyro_model, kwargs, position, third=True)
    assert third.shape == (4, 4, 4)
    np.testing.assert_array_equal(hessian, potential_derivatives(spec.numpyro_model, kwargs, position)[0])
    for order in [(1, 0, 2), (2, 1, 0), (0, 2, 1)]:
        np.testing.assert_allclose(third.transpose(order), third, rtol=data_rtol(1e-10))
    step = 1e-2
    for index, (site, element) in enumerate([("intercept", ()), ("beta", (0,)), ("beta", (1,)), ("beta", (2,))]):

        def moved(by):
            values = {name: np.array(value, dtype=float) for name, value in position.items()}
            values[site][element] += by
            return potential_derivatives(spec.numpyro_model, kwargs, values)[0]

        difference = (moved(step) - moved(-step)) / (2 * step)
        np.testing.assert_allclose(difference, third[:, :, index], rtol=1e-3, atol=1e-3 * np.abs(third).max())


def test_combine_applies_the_term_only_where_it_holds(caplog):
    """Through combine: the combination and its Gaussian product move by δ together, recorded
    per parameter; a kept shard without third derivatives, or one whose expansion ratio is
    past MAX_EXPANSION_RATIO (its T scaled up here), leaves the plain product, with the
    reason and a warning; settings it does not apply to (draw weights, diagonal consensus)
    leave it too, with the reason and no warning (the term is on by default); a shard the
    screen leaves out is out of δ, and the product of every shard that the correction
    proposes from is moved by its own."""
    spec, options, X, y = simulated("logistic", rows=1600, features=3, seed=6)
    runs, kwargs = shard_runs(
        spec, options, X, y, split_rows(len(y), 4, seed=0), REPEAT_SETTINGS, third_derivatives=True
    )
    plain = CombineSettings("consensus", 0, 0.0, None, 1.0, "fail", "hessian", False)

    def combine(settings, shards=runs, **options):
        return combine_shards(shards.__getitem__, len(shards), spec.numpyro_model, kwargs[0], settings, **options)

    before, after = combine(plain), combine(replace(plain, second_order=True))
    term = after.record["second_order"]
    assert term["applied"] and set(term["expansion_ratio"]) == {"0", "1", "2", "3"}
    shift = before.gaussian["mean"] - after.gaussian["mean"]
    sd = np.sqrt(np.diag(before.gaussian["covariance"]))
    np.testing.assert_allclose(shift / sd, list(term["shift_sd"].values()), rtol=1e-9)
    assert (
        term["max_abs_shift_sd"] == pytest.approx(np.abs(shift / sd).max(), rel=1e-9) and term["max_abs_shift_sd"] > 0
    )
    for site, site_shift in unflatten_draws(shift[None, :], before.gaussian["layout"]).items():
        moved = before.idata.unconstrained_posterior[site] - after.idata.unconstrained_posterior[site]
        np.testing.assert_allclose(moved.values, np.broadcast_to(site_shift[0], moved.shape), rtol=1e-6, atol=1e-12)

    for method, weights in [("consensus", "draws"), ("consensus_diag", "hessian")]:
        caplog.clear()
        settings = replace(plain, method=method, weights=weights)
        term = combine(replace(settings, second_order=True)).record["second_order"]
        assert not term["applied"] and f"not weights: {weights} with method: {method}" in term["reason"]
        assert term["cause"] == "settings"
        assert not [record for record in caplog.records if record.levelname == "WARNING"]

    without = [copy.deepcopy(run) for run in runs]
    without[2].curvature = without[2].curvature.drop_vars("third_derivatives")
    term = combine(replace(plain, second_order=True), without).record["second_order"]
    assert not term["applied"] and "shards [2] have no third derivatives" in term["reason"]
    assert term["cause"] == "shards"

    steep = [copy.deepcopy(run) for run in runs]
    steep[1].curvature["third_derivatives"] = steep[1].curvature["third_derivatives"] * 1000
    refused = combine(replace(plain, second_order=True), steep)
    term = refused.record["second_order"]
    assert not term["applied"] and term["expansion_ratio"]["1"] > MAX_EXPANSION_RATIO
    assert "shard 1's expansion ratio" in term["reason"] and term["cause"] == "shards"
    np.testing.assert_array_equal(refused.gaussian["mean"], before.gaussian["mean"])

    # shard 3 screened out (its R-hat): out of δ, and in the every-shard product's own
    diagnostics = [{"max_r_hat": 1.0, "min_ess_bulk": 1000.0, "divergence_rate": 0.0}] * 3
    diagnostics.append({"max_r_hat": 2.0, "min_ess_bulk": 1000.0, "divergence_rate": 0.0})
    screen = {"max_divergence_rate": 0.05, "max_r_hat": 1.1, "min_ess": 40.0, "max_outlier_z": 1000.0}
    screened = replace(plain, screen=screen, min_shards_fraction=0.5)
    plain_screened = combine(screened, diagnostics=diagnostics, corrected=True)
    moved_screened = combine(replace(screened, second_order=True), diagnostics=diagnostics, corrected=True)
    assert moved_screened.record["used"] == [0, 1, 2]
    np.testing.assert_allclose(
        moved_screened.gaussian["mean"], combine(replace(plain, second_order=True), runs[:3]).gaussian["mean"]
    )
    every = moved_screened.record["second_order"]["every_shard_product"]
    assert every["applied"] and set(every["expansion_ratio"]) == {"0", "1", "2", "3"}
    every_sd = np.sqrt(np.diag(plain_screened.every_shard["covariance"]))
    np.testing.assert_allclose(
        (plain_screened.every_shard["mean"] - moved_screened.every_shard["mean"]) / every_sd,
        list(every["shift_sd"].values()),
        rtol=1e-9,
    )
