"""Shard screening: which subposteriors combine uses, and why the others are left out.

One policy over all parameters at once, thresholds from the config (``combine.screen``).
A shard is excluded, with its reason recorded, when

- ``non-finite``: any of its draws is NaN or infinite;
- ``divergences``: its divergence rate exceeds ``max_divergence_rate``;
- ``r_hat``: its largest split R-hat exceeds ``max_r_hat``;
- ``ess``: its smallest bulk ESS is below ``min_ess``;
- ``outlier``: its posterior mean is far from the others'. Per parameter p,
  z_s,p = (μ_s,p − μ_p) / √(σ²_s,p − σ²_p), where μ_p, σ²_p are the precision-weighted
  (Gaussian product) combination of the shards still kept: if every subposterior is
  centred on the same value with its own spread, μ_s − μ has variance σ²_s − σ² (μ includes
  shard s). A shard whose largest |z_s,p| exceeds ``max_outlier_z`` is an outlier; the
  worst one is excluded and the test repeated on the rest, so one wild shard cannot hide
  behind the mean it drags.

Diagnostics are the shard's own (on aligned draws for rigid models), never those of the
combined synthetic draws. Fewer kept shards than ``min_shards_fraction`` of K fails the
run with a message naming every excluded shard and its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import special

from cmcflow.errors import InputError

#: A shard whose NUTS trajectories reach the largest tree on more than this share of its
#: iterations is flagged, not excluded (sample log, report): sampling it was slow and each
#: draw moved less far than NUTS wanted.
TREE_DEPTH_WARNING = 0.1
#: σ²_s − σ² is floored at this fraction of σ²_s (a shard far more precise than the
#: combination of all shards would otherwise divide by ~0).
MIN_VARIANCE_EXCESS = 0.01
#: Below this χ² p-value the kept shards' means disagree more than their posteriors allow
#: (:func:`disagreement_test`): combine warns and the report says so.
DISAGREEMENT_P_VALUE = 1e-3


@dataclass(frozen=True)
class ShardSummary:
    """What screening needs of one shard: ``mean``, ``variance`` ``(D,)`` of its flat
    unconstrained draws, whether all draws are finite, and its diagnostics."""

    shard: int
    mean: np.ndarray
    variance: np.ndarray
    finite: bool
    max_r_hat: float
    min_ess_bulk: float
    divergence_rate: float


def summarise(shard: int, draws: np.ndarray, diagnostics: Mapping) -> ShardSummary:
    """``draws (S, D)`` flat unconstrained draws and the shard's diagnostics dict."""
    finite = bool(np.isfinite(draws).all())
    return ShardSummary(
        shard=shard,
        mean=draws.mean(axis=0) if finite else np.full(draws.shape[1], np.nan),
        variance=draws.var(axis=0, ddof=1) if finite else np.full(draws.shape[1], np.nan),
        finite=finite,
        max_r_hat=float(diagnostics["max_r_hat"]),
        min_ess_bulk=float(diagnostics["min_ess_bulk"]),
        divergence_rate=float(diagnostics["divergence_rate"]),
    )


def diagnostic_reason(summary: ShardSummary, thresholds: Mapping[str, float]) -> str | None:
    """Why the shard fails a per-shard check, or ``None``."""
    if not summary.finite:
        return "non-finite: some draws are NaN or infinite"
    if summary.divergence_rate > thresholds["max_divergence_rate"]:
        return f"divergences: rate {summary.divergence_rate:.3g} > {thresholds['max_divergence_rate']}"
    if not summary.max_r_hat <= thresholds["max_r_hat"]:  # NaN R-hat fails too
        return f"r_hat: max {summary.max_r_hat:.3f} > {thresholds['max_r_hat']}"
    if not summary.min_ess_bulk >= thresholds["min_ess"]:
        return f"ess: min bulk ESS {summary.min_ess_bulk:.0f} < {thresholds['min_ess']}"
    return None


def outlier_scores(summaries: Sequence[ShardSummary], reference: Sequence[ShardSummary] | None = None) -> np.ndarray:
    """``(K,)`` max over parameters of |z_s,p| (see the module docstring), with μ, σ² the
    combination of ``reference`` (default: the same shards)."""
    reference = summaries if reference is None else reference
    means = np.stack([s.mean for s in summaries])  # (K, D)
    variances = np.stack([s.variance for s in summaries])
    precision = 1.0 / np.stack([s.variance for s in reference])
    reference_means = np.stack([s.mean for s in reference])
    combined_variance = 1.0 / precision.sum(axis=0)
    combined_mean = (precision * reference_means).sum(axis=0) * combined_variance
    excess = np.maximum(variances - combined_variance, MIN_VARIANCE_EXCESS * variances)
    return np.max(np.abs(means - combined_mean) / np.sqrt(excess), axis=1)


def screen(summaries: Sequence[ShardSummary], thresholds: Mapping[str, float]) -> tuple[list[int], list[dict]]:
    """Apply the policy; returns the kept shard numbers and ``[{"shard", "reason"}]`` excluded."""
    excluded = []
    kept = []
    for summary in summaries:
        reason = diagnostic_reason(summary, thresholds)
        if reason is None:
            kept.append(summary)
        else:
            excluded.append({"shard": summary.shard, "reason": reason})
    while len(kept) > 2:
        scores = outlier_scores(kept)
        worst = int(np.argmax(scores))
        if scores[worst] <= thresholds["max_outlier_z"]:
            break
        excluded.append(
            {
                "shard": kept[worst].shard,
                "reason": f"outlier: max |z| {scores[worst]:.1f} > {thresholds['max_outlier_z']}",
            }
        )
        kept.pop(worst)
    return [summary.shard for summary in kept], sorted(excluded, key=lambda entry: entry["shard"])


def require_enough(kept: Sequence[int], excluded: Sequence[Mapping], num_shards: int, min_fraction: float) -> None:
    """Raise :class:`InputError` naming the excluded shards if fewer than ``min_fraction``
    of the ``num_shards`` shards are kept."""
    if len(kept) < max(1, np.ceil(min_fraction * num_shards)):
        reasons = "; ".join(f"shard {entry['shard']}: {entry['reason']}" for entry in excluded)
        raise InputError(
            f"only {len(kept)} of {num_shards} shards are usable (combine.min_shards_fraction = {min_fraction}); "
            f"excluded: {reasons}"
        )


def disagreement_test(statistic: float, degrees_of_freedom: int, variance: float | None = None) -> dict:
    """The kept shards' disagreement Q (:meth:`~cmcflow.consensus.ConsensusAccumulator.disagreement`)
    against χ² with ``degrees_of_freedom``: ``{"statistic", "degrees_of_freedom", "p_value"}``.
    A p-value below :data:`DISAGREEMENT_P_VALUE` says that one model does not describe every
    shard's rows alike (misfit, a subpopulation in some shards), so that a Gaussian
    combination can be biased (the importance correction measures by how much): many shards
    each a little off, which the outlier screen cannot see. A large one does not clear the
    combination: shards too small for a Gaussian posterior all lean the same way, a bias Q
    cannot see (the correction and the K-stability check can).

    ``variance``: Var Q where block-diagonal weights make it other than χ²'s 2·df
    (:meth:`~cmcflow.consensus.ConsensusAccumulator.disagreement_variance`); Q is then taken
    as c χ²_ν with its mean df and this variance (Satterthwaite: c = Var / (2 df),
    ν = 2 df² / Var), recorded as ``"variance"`` and ``"effective_degrees_of_freedom"`` ν."""
    if variance is None or not variance > 0:
        return {
            "statistic": statistic,
            "degrees_of_freedom": degrees_of_freedom,
            "p_value": float(special.chdtrc(degrees_of_freedom, statistic)),
        }
    scale, effective = variance / (2 * degrees_of_freedom), 2 * degrees_of_freedom**2 / variance
    return {
        "statistic": statistic,
        "degrees_of_freedom": degrees_of_freedom,
        "p_value": float(special.chdtrc(effective, statistic / scale)),
        "variance": variance,
        "effective_degrees_of_freedom": effective,
    }


def final_outlier_scores(summaries: Sequence[ShardSummary], kept: Sequence[int]) -> dict[int, float]:
    """The max |z| of every shard whose draws are finite and vary, against the combination of
    the ``kept`` shards (for the report's heterogeneity plot). A shard whose chains never
    moved has no spread to measure its distance in (it fails the R-hat check): no score."""
    scored = [summary for summary in summaries if summary.finite and np.all(summary.variance > 0)]
    reference = [summary for summary in scored if summary.shard in set(kept)]
    if not scored or not reference:
        return {}
    return {summary.shard: float(score) for summary, score in zip(scored, outlier_scores(scored, reference))}
