"""Locating a combined structure in distance space, for rigid models observed through
distances between their points.

Each shard's posterior mean of an observed distance is nearly unbiased, while its posterior
mean of the coordinates is biased in shape: a shard knows each distance K times less
precisely than the full data, and the mean of a spread-out cloud is not the cloud of mean
distances. That bias is the same in every shard, so averaging coordinates does not remove
it (measured: bench/results/structure_accuracy.md). Instead, the pair distances are
combined as Gaussian marginals (:func:`distance_consensus`), the structure that best fits
them is found (:func:`fit_to_distances`), and the combined draws are moved so that their
mean is that structure (:func:`locate_by_distances`); the draws' spread is unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize

from cmcflow.superposition import rmsd, superpose

log = logging.getLogger(__name__)


def pair_distances(points: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``(S, N, 3)`` point clouds, ``(P, 2)`` point pairs -> ``(S, P)`` distances |x_i − x_j|."""
    return np.linalg.norm(points[:, pairs[:, 0]] - points[:, pairs[:, 1]], axis=-1)


def distance_moments(points: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance ``(P,)`` over draws ``(S, N, 3)`` of each pair's distance."""
    distances = pair_distances(points, pairs)
    return distances.mean(axis=0), distances.var(axis=0)


def distance_consensus(moments: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Precision-weighted consensus of pair distances over K shards, from each shard's
    :func:`distance_moments` (d̄_s ``(P,)``, v_s ``(P,)``).

    d̂_p = Σ_s w_s,p d̄_s,p / W_p with w_s,p = 1 / v_s,p and W_p = Σ_s w_s,p (the product of
    Gaussian marginals). Returns d̂ ``(P,)`` and W ``(P,)``.
    """
    means = np.stack([mean for mean, _ in moments])
    precision = 1.0 / np.maximum(np.stack([variance for _, variance in moments]), np.finfo(float).tiny)
    total = precision.sum(axis=0)
    return (precision * means).sum(axis=0) / total, total


def fit_to_distances(distances: np.ndarray, weights: np.ndarray, pairs: np.ndarray, start: np.ndarray) -> np.ndarray:
    """The structure ``(N, 3)`` minimising the weighted stress Σ_p W_p (|x_i − x_j| − d̂_p)²,
    by L-BFGS (SciPy) from ``start (N, 3)``; points in no pair stay where they start."""
    first, second = pairs[:, 0], pairs[:, 1]
    scale = weights / weights.mean()

    def stress(flat):
        points = flat.reshape(start.shape)
        difference = points[first] - points[second]
        length = np.sqrt(np.sum(difference**2, axis=-1) + 1e-12)
        residual = length - distances
        pull = (2 * scale * residual / length)[:, None] * difference
        gradient = np.zeros_like(points)
        np.add.at(gradient, first, pull)
        np.add.at(gradient, second, -pull)
        return np.sum(scale * residual**2), gradient.reshape(-1)

    result = minimize(stress, start.reshape(-1), jac=True, method="L-BFGS-B", options={"maxiter": 10_000})
    if not result.success:
        log.warning("distance fit of the combined structure stopped early: %s", result.message)
    return result.x.reshape(start.shape)


def locate_by_distances(
    combined: np.ndarray, moments: Sequence[tuple[np.ndarray, np.ndarray]], pairs: np.ndarray
) -> tuple[np.ndarray, float]:
    """Move the combined draws ``(S, N, 3)`` so that their mean is the structure that fits
    the :func:`distance_consensus` of the shards' distance ``moments`` over ``pairs (P, 2)``
    (:func:`fit_to_distances` started from the combined mean, then superposed on it); every
    draw keeps its deviation from the mean. Returns the moved draws and the RMSD (Å)
    between the old and the new mean."""
    distances, weights = distance_consensus(moments)
    mean = combined.mean(axis=0)
    structure = superpose(mean, fit_to_distances(distances, weights, pairs, mean))
    return combined + (structure - mean), float(rmsd(structure, mean))
