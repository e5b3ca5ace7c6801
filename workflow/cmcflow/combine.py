"""The combine stage: screen the shards' runs, then combine the kept ones by consensus Monte
Carlo (:mod:`cmcflow.consensus`) in the unconstrained space, all latent sites jointly.

The unconstrained space is where subposteriors are closest to Gaussian; the combined
draws are then pushed through the model's support transforms (NumPyro's
``constrain_fn``) to give the constrained sites. The stage runs in named phases over one
:class:`~cmcflow.consensus.ConsensusPlan` decided once:

1. :func:`scan_shards` reads every shard once: failures, layout, screening summaries,
   moments for the report, the pooled covariance shape, distance moments;
2. :func:`select_shards` applies the failure policy and the screen (:mod:`cmcflow.screening`);
3. :func:`pooled_shapes` takes the screened-out shards back out of the pooled shape;
4. :func:`stream_combine` combines the kept shards one at a time; with
   ``combine.second_order`` the result is moved by the second-order term
   (:mod:`cmcflow.second_order`, :func:`second_order_term`);
5. a rigid model observed through distances is located by them (:mod:`cmcflow.locate`);
6. :func:`combined_record` writes down what was done;
7. where the importance correction runs, :func:`draw_proposal` draws its proposal from the
   Gaussian product (and, where the screen left shards out, from :func:`every_shard_product`
   too), with the prior and the constrained sites at every draw (the model is traced here
   already; a job of its own would pay Python, JAX and the model again).

Above ``STREAMING_ABOVE`` shards the draws are read twice (scan, combine) and never held
together, so memory does not grow with K.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat, tee
from typing import NamedTuple

import arviz as az
import jax
import numpy as np
import pandas as pd

from cmcflow import importance, screening
from cmcflow.consensus import (
    HESSIAN_MAX_PARAMETERS,
    SPREAD_MAX_PARAMETERS,
    WEIGHTS,
    ConsensusAccumulator,
    ConsensusPlan,
    block_shapes,
    flatten,
    group_blocks,
    hessian_covariance,
    mean_shapes,
    pack_constrained,
    plan_consensus,
    site_layout,
    unflatten,
    unflatten_draws,
)
from cmcflow.errors import InputError
from cmcflow.jaxenv import PRECISION
from cmcflow.likelihood import log_prior
from cmcflow.locate import distance_moments, locate_by_distances
from cmcflow.runs import constrained_moments, element_labels, is_failed, unconstrained_draws
from cmcflow.second_order import MAX_EXPANSION_RATIO, THIRD_DERIVATIVES_MAX_PARAMETERS, second_order_shift
from cmcflow.transforms import constrain_draws

log = logging.getLogger(__name__)

#: Above this many shards, combine streams: it never holds more than one shard's draws.
STREAMING_ABOVE = 500


@dataclass(frozen=True)
class CombineSettings:
    """The config's ``combine`` section, as the stage uses it.

    ``shrinkage``: ``covariance_shrinkage``; ``screen``: the screening thresholds, or
    ``None`` to combine every shard that did not fail; ``weights``: ``hessian`` or ``draws``
    (:data:`~cmcflow.consensus.WEIGHTS`); ``second_order``: move the combined posterior by
    the second-order term (:mod:`cmcflow.second_order`).
    """

    method: str
    seed: int
    shrinkage: float | str
    screen: Mapping[str, float] | None
    min_shards_fraction: float
    on_failed_shard: str
    weights: str
    second_order: bool

    @classmethod
    def from_config(cls, combine: Mapping) -> CombineSettings:
        return cls(
            weights=combine["weights"],
            method=combine["method"],
            seed=combine["seed"],
            shrinkage=combine["covariance_shrinkage"],
            screen=combine["screen"],
            min_shards_fraction=combine["min_shards_fraction"],
            on_failed_shard=combine["on_failed_shard"],
            second_order=combine["second_order"],
        )


def stream_combine(
    shard_draws: Iterable[Mapping[str, np.ndarray]],
    like: Mapping[str, np.ndarray],
    plan: ConsensusPlan,
    rng_key: jax.Array,
    *,
    shapes: Mapping[int, np.ndarray] | None = None,
    chains: int = 1,
    shard_covariances: Iterable[np.ndarray | None] | None = None,
) -> tuple[dict[str, np.ndarray], ConsensusAccumulator]:
    """Combine shards given one ``{site: (S, …)}`` at a time by ``plan``
    (:class:`~cmcflow.consensus.ConsensusAccumulator`); ``like``: any shard's draws, for the
    layout; ``shapes``: the pooled :func:`~cmcflow.consensus.block_shapes` of the shards,
    needed when the plan shrinks; ``chains``: the chains in each S; ``shard_covariances``:
    for each shard a covariance ``(D, D)`` to weigh it by, or ``None`` (its draws' own).
    ``parametric`` draws from the Gaussian product with standard normals from ``rng_key``.

    Returns the combined draws ``{site: (S, …)}`` and the accumulator (the shards'
    shrinkage intensities λ, their Gaussian product).
    """
    sites = list(like)
    flat_like = flatten(like, sites)
    accumulator = ConsensusAccumulator(
        plan.blocks(like, sites), *flat_like.shape, shrinkage=plan.shrinkage, shapes=shapes, chains=chains
    )
    covariances = repeat(None) if shard_covariances is None else shard_covariances
    for draws, covariance in zip(shard_draws, covariances):
        accumulator.add(flatten(draws, sites), covariance)
    if plan.method == "parametric":
        combined = accumulator.parametric_draws(np.asarray(jax.random.normal(rng_key, flat_like.shape)))
    else:
        combined = accumulator.draws()
    return unflatten(combined, like, sites), accumulator


def combine_draws(
    subposteriors: Sequence[Mapping[str, np.ndarray]],
    method: str,
    rng_key: jax.Array,
    point_site: str | None = None,
    *,
    shrinkage: float | str = 0.0,
    chains: int = 1,
) -> dict[str, np.ndarray]:
    """Combine K subposteriors held in memory, each ``{site: (S, …)}`` with the same S, into
    ``{site: (S, …)}``: :func:`stream_combine` with the shapes pooled over all of them."""
    plan = plan_consensus(method, shrinkage, point_site)
    counts = {len(next(iter(sub.values()))) for sub in subposteriors}
    if len(counts) != 1:
        raise InputError(f"shards have different numbers of draws {sorted(counts)}; combine needs equal counts")
    sites = list(subposteriors[0])
    shapes = None
    if plan.shrinkage != 0.0:
        groups = group_blocks(plan.blocks(subposteriors[0], sites))
        shapes = mean_shapes([block_shapes(flatten(sub, sites), groups) for sub in subposteriors])
    return stream_combine(subposteriors, subposteriors[0], plan, rng_key, shapes=shapes, chains=chains)[0]


class Combination(NamedTuple):
    """What :func:`combine_shards` returns: the combined InferenceData, the shard record
    (:func:`combined_record`), every shard's constrained means and sds, the Gaussian
    product of the kept shards (``mean (D,)``, ``covariance (D, D)``, the sites' ``layout``:
    what the importance correction proposes from) and, where the screen left out shards
    whose draws are finite, the product of every such shard too (:func:`every_shard_product`;
    else ``None``)."""

    idata: az.InferenceData
    record: dict
    moments: pd.DataFrame
    gaussian: dict
    every_shard: dict | None = None


@dataclass
class ShardScan:
    """What one read of every shard run leaves behind (:func:`scan_shards`).

    ``layout``: (chains, draws) shared by every run; ``sites``, ``dims``: the latent sites
    and their ArviZ dims; ``summaries``: screening summaries; ``moments``: constrained
    means and sds per shard (for the report); ``shape_sums``, ``shaped``: the sum of the
    shards' :func:`~cmcflow.consensus.block_shapes` and the shards in it;
    ``distance_moments``: per shard, the mean and variance of each observed distance;
    ``draws``: the unconstrained draws of every run, unless streaming; ``covariances``: with
    Hessian weights, every run's :func:`shard_covariance` unless streaming;
    ``weighed_by_draws``: with Hessian weights, the runs without a usable one;
    ``with_third``: where the second-order term is asked for, the runs with a usable Hessian
    and third derivatives, their means ``(D,)`` in ``shard_means`` and, unless streaming,
    their third derivatives ``(D, D, D)`` in ``thirds``.
    """

    failed: list[dict] = field(default_factory=list)
    layout: tuple[int, int] | None = None
    sites: list[str] = field(default_factory=list)
    dims: dict[str, list[str]] = field(default_factory=dict)
    like: dict[str, np.ndarray] | None = None
    summaries: list[screening.ShardSummary] = field(default_factory=list)
    moments: list[pd.DataFrame] = field(default_factory=list)
    shape_sums: dict[int, np.ndarray] = field(default_factory=dict)
    shaped: set[int] = field(default_factory=set)
    distance_moments: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    draws: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    covariances: dict[int, np.ndarray | None] = field(default_factory=dict)
    weighed_by_draws: set[int] = field(default_factory=set)
    with_third: set[int] = field(default_factory=set)
    shard_means: dict[int, np.ndarray] = field(default_factory=dict)
    thirds: dict[int, np.ndarray] = field(default_factory=dict)


def scan_shards(
    load: Callable[[int], az.InferenceData],
    num_shards: int,
    plan: ConsensusPlan,
    *,
    streaming: bool,
    diagnostics: Sequence[Mapping] | None,
    point_pairs: np.ndarray | None,
    second_order: bool = False,
) -> ShardScan:
    """Read every shard run ``load(0) … load(K − 1)`` once; every run that did not fail must
    share the first one's sites and (chains, draws) layout. ``second_order``: note the runs
    with a usable Hessian and third derivatives, for the second-order term."""
    scan, groups, first_shard = ShardScan(), None, None
    for shard in range(num_shards):
        run = load(shard)
        if is_failed(run):
            scan.failed.append({"shard": shard, "reason": f"failed: {run.posterior.attrs['error']}"})
            continue
        draws, layout = unconstrained_draws(run)
        if scan.layout is None:
            scan.layout, scan.sites, scan.like, first_shard = layout, list(draws), draws, shard
            scan.dims = {name: list(run.posterior[name].dims[2:]) for name in draws}
            groups = group_blocks(plan.blocks(draws, scan.sites))
        if list(draws) != scan.sites or layout != scan.layout:
            raise InputError(
                f"shard {shard} has sites {list(draws)} and {layout[0]}x{layout[1]} draws; "
                f"shard {first_shard} has {scan.sites} and {scan.layout[0]}x{scan.layout[1]}"
            )
        scan.moments.append(constrained_moments(shard, run.posterior))
        flat = flatten(draws, scan.sites)
        if diagnostics is not None:
            scan.summaries.append(screening.summarise(shard, flat, diagnostics[shard]))
        if plan.shrinkage != 0.0 and np.isfinite(flat).all():
            for size, shape in block_shapes(flat, groups).items():
                scan.shape_sums[size] = scan.shape_sums.get(size, 0.0) + shape
            scan.shaped.add(shard)
        if point_pairs is not None:
            scan.distance_moments[shard] = distance_moments(draws[plan.point_site], point_pairs)
        if plan.weights == "hessian":
            covariance = shard_covariance(run)
            if covariance is None:
                scan.weighed_by_draws.add(shard)
            elif second_order and "third_derivatives" in run.curvature:
                scan.with_third.add(shard)
                scan.shard_means[shard] = flat.mean(axis=0)
                if not streaming:
                    scan.thirds[shard] = run.curvature["third_derivatives"].values
            if not streaming:
                scan.covariances[shard] = covariance
        if not streaming:
            scan.draws[shard] = draws
    return scan


def shard_covariance(run: az.InferenceData) -> np.ndarray | None:
    """The inverse of a run's potential Hessian ``(D, D)`` (its ``curvature`` group, written by
    the sample stage), or ``None`` where the run has none or it is not positive definite."""
    if "curvature" not in run.groups():
        return None
    return hessian_covariance(run.curvature["precision"].values)


def select_shards(
    scan: ShardScan, num_shards: int, settings: CombineSettings, sample_paths: Sequence[str] | None = None
) -> tuple[list[int], list[dict]]:
    """The shards to combine, and the excluded ones with their reasons: failed shards stop
    the run (``on_failed_shard="fail"``; the message names the command that resamples them,
    given their ``sample_paths``, the sample jobs' outputs by shard) or are excluded
    (``"skip"``); the rest are screened when ``settings.screen`` is given; too few kept
    shards stop the run."""
    if scan.failed and settings.on_failed_shard == "fail":
        failed = [entry["shard"] for entry in scan.failed]
        targets = " ".join(sample_paths[shard] for shard in failed) if sample_paths else "<their sample outputs>"
        raise InputError(
            f"{len(failed)} of {num_shards} sample jobs failed: "
            + "; ".join(f"shard {entry['shard']}: {entry['reason']}" for entry in scan.failed)
            + f". Once the cause is fixed, `snakemake --forcerun {targets}` samples them again"
            + ("; or set combine.on_failed_shard: skip to combine the others" if len(failed) < num_shards else "")
        )
    if settings.screen is not None:
        kept, excluded = screening.screen(scan.summaries, settings.screen)
    else:
        failed_shards = {entry["shard"] for entry in scan.failed}
        kept, excluded = [shard for shard in range(num_shards) if shard not in failed_shards], []
    excluded = sorted(scan.failed + excluded, key=lambda entry: entry["shard"])
    screening.require_enough(kept, excluded, num_shards, settings.min_shards_fraction)
    for entry in excluded:
        log.warning("shard %d excluded: %s", entry["shard"], entry["reason"])
    return kept, excluded


def pooled_shapes(
    scan: ShardScan, kept: Sequence[int], plan: ConsensusPlan, draws_of: Callable[[int], Mapping[str, np.ndarray]]
) -> dict[int, np.ndarray] | None:
    """The mean covariance shape of the ``kept`` shards (``None`` when the plan does not
    shrink): the scan's sum with the shards screened out taken back out."""
    if plan.shrinkage == 0.0:
        return None
    groups = group_blocks(plan.blocks(scan.like, scan.sites))
    sums = dict(scan.shape_sums)
    for shard in sorted(scan.shaped - set(kept)):
        for size, shape in block_shapes(flatten(draws_of(shard), scan.sites), groups).items():
            sums[size] = sums[size] - shape
    return {size: total / len(kept) for size, total in sums.items()}


def combined_record(
    plan: ConsensusPlan, scan: ShardScan, kept: list[int], excluded: list[dict], num_shards: int, **facts
) -> dict:
    """The shard record of a combination (``combined/shards.json``): method, weights, used
    and excluded shards with reasons, each shard's outlier score; ``facts``: more entries
    (streaming, location, shrinkage intensities, the kept shards' disagreement)."""
    return {
        "method": plan.method,
        "covariance": plan.covariance,
        "space": "unconstrained",
        "covariance_shrinkage": plan.shrinkage,
        "num_shards": num_shards,
        "used": kept,
        "excluded": excluded,
        # every shard's prior was tempered to 1/K: the combined posterior holds prior^(kept/K)
        "prior_power": len(kept) / num_shards,
        "max_abs_z": {str(shard): z for shard, z in screening.final_outlier_scores(scan.summaries, kept).items()},
        **facts,
    }


#: Entries of the shard record that are not copied into the combined posterior's attributes.
RECORD_ONLY = (
    "disagreement",
    "used",
    "excluded",
    "failed",
    "streaming",
    "max_abs_z",
    "max_outlier_z",
    "shrinkage_intensity",
    "weighed_by_draws",
    "second_order",
)


def combine_shards(
    load: Callable[[int], az.InferenceData],
    num_shards: int,
    model,
    model_kwargs: Mapping,
    settings: CombineSettings,
    *,
    diagnostics: Sequence[Mapping] | None = None,
    point_site: str | None = None,
    point_pairs: np.ndarray | None = None,
    sample_paths: Sequence[str] | None = None,
    corrected: bool = False,
) -> Combination:
    """Screen and combine the shard runs ``load(0) … load(K − 1)`` of ``model(**model_kwargs)``.

    ``diagnostics``: the shards' own diagnostics, for screening (needed when
    ``settings.screen`` is given); ``point_site``: a rigid model's aligned point cloud;
    ``point_pairs (P, 2)``: the point pairs whose distances the data observe, given which
    the combined structure is located by them; ``sample_paths``: the sample jobs' outputs by
    shard, named in the message when failed shards stop the run; ``corrected``: the
    importance correction runs, so the product of every shard is formed where the screen
    left some out (:attr:`Combination.every_shard`). Returns the :class:`Combination`.

    Draws keep the shards' (chain, draw) layout: combined draw (c, j) merges draw (c, j) of
    every shard. The chains of a combined posterior are not independent MCMC chains, so
    R-hat and ESS belong to the shards, never to the combined draws.
    """
    plan = plan_consensus(settings.method, settings.shrinkage, point_site, settings.weights)
    streaming = num_shards > STREAMING_ABOVE
    scan = scan_shards(
        load,
        num_shards,
        plan,
        streaming=streaming,
        diagnostics=diagnostics if settings.screen is not None else None,
        point_pairs=point_pairs,
        second_order=settings.second_order,
    )
    kept, excluded = select_shards(scan, num_shards, settings, sample_paths)

    def draws_of(shard: int) -> Mapping[str, np.ndarray]:
        return unconstrained_draws(load(shard))[0] if streaming else scan.draws[shard]

    def weighed(shard: int) -> tuple[Mapping[str, np.ndarray], np.ndarray | None]:
        """The shard's draws and the covariance that weighs it (``None``: its draws')."""
        if not streaming:
            return scan.draws[shard], scan.covariances.get(shard)
        run = load(shard)
        covariance = shard_covariance(run) if plan.weights == "hessian" else None
        return unconstrained_draws(run)[0], covariance

    for_draws, for_covariances = tee(weighed(shard) for shard in kept)
    combined, accumulator = stream_combine(
        (draws for draws, _ in for_draws),
        scan.like,
        plan,
        jax.random.PRNGKey(settings.seed),
        shapes=pooled_shapes(scan, kept, plan, draws_of),
        chains=scan.layout[0],
        shard_covariances=(covariance for _, covariance in for_covariances),
    )
    facts = {
        "streaming": streaming,
        "weights": WEIGHTS[plan.weights],
        "precision": PRECISION.name,
        "failed": sorted(entry["shard"] for entry in scan.failed),
    }
    if plan.weights == "hessian":
        facts["weighed_by_draws"] = sorted(scan.weighed_by_draws & set(kept))
        if facts["weighed_by_draws"]:
            log.warning(
                "shards %s have no usable Hessian (not positive definite at the posterior mean, or none computed: "
                "more than %d parameters); their draws' covariance weighs them",
                facts["weighed_by_draws"],
                HESSIAN_MAX_PARAMETERS,
            )
    mean, covariance = accumulator.gaussian_product()
    if settings.second_order:
        facts["second_order"], shift = second_order_term(scan, kept, plan, load, mean, covariance)
        if shift is not None:
            mean = mean - shift
            moved = unflatten(shift[None, :], scan.like, scan.sites)
            combined = {name: values - moved[name] for name, values in combined.items()}
    if point_site is not None:
        facts["location"] = "coordinate consensus"
    if point_pairs is not None:
        moments = [scan.distance_moments[shard] for shard in kept]
        combined[point_site], shift = locate_by_distances(combined[point_site], moments, point_pairs)
        facts |= {
            "location": f"distance consensus over {len(point_pairs)} observed pairs",
            "location_shift_rmsd": shift,
        }
        log.info("combined structure located by %s: its mean moved %.3f Å", facts["location"], shift)
    if plan.shrinkage != 0.0:
        facts["shrinkage_intensity"] = {str(shard): weight for shard, weight in zip(kept, accumulator.intensities)}
    if settings.screen is not None:
        facts["max_outlier_z"] = settings.screen["max_outlier_z"]
    if len(kept) > 1:
        disagreement = facts["disagreement"] = screening.disagreement_test(
            *accumulator.disagreement(), accumulator.disagreement_variance()
        )
        if accumulator.block_diagonal and "variance" not in disagreement:
            disagreement["approximate"] = (
                f"block weights over more than {SPREAD_MAX_PARAMETERS} parameters: χ²'s p-value, which the "
                "correlations between blocks make too small"
            )
        if disagreement["p_value"] < screening.DISAGREEMENT_P_VALUE:
            log.warning(
                "the kept shards' means disagree more than their posteriors allow: Q = %.1f against %d expected "
                "(p = %.2g); the model may not describe every shard's rows alike, and a Gaussian "
                "combination may be biased",
                disagreement["statistic"],
                disagreement["degrees_of_freedom"],
                disagreement["p_value"],
            )
    record = combined_record(plan, scan, kept, excluded, num_shards, **facts)
    idata = combined_idata(combined, scan, model, model_kwargs)
    idata.posterior.attrs.update({key: value for key, value in record.items() if key not in RECORD_ONLY})
    idata.posterior.attrs["num_shards_used"] = len(kept)
    gaussian = {"mean": mean, "covariance": covariance, "layout": site_layout(scan.like)}
    every_shard = None
    screened_out = sorted({summary.shard for summary in scan.summaries if summary.finite} - set(kept))
    if corrected and screened_out:
        every_shard = every_shard_product(accumulator, (weighed(shard) for shard in screened_out), scan.sites)
        if every_shard is None:
            log.warning(
                "shards %s: no Gaussian product with them (a covariance is singular); the correction proposes from "
                "the kept shards' alone",
                screened_out,
            )
        else:
            every_shard["layout"] = gaussian["layout"]
            if settings.second_order and record["second_order"]["applied"]:  # moved as the kept shards' is
                every = sorted([*kept, *screened_out])
                term, shift = second_order_term(
                    scan, every, plan, load, every_shard["mean"], every_shard["covariance"], "every shard's product"
                )
                record["second_order"]["every_shard_product"] = term
                if shift is not None:
                    every_shard["mean"] = every_shard["mean"] - shift
    return Combination(idata, record, pd.concat(scan.moments, ignore_index=True), gaussian, every_shard)


def second_order_term(
    scan: ShardScan,
    kept: Sequence[int],
    plan: ConsensusPlan,
    load: Callable[[int], az.InferenceData],
    mean: np.ndarray,
    covariance: np.ndarray,
    product: str = "the combination",
) -> tuple[dict, np.ndarray | None]:
    """The second-order term δ ``(D,)`` of the ``kept`` shards' Gaussian product (``mean``
    m̄ ``(D,)``, ``covariance`` P⁻¹ ``(D, D)``; :func:`~cmcflow.second_order.second_order_shift`)
    and its record: δ in the product's sd per parameter (unconstrained), the largest, and the
    shards' expansion ratios ρ_s. ``None`` and the record's reason and cause
    (:func:`not_applied`) where it does not apply, the plain product kept: where the
    settings or the model rule it out (a rigid model, weights other than full inverse
    Hessians, more than :data:`~cmcflow.second_order.THIRD_DERIVATIVES_MAX_PARAMETERS`
    parameters: logged as information), and with a warning that names the ``product`` where
    the shards do (a kept shard without a usable Hessian or third derivatives, or a ρ_s
    above :data:`~cmcflow.second_order.MAX_EXPANSION_RATIO`: the expansion does not hold
    there).
    A streaming combine reads the kept runs once more."""
    if plan.point_site is not None:
        return not_applied("not for rigid models (align fixes their frame after sampling)", product, "settings"), None
    if plan.weights != "hessian" or plan.method == "consensus_diag":
        reason = (
            "needs full-covariance Hessian weights (combine.weights: hessian with method consensus or parametric), "
            f"not weights: {plan.weights} with method: {plan.method}"
        )
        return not_applied(reason, product, "settings"), None
    if mean.size > THIRD_DERIVATIVES_MAX_PARAMETERS:
        reason = (
            f"the model has {mean.size} unconstrained parameters; the sample jobs compute third derivatives for at "
            f"most {THIRD_DERIVATIVES_MAX_PARAMETERS}"
        )
        return not_applied(reason, product, "settings"), None
    if without_hessian := sorted(set(kept) & scan.weighed_by_draws):
        reason = f"shards {without_hessian} have no usable Hessian (not positive definite at their posterior mean)"
        return not_applied(reason, product, "shards"), None
    if missing := sorted(set(kept) - scan.with_third):
        reason = f"shards {missing} have no third derivatives (sampled with combine.second_order: false)"
        return not_applied(reason, product, "shards"), None

    def expansions():
        for shard in kept:
            if shard in scan.thirds:
                yield scan.shard_means[shard], scan.covariances[shard], scan.thirds[shard]
            else:
                run = load(shard)
                yield scan.shard_means[shard], shard_covariance(run), run.curvature["third_derivatives"].values

    shift, ratios = second_order_shift(mean, covariance, expansions())
    in_sd = shift / np.sqrt(np.diag(covariance))
    labels = [label for site in scan.sites for label in element_labels(site, scan.like[site].shape[1:])]
    largest = int(np.argmax(np.abs(in_sd)))
    record = {
        "max_abs_shift_sd": float(abs(in_sd[largest])),
        "largest": labels[largest],
        "shift_sd": dict(zip(labels, in_sd.tolist())),
        "space": "unconstrained",
        "expansion_ratio": {str(shard): float(ratio) for shard, ratio in zip(kept, ratios)},
    }
    if ratios.max() > MAX_EXPANSION_RATIO:
        worst = kept[int(np.argmax(ratios))]
        reason = (
            f"shard {worst}'s expansion ratio ρ = {ratios.max():.2f} exceeds {MAX_EXPANSION_RATIO}: the shards sit "
            "too far apart, for their size, for a second-order expansion (use fewer, larger shards)"
        )
        return not_applied(reason, product, "shards") | record, None
    log.info("second-order term: %s moved by up to %.3f sd (%s)", product, in_sd[largest], labels[largest])
    return {"applied": True} | record, shift


def not_applied(reason: str, product: str, cause: str) -> dict:
    """The record of a second-order term not applied to ``product`` for ``reason``, and
    its ``cause``: ``"settings"`` (the settings or the model rule the term out: logged as
    information) or ``"shards"`` (the shards do: a warning)."""
    (log.warning if cause == "shards" else log.info)("combine.second_order: %s not moved: %s", product, reason)
    return {"applied": False, "reason": reason, "cause": cause}


def every_shard_product(
    accumulator: ConsensusAccumulator,
    screened_out: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray | None]],
    sites: Sequence[str],
) -> dict[str, np.ndarray] | None:
    """The Gaussian product of the kept shards (``accumulator``) and the ``screened_out``
    ones (each its draws ``{site: (S, …)}`` and the covariance that weighs it, or ``None``:
    its draws'), weighed as the kept ones were: ``mean (D,)`` and ``covariance (D, D)``.

    The importance correction's target holds every shard's rows, the screened-out ones'
    too, so this product is closer to it where those shards were left out for rows that
    truly differ (influential rows, model misfit) and further where their runs went wrong;
    the proposal mixes it with the kept shards' product (:func:`draw_proposal`). ``None``
    where a screened-out shard's draws leave a covariance singular (draws that never moved)."""
    every = copy.deepcopy(accumulator)
    try:
        for draws, covariance in screened_out:
            every.add(flatten(draws, sites), covariance)
        mean, covariance = every.gaussian_product()
        np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        return None
    if not (np.isfinite(mean).all() and np.isfinite(covariance).all()):
        return None
    return {"mean": mean, "covariance": covariance}


def combined_idata(
    combined: Mapping[str, np.ndarray], scan: ShardScan, model, model_kwargs: Mapping
) -> az.InferenceData:
    """The combined unconstrained draws ``{site: (S, …)}`` in the shards' (chain, draw)
    layout, with the constrained ``posterior`` group beside them."""
    chains, draws = scan.layout
    unconstrained = {name: value.reshape(chains, draws, *value.shape[1:]) for name, value in combined.items()}
    constrained = constrain_draws(model, model_kwargs, unconstrained, batch_ndims=2)
    return az.InferenceData(
        posterior=az.dict_to_dataset(constrained, library=None, dims=scan.dims),
        unconstrained_posterior=az.dict_to_dataset(unconstrained, library=None),
    )


def draw_proposal(
    model: Callable,
    kwargs: Mapping,
    gaussian: Mapping[str, np.ndarray],
    settings: Mapping,
    every_shard: Mapping[str, np.ndarray] | None = None,
) -> dict:
    """The importance correction's proposal (:func:`cmcflow.importance.propose`, the config's
    ``correct`` section) for the Gaussian product ``gaussian`` (``mean (D,)``, ``covariance
    (D, D)``, ``layout``), with what the later stages need of the model at its draws, so that
    only reweight evaluates the model again: ``draws (M, D)`` (unconstrained),
    ``log_density (M,)`` (log q), ``log_prior (M,)`` (log p(T θ) + log |J_T(θ)|, the whole
    prior) and every site of the model constrained, deterministic ones included
    (:func:`cmcflow.consensus.pack_constrained`).

    ``every_shard``: the product of every shard, the screened-out ones too
    (:attr:`Combination.every_shard`); given, the proposal is the equal mixture of the two
    (half the draws from each): defensive, as the correction's target holds the
    screened-out shards' rows while the screen may have left them out for a run that went
    wrong; whichever product is closer to the target carries the weights, at a cost of at
    most half the effective sample size."""
    proposal = importance.propose([gaussian] + ([every_shard] if every_shard is not None else []), settings)
    draws = unflatten_draws(proposal["draws"], str(proposal["layout"]))
    constrained = constrain_draws(model, kwargs, draws, batch_ndims=1)
    return {**proposal, "log_prior": log_prior(model, kwargs, draws, 1.0), **pack_constrained(constrained)}


def combine_runs(
    runs: Sequence[az.InferenceData],
    model,
    model_kwargs: Mapping,
    method: str,
    seed: int,
    *,
    shrinkage: float | str,
    weights: str,
    point_site: str | None = None,
    point_pairs: np.ndarray | None = None,
) -> az.InferenceData:
    """:func:`combine_shards` of runs already in memory, without screening."""
    settings = CombineSettings(
        method,
        seed,
        shrinkage,
        screen=None,
        min_shards_fraction=1.0,
        on_failed_shard="fail",
        weights=weights,
        second_order=False,
    )
    return combine_shards(
        runs.__getitem__, len(runs), model, model_kwargs, settings, point_site=point_site, point_pairs=point_pairs
    ).idata
