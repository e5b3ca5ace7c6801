"""Shard screening (one policy, reasons recorded) and the streaming combination path."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from cmcflow.combine import CombineSettings, combine_draws, stream_combine
from cmcflow.consensus import block_consensus, plan_consensus
from cmcflow.errors import InputError
from cmcflow.screening import DISAGREEMENT_P_VALUE, ShardSummary, require_enough, screen, summarise

THRESHOLDS = {"max_divergence_rate": 0.05, "max_r_hat": 1.1, "min_ess": 40, "max_outlier_z": 5.0}
HEALTHY = {"max_r_hat": 1.01, "min_ess_bulk": 800.0, "divergence_rate": 0.0}


def exchangeable_shards(rng, shards=8, draws=2000, dimension=6, shard_sd=1.0):
    """Subposteriors as CMC sees them: shard s ~ N(μ_s, shard_sd²) with μ_s ~ N(0, shard_sd²)."""
    return [
        rng.normal(scale=shard_sd, size=dimension) + rng.normal(scale=shard_sd, size=(draws, dimension))
        for _ in range(shards)
    ]


def test_an_injected_outlier_shard_is_excluded_with_its_reason():
    rng = np.random.default_rng(0)
    shards = exchangeable_shards(rng)
    shards[3] = shards[3] + np.array([0, 0, 8.0, 0, 0, 0])  # one parameter 8 sd away
    summaries = [summarise(index, draws, HEALTHY) for index, draws in enumerate(shards)]
    kept, excluded = screen(summaries, THRESHOLDS)
    assert kept == [0, 1, 2, 4, 5, 6, 7]
    assert len(excluded) == 1 and excluded[0]["shard"] == 3
    assert excluded[0]["reason"].startswith("outlier: max |z|")


def test_exchangeable_shards_are_all_kept():
    for seed in range(20):
        summaries = [summarise(i, d, HEALTHY) for i, d in enumerate(exchangeable_shards(np.random.default_rng(seed)))]
        assert screen(summaries, THRESHOLDS) == (list(range(8)), []), seed


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"max_r_hat": 1.3}, "r_hat: max 1.300 > 1.1"),
        ({"max_r_hat": float("nan")}, "r_hat: max nan > 1.1"),
        ({"min_ess_bulk": 12.0}, "ess: min bulk ESS 12 < 40"),
        ({"divergence_rate": 0.2}, "divergences: rate 0.2 > 0.05"),
    ],
)
def test_diagnostic_failures_are_excluded_with_their_reason(change, reason):
    shards = exchangeable_shards(np.random.default_rng(1), shards=4)
    summaries = [summarise(i, d, HEALTHY | (change if i == 2 else {})) for i, d in enumerate(shards)]
    assert screen(summaries, THRESHOLDS) == ([0, 1, 3], [{"shard": 2, "reason": reason}])


def test_non_finite_draws_are_excluded():
    shards = exchangeable_shards(np.random.default_rng(2), shards=4)
    shards[1][5, 2] = np.nan
    summary = summarise(1, shards[1], HEALTHY)
    assert isinstance(summary, ShardSummary) and not summary.finite
    kept, excluded = screen([summarise(i, d, HEALTHY) for i, d in enumerate(shards)], THRESHOLDS)
    assert kept == [0, 2, 3] and excluded[0]["reason"].startswith("non-finite")


def test_too_few_usable_shards_fail_naming_every_excluded_shard():
    excluded = [{"shard": 1, "reason": "r_hat: max 1.300 > 1.1"}, {"shard": 4, "reason": "outlier: max |z| 9.0 > 5.0"}]
    require_enough([0, 2, 3], excluded, num_shards=5, min_fraction=0.5)
    with pytest.raises(InputError, match=r"only 3 of 5 shards are usable .* shard 1: r_hat: .*; shard 4: outlier"):
        require_enough([0, 2, 3], excluded, num_shards=5, min_fraction=0.8)


@pytest.mark.parametrize("method", ["consensus", "consensus_diag"])
def test_streaming_matches_in_memory_on_600_shards(method):
    rng = np.random.default_rng(3)
    subposteriors = []
    for _ in range(600):
        factor = np.eye(4) + 0.3 * rng.normal(size=(4, 4))
        draws = rng.normal(size=4) + rng.normal(size=(300, 4)) @ factor
        subposteriors.append({"beta": draws[:, :3], "log_sigma": draws[:, 3]})
    in_memory = combine_draws(subposteriors, method, jax.random.PRNGKey(0))
    plan = plan_consensus(method, 0.0, point_site=None)
    streamed, _ = stream_combine(iter(subposteriors), subposteriors[0], plan, jax.random.PRNGKey(0))
    for site in ("beta", "log_sigma"):
        np.testing.assert_allclose(streamed[site], in_memory[site], rtol=1e-6, atol=1e-9)


def test_streaming_parametric_has_the_gaussian_product_moments():
    rng = np.random.default_rng(4)
    subposteriors = [{"x": rng.normal(size=2) + rng.normal(size=(4000, 2)) * [1.0, 2.0]} for _ in range(600)]
    plan = plan_consensus("parametric", 0.0, point_site=None)
    streamed = stream_combine(iter(subposteriors), subposteriors[0], plan, jax.random.PRNGKey(1))[0]["x"]
    precision = sum(np.linalg.inv(np.cov(s["x"].T)) for s in subposteriors)
    covariance = np.linalg.inv(precision)
    mean = covariance @ sum(np.linalg.inv(np.cov(s["x"].T)) @ s["x"].mean(0) for s in subposteriors)
    sd = np.sqrt(np.diag(covariance))
    # 4000 draws: the sample mean is within 4 standard errors, the sd within 5%
    np.testing.assert_array_less(np.abs(streamed.mean(0) - mean), 4 * sd / np.sqrt(4000))
    np.testing.assert_allclose(streamed.std(0), sd, rtol=0.05)


@pytest.mark.parametrize("method", ["consensus", "consensus_diag"])
def test_disagreement_is_the_spread_of_the_shard_means_in_their_own_precisions(method):
    """Q = Σ_s (m_s − m̄)ᵀ W_s (m_s − m̄), m̄ the product's mean, summed over the weight
    blocks; streamed about the first shard's mean, so means far from 0 lose no digits."""
    rng = np.random.default_rng(12)
    shards = [1e6 + rng.normal(size=3) + rng.normal(size=(500, 3)) @ rng.normal(size=(3, 3)) for _ in range(5)]
    _, accumulator = stream_combine(
        ({"x": draws} for draws in shards), {"x": shards[0]}, plan_consensus(method, 0.0, None), jax.random.PRNGKey(0)
    )
    statistic, degrees_of_freedom = accumulator.disagreement()
    covariances = [np.cov(draws.T) for draws in shards]
    if method == "consensus_diag":
        covariances = [np.diag(np.diag(covariance)) for covariance in covariances]
    weights = [np.linalg.inv(covariance) for covariance in covariances]
    means = [draws.mean(axis=0) for draws in shards]
    mean = np.linalg.solve(sum(weights), sum(weight @ m for weight, m in zip(weights, means)))
    expected = sum((m - mean) @ weight @ (m - mean) for weight, m in zip(weights, means))
    assert degrees_of_freedom == 4 * 3
    np.testing.assert_allclose(statistic, expected, rtol=1e-6)


def test_disagreement_is_chi_squared_where_shards_agree_and_flags_overdispersed_shards():
    """Exchangeable shards (each mean scattered about the truth by its own posterior sd: one
    model describes every shard) give Q ~ χ² with (K − 1)·D = 42 degrees of freedom, for full
    and diagonal weights; shards whose means scatter twice as far (a model that does not
    describe every shard's rows alike) are flagged. 200 repeats: the mean of Q is within 4
    standard errors (√(2·42/200) = 0.65) of 42."""
    from scipy import stats

    from cmcflow.screening import disagreement_test

    def disagreement(shards, method):
        plan = plan_consensus(method, 0.0, None)
        _, accumulator = stream_combine(
            ({"x": draws} for draws in shards), {"x": shards[0]}, plan, jax.random.PRNGKey(0)
        )
        return disagreement_test(*accumulator.disagreement())

    for method in ("consensus", "consensus_diag"):
        records = [disagreement(exchangeable_shards(np.random.default_rng(seed)), method) for seed in range(200)]
        statistics = [record["statistic"] for record in records]
        assert {record["degrees_of_freedom"] for record in records} == {42}
        assert abs(np.mean(statistics) - 42) < 4 * 0.65, (method, np.mean(statistics))
        assert stats.kstest(statistics, stats.chi2(42).cdf).pvalue > 0.01
    for seed in range(20):
        rng = np.random.default_rng(seed)
        spread = [2.0 * rng.normal(size=6) + rng.normal(size=(2000, 6)) for _ in range(8)]
        assert disagreement(spread, "consensus")["p_value"] < DISAGREEMENT_P_VALUE, seed


def correlated_shards(rng, shards=8, draws=1000, rho=0.8):
    """Exchangeable shards of 6 parameters correlated by ``rho`` (scales 0.5 to 2): each
    shard's mean scatters about 0 with its posterior covariance C, its draws about its mean."""
    scales = np.linspace(0.5, 2.0, 6)
    covariance = (rho * np.ones((6, 6)) + (1 - rho) * np.eye(6)) * np.outer(scales, scales)
    root = np.linalg.cholesky(covariance)
    return [rng.normal(size=6) @ root.T + rng.normal(size=(draws, 6)) @ root.T for _ in range(shards)]


def test_the_disagreement_variance_is_that_of_the_quadratic_form():
    """Block-diagonal (here diagonal) weights: Var Q = 2 tr((A C)²) for Q = xᵀ A x over the
    stacked shard means, C the shards' covariances (their draws'), A = W − W 1 P⁻¹ 1ᵀ W;
    computed densely here over all K·D coordinates, streamed by the accumulator."""
    shards = correlated_shards(np.random.default_rng(5), shards=4, draws=500)
    _, accumulator = stream_combine(
        ({"x": draws} for draws in shards),
        {"x": shards[0]},
        plan_consensus("consensus_diag", 0.0, None),
        jax.random.PRNGKey(0),
    )
    covariances = [np.cov(draws, rowvar=False) for draws in shards]
    weights = [np.diag(1 / np.diag(covariance)) for covariance in covariances]
    stacked_weights = np.zeros((24, 24))
    stacked_covariance = np.zeros((24, 24))
    for s, (weight, covariance) in enumerate(zip(weights, covariances)):
        stacked_weights[6 * s : 6 * s + 6, 6 * s : 6 * s + 6] = weight
        stacked_covariance[6 * s : 6 * s + 6, 6 * s : 6 * s + 6] = covariance
    to_pooled = np.vstack(weights)  # (K D, D): W 1
    form = stacked_weights - to_pooled @ np.linalg.inv(sum(weights)) @ to_pooled.T
    product = form @ stacked_covariance
    np.testing.assert_allclose(accumulator.disagreement_variance(), 2 * np.trace(product @ product), rtol=1e-9)
    # one full block: W_s = C_s⁻¹ and Q ~ χ², with nothing to correct
    _, full = stream_combine(
        ({"x": draws} for draws in shards),
        {"x": shards[0]},
        plan_consensus("consensus", 0.0, None),
        jax.random.PRNGKey(0),
    )
    assert full.disagreement_variance() is None


def test_block_diagonal_weights_take_the_disagreements_spread_into_its_p_value():
    """Correlated parameters weighed by diagonal weights: Q keeps χ²'s mean (K − 1)·D but
    spreads about 4x as wide, so χ²'s p-values of exchangeable shards (one model describes
    them all) are far from uniform and raise false alarms; Satterthwaite's c χ²_ν with Q's own
    variance gives p-values that are uniform (200 repeats; Kolmogorov–Smirnov at 1%) and
    false alarms at the rate asked for."""
    from scipy import stats

    from cmcflow.report import disagreement_sentence
    from cmcflow.screening import disagreement_test

    plain, corrected = [], []
    for seed in range(200):
        shards = correlated_shards(np.random.default_rng(seed))
        _, accumulator = stream_combine(
            ({"x": draws} for draws in shards),
            {"x": shards[0]},
            plan_consensus("consensus_diag", 0.0, None),
            jax.random.PRNGKey(0),
        )
        statistic, degrees_of_freedom = accumulator.disagreement()
        plain.append(disagreement_test(statistic, degrees_of_freedom)["p_value"])
        corrected.append(disagreement_test(statistic, degrees_of_freedom, accumulator.disagreement_variance()))
    assert stats.kstest(plain, "uniform").pvalue < 1e-6
    assert stats.kstest([record["p_value"] for record in corrected], "uniform").pvalue > 0.01
    assert np.mean([record["p_value"] < 0.01 for record in corrected]) <= 0.03
    assert all(record["effective_degrees_of_freedom"] < 0.5 * 42 for record in corrected)
    sentence = disagreement_sentence({"disagreement": corrected[0]})
    assert f"on {corrected[0]['effective_degrees_of_freedom']:.1f} effective degrees of freedom" in sentence


def beta_model():
    """A model of one site ``beta (6,)``, as the runs of :func:`beta_run` draw it."""
    import numpyro
    import numpyro.distributions as dist

    numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([6]))


def beta_run(draws):
    """A shard run of ``draws (400, 6)`` of :func:`beta_model`'s ``beta``, as 4 chains of 100 (unconstrained
    and constrained alike)."""
    import arviz as az

    layout = {"beta": draws.reshape(4, 100, 6)}
    run = az.from_dict(posterior=layout)
    run.add_groups(unconstrained_posterior=layout)
    return run


def test_combine_shards_streams_the_same_shrunk_consensus_without_the_screened_out_shard(monkeypatch):
    """The pooled shape for covariance shrinkage is summed while the shards are first read;
    a shard that screening excludes is taken back out of it. Streaming (two reads) and the
    in-memory path must then agree, and the record gives λ for the kept shards only."""
    from cmcflow import combine

    shards = exchangeable_shards(np.random.default_rng(8), shards=10, draws=400)
    shards[4] = shards[4] + np.array([0, 9.0, 0, 0, 0, 0])
    runs = [beta_run(draws) for draws in shards]

    def combined(streaming_above):
        monkeypatch.setattr(combine, "STREAMING_ABOVE", streaming_above)
        settings = CombineSettings(
            "consensus",
            0,
            "auto",
            THRESHOLDS,
            min_shards_fraction=0.5,
            on_failed_shard="fail",
            weights="draws",
            second_order=False,
        )
        return combine.combine_shards(
            runs.__getitem__, len(runs), beta_model, {}, settings, diagnostics=[HEALTHY] * len(runs)
        )

    (in_memory, record, *_), (streamed, streamed_record, *_) = combined(500), combined(5)
    assert record["excluded"][0]["shard"] == 4 and streamed_record["streaming"] and not record["streaming"]
    assert sorted(record["shrinkage_intensity"]) == sorted(str(shard) for shard in record["used"])
    assert record["shrinkage_intensity"] == pytest.approx(streamed_record["shrinkage_intensity"], rel=1e-9)
    np.testing.assert_allclose(
        streamed.posterior["beta"].values, in_memory.posterior["beta"].values, rtol=1e-9, atol=1e-12
    )
    # the shapes were pooled over the kept shards only: the same as combining just those
    kept = block_consensus([shards[shard] for shard in record["used"]], [np.arange(6)], shrinkage="auto", chains=4)
    np.testing.assert_allclose(in_memory.posterior["beta"].values.reshape(400, 6), kept.draws(), rtol=1e-9, atol=1e-12)


def test_the_every_shard_product_adds_the_screened_out_shard_back():
    """Where the screen leaves a shard out, the combination also carries the Gaussian product
    of every shard, the screened-out one included, weighed as the kept ones (here by the
    inverse of each shard's draw covariance): the importance correction's target holds that
    shard's rows. With nothing screened out there is none."""
    from cmcflow import combine

    shards = exchangeable_shards(np.random.default_rng(9), shards=6, draws=400)
    shards[2] = shards[2] + np.array([0, 0, 0, 9.0, 0, 0])
    runs = [beta_run(draws) for draws in shards]
    settings = CombineSettings(
        "consensus",
        0,
        0.0,
        THRESHOLDS,
        min_shards_fraction=0.5,
        on_failed_shard="fail",
        weights="draws",
        second_order=False,
    )
    combination = combine.combine_shards(
        runs.__getitem__, 6, beta_model, {}, settings, diagnostics=[HEALTHY] * 6, corrected=True
    )
    assert [entry["shard"] for entry in combination.record["excluded"]] == [2]
    precisions = [np.linalg.inv(np.cov(draws.T)) for draws in shards]
    covariance = np.linalg.inv(sum(precisions))
    mean = covariance @ sum(precision @ draws.mean(0) for precision, draws in zip(precisions, shards))
    np.testing.assert_allclose(combination.every_shard["covariance"], covariance, rtol=1e-9)
    np.testing.assert_allclose(combination.every_shard["mean"], mean, rtol=1e-9, atol=1e-12)
    assert combination.every_shard["layout"] == combination.gaussian["layout"]
    assert np.abs(combination.gaussian["mean"][3] - mean[3]) > 0.5  # the kept shards' product misses shard 2
    kept_only = combine.combine_shards(
        lambda shard: runs[[0, 1, 3, 4, 5][shard]],
        5,
        beta_model,
        {},
        settings,
        diagnostics=[HEALTHY] * 5,
        corrected=True,
    )
    assert kept_only.every_shard is None
    # a shard whose chains never moved (R-hat NaN) has no covariance to weigh it by: no product, no failure
    runs[2] = beta_run(np.ones((400, 6)))
    diagnostics = [HEALTHY] * 6
    diagnostics[2] = HEALTHY | {"max_r_hat": float("nan")}
    stuck = combine.combine_shards(
        runs.__getitem__, 6, beta_model, {}, settings, diagnostics=diagnostics, corrected=True
    )
    assert [entry["shard"] for entry in stuck.record["excluded"]] == [2] and stuck.every_shard is None
    # nor a distance from the others (no spread to measure it in): its record stays standard JSON
    assert "2" not in stuck.record["max_abs_z"] and len(stuck.record["max_abs_z"]) == 5
    json.dumps(stuck.record["max_abs_z"], allow_nan=False)


def test_combine_warns_where_the_kept_shards_disagree_and_the_report_says_so(caplog):
    """Shards whose means scatter twice their posterior sd: combine records Q with its
    p-value, warns, and the report explains; exchangeable shards raise neither."""
    import logging

    from cmcflow import combine
    from cmcflow.report import disagreement_sentence

    settings = CombineSettings(
        "consensus", 0, 0.0, None, min_shards_fraction=0.5, on_failed_shard="fail", weights="draws", second_order=False
    )
    rng = np.random.default_rng(21)
    spread = [2.0 * rng.normal(size=6) + rng.normal(size=(400, 6)) for _ in range(8)]
    agreeing = exchangeable_shards(np.random.default_rng(22), draws=400)
    for shards, alarm in ((spread, True), (agreeing, False)):
        runs = [beta_run(draws) for draws in shards]
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cmcflow.combine"):
            record = combine.combine_shards(runs.__getitem__, 8, beta_model, {}, settings).record
        figures = record["disagreement"]
        assert figures["degrees_of_freedom"] == 7 * 6
        assert (figures["p_value"] < DISAGREEMENT_P_VALUE) is alarm, figures
        assert ("disagree more than their posteriors allow" in caplog.text) is alarm
        sentence = disagreement_sentence(record)
        assert sentence.startswith(f"<p>The kept shards' means disagree by Q = {figures['statistic']:.1f}") is not alarm
        assert ("more than their posteriors allow" in sentence) is alarm


def test_combine_records_which_distribution_the_disagreements_p_value_is_from(monkeypatch):
    """Diagonal weights: combine records Q's variance and effective degrees of freedom, and the
    report names the scaled χ²; with more parameters than it keeps (D, D) sums for, the
    record and the report say that χ²'s p-value is approximate. Full weights: plain χ²."""
    from cmcflow import combine, consensus
    from cmcflow.report import disagreement_sentence

    runs = [beta_run(draws) for draws in correlated_shards(np.random.default_rng(3), draws=400)]

    def disagreement(method):
        settings = CombineSettings(
            method, 0, 0.0, None, min_shards_fraction=0.5, on_failed_shard="fail", weights="draws", second_order=False
        )
        record = combine.combine_shards(runs.__getitem__, 8, beta_model, {}, settings).record
        return record["disagreement"], disagreement_sentence(record)

    figures, sentence = disagreement("consensus_diag")
    assert figures["variance"] > 2 * 42 and figures["effective_degrees_of_freedom"] < 42, figures
    assert "χ² scaled to Q's own spread" in sentence and "approximate" not in figures
    figures, sentence = disagreement("consensus")
    assert {"variance", "effective_degrees_of_freedom", "approximate"}.isdisjoint(figures)
    assert "(χ², p = " in sentence
    monkeypatch.setattr(consensus, "SPREAD_MAX_PARAMETERS", 5)
    monkeypatch.setattr(combine, "SPREAD_MAX_PARAMETERS", 5)
    figures, sentence = disagreement("consensus_diag")
    assert "variance" not in figures and figures["approximate"].startswith("block weights over more than 5")
    assert "χ²; approximate: block weights" in sentence
