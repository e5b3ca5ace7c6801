"""The built-in models users bring (linear with unknown noise, Poisson and negative binomial
counts with an optional offset): consensus Monte Carlo against full-data NUTS on the same
rows, and the offset as an optional column."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import data_rtol, shard_log_likelihood
from numpyro.infer.util import initialize_model, potential_energy
from test_statistics import DEVICES, SETTINGS, flat_draws, shard_runs, simulated

from cmcflow.combine import CombineSettings, combine_shards, draw_proposal
from cmcflow.config import schema_default
from cmcflow.consensus import constrained_sites, layout_sites
from cmcflow.correct import correct_draws, corrected_idata
from cmcflow.featurize import padded_size
from cmcflow.jaxenv import PRECISION
from cmcflow.likelihood import log_likelihood_at
from cmcflow.models import get_model, resolve_columns, resolve_options, role_arrays
from cmcflow.models.rows import offset_regression_features
from cmcflow.sample import sample_features
from cmcflow.shard import split_rows
from cmcflow.transforms import model_kwargs


def full_data_run(spec, options, columns, seed=11):
    features = spec.featurize(columns, padded_size([len(columns["label"])], 64), {})
    return sample_features(
        spec, features, options, num_shards=1, shard=-1, seed=seed, settings=SETTINGS, chains=DEVICES
    )[0]


def against_full_data(full, results, name):
    """For every site of the full-data run and every ``results`` entry (label -> InferenceData):
    (site, label, |mean error| in full-data sd, sd ratio), each array over the site's elements
    (printed, for the record)."""
    for site in full.posterior.data_vars:
        reference = flat_draws(full, site)
        for label, result in results.items():
            draws = flat_draws(result, site)
            error = np.abs(draws.mean(axis=0) - reference.mean(axis=0)) / reference.std(axis=0)
            ratio = draws.std(axis=0) / reference.std(axis=0)
            print(f"{name} {site} {label}: mean error {np.round(error, 3)} sd, sd ratio {np.round(ratio, 3)}")
            yield site, label, error, ratio


def corrected(spec, kwargs, gaussian):
    """The correction stages in memory, as the workflow runs them: combine's proposal (4,000
    Gaussian draws, the prior and the constrained sites at each), every shard's
    log-likelihood at the constrained latent values (reweight), PSIS and resampling
    (correct); the corrected InferenceData and the figures (k-hat …)."""
    settings = {"draws": 4000, "proposal": "gaussian", "df": 5.0, "seed": 0}
    proposal = draw_proposal(spec.numpyro_model, kwargs[0], gaussian, settings)
    constrained = constrained_sites(proposal)
    latent = {name: constrained[name] for name in layout_sites(gaussian["layout"])}
    rows = len(kwargs[0]["mask"])
    log_likelihoods = [log_likelihood_at(spec.numpyro_model, shard, latent, rows=rows) for shard in kwargs]
    _, indices, figures = correct_draws(proposal, log_likelihoods, proposal["log_prior"], 4000, 0)
    return corrected_idata(proposal, indices, {}), figures


@pytest.mark.parametrize("name", ["linear", "poisson", "negative_binomial"])
def test_corrected_cmc_matches_full_data_nuts(name):
    """4 shards of 1,000 rows against full-data NUTS on the same rows, in full-data sd.
    Plain consensus: every mean within 0.2 sd (measured: at most 0.11, the linear model's
    sigma; the negative binomial's concentration 0.07, 0.31 while the shards left its
    Jacobian untempered, :mod:`cmcflow.tempering`). The importance correction (k-hat < 0.7)
    brings every parameter within 0.1 sd and every sd within 10% (measured: at most 0.06 sd;
    concentration 0.005, sigma 0.001)."""
    spec, options, X, y = simulated(name, rows=4000, features=3, seed=2)
    runs, kwargs = shard_runs(spec, options, X, y, split_rows(len(y), 4, seed=0))
    settings = CombineSettings(
        "consensus",
        0,
        schema_default("combine", "covariance_shrinkage"),
        None,
        1.0,
        "fail",
        schema_default("combine", "weights"),
        False,  # first-order consensus: the target holds the Gaussian product alone
    )
    combination = combine_shards(runs.__getitem__, len(runs), spec.numpyro_model, kwargs[0], settings)
    fixed, figures = corrected(spec, kwargs, combination.gaussian)
    assert figures["khat"] < 0.7, figures["khat"]
    full = full_data_run(spec, options, {"features": X, "label": y})
    for site, label, error, ratio in against_full_data(full, {"plain": combination.idata, "corrected": fixed}, name):
        if label == "corrected":
            assert error.max() <= 0.1 and np.all(np.abs(ratio - 1) <= 0.1), (site, error, ratio)
        else:
            assert error.max() <= 0.2, (site, error)


def test_offset_is_an_optional_column_that_enters_the_linear_predictor():
    spec = get_model("poisson")
    assert resolve_columns(spec, {"features": ["a"]})["offset"] == []
    assert resolve_columns(spec, {"features": ["a"], "offset": "log_exposure"})["offset"] == ["log_exposure"]
    no_offset = offset_regression_features({"features": np.ones((3, 1)), "label": np.ones(3)}, 4, {})
    np.testing.assert_array_equal(no_offset["offset"], np.zeros(4))
    # counts over exposures from 0.1 to 10: the offset log(exposure) carries the scale
    rng = np.random.default_rng(8)
    X = rng.normal(0.0, 0.5, size=(2000, 2))
    exposure = np.exp(rng.uniform(np.log(0.1), np.log(10.0), size=2000))
    y = rng.poisson(exposure * np.exp(0.5 + X @ np.array([0.4, -0.3])))
    full = full_data_run(spec, spec.options, {"features": X, "label": y, "offset": np.log(exposure)})
    for site, truth in (("intercept", [0.5]), ("beta", [0.4, -0.3])):
        draws = flat_draws(full, site)
        assert np.all(np.abs(draws.mean(axis=0) - truth) / draws.std(axis=0) < 4), site


def test_logistic_weight_counts_a_row_that_many_times_and_offset_shifts_the_log_odds():
    """A row of weight 2 holds exactly the log-likelihood of the row twice; an offset c on
    every row is an intercept moved by c; weights and offsets are optional columns."""
    spec = get_model("logistic")
    assert resolve_columns(spec, {"features": ["a"]})["weight"] == []
    rng = np.random.default_rng(4)
    X, y = rng.normal(size=(30, 2)), rng.integers(0, 2, size=30).astype(float)
    weight = rng.integers(0, 3, size=30).astype(float)
    repeated = np.repeat(np.arange(30), weight.astype(int))
    weighted = spec.featurize({"features": X, "label": y, "weight": weight}, 32, {})
    plain = spec.featurize({"features": X[repeated], "label": y[repeated]}, 64, {})
    assert "weight" not in plain  # no weight column: every row counts once
    point = {"intercept": np.array([[0.3]]), "beta": np.array([[0.5, -1.2]])}
    log_likelihood = [
        shard_log_likelihood(spec.numpyro_model, model_kwargs(features, spec.options), point, rows=64)
        for features in (weighted, plain)
    ]
    np.testing.assert_allclose(*log_likelihood, rtol=data_rtol(1e-12))
    shifted = spec.featurize({"features": X, "label": y, "offset": np.full(30, 0.7)}, 32, {})
    plain = spec.featurize({"features": X, "label": y}, 32, {})
    moved = {"intercept": np.array([[1.0]]), "beta": point["beta"]}
    np.testing.assert_allclose(
        shard_log_likelihood(spec.numpyro_model, model_kwargs(shifted, spec.options), point, rows=32),
        shard_log_likelihood(spec.numpyro_model, model_kwargs(plain, spec.options), moved, rows=32),
        rtol=data_rtol(1e-12),
    )


@pytest.mark.skipif(not jax.config.jax_enable_x64, reason="mixed precision needs x64 mode")
@pytest.mark.parametrize("name", ["linear", "logistic", "poisson", "negative_binomial", "linear_gaussian", "structure"])
def test_mixed_precision_reads_the_data_in_float32_and_keeps_the_gradient_float64(name, monkeypatch):
    """Under ``jax.precision: mixed`` the data are float32 and every matrix product that reads
    them (forward and in the gradient) runs in float32 (the speed-up: half the bytes), while
    the potential's gradient with respect to the float64 parameters stays float64 and
    agrees with the float64 model's to float32 rounding (relative 1e-4)."""
    spec = get_model(name)
    options = resolve_options(spec, {})
    table, _ = spec.simulate(300, 0, **({"points": 12} if name == "structure" else {"features": 3}))
    arrays = role_arrays(table, resolve_columns(spec, {}, None if name == "structure" else 3), spec)
    features = spec.featurize(arrays, padded_size([len(table)], 64), spec.table_facts(arrays))
    start = initialize_model(jax.random.PRNGKey(0), spec.numpyro_model, model_kwargs=model_kwargs(features, options))
    position = start.param_info.z  # unconstrained, float64
    gradients, product_types = {}, {}
    for precision in ("float64", "mixed"):
        monkeypatch.setattr(PRECISION, "name", precision)
        kwargs = model_kwargs(features, options)
        gradient = jax.grad(lambda p, kwargs=kwargs: potential_energy(spec.numpyro_model, (), kwargs, p))
        gradients[precision] = gradient(position)
        equations = jax.make_jaxpr(gradient)(position).jaxpr.eqns
        product_types[precision] = {
            var.aval.dtype.name for eqn in equations if eqn.primitive.name == "dot_general" for var in eqn.invars
        }
    if name != "structure":  # the structure model gathers points: it has no matrix product
        assert product_types == {"float64": {"float64"}, "mixed": {"float32"}}
    for site, exact in gradients["float64"].items():
        assert gradients["mixed"][site].dtype == np.float64
        np.testing.assert_allclose(gradients["mixed"][site], exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
