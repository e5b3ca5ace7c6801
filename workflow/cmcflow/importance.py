"""Importance correction of a consensus combination against the exact posterior, in NumPy,
SciPy and ArviZ alone.

Consensus Monte Carlo is exact only when every subposterior is Gaussian. Its error can be
measured, and removed, because the full log-likelihood is the sum of the shards' own:
with θ in the unconstrained space, the combination's target is

    log π(θ) = log p(T θ) + log |J_T(θ)| + Σ_s ℓ_s(T θ),

the whole prior and ℓ_s shard s's untempered log-likelihood, summed over every shard whose
sampling did not fail. Draws θ_j from a proposal q close to π (the Gaussian product of the
shards' approximations, or a Student-t of the same location and scale; where screening
left shards out, an equal mixture with the product of every shard) get log weights
log w_j = log π(θ_j) − log q(θ_j). Pareto-smoothed importance sampling (Vehtari et al.
2024; ArviZ's ``psislw``) smooths the largest weights and estimates the Pareto shape k̂ of
their tail: below 0.7 the weighted draws estimate π's expectations with Monte Carlo error
only; at or above it the proposal, and so the combination it came from, is too far from
the posterior for any weighting to repair. The effective sample size 1 / Σ w̃_j² says how
large that Monte Carlo error can be: below :data:`ESS_RELIABLE` the result is not trusted
either.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import arviz as az
import numpy as np
from scipy import special, stats

#: k̂ below this: the corrected posterior is exact up to Monte Carlo error (Vehtari et al.).
KHAT_RELIABLE = 0.7
#: Effective sample size below this: however small k̂, the weighted moments rest on fewer than
#: this many independent draws' worth, so their Monte Carlo error may reach 1/√100 = 0.1
#: posterior sd (weights that concentrate on a few draws lose the evenness of Sobol' points).
#: A second signal beside k̂, whose estimate is itself noisy near 0.7.
ESS_RELIABLE = 100
PROPOSALS = ("gaussian", "student_t")


def proposal_draws(
    mean: np.ndarray, covariance: np.ndarray, num_draws: int, kind: str, df: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``num_draws`` draws ``(M, D)`` of the proposal and their log densities ``(M,)``:
    N(mean, covariance) for ``"gaussian"``, or the multivariate Student-t with ``df``
    degrees of freedom, location ``mean`` and scale matrix ``covariance`` (heavier tails,
    the same centre and shape) for ``"student_t"``.

    The draws are randomised quasi-Monte Carlo: the first M points u of a scrambled Sobol'
    sequence in [0, 1)^D (SciPy's ``qmc.Sobol``; one more dimension for the Student-t's
    χ²), mapped by θ = mean + L Φ⁻¹(u) (Student-t: divided by √(χ²_df / df)), L the
    Cholesky factor of ``covariance``. Each draw is still distributed as q, so importance
    sampling stays unbiased as M grows, but the points fill the space evenly: the weighted
    means and sds of a near-Gaussian target carry far less Monte Carlo error than from
    independent draws (bench/results/importance_qmc.md). A power of two keeps Sobol'
    balance; other M take the first M points of the next power of two."""
    return mixture_draws([(mean, covariance)], num_draws, kind, df, rng)


def mixture_draws(
    components: Sequence[tuple[np.ndarray, np.ndarray]],
    num_draws: int,
    kind: str,
    df: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`proposal_draws` from a mixture of C components ``[(mean (D,), covariance (D, D)), …]``
    of one ``kind``: the M Sobol' points cut into C consecutive blocks of n_c ≈ M / C (with
    M and C powers of two, each block is itself a balanced Sobol' net), block c mapped through
    component c. Each draw's log density is the mixture's, log Σ_c (n_c / M) q_c(θ) (the
    balance heuristic of multiple importance sampling, Veach and Guibas 1995; Owen and Zhou
    2000): weights π / that density are unbiased, and never exceed M / n_c times what
    component c alone would give, so a component far from π costs at most that factor in
    effective sample size (defensive importance sampling). One component: the plain proposal."""
    if kind not in PROPOSALS:
        raise ValueError(f"unknown proposal {kind!r}; choose one of {PROPOSALS}")
    dimensions = len(components[0][0]) + (kind == "student_t")
    points = stats.qmc.Sobol(dimensions, scramble=True, seed=rng).random_base2(max(0, math.ceil(math.log2(num_draws))))
    # scrambled points lie in [0, 1); keep Φ⁻¹ finite at 0
    points = np.clip(points[:num_draws], np.finfo(float).tiny, 1.0 - np.finfo(float).epsneg)
    blocks = np.array_split(np.arange(num_draws), len(components))
    draws = np.concatenate(
        [
            mapped_points(points[block], mean, covariance, kind, df)
            for block, (mean, covariance) in zip(blocks, components)
        ]
    )
    log_densities = [log_density(draws, mean, covariance, kind, df) for mean, covariance in components]
    if len(components) == 1:
        return draws, log_densities[0]
    shares = np.log([len(block) / num_draws for block in blocks])
    return draws, special.logsumexp(np.stack(log_densities) + shares[:, None], axis=0)


def mapped_points(points: np.ndarray, mean: np.ndarray, covariance: np.ndarray, kind: str, df: float) -> np.ndarray:
    """Points ``(n, D)`` (``(n, D + 1)`` for ``"student_t"``) in (0, 1) mapped to draws ``(n, D)``
    of the proposal (:func:`proposal_draws`)."""
    scaled = stats.norm.ppf(points[:, : len(mean)]) @ np.linalg.cholesky(covariance).T
    if kind == "gaussian":
        return mean + scaled
    return mean + scaled / np.sqrt(stats.chi2.ppf(points[:, -1], df) / df)[:, None]


def log_density(draws: np.ndarray, mean: np.ndarray, covariance: np.ndarray, kind: str, df: float) -> np.ndarray:
    """log q ``(M,)`` of ``draws (M, D)`` under the proposal of ``kind`` (:func:`proposal_draws`)."""
    if kind == "gaussian":
        return stats.multivariate_normal(mean, covariance).logpdf(draws).reshape(len(draws))
    return stats.multivariate_t(mean, covariance, df=df).logpdf(draws).reshape(len(draws))


def smoothed_weights(log_target: np.ndarray, log_proposal: np.ndarray) -> tuple[np.ndarray, float]:
    """PSIS of the log weights log π − log q ``(M,)``: the smoothed, normalised log weights
    ``(M,)`` (they sum to 1 after exp) and the Pareto shape k̂ of their tail (ArviZ)."""
    raw = np.asarray(log_target, dtype=float) - np.asarray(log_proposal, dtype=float)
    if not np.isfinite(raw).all():
        raw = np.where(np.isfinite(raw), raw, -np.inf)
    log_weights, khat = az.psislw(raw)
    return np.asarray(log_weights), float(khat)


def effective_sample_size(log_weights: np.ndarray) -> float:
    """1 / Σ w_j² of normalised weights: how many independent draws the weighted ones are worth."""
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    return float(1.0 / np.sum(weights**2))


def weighted_moments(values: np.ndarray, log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and sd ``(P,)`` of ``values (M, P)`` under normalised ``log_weights (M,)``."""
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    mean = weights @ values
    return mean, np.sqrt(np.maximum(weights @ (values - mean) ** 2, 0.0))


def weighted_quantiles(values: np.ndarray, log_weights: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Quantiles ``(Q, P)`` of ``values (M, P)`` under normalised ``log_weights (M,)``: the
    weighted empirical CDF (each draw's mass centred on its value) inverted by linear
    interpolation; with equal weights, NumPy's ``hazen`` quantiles."""
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    order = np.argsort(values, axis=0)
    mass = weights[order]
    centred = np.cumsum(mass, axis=0) - mass / 2
    return np.stack(
        [np.interp(probabilities, centred[:, p], values[order[:, p], p]) for p in range(values.shape[1])], axis=1
    )


def resample(log_weights: np.ndarray, num_draws: int, rng: np.random.Generator) -> np.ndarray:
    """``num_draws`` indices into the weighted draws by systematic resampling: each draw
    appears about M · w_j times, with less noise than multinomial resampling."""
    weights = np.exp(log_weights - np.logaddexp.reduce(log_weights))
    positions = (rng.random() + np.arange(num_draws)) / num_draws
    return np.minimum(np.searchsorted(np.cumsum(weights), positions), len(weights) - 1)


def is_reliable(khat: float, effective_sample_size: float) -> bool:
    """Whether the corrected posterior can be trusted: k̂ below :data:`KHAT_RELIABLE` and an
    effective sample size of at least :data:`ESS_RELIABLE`."""
    return khat < KHAT_RELIABLE and effective_sample_size >= ESS_RELIABLE


def verdict(khat: float, effective_sample_size: float) -> str:
    """What k̂ and the effective sample size mean for the user, in one sentence."""
    if khat >= KHAT_RELIABLE:
        return (
            f"k̂ = {khat:.2f} ≥ {KHAT_RELIABLE}: the combination is unreliable here (the shards' subposteriors are "
            "too far from Gaussian for consensus Monte Carlo, and too far for importance weights to repair): use "
            "fewer, larger shards"
        )
    if effective_sample_size < ESS_RELIABLE:
        return (
            f"k̂ = {khat:.2f} < {KHAT_RELIABLE}, but the weights rest on {effective_sample_size:.0f} draws' worth "
            f"(effective sample size < {ESS_RELIABLE}): the corrected posterior may be off by about "
            f"{1 / math.sqrt(max(effective_sample_size, 1.0)):.1f} sd or more; raise correct.draws, or use fewer, "
            "larger shards"
        )
    return f"k̂ = {khat:.2f} < {KHAT_RELIABLE}: the corrected posterior is exact up to Monte Carlo error"


def propose(gaussians: Sequence[Mapping[str, np.ndarray]], settings: Mapping) -> dict[str, np.ndarray]:
    """The proposal for ``gaussians`` (combine's Gaussian products, each ``mean (D,)``,
    ``covariance (D, D)`` and ``layout``; several: their equal mixture,
    :func:`mixture_draws`) and the config's ``correct`` section: ``draws (M, D)``,
    ``log_density (M,)``, the layout and the number of ``components``."""
    rng = np.random.default_rng(settings["seed"])
    draws, log_q = mixture_draws(
        [(gaussian["mean"], gaussian["covariance"]) for gaussian in gaussians],
        settings["draws"],
        settings["proposal"],
        settings["df"],
        rng,
    )
    return {"draws": draws, "log_density": log_q, "layout": gaussians[0]["layout"], "components": len(gaussians)}
