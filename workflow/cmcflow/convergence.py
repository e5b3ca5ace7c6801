"""Convergence diagnostics of MCMC draws: rank-normalised split R-hat, bulk and tail
effective sample size (Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, "Rank-
normalization, folding, and localization: an improved R-hat for assessing convergence of
MCMC"), the Monte Carlo error of the mean, and E-BFMI (Betancourt 2016).

The estimators are ArviZ's (0.23: ``rhat(method="rank")``, ``ess(method="bulk")``,
``ess(method="tail")``, ``mcse(method="mean")``, ``bfmi``), written again in NumPy because
importing ArviZ costs a sample job about 0.7 s (it loads SciPy's statistics and
Matplotlib), a third of the job's own overhead; tests/test_convergence.py checks each
against ArviZ. Every function takes the draws of one scalar quantity, ``x`` of shape
``(chains, draws)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtri

#: The draws each chain needs (ArviZ's minimum; fewer give NaN).
MIN_DRAWS = 4


def split_chains(x: np.ndarray) -> np.ndarray:
    """``(chains, draws)`` -> ``(2 chains, draws // 2)``: each chain's first and last half
    (its middle draw dropped when ``draws`` is odd)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]])


def rank_normalise(x: np.ndarray) -> np.ndarray:
    """z_i = Φ⁻¹((r_i − 3/8) / (S + 1/4)), r_i the rank of x_i among all S values (ties
    averaged), same shape."""
    flat = x.ravel()
    order = np.argsort(flat, kind="stable")
    ranks = np.empty(flat.size)
    ranks[order] = np.arange(1, flat.size + 1)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if values.size < flat.size:  # ties: each value's average rank
        ranks = (np.bincount(inverse, weights=ranks) / counts)[inverse]
    return ndtri((ranks - 3 / 8) / (flat.size + 1 / 4)).reshape(x.shape)


def potential_scale_reduction(x: np.ndarray) -> float:
    """R̂ = √((N − 1)/N + B / (N W)) of ``(chains, N)`` draws: B / N the variance of the chain
    means, W the mean within-chain variance (both with ddof 1)."""
    draws = x.shape[1]
    between = draws * np.var(x.mean(axis=1), ddof=1)
    within = np.mean(np.var(x, axis=1, ddof=1))
    return float(np.sqrt((between / within + draws - 1) / draws))


def autocovariance(x: np.ndarray) -> np.ndarray:
    """Each chain's autocovariance at lags 0 … N − 1 (biased: divided by N), ``(chains, N)``,
    by FFT of the draws zero-padded to 2N."""
    draws = x.shape[1]
    centred = x - x.mean(axis=1, keepdims=True)
    spectrum = np.fft.rfft(centred, n=2 * draws, axis=1)
    return np.fft.irfft(spectrum * np.conjugate(spectrum), n=2 * draws, axis=1)[:, :draws] / draws


def effective_sample_size(x: np.ndarray) -> float:
    """ESS = C N / τ̂ of ``(C, N)`` draws, τ̂ = −1 + 2 Σ ρ̂_t over Geyer's initial positive
    sequence of autocorrelations (pairs ρ̂_2k + ρ̂_2k+1 summed while positive, made
    monotone), ρ̂_t = 1 − (W − mean autocovariance_t) / var⁺; τ̂ at least 1 / log10(C N).
    Constant draws: C N."""
    chains, draws = x.shape
    if np.max(x) - np.min(x) < np.finfo(float).resolution:
        return float(x.size)
    acov = autocovariance(x)
    mean_var = np.mean(acov[:, 0]) * draws / (draws - 1.0)
    var_plus = mean_var * (draws - 1.0) / draws
    if chains > 1:
        var_plus += np.var(x.mean(axis=1), ddof=1)
    rho = np.zeros(draws)
    rho_even, rho_odd = 1.0, 1.0 - (mean_var - np.mean(acov[:, 1])) / var_plus
    rho[0], rho[1] = rho_even, rho_odd
    t = 1
    while t < draws - 3 and rho_even + rho_odd > 0.0:
        rho_even = 1.0 - (mean_var - np.mean(acov[:, t + 1])) / var_plus
        rho_odd = 1.0 - (mean_var - np.mean(acov[:, t + 2])) / var_plus
        if rho_even + rho_odd >= 0:
            rho[t + 1], rho[t + 2] = rho_even, rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho[max_t + 1] = rho_even
    t = 1
    while t <= max_t - 2:  # initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    tau = -1.0 + 2.0 * np.sum(rho[: max_t + 1]) + np.sum(rho[max_t + 1 : max_t + 2])
    tau = max(tau, 1 / np.log10(x.size))
    return float(np.nan if np.isnan(rho).any() else x.size / tau)


def _valid(x: np.ndarray, min_chains: int) -> bool:
    return not np.isnan(x).any() and x.shape[0] >= min_chains and x.shape[1] >= MIN_DRAWS


def rank_rhat(x: np.ndarray) -> float:
    """Rank-normalised split R̂: the larger of R̂ of the rank-normalised split chains (bulk)
    and of their folded values |x − median| (tails). NaN below 2 chains or 4 draws."""
    if not _valid(x, min_chains=2):
        return float("nan")
    split = split_chains(x)
    bulk = potential_scale_reduction(rank_normalise(split))
    tails = potential_scale_reduction(rank_normalise(np.abs(split - np.median(split))))
    return max(bulk, tails)


def ess_bulk(x: np.ndarray) -> float:
    """Bulk ESS: the ESS of the rank-normalised split chains."""
    return effective_sample_size(rank_normalise(split_chains(x))) if _valid(x, 1) else float("nan")


def ess_tail(x: np.ndarray) -> float:
    """Tail ESS: the smaller ESS of the indicators x ≤ q₅% and x ≤ q₉₅% (split chains)."""
    if not _valid(x, 1):
        return float("nan")
    return min(effective_sample_size(split_chains((x <= np.quantile(x, prob)).astype(float))) for prob in (0.05, 0.95))


def mcse_mean(x: np.ndarray) -> float:
    """Monte Carlo standard error of the mean: sd / √ESS of the split chains (unranked)."""
    if not _valid(x, 1):
        return float("nan")
    return float(np.std(x, ddof=1) / np.sqrt(effective_sample_size(split_chains(x))))


def bfmi(energy: np.ndarray) -> np.ndarray:
    """E-BFMI per chain: mean squared change of the Hamiltonian energy between draws over its
    variance (ddof 1), ``(chains,)``; below 0.3 the momentum resampling explores the energy
    poorly."""
    return np.square(np.diff(energy, axis=1)).mean(axis=1) / np.var(energy, axis=1, ddof=1)


def element_diagnostics(x: np.ndarray) -> dict[str, float]:
    """``mcse_mean``, ``ess_bulk``, ``ess_tail``, ``r_hat`` of one scalar's ``(chains, draws)``."""
    x = np.asarray(x, dtype=float)
    return {"mcse_mean": mcse_mean(x), "ess_bulk": ess_bulk(x), "ess_tail": ess_tail(x), "r_hat": rank_rhat(x)}
