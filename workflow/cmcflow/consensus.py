"""Consensus Monte Carlo: the maths of combining K subposteriors, in NumPy alone.

With θ_s,j the j-th draw of shard s flattened over all sites ``(S, D)``, consensus Monte
Carlo (Scott et al. 2016) combines draw by draw

    θ_j = (Σ_s W_s)⁻¹ Σ_s W_s θ_s,j,

W_s the inverse of shard s's covariance Σ_s. Exact for Gaussian subposteriors; keeps some
of their non-Gaussian shape otherwise. The weights can be block-diagonal
(:class:`ConsensusAccumulator`: one block of all D is full covariance, singletons are
diagonal, one 3×3 block per point suits an aligned point cloud), and ``parametric`` draws
from the product of the shards' Gaussian approximations N(μ_s, Σ_s) instead.

The weights can come from the model: W_s = H_s, the Hessian of shard s's tempered potential
−log p(θ)^(1/K) p(y_s | θ) in the unconstrained space at its posterior mean
(:func:`hessian_covariance`; computed by the sample stage), the precision of its Laplace
approximation, with no Monte Carlo noise. Or they come from each shard's draws, and with
many parameters their sampling noise moves the combined mean. Random and stratified shards
share one covariance *shape*, so each shard's covariance can be shrunk toward the pooled
shape at the shard's own scale,
Σ̃ = (1 − λ) Σ̂ + λ tr(Σ̂) Ψ, with a Ledoit–Wolf intensity λ estimated from the shard's draws
(:func:`shrinkage_intensity`; measured effect: bench/results/cmc_vs_full.md). NumPyro's
``hmc_util.consensus`` estimates each covariance on its own and has neither blocks nor
shrinkage, so the combination is written here; tests hold it to NumPyro's where both apply.

:func:`plan_consensus` decides once, for a method and a model, what the weights are.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cmcflow.errors import InputError

METHODS = {
    "consensus": "full covariance",
    "consensus_diag": "diagonal covariance",
    "parametric": "full covariance (Gaussian product)",
}
#: Where each shard's covariance comes from (``combine.weights``).
WEIGHTS = {"hessian": "inverse Hessian at the shard's posterior mean", "draws": "sample covariance of the draws"}
#: Above this many unconstrained parameters the sample stage computes no Hessian (D forward
#: passes of the gradient and D² numbers per shard): every shard is weighed by its draws.
HESSIAN_MAX_PARAMETERS = 1000
#: Most parameters for which block-diagonal weights keep the (D, D) sums that give the
#: disagreement's spread (ConsensusAccumulator.disagreement_variance): the draws' covariance
#: and three (D, D) products per shard, about 0.1 s at 600 (a rigid model of 200 points) on
#: 2 cores, 0.03 s at 300.
SPREAD_MAX_PARAMETERS = 600
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


def site_layout(like: Mapping[str, np.ndarray]) -> str:
    """The sites and their per-draw shapes of ``{site: (S, …)}``, as JSON (kept with the
    flat proposal draws so every job unflattens them alike)."""
    return json.dumps({name: list(value.shape[1:]) for name, value in like.items()})


def layout_sites(layout: str) -> list[str]:
    """The latent sites of a :func:`site_layout`, in their flat order."""
    return list(json.loads(layout))


def unflatten_draws(flat: np.ndarray, layout: str) -> dict[str, np.ndarray]:
    """Flat draws ``(M, D)`` -> ``{site: (M, …)}`` by a :func:`site_layout`."""
    shapes = json.loads(layout)
    like = {name: np.empty((1, *shape)) for name, shape in shapes.items()}
    return unflatten(flat, like, list(shapes))


#: The key prefix of the constrained sites stored beside flat proposal draws.
CONSTRAINED_PREFIX = "constrained:"


def pack_constrained(sites: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Constrained draws ``{site: (M, …)}`` as arrays to store beside the flat draws (keys
    prefixed :data:`CONSTRAINED_PREFIX`); :func:`constrained_sites` reads them back."""
    return {f"{CONSTRAINED_PREFIX}{name}": np.asarray(value) for name, value in sites.items()}


def constrained_sites(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The constrained draws ``{site: (M, …)}`` that :func:`pack_constrained` stored in ``arrays``."""
    return {
        name.removeprefix(CONSTRAINED_PREFIX): value
        for name, value in arrays.items()
        if name.startswith(CONSTRAINED_PREFIX)
    }


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
    return {
        size: np.stack([block for block in blocks if len(block) == size]) for size in {len(block) for block in blocks}
    }


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
    draws, which is larger for squares than for the draws themselves.
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
    λ ≈ 0 (tests/test_combine.py holds both cases).
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

    :meth:`disagreement` gives how far the shards' means m_s lie from the product's mean m̄
    in their own precisions, Q = Σ_s (m_s − m̄)ᵀ W_s (m_s − m̄) (summed over blocks), kept as
    Σ_s (m_s − r)ᵀ W_s (m_s − r) about the first shard's mean r and finished as
    Q = Σ_s (m_s − r)ᵀ W_s (m_s − r) − (m̄ − r)ᵀ (Σ_s W_s) (m̄ − r), so it streams too.
    With more than one block the weights leave out the correlations between blocks, and Q's
    spread under one model is wider than χ²'s; :meth:`disagreement_variance` gives it, from
    each shard's full covariance C_s (its draws', or the given one), for at most
    :data:`SPREAD_MAX_PARAMETERS` parameters.
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
        self.shards = 0
        self.reference: np.ndarray | None = None  # r: the first shard's mean (D,)
        self.centred_square = 0.0  # Σ_s (m_s − r)ᵀ W_s (m_s − r)
        self.block_diagonal = sum(len(index) for index in self.groups.values()) > 1
        # Σ_s tr(G_s²), Σ_s G_s² W_s and Σ_s G_s W_s, G_s = W_s C_s (disagreement_variance)
        self.spread: dict | None = None
        if self.block_diagonal and dimension <= SPREAD_MAX_PARAMETERS:
            self.spread = {"trace": 0.0, "N": np.zeros((dimension, dimension)), "M": np.zeros((dimension, dimension))}

    def add(self, draws: np.ndarray, covariance: np.ndarray | None = None) -> None:
        """Add one shard's draws ``(S, D)``, weighted by the inverse of the given
        ``covariance`` ``(D, D)`` restricted to each block (no shrinkage), or else by the
        inverse of the draws' own (shrunk) covariance."""
        if self.reference is None:
            self.reference = draws.mean(axis=0)
        self.shards += 1
        intensities = []
        dense = None if self.spread is None else np.zeros_like(self.spread["N"])  # W_s (D, D)
        for size, index in self.groups.items():
            values = draws[:, index]  # (S, B, size)
            if covariance is not None:
                weights = np.linalg.inv(covariance[index[:, :, None], index[:, None, :]])
                self._accumulate(size, index, weights, values, dense)
                continue
            covariance_hat = block_covariances(values)
            if self.shrinkage != 0.0 and size > 1:  # Σ̃ = (1 − λ) Σ̂ + λ T
                target = shrinkage_targets(covariance_hat, self.shapes[size])
                if self.shrinkage == "auto":
                    weight = shrinkage_intensity(values, covariance_hat, target, self.chains)
                else:
                    weight = np.full(len(covariance_hat), float(self.shrinkage))
                covariance_hat = (1 - weight)[:, None, None] * covariance_hat + weight[:, None, None] * target
                intensities.append(weight)
            self._accumulate(size, index, np.linalg.inv(covariance_hat), values, dense)
        self.intensities.append(float(np.concatenate(intensities).mean()) if intensities else 0.0)
        if dense is not None:
            full = np.cov(draws, rowvar=False) if covariance is None else covariance  # C_s
            product = dense @ full  # G_s
            self.spread["trace"] += float(np.sum(product * product.T))
            self.spread["M"] += product @ dense
            self.spread["N"] += product @ (product @ dense)

    def _accumulate(
        self, size: int, index: np.ndarray, weights: np.ndarray, values: np.ndarray, dense: np.ndarray | None
    ) -> None:
        """Add W_s,b ``(B, size, size)`` and W_s,b θ_s,j[b] for the blocks' ``values (S, B, size)``
        (and write W_s,b into ``dense``, the shard's weights as one ``(D, D)`` matrix, if given)."""
        if dense is not None:
            dense[index[:, :, None], index[:, None, :]] = weights
        self.precision[size] += weights
        self.weighted_draws[:, index] += np.einsum("bij,sbj->sbi", weights, values)
        self.weighted_mean[index] += np.einsum("bij,bj->bi", weights, values.mean(axis=0))
        centred = values.mean(axis=0) - self.reference[index]  # (B, size)
        self.centred_square += float(np.einsum("bi,bij,bj->", centred, weights, centred))

    def draws(self) -> np.ndarray:
        """The combined draws ``(S, D)``."""
        combined = np.empty_like(self.weighted_draws)
        for size, index in self.groups.items():
            combined[:, index] = np.linalg.solve(self.precision[size][None], self.weighted_draws[:, index][..., None])[
                ..., 0
            ]
        return combined

    def gaussian(self) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """Mean ``(D,)`` and, per block size, the covariances ``(B, size, size)`` of the product."""
        mean = np.empty_like(self.weighted_mean)
        covariances = {}
        for size, index in self.groups.items():
            covariances[size] = np.linalg.inv(self.precision[size])
            mean[index] = np.einsum("bij,bj->bi", covariances[size], self.weighted_mean[index])
        return mean, covariances

    def disagreement(self) -> tuple[float, int]:
        """Q (see the class docstring) and (K − 1)·D, K the shards added: where one model
        describes every shard's rows and the subposteriors are Gaussian, each m_s scatters
        about the truth with covariance W_s⁻¹, and Q ~ χ² with (K − 1)·D degrees of freedom
        (Cochran's Q of meta-analysis, one block of all D; block-diagonal weights keep its
        mean but widen its spread, as they leave out the correlations between blocks)."""
        mean, _ = self.gaussian()
        centred = mean - self.reference
        pooled = sum(
            float(np.einsum("bi,bij,bj->", centred[index], self.precision[size], centred[index]))
            for size, index in self.groups.items()
        )
        return max(self.centred_square - pooled, 0.0), (self.shards - 1) * len(mean)

    def disagreement_variance(self) -> float | None:
        """Var Q where each m_s scatters about the truth with its shard's full covariance C_s
        and the weights are block-diagonal (Q = xᵀ A x over the stacked means, Var Q =
        2 tr((A C)²)): with G_s = W_s C_s and P = Σ_s W_s,

            Var Q = 2 [Σ_s tr(G_s²) − 2 tr(P⁻¹ Σ_s G_s² W_s) + tr((P⁻¹ Σ_s G_s W_s)²)],

        which is 2 (K − 1) D, χ²'s, where W_s = C_s⁻¹. ``None`` where the weights are one full
        block (Q ~ χ² already) or the parameters too many to keep (D, D) sums."""
        if self.spread is None:
            return None
        _, pooled = self.gaussian_product()  # P⁻¹ (block-diagonal)
        inverse_m = pooled @ self.spread["M"]
        square = float(np.sum(inverse_m * inverse_m.T))  # tr((P⁻¹ M)²)
        return 2 * (self.spread["trace"] - 2 * float(np.sum(pooled * self.spread["N"].T)) + square)

    def gaussian_product(self) -> tuple[np.ndarray, np.ndarray]:
        """The product of the shards' Gaussian approximations as one mean ``(D,)`` and one
        covariance ``(D, D)`` (zero between blocks)."""
        mean, covariances = self.gaussian()
        covariance = np.zeros((len(mean), len(mean)))
        for size, index in self.groups.items():
            covariance[index[:, :, None], index[:, None, :]] = covariances[size]
        return mean, covariance

    def parametric_draws(self, normal: np.ndarray) -> np.ndarray:
        """Draws ``(S, D)`` from the product of the shards' Gaussian approximations (one full
        block): μ + L z for the standard normal draws ``normal`` z ``(S, D)``, L L^T = Σ."""
        mean, covariances = self.gaussian()
        (covariance,) = covariances[len(mean)]
        return mean + normal @ np.linalg.cholesky(covariance).T


def hessian_covariance(precision: np.ndarray) -> np.ndarray | None:
    """Σ = H⁻¹ ``(D, D)`` for a shard's potential Hessian H ``(D, D)``
    (:func:`cmcflow.transforms.potential_derivatives`), or ``None`` where H is not finite and
    positive definite (then its draws weigh it)."""
    symmetric = (precision + precision.T) / 2
    if not np.isfinite(symmetric).all():
        return None
    try:
        root = np.linalg.cholesky(symmetric)
    except np.linalg.LinAlgError:
        return None
    inverse_root = np.linalg.inv(root)
    return inverse_root.T @ inverse_root


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
    accumulator = ConsensusAccumulator(
        blocks, *subposteriors[0].shape, shrinkage=shrinkage, shapes=shapes, chains=chains
    )
    for draws in subposteriors:
        accumulator.add(draws)
    return accumulator


@dataclass(frozen=True)
class ConsensusPlan:
    """How one combination weights the shards, decided once by :func:`plan_consensus`.

    ``method``: ``consensus``, ``consensus_diag`` or ``parametric``; ``covariance``: what
    the weights are, in words (recorded with the result); ``shrinkage``: λ in [0, 1] or
    ``"auto"`` where shrinkage applies, else 0; ``point_site``: a rigid model's aligned
    point cloud ``(N, 3)``, or ``None``; ``weights``: ``"hessian"`` (each shard's covariance
    is the inverse of its potential's Hessian, :func:`hessian_covariance`, where that is
    positive definite) or ``"draws"`` (the sample covariance of its draws).
    """

    method: str
    covariance: str
    shrinkage: float | str
    point_site: str | None
    weights: str = "draws"

    def blocks(self, like: Mapping[str, np.ndarray], sites: Sequence[str]) -> list[np.ndarray]:
        """The weight blocks over the flattened parameters of ``like`` ``{site: (S, …)}``:
        per-point blocks for a rigid model's consensus, singletons for ``consensus_diag``,
        otherwise one full block."""
        dimension = sum(int(np.prod(like[site].shape[1:], dtype=int)) for site in sites)
        if self.covariance == POINT_BLOCKS:
            return point_blocks(like, sites, self.point_site)
        if self.method == "consensus_diag":
            return [np.array([index]) for index in range(dimension)]
        return [np.arange(dimension)]


def plan_consensus(
    method: str, shrinkage: float | str, point_site: str | None, weights: str = "draws"
) -> ConsensusPlan:
    """The :class:`ConsensusPlan` of ``method`` with covariance ``shrinkage`` and ``weights``
    for a model whose aligned point cloud is ``point_site`` (``None``: not a rigid model).

    Aligned coordinates have a rank-deficient covariance (alignment removed the 6
    rigid-motion directions), so a rigid model's ``consensus`` weighs each point by its own
    3×3 block, and ``parametric`` (one full Gaussian) is refused. Shrinkage applies to
    neither ``consensus_diag`` (a diagonal has no shape to shrink) nor rigid models (their
    per-point blocks are estimated from thousands of draws each, and their accuracy was
    measured without it: bench/results/structure_accuracy.md). Hessian weights have no
    sampling noise to shrink away, and a rigid model has none (its Hessian is singular
    along the rigid motions, and its draws are aligned after sampling): it weighs by draws.
    """
    if weights not in WEIGHTS:
        raise InputError(f"unknown combine weights {weights!r}; choose one of {sorted(WEIGHTS)}")
    if method not in METHODS:
        raise InputError(f"unknown combine method {method!r}; choose one of {sorted(METHODS)}")
    covariance = METHODS[method]
    if point_site is not None and method == "consensus":
        covariance = POINT_BLOCKS
    if point_site is not None and method == "parametric":
        raise InputError(
            f"combine method {method!r} is not well posed for rigid models; use consensus or consensus_diag"
        )
    if point_site is not None:
        weights = "draws"
    applies = shrinkage != 0.0 and method != "consensus_diag" and point_site is None and weights == "draws"
    return ConsensusPlan(method, covariance, shrinkage if applies else 0.0, point_site, weights)
