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


class ConsensusAccumulator:
    """Consensus Monte Carlo with block-diagonal weights, one shard at a time.

    ``blocks``: index arrays partitioning range(D) (one block of all D: full covariance;
    singletons: diagonal). For every block b it keeps Σ_s W_s,b and Σ_s W_s,b θ_s,j[b], where
    W_s,b is the inverse sample covariance of shard s on block b, so memory is
    O(S·D + Σ_b d_b²) whatever the number of shards, and no synthetic draw is ever combined
    again. :meth:`draws` gives θ_j[b] = (Σ_s W_s,b)⁻¹ Σ_s W_s,b θ_s,j[b] ``(S, D)``;
    :meth:`gaussian` the product of the shards' Gaussian approximations (mean ``(D,)`` and the
    covariance of each block).
    """

    def __init__(self, blocks: Sequence[np.ndarray], num_draws: int, dimension: int):
        self.groups = {
            size: np.stack([block for block in blocks if len(block) == size]) for size in {len(block) for block in blocks}
        }  # size -> (B, size) indices
        self.precision = {size: np.zeros((len(index), size, size)) for size, index in self.groups.items()}
        self.weighted_draws = np.zeros((num_draws, dimension))
        self.weighted_mean = np.zeros(dimension)

    def add(self, draws: np.ndarray) -> None:
        """Add one shard's draws ``(S, D)``."""
        for size, index in self.groups.items():
            values = draws[:, index]  # (S, B, size)
            mean = values.mean(axis=0)
            centred = values - mean
            weights = np.linalg.inv(np.einsum("sbi,sbj->bij", centred, centred) / (len(draws) - 1))
            self.precision[size] += weights
            self.weighted_draws[:, index] += np.einsum("bij,sbj->sbi", weights, values)
            self.weighted_mean[index] += np.einsum("bij,bj->bi", weights, mean)

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


def block_consensus(subposteriors: Sequence[np.ndarray], blocks: Sequence[np.ndarray]) -> np.ndarray:
    """Consensus Monte Carlo with block-diagonal weights (:class:`ConsensusAccumulator`) of K
    subposteriors ``(S, D)``; returns ``(S, D)``."""
    accumulator = ConsensusAccumulator(blocks, *subposteriors[0].shape)
    for draws in subposteriors:
        accumulator.add(draws)
    return accumulator.draws()


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


def combine_draws(
    subposteriors: Sequence[Mapping[str, np.ndarray]], method: str, rng_key: jax.Array, point_site: str | None = None
) -> dict[str, np.ndarray]:
    """Combine K subposteriors, each ``{site: (S, …)}`` with the same S, into ``{site: (S, …)}``.

    ``point_site``: the aligned point cloud of a rigid model (see :func:`covariance_structure`).
    """
    draws = {len(next(iter(sub.values()))) for sub in subposteriors}
    if len(draws) != 1:
        raise InputError(f"shards have different numbers of draws {sorted(draws)}; combine needs equal counts")
    if covariance_structure(method, point_site) == POINT_BLOCKS:
        sites = list(subposteriors[0])
        blocks = point_blocks(subposteriors[0], sites, point_site)
        combined = block_consensus([flatten(sub, sites) for sub in subposteriors], blocks)
        return unflatten(combined, subposteriors[0], sites)
    if method == "consensus":
        combined = consensus(list(subposteriors), diagonal=False)
    elif method == "consensus_diag":
        combined = consensus(list(subposteriors), diagonal=True)
    elif method == "parametric":
        combined = parametric_draws(list(subposteriors), num_draws=draws.pop(), diagonal=False, rng_key=rng_key)
    else:
        raise InputError(f"unknown combine method {method!r}; choose one of {sorted(METHODS)}")
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
    Above ``STREAMING_ABOVE`` shards the draws are read twice (summaries, then a
    :class:`ConsensusAccumulator`) and never held together.

    Draws keep the shards' (chain, draw) layout: combined draw (c, j) merges draw (c, j) of
    every shard. The chains of a combined posterior are not independent MCMC chains, so
    R-hat and ESS belong to the shards, never to the combined draws.
    """
    streaming = num_shards > STREAMING_ABOVE
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
        if list(draws) != sites or shape != layout:
            raise InputError(
                f"shard {shard} has sites {list(draws)} and {shape[0]}x{shape[1]} draws; "
                f"shard {first_shard} has {sites} and {layout[0]}x{layout[1]}"
            )
        moments.append(constrained_moments(shard, run.posterior))
        if screen_thresholds is not None:
            summaries.append(screening.summarise(shard, flatten(draws, sites), diagnostics[shard]))
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

    rng_key = jax.random.PRNGKey(seed)
    if streaming:
        combined = stream_combine((unconstrained_draws(load(shard))[0] for shard in kept), first, method, rng_key, point_site)
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
        {key: value for key, value in record.items() if key not in ("used", "excluded", "streaming", "max_abs_z", "max_outlier_z")}
    )
    idata.posterior.attrs["num_shards_used"] = len(kept)
    return idata, record, pd.concat(moments, ignore_index=True)


def stream_combine(
    shard_draws: Iterable[Mapping[str, np.ndarray]],
    like: Mapping[str, np.ndarray],
    method: str,
    rng_key: jax.Array,
    point_site: str | None,
) -> dict[str, np.ndarray]:
    """:func:`combine_draws` for many shards, one ``{site: (S, …)}`` at a time
    (:class:`ConsensusAccumulator`); ``like``: any shard's draws, for the layout."""
    sites = list(like)
    structure = covariance_structure(method, point_site)
    dimension = flatten(like, sites).shape[1]
    if structure == POINT_BLOCKS:
        blocks = point_blocks(like, sites, point_site)
    elif method == "consensus_diag":
        blocks = [np.array([index]) for index in range(dimension)]
    else:
        blocks = [np.arange(dimension)]
    num_draws = len(next(iter(like.values())))
    accumulator = ConsensusAccumulator(blocks, num_draws, dimension)
    for draws in shard_draws:
        accumulator.add(flatten(draws, sites))
    if method == "parametric":
        mean, covariances = accumulator.gaussian()
        normal = np.asarray(jax.random.normal(rng_key, (num_draws, dimension)))
        combined = mean + normal @ np.linalg.cholesky(covariances[dimension][0]).T
    else:
        combined = accumulator.draws()
    return unflatten(combined, like, sites)


def combine_runs(
    runs: Sequence[az.InferenceData],
    model,
    model_kwargs: Mapping,
    method: str,
    seed: int,
    point_site: str | None = None,
    point_pairs: np.ndarray | None = None,
) -> az.InferenceData:
    """:func:`combine_shards` of runs already in memory, without screening."""
    idata, _, _ = combine_shards(
        runs.__getitem__, len(runs), model, model_kwargs, method, seed, point_site=point_site, point_pairs=point_pairs
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
