"""The combine stage: consensus Monte Carlo over the shards' subposteriors.

All latent sites are combined jointly in the unconstrained space, where subposteriors are
closest to Gaussian; the combined draws are then pushed through the model's support
transforms (NumPyro's ``constrain_fn``) to give the constrained sites.

Methods (NumPyro ``infer.hmc_util``), with θ_s,j the j-th draw of shard s, flattened
over all sites:

- ``consensus`` (Scott et al. 2016): θ_j = (Σ_s W_s)⁻¹ Σ_s W_s θ_s,j with W_s the inverse
  of shard s's full sample covariance. Exact for Gaussian subposteriors, keeps some
  non-Gaussian shape otherwise. The default.
- ``consensus_diag``: the same with W_s = 1/variance; ignores posterior correlations, so
  only right when parameters are nearly independent a posteriori.
- ``parametric`` (Neiswanger et al. 2014): draws from the product of the subposteriors'
  Gaussian approximations N(μ_s, Σ_s).

The weights W_s come from each shard's draws, and with many parameters their sampling
noise moves the combined mean (on 10⁶ logistic rows, 21 coefficients, 2,000 draws a shard:
0.25 full-data sd at worst, while a plain average of the shard means was off by 0.08).
With ``shrinkage`` each shard's covariance is shrunk toward the shape the shards share,
at the shard's own scale (:class:`ConsensusAccumulator`, :func:`shrinkage_intensity`),
which brought that error to 0.085. NumPyro's consensus estimates each covariance on its
own, so the shrunk path is written here; without shrinkage NumPyro's functions are used.

Rigid models (point clouds aligned by the align stage) need another structure: aligned
coordinates have a rank-deficient covariance (the 6 rigid-motion directions were removed
by alignment), so full-covariance weights are ill posed. For them ``consensus`` uses
block-diagonal weights: one 3×3 block per point, and one full block for all other
parameters (:func:`block_consensus`; NumPyro has no block option, so it is written here).
Measured on 8 ubiquitin shards (issue 3): full covariance put the combined mean 98–885 Å
from the crystal structure, diagonal 0.385 Å, per-point blocks 0.353 Å (full data 0.32 Å).

Where a rigid model's data are distances between points (the model declares its
``observed_pairs``), the combined structure is also *located* in distance space
(:func:`locate_by_distances`): each shard's posterior mean of an observed distance is
nearly unbiased, while its posterior mean of the coordinates is biased in shape (a shard
knows each distance K times less precisely, and the mean of a spread-out cloud is not the
cloud of mean distances). That bias is the same in every shard, so averaging does not
remove it. Measured on ubiquitin (K = 8, 34,000 distances): coordinate consensus put the
combined mean 0.50 Å from the crystal structure, distance location 0.32 Å (full-data NUTS
0.29 Å); the spread of the draws is unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import arviz as az
import jax
import numpy as np
import pandas as pd
from numpyro.infer.hmc_util import consensus, parametric_draws
from numpyro.infer.util import constrain_fn
from scipy.optimize import minimize

from cmcflow import screening
from cmcflow.errors import InputError
from cmcflow.io import atomic_path, write_json_atomic
from cmcflow.sample import is_failed, map_draws

log = logging.getLogger(__name__)

METHODS = {
    "consensus": "full covariance",
    "consensus_diag": "diagonal covariance",
    "parametric": "full covariance (Gaussian product)",
}
#: What ``consensus`` means for a rigid model.
POINT_BLOCKS = "per-point 3x3 blocks (rigid model), other parameters full"


def flatten(draws: Mapping[str, np.ndarray], sites: Sequence[str]) -> np.ndarray:
    """``{site: (S, …)}`` -> ``(S, D)``: sites in the given order, each row-major."""
    return np.concatenate([draws[site].reshape(len(draws[site]), -1) for site in sites], axis=1)


def unflatten(flat: np.ndarray, like: Mapping[str, np.ndarray], sites: Sequence[str]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten`, shapes taken from ``like``."""
    result, offset = {}, 0
    for site in sites:
        shape = like[site].shape[1:]
        size = int(np.prod(shape, dtype=int))
        result[site] = flat[:, offset : offset + size].reshape(len(flat), *shape)
        offset += size
    return result


def point_blocks(draws: Mapping[str, np.ndarray], sites: Sequence[str], point_site: str) -> list[np.ndarray]:
    """Index blocks of the flattened parameter vector: one per point (its x, y, z) of
    ``point_site`` ``(N, 3)``, then one holding every other parameter."""
    blocks, others, offset = [], [], 0
    for site in sites:
        size = int(np.prod(draws[site].shape[1:], dtype=int))
        indices = np.arange(offset, offset + size)
        if site == point_site:
            blocks.extend(indices.reshape(-1, 3))
        else:
            others.extend(indices)
        offset += size
    return blocks + ([np.asarray(others)] if others else [])


#: Each chain is cut into this many contiguous batches for the batch-means estimate of how
#: much a shard's sample covariance would vary between runs (:func:`covariance_noise`).
BATCHES_PER_CHAIN = 5


def group_blocks(blocks: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    """Index blocks grouped by size: ``{size: (B, size)}``."""
    return {size: np.stack([block for block in blocks if len(block) == size]) for size in {len(block) for block in blocks}}


def block_covariances(values: np.ndarray) -> np.ndarray:
    """``(S, B, size)`` draws of B blocks -> their sample covariances ``(B, size, size)``."""
    centred = values - values.mean(axis=0)
    return np.einsum("sbi,sbj->bij", centred, centred) / (len(values) - 1)


def block_shapes(draws: np.ndarray, groups: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Each block's sample covariance over ``draws (S, D)`` divided by its trace:
    ``{size: (B, size, size)}``, the shape of the covariance without its scale."""
    shapes = {}
    for size, index in groups.items():
        covariance = block_covariances(draws[:, index])
        shapes[size] = covariance / np.trace(covariance, axis1=1, axis2=2)[:, None, None]
    return shapes


def covariance_noise(values: np.ndarray, chains: int) -> np.ndarray:
    """Σ_ij Var(Σ̂_ij) ``(B,)``: how much each block's sample covariance Σ̂ over ``values
    (S, B, size)`` (S = chains × draws, chain-major) would vary between runs.

    Batch means: every chain is cut into ``BATCHES_PER_CHAIN`` contiguous batches, Σ̂⁽ᵇ⁾ is the
    covariance about the overall mean within batch b, and Var(Σ̂_ij) ≈ Var_b(Σ̂⁽ᵇ⁾_ij) / n_batches.
    Unlike the iid formula (Σ_ii Σ_jj + Σ_ij²) / S this counts the autocorrelation of MCMC
    draws, which is larger for squares than for the draws themselves (measured on the P4
    shards: about twice the iid figure).
    """
    per_chain = values.shape[0] // chains
    batches_per_chain = max(1, min(BATCHES_PER_CHAIN, per_chain // 2))
    centred = (values - values.mean(axis=0)).reshape(chains, per_chain, *values.shape[1:])
    batch_covariances = np.stack(
        [
            np.einsum("sbi,sbj->bij", batch, batch) / len(batch)
            for chain in centred
            for batch in np.array_split(chain, batches_per_chain)
        ]
    )
    num_batches = len(batch_covariances)
    if num_batches < 2:
        raise InputError("covariance shrinkage needs at least 2 chains or 4 draws per chain to judge its intensity")
    return batch_covariances.var(axis=0, ddof=1).sum(axis=(-2, -1)) / num_batches


def shrinkage_targets(covariances: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """T = tr(Σ̂) Ψ ``(B, size, size)``: the pooled shape Ψ (``shapes``, the mean over the shards
    of Σ̂_s / tr(Σ̂_s)) at the scale of this shard's ``covariances`` Σ̂."""
    return np.trace(covariances, axis1=1, axis2=2)[:, None, None] * shapes


def shrinkage_intensity(values: np.ndarray, covariances: np.ndarray, targets: np.ndarray, chains: int) -> np.ndarray:
    """Ledoit & Wolf's (2004) intensity λ = min(1, E‖Σ̂ − Σ‖² / ‖Σ̂ − T‖²) ``(B,)`` for shrinking
    the sample covariances Σ̂ of ``values (S, B, size)`` toward ``targets`` T.

    Consensus weights are precisions, so the distance is measured symmetrically, in T's
    metric and in Σ̂'s: ‖L_T⁻¹ Σ̂ L_T⁻ᵀ − I‖²_F + ‖L_Σ̂⁻¹ T L_Σ̂⁻ᵀ − I‖²_F (L Lᵀ the Cholesky
    factors). A direction where the shard's variance is far smaller than the target's then
    counts as much as one where it is larger, and a shard whose shape truly differs gets
    λ ≈ 0 (measured: shards with random, compatible shapes get λ < 0.003 and the same error
    as without shrinkage; T's metric alone gave λ ≈ 0.005, enough to multiply that error by
    2.6–6).
    Near Σ̂ = T both terms are the same perturbation, so the numerator is twice the
    :func:`covariance_noise` of the T-whitened draws (batch means over each chain).
    """
    identity = np.eye(values.shape[-1])
    inverse_root = np.linalg.inv(np.linalg.cholesky(targets))
    whitened = np.einsum("bij,sbj->sbi", inverse_root, values)
    own_root = np.linalg.inv(np.linalg.cholesky(covariances))
    distance = np.sum((block_covariances(whitened) - identity) ** 2, axis=(-2, -1)) + np.sum(
        (own_root @ targets @ np.swapaxes(own_root, -1, -2) - identity) ** 2, axis=(-2, -1)
    )
    noise = 2 * covariance_noise(whitened, chains)
    return np.clip(np.divide(noise, distance, out=np.ones_like(distance), where=distance > 0), 0.0, 1.0)


class ConsensusAccumulator:
    """Consensus Monte Carlo with block-diagonal weights, one shard at a time.

    ``blocks``: index arrays partitioning range(D) (one block of all D: full covariance;
    singletons: diagonal). For every block b it keeps Σ_s W_s,b and Σ_s W_s,b θ_s,j[b], where
    W_s,b is the inverse covariance of shard s on block b, so memory is
    O(S·D + Σ_b d_b²) whatever the number of shards, and no synthetic draw is ever combined
    again. :meth:`draws` gives θ_j[b] = (Σ_s W_s,b)⁻¹ Σ_s W_s,b θ_s,j[b] ``(S, D)``;
    :meth:`gaussian` the product of the shards' Gaussian approximations (mean ``(D,)`` and the
    covariance of each block).

    W_s,b is the inverse sample covariance Σ̂, or with ``shrinkage`` the inverse of
    Σ̃ = (1 − λ) Σ̂ + λ T, T the pooled shape at this shard's scale (:func:`shrinkage_targets`,
    ``shapes`` the mean :func:`block_shapes` of the shards combined) and λ in [0, 1] given or,
    with ``"auto"``, :func:`shrinkage_intensity` (``chains``: how the S draws are laid out, for
    its batch means). Where the shards share one shape (random or stratified splits) Σ̂ − T is
    mostly noise and λ nears 1; where their shapes truly differ, λ nears 0.
    :attr:`intensities` lists each added shard's λ (mean over its blocks).
    """

    def __init__(
        self,
        blocks: Sequence[np.ndarray],
        num_draws: int,
        dimension: int,
        *,
        shrinkage: float | str = 0.0,
        shapes: Mapping[int, np.ndarray] | None = None,
        chains: int = 1,
    ):
        self.groups = group_blocks(blocks)
        self.precision = {size: np.zeros((len(index), size, size)) for size, index in self.groups.items()}
        self.weighted_draws = np.zeros((num_draws, dimension))
        self.weighted_mean = np.zeros(dimension)
        self.shrinkage, self.shapes, self.chains = shrinkage, shapes, chains
        self.intensities: list[float] = []

    def add(self, draws: np.ndarray) -> None:
        """Add one shard's draws ``(S, D)``."""
        intensities = []
        for size, index in self.groups.items():
            values = draws[:, index]  # (S, B, size)
            covariance = block_covariances(values)
            if self.shrinkage != 0.0 and size > 1:  # Σ̃ = (1 − λ) Σ̂ + λ T
                target = shrinkage_targets(covariance, self.shapes[size])
                if self.shrinkage == "auto":
                    weight = shrinkage_intensity(values, covariance, target, self.chains)
                else:
                    weight = np.full(len(covariance), float(self.shrinkage))
                covariance = (1 - weight)[:, None, None] * covariance + weight[:, None, None] * target
                intensities.append(weight)
            weights = np.linalg.inv(covariance)
            self.precision[size] += weights
            self.weighted_draws[:, index] += np.einsum("bij,sbj->sbi", weights, values)
            self.weighted_mean[index] += np.einsum("bij,bj->bi", weights, values.mean(axis=0))
        self.intensities.append(float(np.concatenate(intensities).mean()) if intensities else 0.0)

    def draws(self) -> np.ndarray:
        combined = np.empty_like(self.weighted_draws)
        for size, index in self.groups.items():
            combined[:, index] = np.linalg.solve(self.precision[size][None], self.weighted_draws[:, index][..., None])[..., 0]
        return combined

    def gaussian(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Mean ``(D,)`` and, per block size, the covariances ``(B, size, size)`` of the product."""
        mean = np.empty_like(self.weighted_mean)
        covariances = {}
        for size, index in self.groups.items():
            covariances[size] = np.linalg.inv(self.precision[size])
            mean[index] = np.einsum("bij,bj->bi", covariances[size], self.weighted_mean[index])
        return mean, covariances

    def parametric_draws(self, rng_key: jax.Array) -> np.ndarray:
        """Draws ``(S, D)`` from the product of the shards' Gaussian approximations (one full block)."""
        mean, covariances = self.gaussian()
        (covariance,) = covariances[len(mean)]
        normal = np.asarray(jax.random.normal(rng_key, self.weighted_draws.shape))
        return mean + normal @ np.linalg.cholesky(covariance).T


def mean_shapes(shapes: Sequence[Mapping[int, np.ndarray]]) -> dict[int, np.ndarray]:
    """The mean of several :func:`block_shapes` results."""
    return {size: np.mean([shape[size] for shape in shapes], axis=0) for size in shapes[0]}


def block_consensus(
    subposteriors: Sequence[np.ndarray], blocks: Sequence[np.ndarray], *, shrinkage: float | str = 0.0, chains: int = 1
) -> ConsensusAccumulator:
    """The :class:`ConsensusAccumulator` of K subposteriors ``(S, D)`` held in memory, with the
    pooled shapes for ``shrinkage`` taken over all of them; its :meth:`~ConsensusAccumulator.draws`
    are the combined draws ``(S, D)``."""
    groups = group_blocks(blocks)
    shapes = None
    if shrinkage != 0.0:
        shapes = mean_shapes([block_shapes(draws, groups) for draws in subposteriors])
    accumulator = ConsensusAccumulator(blocks, *subposteriors[0].shape, shrinkage=shrinkage, shapes=shapes, chains=chains)
    for draws in subposteriors:
        accumulator.add(draws)
    return accumulator


def pair_distances(points: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``(S, N, 3)`` point clouds, ``(P, 2)`` point pairs -> ``(S, P)`` distances |x_i − x_j|."""
    return np.linalg.norm(points[:, pairs[:, 0]] - points[:, pairs[:, 1]], axis=-1)


def distance_moments(points: np.ndarray, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance ``(P,)`` over draws ``(S, N, 3)`` of each pair's distance."""
    distances = pair_distances(points, pairs)
    return distances.mean(axis=0), distances.var(axis=0)


def consensus_of_moments(means: np.ndarray, variances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(K, P)`` per-shard means and variances -> precision-weighted mean ``(P,)`` and the
    total precision ``(P,)`` (the product of Gaussian marginals)."""
    precision = 1.0 / np.maximum(variances, np.finfo(float).tiny)
    total = precision.sum(axis=0)
    return (precision * means).sum(axis=0) / total, total


def distance_consensus(subposteriors: Sequence[np.ndarray], pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision-weighted consensus of pair distances over K subposteriors ``(S, N, 3)``.

    d̂_p = Σ_s w_s,p d̄_s,p / W_p with W_p = Σ_s w_s,p, where d̄_s,p and 1/w_s,p are the mean
    and variance of pair p's distance over shard s's draws (the consensus of Gaussian
    marginals). Returns d̂ ``(P,)`` and W ``(P,)``.
    """
    moments = [distance_moments(points, pairs) for points in subposteriors]
    return consensus_of_moments(np.stack([m for m, _ in moments]), np.stack([v for _, v in moments]))


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


def superpose(reference: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points (N, 3)`` moved by the proper rigid motion that best fits them onto ``reference``."""
    centred_ref, centred = reference - reference.mean(axis=0), points - points.mean(axis=0)
    u, _, vt = np.linalg.svd(centred.T @ centred_ref)
    handedness = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])
    return centred @ (u @ handedness @ vt) + reference.mean(axis=0)


def locate_at_distances(
    combined: np.ndarray, distances: np.ndarray, weights: np.ndarray, pairs: np.ndarray
) -> tuple[np.ndarray, float]:
    """Move the combined draws ``(S, N, 3)`` so that their mean is the structure that fits
    the target ``distances (P,)`` with ``weights (P,)`` (:func:`fit_to_distances` started from
    the combined mean, then superposed on it); every draw keeps its deviation from the mean.
    Returns the moved draws and the RMSD (Å) between the old and the new mean."""
    mean = combined.mean(axis=0)
    structure = superpose(mean, fit_to_distances(distances, weights, pairs, mean))
    return combined + (structure - mean), float(np.sqrt(np.mean(np.sum((structure - mean) ** 2, axis=-1))))


def locate_by_distances(
    combined: np.ndarray, subposteriors: Sequence[np.ndarray], pairs: np.ndarray
) -> tuple[np.ndarray, float]:
    """:func:`locate_at_distances` at the :func:`distance_consensus` of the subposteriors."""
    return locate_at_distances(combined, *distance_consensus(subposteriors, pairs), pairs)


def covariance_structure(method: str, point_site: str | None) -> str:
    """What the weights of ``method`` are, for a model with or without a point site."""
    if point_site is None:
        return METHODS[method]
    if method == "consensus":
        return POINT_BLOCKS
    if method == "consensus_diag":
        return METHODS[method]
    raise InputError(f"combine method {method!r} is not well posed for rigid models; use consensus or consensus_diag")


def consensus_blocks(like: Mapping[str, np.ndarray], sites: Sequence[str], method: str, point_site: str | None) -> list[np.ndarray]:
    """The weight blocks of ``method`` over the flattened parameters of ``like`` ``{site: (S, …)}``:
    per-point blocks for a rigid model's ``consensus``, singletons for ``consensus_diag``,
    otherwise one full block."""
    dimension = flatten(like, sites).shape[1]
    if covariance_structure(method, point_site) == POINT_BLOCKS:
        return point_blocks(like, sites, point_site)
    if method == "consensus_diag":
        return [np.array([index]) for index in range(dimension)]
    return [np.arange(dimension)]


def shrinks(method: str, shrinkage: float | str, point_site: str | None) -> bool:
    """Whether ``shrinkage`` applies: not to ``consensus_diag`` (a diagonal has no shape to
    shrink), and not yet to rigid models, whose per-point 3×3 blocks are estimated from
    thousands of draws each and whose accuracy was measured without it (issue 3)."""
    return shrinkage != 0.0 and method != "consensus_diag" and point_site is None


def combine_draws(
    subposteriors: Sequence[Mapping[str, np.ndarray]],
    method: str,
    rng_key: jax.Array,
    point_site: str | None = None,
    *,
    shrinkage: float | str = 0.0,
    chains: int = 1,
) -> dict[str, np.ndarray]:
    """Combine K subposteriors, each ``{site: (S, …)}`` with the same S, into ``{site: (S, …)}``.

    ``point_site``: the aligned point cloud of a rigid model (see :func:`covariance_structure`).
    ``shrinkage``: λ in [0, 1] or ``"auto"``, the shrinkage of each shard's covariance toward the
    shards' pooled shape (:class:`ConsensusAccumulator`); ``chains``: the chains in each S, for
    ``"auto"``. Without shrinkage, full and diagonal consensus and parametric draws are NumPyro's.
    """
    if method not in METHODS:
        raise InputError(f"unknown combine method {method!r}; choose one of {sorted(METHODS)}")
    draws = {len(next(iter(sub.values()))) for sub in subposteriors}
    if len(draws) != 1:
        raise InputError(f"shards have different numbers of draws {sorted(draws)}; combine needs equal counts")
    if covariance_structure(method, point_site) == POINT_BLOCKS or shrinks(method, shrinkage, point_site):
        sites = list(subposteriors[0])
        accumulator = block_consensus(
            [flatten(sub, sites) for sub in subposteriors],
            consensus_blocks(subposteriors[0], sites, method, point_site),
            shrinkage=shrinkage if shrinks(method, shrinkage, point_site) else 0.0,
            chains=chains,
        )
        combined = accumulator.parametric_draws(rng_key) if method == "parametric" else accumulator.draws()
        return unflatten(combined, subposteriors[0], sites)
    if method == "consensus":
        combined = consensus(list(subposteriors), diagonal=False)
    elif method == "consensus_diag":
        combined = consensus(list(subposteriors), diagonal=True)
    else:
        combined = parametric_draws(list(subposteriors), num_draws=draws.pop(), diagonal=False, rng_key=rng_key)
    return {name: np.asarray(value) for name, value in combined.items()}


def summary_table(idata: az.InferenceData) -> pd.DataFrame:
    """Mean, sd, 5% and 95% quantiles of every posterior element (ArviZ ``summary``)."""
    quantiles = {"5%": lambda x: np.quantile(x, 0.05), "95%": lambda x: np.quantile(x, 0.95)}
    table = az.summary(idata, kind="stats", stat_funcs=quantiles, round_to="none")
    return table[["mean", "sd", "5%", "95%"]]


#: Above this many shards, combine streams: it never holds more than one shard's draws.
STREAMING_ABOVE = 500


def unconstrained_draws(run: az.InferenceData) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """``{site: (chains · draws, …)}`` of a run's ``unconstrained_posterior``, and (chains, draws)."""
    group = run.unconstrained_posterior
    chains, draws = group.sizes["chain"], group.sizes["draw"]
    return {name: group[name].values.reshape(chains * draws, *group[name].shape[2:]) for name in group.data_vars}, (
        chains,
        draws,
    )


def element_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """ArviZ's labels of a site's elements, row-major: ``beta[0]``, ``coords[3, 1]``, ``sigma``."""
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, index))}]" for index in np.ndindex(*shape)]


def constrained_moments(shard: int, posterior) -> pd.DataFrame:
    """Mean and sd over all draws of every element of every site of a shard's ``posterior``
    group (constrained): rows (shard, parameter, mean, sd)."""
    rows = []
    for name, values in posterior.data_vars.items():
        flat = values.values.reshape(-1, int(np.prod(values.shape[2:], dtype=int)))
        labels = element_labels(name, values.shape[2:])
        rows.append(pd.DataFrame({"shard": shard, "parameter": labels, "mean": flat.mean(axis=0), "sd": flat.std(axis=0)}))
    return pd.concat(rows, ignore_index=True)


def combine_shards(
    load: Callable[[int], az.InferenceData],
    num_shards: int,
    model,
    model_kwargs: Mapping,
    method: str,
    seed: int,
    *,
    shrinkage: float | str,
    diagnostics: Sequence[Mapping] | None = None,
    screen_thresholds: Mapping[str, float] | None = None,
    min_shards_fraction: float = 1.0,
    on_failed_shard: str = "fail",
    point_site: str | None = None,
    point_pairs: np.ndarray | None = None,
) -> tuple[az.InferenceData, dict, pd.DataFrame]:
    """Screen and combine the shard runs ``load(0) … load(K − 1)`` (each with an
    ``unconstrained_posterior`` group); returns the combined InferenceData, the shard
    record (used, excluded with reasons, method, covariance, location, each shard's outlier
    score) and every shard's constrained means and sds (:func:`constrained_moments`).

    Shards whose sample job failed (:func:`cmcflow.sample.failed_run`) fail the run with
    their errors (``on_failed_shard="fail"``) or are excluded with them (``"skip"``).
    Screening (:mod:`cmcflow.screening`) runs when ``screen_thresholds`` and the shards'
    ``diagnostics`` are given. ``point_pairs (P, 2)``: the point pairs whose distances the
    data observe; given, the combined ``point_site`` is located by :func:`locate_at_distances`.
    ``shrinkage`` (λ or ``"auto"``; :class:`ConsensusAccumulator`) shrinks each kept shard's
    covariance toward the kept shards' pooled shape, summed while the shards are first read.
    Above ``STREAMING_ABOVE`` shards the draws are read twice (summaries, then a
    :class:`ConsensusAccumulator`) and never held together.

    Draws keep the shards' (chain, draw) layout: combined draw (c, j) merges draw (c, j) of
    every shard. The chains of a combined posterior are not independent MCMC chains, so
    R-hat and ESS belong to the shards, never to the combined draws.
    """
    streaming = num_shards > STREAMING_ABOVE
    shrinking = shrinks(method, shrinkage, point_site)
    shape_sums, shaped = {}, set()  # Σ of the pooled-shape terms, and the shards summed
    failed = []
    first = layout = None
    in_memory, summaries, distance_means, distance_variances, moments = {}, [], {}, {}, []
    for shard in range(num_shards):
        run = load(shard)
        if is_failed(run):
            failed.append({"shard": shard, "reason": f"failed: {run.posterior.attrs['error']}"})
            continue
        draws, shape = unconstrained_draws(run)
        if first is None:  # the layout every other shard must share, and the sites' dims
            first, layout, first_shard, sites = draws, shape, shard, list(draws)
            dims = {name: list(run.posterior[name].dims[2:]) for name in sites}
            groups = group_blocks(consensus_blocks(draws, sites, method, point_site))
        if list(draws) != sites or shape != layout:
            raise InputError(
                f"shard {shard} has sites {list(draws)} and {shape[0]}x{shape[1]} draws; "
                f"shard {first_shard} has {sites} and {layout[0]}x{layout[1]}"
            )
        moments.append(constrained_moments(shard, run.posterior))
        flat = flatten(draws, sites)
        if screen_thresholds is not None:
            summaries.append(screening.summarise(shard, flat, diagnostics[shard]))
        if shrinking and np.isfinite(flat).all():
            for size, shape in block_shapes(flat, groups).items():
                shape_sums[size] = shape_sums.get(size, 0.0) + shape
            shaped.add(shard)
        if point_pairs is not None:
            distance_means[shard], distance_variances[shard] = distance_moments(draws[point_site], point_pairs)
        if not streaming:
            in_memory[shard] = draws
    if failed and on_failed_shard == "fail":
        raise InputError(
            f"{len(failed)} of {num_shards} sample jobs failed (set combine.on_failed_shard: skip to combine the "
            "others): " + "; ".join(f"shard {entry['shard']}: {entry['reason']}" for entry in failed)
        )
    if screen_thresholds is not None:
        kept, excluded = screening.screen(summaries, screen_thresholds)
    else:
        failed_shards = {entry["shard"] for entry in failed}
        kept, excluded = [shard for shard in range(num_shards) if shard not in failed_shards], []
    excluded = sorted(failed + excluded, key=lambda entry: entry["shard"])
    screening.require_enough(kept, excluded, num_shards, min_shards_fraction)
    for entry in excluded:
        log.warning("shard %d excluded: %s", entry["shard"], entry["reason"])

    def draws_of(shard: int) -> dict[str, np.ndarray]:
        return unconstrained_draws(load(shard))[0] if streaming else in_memory[shard]

    shapes = None
    if shrinking:  # the pooled shape of the kept shards: take the screened-out ones back out
        for shard in sorted(shaped - set(kept)):
            for size, shape in block_shapes(flatten(draws_of(shard), sites), groups).items():
                shape_sums[size] = shape_sums[size] - shape
        shapes = {size: total / len(kept) for size, total in shape_sums.items()}
    rng_key = jax.random.PRNGKey(seed)
    if streaming or shrinking or covariance_structure(method, point_site) == POINT_BLOCKS:
        combined, intensities = stream_combine(
            (draws_of(shard) for shard in kept), first, method, rng_key, point_site,
            shrinkage=shrinkage if shrinking else 0.0, shapes=shapes, chains=layout[0],
        )
    else:
        combined = combine_draws([in_memory[shard] for shard in kept], method, rng_key, point_site)
    location = {} if point_site is None else {"location": "coordinate consensus"}
    if point_pairs is not None:
        target, weights = consensus_of_moments(
            np.stack([distance_means[shard] for shard in kept]), np.stack([distance_variances[shard] for shard in kept])
        )
        combined[point_site], shift = locate_at_distances(combined[point_site], target, weights, point_pairs)
        location = {"location": f"distance consensus over {len(point_pairs)} observed pairs", "location_shift_rmsd": shift}
        log.info("combined structure located by %s: its mean moved %.3f Å", location["location"], shift)

    chains, draws = layout
    unconstrained = {name: value.reshape(chains, draws, *value.shape[1:]) for name, value in combined.items()}
    constrained = map_draws(
        lambda position: constrain_fn(model, (), model_kwargs, position), unconstrained, batch_ndims=2
    )
    idata = az.InferenceData(
        posterior=az.dict_to_dataset(constrained, library=None, dims=dims),
        unconstrained_posterior=az.dict_to_dataset(unconstrained, library=None),
    )
    record = {
        "method": method,
        "covariance": covariance_structure(method, point_site),
        **location,
        "space": "unconstrained",
        "covariance_shrinkage": shrinkage if shrinking else 0.0,
        **(
            {"shrinkage_intensity": {str(shard): weight for shard, weight in zip(kept, intensities)}}
            if shrinking
            else {}
        ),
        "streaming": streaming,
        "num_shards": num_shards,
        "used": kept,
        "excluded": excluded,
        # every shard's prior was tempered to 1/K: the combined posterior holds prior^(kept/K)
        "prior_power": len(kept) / num_shards,
        "max_abs_z": {str(shard): z for shard, z in screening.final_outlier_scores(summaries, kept).items()},
        **({"max_outlier_z": screen_thresholds["max_outlier_z"]} if screen_thresholds is not None else {}),
    }
    idata.posterior.attrs.update(
        {
            key: value
            for key, value in record.items()
            if key not in ("used", "excluded", "streaming", "max_abs_z", "max_outlier_z", "shrinkage_intensity")
        }
    )
    idata.posterior.attrs["num_shards_used"] = len(kept)
    return idata, record, pd.concat(moments, ignore_index=True)


def stream_combine(
    shard_draws: Iterable[Mapping[str, np.ndarray]],
    like: Mapping[str, np.ndarray],
    method: str,
    rng_key: jax.Array,
    point_site: str | None,
    *,
    shrinkage: float | str = 0.0,
    shapes: Mapping[int, np.ndarray] | None = None,
    chains: int = 1,
) -> tuple[dict[str, np.ndarray], list[float]]:
    """:func:`combine_draws` for many shards, one ``{site: (S, …)}`` at a time
    (:class:`ConsensusAccumulator`); ``like``: any shard's draws, for the layout; ``shapes``:
    the pooled :func:`block_shapes` of the shards, needed when ``shrinkage`` is not 0.
    Returns the combined draws and each shard's shrinkage intensity λ."""
    sites = list(like)
    blocks = consensus_blocks(like, sites, method, point_site)
    num_draws = len(next(iter(like.values())))
    accumulator = ConsensusAccumulator(
        blocks,
        num_draws,
        flatten(like, sites).shape[1],
        shrinkage=shrinkage if shrinks(method, shrinkage, point_site) else 0.0,
        shapes=shapes,
        chains=chains,
    )
    for draws in shard_draws:
        accumulator.add(flatten(draws, sites))
    combined = accumulator.parametric_draws(rng_key) if method == "parametric" else accumulator.draws()
    return unflatten(combined, like, sites), accumulator.intensities


def combine_runs(
    runs: Sequence[az.InferenceData],
    model,
    model_kwargs: Mapping,
    method: str,
    seed: int,
    *,
    shrinkage: float | str,
    point_site: str | None = None,
    point_pairs: np.ndarray | None = None,
) -> az.InferenceData:
    """:func:`combine_shards` of runs already in memory, without screening."""
    idata, _, _ = combine_shards(
        runs.__getitem__, len(runs), model, model_kwargs, method, seed,
        shrinkage=shrinkage, point_site=point_site, point_pairs=point_pairs,
    )
    return idata


def write_combined(
    idata: az.InferenceData,
    shards: dict,
    moments: pd.DataFrame,
    netcdf_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    shards_path: str | os.PathLike,
    moments_path: str | os.PathLike,
) -> pd.DataFrame:
    """Write the combined NetCDF, the summary CSV, the shard record (JSON) and the shards'
    moments (CSV), each atomically."""
    with atomic_path(moments_path) as tmp:
        moments.to_csv(tmp, index=False)
    with atomic_path(netcdf_path) as tmp:
        idata.to_netcdf(str(tmp), engine="h5netcdf")
    summary = summary_table(idata)
    with atomic_path(summary_path) as tmp:
        summary.to_csv(tmp, index_label="parameter")
    write_json_atomic(shards_path, shards)
    return summary
