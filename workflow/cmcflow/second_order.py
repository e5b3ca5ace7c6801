"""The second-order term of consensus Monte Carlo: where the Gaussian product of the shards'
posteriors misses the full posterior's mean, from the model's third derivatives.

With H_s the Hessian of shard s's tempered potential U_s = −log p_s at its posterior mean
μ_s, Σ_s = H_s⁻¹, and T_s its third derivatives there ``(D, D, D)``, the product's mean is
m̄ = P⁻¹ Σ_s H_s μ_s with P = Σ_s H_s, and the full posterior's mean is m̄ − δ to second
order, where, with d_s = m̄ − μ_s,

    δ = ½ P⁻¹ Σ_s T_s : (d_s d_sᵀ − Σ_s + P⁻¹),   (T : A)_i = Σ_jk T_ijk A_jk.

Two terms make it. Expanding each shard's gradient to second order about its mode, the full
posterior's mode is the product of the modes less ½ P⁻¹ Σ_s T_s[d_s, d_s] (the shards'
disagreement, seen through the model's curvature); and a posterior's mean is its mode less
½ H⁻¹ (T : H⁻¹) to first order in 1/n, so the product of the means is its modes' product
less ½ P⁻¹ Σ_s T_s : Σ_s, and the full posterior's mean its mode less ½ P⁻¹ (Σ_s T_s) : P⁻¹.
Where one model describes every shard, Cov(d_s) ≈ Σ_s − P⁻¹ and δ is zero on average: it is
the disagreement in excess of what the model allows, weighed by how far from Gaussian the
posterior is.

The expansion holds while the second-order part of each shard's gradient over d_s is small
against the first: ρ_s = ‖½ T_s[d_s, d_s]‖ / ‖H_s d_s‖ (norms in Σ_s); what it leaves out
grows with ρ_s. Where δ helps and where it does not: ``bench/results/real_data.md`` (real
data) and ``bench/results/second_order.md`` (simulated shards of 50 to 800 rows).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

#: Most unconstrained parameters for which a sample job computes and keeps the third
#: derivatives (D³ numbers: 2 MiB at 64, D forward passes over the Hessian's program).
THIRD_DERIVATIVES_MAX_PARAMETERS = 64
#: Largest ρ_s at which combine applies δ: beyond it the shards sit too far apart, for their
#: size, for a second-order expansion (bench S: 4 of the 5 cases past it would have been made worse).
MAX_EXPANSION_RATIO = 0.5


def contract(third: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(T : A)_i = Σ_jk T_ijk A_jk of third derivatives ``(D, D, D)`` and a matrix ``(D, D)``: ``(D,)``."""
    return np.einsum("ijk,jk->i", third, matrix)


def second_order_shift(
    mean: np.ndarray, covariance: np.ndarray, shards: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """δ ``(D,)`` for the Gaussian product of ``shards`` (its mean m̄ ``(D,)`` and covariance
    P⁻¹ ``(D, D)``), each shard its posterior mean μ_s ``(D,)``, the covariance Σ_s = H_s⁻¹
    ``(D, D)`` that weighs it and its third derivatives T_s ``(D, D, D)`` at μ_s, given one
    at a time; and every shard's expansion ratio ρ_s ``(K,)``. The full posterior's mean is
    m̄ − δ to second order."""
    excess, ratios = np.zeros_like(mean), []
    for at, shard_covariance, third in shards:
        apart = mean - at
        excess += contract(third, np.outer(apart, apart) - shard_covariance + covariance)
        second = 0.5 * third @ apart @ apart
        first = np.linalg.solve(shard_covariance, apart)  # H_s d_s
        scale = first @ shard_covariance @ first
        ratios.append(np.sqrt((second @ shard_covariance @ second) / scale) if scale > 0 else 0.0)
    return 0.5 * covariance @ excess, np.asarray(ratios)
