"""The importance correction: its densities are the model's, PSIS recovers a known target
and flags one it cannot reach, and the corrected posterior is calibrated.

Calibration: the conjugate linear-Gaussian model with exact tempered subposterior draws
(as in test_coverage.py), the workflow's own proposal (the Gaussian product of the shards
with the default covariance shrinkage), log-likelihoods and prior evaluated through the
model, PSIS and resampling. β is drawn from its prior, so a calibrated 90% interval covers
it with probability 0.9: over 200 repeats × 3 parameters (600 trials, sd ≈ 0.012) the
coverage must lie in 0.90 ± 0.03, and within 0.01 of the exact posterior's own 90%
intervals on the same data (these seeds: 0.925 exact; corrected 0.922 with the Gaussian
proposal, 0.923 with the Student-t). Every repeat is an easy case: k̂ < 0.5 (measured: at
most 0.19 Gaussian, −0.23 Student-t).
"""

from __future__ import annotations

import subprocess
import sys

import arviz as az
import numpy as np
import pytest
from conftest import REPO, data_rtol, shard_log_likelihood
from numpyro.infer.util import potential_energy
from scipy import stats
from test_coverage import FEATURES, NOISE_SD, NUM_SHARDS, PRIOR_SD, ROWS, exact_subposterior_draws

from cmcflow import importance
from cmcflow.config import schema_default
from cmcflow.consensus import block_consensus
from cmcflow.correct import correct_draws, weighted_summary
from cmcflow.likelihood import log_prior
from cmcflow.models import get_model
from cmcflow.models.linear_gaussian import exact_posterior
from cmcflow.models.rows import correlated_features
from cmcflow.runs import summary_table
from cmcflow.shard import split_rows
from cmcflow.transforms import model_kwargs

LINEAR = get_model("linear_gaussian")
OPTIONS = {"prior_sd": PRIOR_SD, "noise_sd": NOISE_SD}


def shard_kwargs(X, y, rows, pad_to):
    return model_kwargs(LINEAR.featurize({"features": X[rows], "label": y[rows]}, pad_to, {}), OPTIONS)


def test_prior_and_shard_likelihoods_add_up_to_the_full_log_density():
    """λ = 1: log p(θ) + log|J| + Σ_s ℓ_s(θ) is the negative potential energy NUTS would use
    on all rows, at any θ (here for a model with a constrained site too)."""
    rng = np.random.default_rng(0)
    spec = get_model("structure")
    table, _ = spec.simulate(300, 0, points=6)
    facts = spec.table_facts({name: table[name].to_numpy(float) for name in ("i", "j")})
    columns = {name: table[name].to_numpy(float) for name in ("i", "j", "distance")}
    options = spec.options

    def kwargs(rows, pad_to):
        return model_kwargs(spec.featurize({k: v[rows] for k, v in columns.items()}, pad_to, facts), options)

    parts = split_rows(300, 2, seed=0)
    draws = {"coords": rng.normal(scale=3.0, size=(20, 6, 3)), "sigma": rng.normal(size=20)}  # unconstrained
    total = log_prior(spec.numpyro_model, kwargs(parts[0], 160), draws, power=1.0) + sum(
        shard_log_likelihood(spec.numpyro_model, kwargs(rows, 160), draws, rows=160) for rows in parts
    )
    full = kwargs(np.arange(300), 320)
    expected = [
        -float(potential_energy(spec.numpyro_model, (), full, {name: value[j] for name, value in draws.items()}))
        for j in range(20)
    ]
    np.testing.assert_allclose(total, expected, rtol=data_rtol(1e-10))


def test_psis_recovers_a_known_target_and_flags_one_it_cannot_reach():
    rng = np.random.default_rng(1)
    mean, covariance = np.array([0.0, 1.0]), np.array([[1.0, 0.3], [0.3, 0.5]])
    draws, log_q = importance.proposal_draws(mean, covariance, 8000, "student_t", 5.0, rng)
    target_mean, target_sd = np.array([0.3, 0.8]), np.array([0.8, 0.6])
    log_target = -0.5 * np.sum(((draws - target_mean) / target_sd) ** 2, axis=1)
    log_weights, khat = importance.smoothed_weights(log_target, log_q)
    weighted_mean, weighted_sd = importance.weighted_moments(draws, log_weights)
    assert khat < 0.5
    np.testing.assert_allclose(weighted_mean, target_mean, atol=0.05)
    np.testing.assert_allclose(weighted_sd, target_sd, rtol=0.05)
    assert importance.effective_sample_size(log_weights) > 2000
    # a target three times as wide as the Gaussian proposal: its weights have no finite variance
    gaussian, log_gaussian = importance.proposal_draws(mean, covariance, 8000, "gaussian", 5.0, rng)
    wide = -0.5 * np.sum((gaussian - mean) ** 2 / (9.0 * np.diag(covariance)), axis=1)
    assert importance.smoothed_weights(wide, log_gaussian)[1] >= importance.KHAT_RELIABLE
    assert importance.verdict(0.8, 4000.0).startswith("k̂ = 0.80 ≥ 0.7: the combination is unreliable here")


def test_few_effective_draws_make_the_result_unreliable_even_where_khat_is_small():
    """A target one proposal sd away, 128 draws: k̂ (about 0.3) passes, but the weights are
    worth about 55 draws, a Monte Carlo error of about 0.13 sd: the verdict says so, and the
    same target with 4,096 draws (worth about 1,500) is reliable."""
    mean, covariance = np.zeros(3), np.eye(3)
    target = np.array([1.0, 0.0, 0.0])
    for draws, reliable in ((128, False), (4096, True)):
        points, log_q = importance.proposal_draws(mean, covariance, draws, "gaussian", 5.0, np.random.default_rng(0))
        proposal = {"draws": points, "log_density": log_q}
        log_likelihood = -0.5 * np.sum((points - target) ** 2, axis=1)
        figures = correct_draws(proposal, [log_likelihood], np.zeros(draws), draws, seed=0).figures
        assert figures["khat"] < importance.KHAT_RELIABLE
        assert (figures["effective_sample_size"] >= importance.ESS_RELIABLE) is reliable
        assert figures["reliable"] is reliable
    assert figures["verdict"].endswith("exact up to Monte Carlo error")
    assert importance.verdict(0.31, 55.0) == (
        "k̂ = 0.31 < 0.7, but the weights rest on 55 draws' worth (effective sample size < 100): the corrected "
        "posterior may be off by about 0.1 sd or more; raise correct.draws, or use fewer, larger shards"
    )


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_proposal_draws_are_the_proposal_spread_evenly(kind):
    """Scrambled Sobol' draws: every draw's log density is q's, each margin is q's margin
    (Kolmogorov–Smirnov), and the draws' mean and covariance sit far closer to q's than
    independent draws would (their mean's sd: 1/√M = 0.016 sd; measured here ≤ 0.002);
    a seed repeats them, and an M that is no power of two gets M draws."""
    mean, covariance = np.array([0.0, 1.0, -2.0]), np.array([[1.0, 0.3, 0.0], [0.3, 0.5, 0.1], [0.0, 0.1, 2.0]])
    draws, log_q = importance.proposal_draws(mean, covariance, 4096, kind, 5.0, np.random.default_rng(3))
    q = (
        stats.multivariate_normal(mean, covariance)
        if kind == "gaussian"
        else stats.multivariate_t(mean, covariance, 5.0)
    )
    np.testing.assert_allclose(log_q, q.logpdf(draws), rtol=1e-12)
    scale = np.sqrt(np.diag(covariance))
    for d in range(3):
        margin = stats.norm(mean[d], scale[d]) if kind == "gaussian" else stats.t(5.0, mean[d], scale[d])
        assert stats.kstest(draws[:, d], margin.cdf).pvalue > 0.01
    assert np.all(np.abs(draws.mean(axis=0) - mean) / scale < 0.005)
    spread = covariance if kind == "gaussian" else covariance * 5.0 / 3.0  # a t's covariance: df / (df − 2) Σ
    np.testing.assert_allclose(np.cov(draws.T), spread, atol=0.03 * np.max(np.abs(spread)))
    again, _ = importance.proposal_draws(mean, covariance, 4096, kind, 5.0, np.random.default_rng(3))
    np.testing.assert_array_equal(draws, again)
    assert importance.proposal_draws(mean, covariance, 1000, kind, 5.0, np.random.default_rng(3))[0].shape == (1000, 3)


@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_a_mixture_proposal_draws_half_from_each_component_at_the_mixture_density(kind):
    """Two components: the first half of the draws is the first component's Sobol' net, the
    second half the second's; every draw's log density is the mixture's, log(q₁/2 + q₂/2).
    One component is :func:`importance.proposal_draws` itself, bit for bit."""
    first, second = (np.zeros(2), np.eye(2)), (np.array([6.0, -3.0]), np.array([[2.0, 0.5], [0.5, 1.0]]))
    draws, log_q = importance.mixture_draws([first, second], 4096, kind, 5.0, np.random.default_rng(5))

    def density(mean, covariance):
        return (
            stats.multivariate_normal(mean, covariance)
            if kind == "gaussian"
            else stats.multivariate_t(mean, covariance, 5.0)
        )

    expected = np.logaddexp(density(*first).logpdf(draws), density(*second).logpdf(draws)) - np.log(2)
    np.testing.assert_allclose(log_q, expected, rtol=1e-12)
    for half, (mean, _) in zip((draws[:2048], draws[2048:]), (first, second)):
        np.testing.assert_allclose(half.mean(axis=0), mean, atol=0.01)
    alone = importance.mixture_draws([first], 1000, kind, 5.0, np.random.default_rng(5))
    for mine, plain in zip(alone, importance.proposal_draws(*first, 1000, kind, 5.0, np.random.default_rng(5))):
        np.testing.assert_array_equal(mine, plain)


def test_a_defensive_mixture_reaches_a_target_one_of_its_components_misses():
    """The target is near the second component, 4 sd from the first: the first alone gives
    k̂ >= 0.7; the half-and-half mixture recovers the target's mean and sd with k̂ < 0.5 and
    about half its draws' worth (the half from the far component carries next to no weight)."""
    target_mean, target_sd = np.array([4.0, 0.0]), np.array([1.1, 0.9])
    near, far = (np.array([3.8, 0.1]), np.diag(target_sd**2)), (np.zeros(2), np.eye(2))

    def log_target(draws):
        return -0.5 * np.sum(((draws - target_mean) / target_sd) ** 2, axis=1)

    draws, log_q = importance.proposal_draws(*far, 4096, "gaussian", 5.0, np.random.default_rng(6))
    assert importance.smoothed_weights(log_target(draws), log_q)[1] >= importance.KHAT_RELIABLE
    draws, log_q = importance.mixture_draws([far, near], 4096, "gaussian", 5.0, np.random.default_rng(6))
    log_weights, khat = importance.smoothed_weights(log_target(draws), log_q)
    mean, sd = importance.weighted_moments(draws, log_weights)
    assert khat < 0.5
    np.testing.assert_allclose(mean, target_mean, atol=0.02)
    np.testing.assert_allclose(sd, target_sd, rtol=0.02)
    assert 1500 < importance.effective_sample_size(log_weights) <= 2048


def test_weighted_summary_is_the_summary_of_the_draws_the_weights_count():
    """Integer weights are repeated draws: the weighted summary of draws with weights 1, 2, 3
    is ArviZ's summary of the draws repeated that often (mean and sd exactly, quantiles
    within a draw's spacing), in ArviZ's rows."""
    rng = np.random.default_rng(4)
    sites = {"beta": rng.normal(size=(300, 2)), "sigma": rng.gamma(2.0, size=300)}
    counts = np.resize([1, 2, 3], 300)
    repeated = az.dict_to_dataset({name: np.repeat(value, counts, axis=0)[None] for name, value in sites.items()})
    expected = summary_table(az.InferenceData(posterior=repeated))
    summary = weighted_summary(sites, np.log(counts / counts.sum()), expected)
    assert list(summary.index) == ["beta[0]", "beta[1]", "sigma"]
    np.testing.assert_allclose(summary["mean"], expected["mean"], rtol=1e-12)
    np.testing.assert_allclose(summary["sd"], expected["sd"], rtol=2e-3)  # ArviZ's sd: ddof = 1 of 600
    np.testing.assert_allclose(summary[["5%", "95%"]], expected[["5%", "95%"]], atol=0.05)


@pytest.mark.parametrize("proposal", ["gaussian", "student_t"])
def test_corrected_posterior_is_calibrated_over_200_repeats(proposal):
    repeats, proposal_draws = 200, 2000
    covered, exact_covered, khats = [], [], []
    pad_to = -(-ROWS // NUM_SHARDS // 64) * 64
    for repeat in range(repeats):
        rng = np.random.default_rng([13, repeat])
        beta = rng.normal(scale=PRIOR_SD, size=FEATURES)
        X = correlated_features(rng, ROWS, FEATURES)
        y = X @ beta + rng.normal(scale=NOISE_SD, size=ROWS)
        parts = split_rows(ROWS, NUM_SHARDS, seed=repeat)
        subposteriors = [exact_subposterior_draws(rng, X[rows], y[rows], NUM_SHARDS) for rows in parts]
        accumulator = block_consensus(
            subposteriors, [np.arange(FEATURES)], shrinkage=schema_default("combine", "covariance_shrinkage"), chains=4
        )
        mean, covariance = accumulator.gaussian_product()
        draws, log_q = importance.proposal_draws(mean, covariance, proposal_draws, proposal, 5.0, rng)
        sites = {"beta": draws}
        log_likelihoods = [
            shard_log_likelihood(LINEAR.numpyro_model, shard_kwargs(X, y, rows, pad_to), sites, rows=pad_to)
            for rows in parts
        ]
        priors = log_prior(LINEAR.numpyro_model, shard_kwargs(X, y, parts[0], pad_to), sites, power=1.0)
        _, indices, figures = correct_draws(
            {"draws": draws, "log_density": log_q}, log_likelihoods, priors, 4000, repeat
        )
        low, high = np.quantile(draws[indices], [0.05, 0.95], axis=0)
        covered.append((low <= beta) & (beta <= high))
        khats.append(figures["khat"])
        exact_mean, exact_covariance = exact_posterior(X, y, PRIOR_SD, NOISE_SD)
        exact_sd = np.sqrt(np.diag(exact_covariance))
        exact_covered.append(np.abs(beta - exact_mean) <= stats.norm.ppf(0.95) * exact_sd)
        if repeat == 0:  # the weighted mean is the exact posterior's, within Monte Carlo error
            assert np.all(np.abs((np.array(figures["unconstrained_mean"]) - exact_mean) / exact_sd) < 0.1)
    coverage, exact_coverage = float(np.mean(covered)), float(np.mean(exact_covered))
    print(f"{proposal}: coverage {coverage:.3f} (exact {exact_coverage:.3f}), k-hat max {max(khats):.2f}")
    assert 0.87 <= coverage <= 0.93, coverage
    assert abs(coverage - exact_coverage) <= 0.01, (coverage, exact_coverage)
    assert max(khats) < 0.5, max(khats)


@pytest.mark.parametrize(
    ("job_imports", "left_out"),
    [
        # scripts/correct.py: PSIS and the corrected posterior from what combine and reweight wrote
        ("import cmcflow.script, cmcflow.correct", ("jax", "numpyro")),
        # scripts/reweight.py: the model at the proposal's draws
        (
            "from cmcflow.jaxenv import configure_jax; configure_jax(1, 'mixed', None); "
            "import cmcflow.script, cmcflow.consensus, cmcflow.featurize, cmcflow.fused, cmcflow.io, "
            "cmcflow.likelihood, cmcflow.models, cmcflow.transforms; "
            "cmcflow.models.get_model('logistic'); cmcflow.models.get_model('negative_binomial')",
            ("arviz", "matplotlib", "scipy.stats", "pandas", "pyarrow"),
        ),
    ],
)
def test_each_correction_job_imports_only_what_it_runs(job_imports, left_out):
    """The correct job imports neither JAX nor the model (combine stored what it needs of
    them); a reweight job neither ArviZ, SciPy's statistics nor pandas (it reads features,
    not tables): each module is a job's set-up."""
    code = f"{job_imports}; import sys; print(sorted(name for name in {left_out!r} if name in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "workflow")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_report_says_where_the_proposal_came_from():
    """The report's "How exact is this result?" names the proposal: the kept shards'
    product, or, where the screen left shards out, the mixture with every shard's."""
    from cmcflow.report import exactness_section

    record = {
        "verdict": importance.verdict(0.43, 336.0),
        "reliable": True,
        "combined_shift_sd": {"beta[0]": 0.2, "sigma": -1.3},
        "largest_combined_shift_sd": 1.3,
        "proposal_draws": 4096,
        "proposal": "gaussian",
        "proposal_components": 1,
        "target_shards": [0, 1, 2, 3],
        "effective_sample_size": 336.0,
        "screened_out": [],
    }
    assert "4096 draws from the kept shards' gaussian product, weighted" in exactness_section(record)
    mixed = exactness_section(record | {"proposal_components": 2, "screened_out": [1, 2]})
    assert "half from the kept shards' product and half from every shard's" in mixed
    assert "Shards 1, 2 were screened out of the combination" in mixed
    # without the correction (off, or a rigid model) the section says what measures the error instead
    uncorrected = exactness_section(None)
    assert "Not measured" in uncorrected and "fulldata: true" in uncorrected
