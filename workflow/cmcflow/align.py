"""The align stage: put every posterior draw of a rigid model's point cloud into one frame.

1. Reference (:func:`build_reference`): within each shard, generalised Procrustes analysis
   (GPA) of all its draws gives the shard's mean structure; GPA over the shard means gives
   the analysis' reference, centred at the origin.
2. Every draw of every chain of a shard is aligned to that reference (one batch per shard,
   distributed over the JAX devices): closed-form Kabsch for labelled points (default), or
   the Gaussian overlay, started from the Kabsch solution (:mod:`cmcflow.superposition`,
   :mod:`cmcflow.overlay`).

Aligned coordinates replace the raw ones in ``posterior`` and ``unconstrained_posterior``
(the point site has real support, so both are the same numbers); ``sample_stats`` gains
``align_score`` (Tanimoto overlap with the reference) and ``align_rmsd`` (Å) per draw.
"""

from __future__ import annotations

from collections.abc import Sequence

import arviz as az
import numpy as np

from cmcflow.overlay import OverlaySettings, align_overlay
from cmcflow.superposition import Alignment, align_kabsch, rmsd

#: GPA stops when the mean structure moves less than this RMSD (in the data's units) ...
GPA_TOLERANCE = 1e-6
#: ... or after this many rounds.
GPA_MAX_ROUNDS = 100


def flat_draws(idata: az.InferenceData, site: str) -> np.ndarray:
    """``(chain · draw, N, 3)`` draws of the point site."""
    values = idata.posterior[site].values
    return values.reshape(-1, *values.shape[2:])


def generalised_procrustes(clouds: np.ndarray, allow_reflection: bool) -> tuple[np.ndarray, int]:
    """Mean structure ``(N, 3)`` (centroid at the origin) of ``clouds (B, N, 3)`` by GPA with
    Kabsch superposition; returns it and the number of rounds used."""
    mask = np.ones(clouds.shape[:2], dtype=bool)
    mean = clouds[0] - clouds[0].mean(axis=0)
    for rounds in range(1, GPA_MAX_ROUNDS + 1):
        aligned = align_kabsch(np.broadcast_to(mean, clouds.shape), clouds, mask, allow_reflection=allow_reflection)
        updated = aligned.points.mean(axis=0)
        updated -= updated.mean(axis=0)
        moved = float(rmsd(updated, mean))
        mean = updated
        if moved < GPA_TOLERANCE:
            break
    return mean, rounds


def build_reference(runs: Sequence[az.InferenceData], site: str, allow_reflection: bool) -> tuple[np.ndarray, dict]:
    """The analysis' reference structure from its shard runs, and a record of how it was built."""
    shard_means, shard_rounds = [], []
    for run in runs:
        mean, rounds = generalised_procrustes(flat_draws(run, site), allow_reflection)
        shard_means.append(mean)
        shard_rounds.append(rounds)
    reference, rounds = generalised_procrustes(np.stack(shard_means), allow_reflection)
    aligned_means = align_kabsch(
        np.broadcast_to(reference, (len(runs), *reference.shape)),
        np.stack(shard_means),
        np.ones((len(runs), reference.shape[0]), dtype=bool),
        allow_reflection=allow_reflection,
    ).points
    record = {
        "shard_gpa_rounds": shard_rounds,
        "reference_gpa_rounds": rounds,
        "shard_mean_rmsd_to_reference": rmsd(aligned_means, reference).tolist(),
    }
    return reference, record


def align_to_reference(
    draws: np.ndarray, reference: np.ndarray, method: str, allow_reflection: bool, overlay: OverlaySettings | None
) -> Alignment:
    """Align ``draws (B, N, 3)`` to ``reference (N, 3)``: ``"kabsch"`` or ``"overlay"``."""
    refs = np.broadcast_to(reference, draws.shape)
    mask = np.ones(draws.shape[:2], dtype=bool)
    if method == "kabsch":
        return align_kabsch(refs, draws, mask, allow_reflection=allow_reflection)
    if method == "overlay":
        return align_overlay(refs, draws, mask, mask, settings=overlay)
    raise ValueError(f"unknown alignment method {method!r}")


def align_run(
    idata: az.InferenceData,
    reference: np.ndarray,
    site: str,
    method: str,
    allow_reflection: bool,
    overlay: OverlaySettings | None = None,
) -> az.InferenceData:
    """A copy of a shard run with every draw of ``site`` aligned to ``reference``."""
    raw = idata.posterior[site].values
    if not np.array_equal(raw, idata.unconstrained_posterior[site].values):
        raise ValueError(f"site {site!r} is constrained; a point site must have real support")
    chains, draws = raw.shape[:2]
    result = align_to_reference(raw.reshape(-1, *raw.shape[2:]), reference, method, allow_reflection, overlay)
    aligned = idata.copy()
    for group in ("posterior", "unconstrained_posterior"):
        dataset = getattr(aligned, group)
        setattr(aligned, group, dataset.assign({site: (dataset[site].dims, result.points.reshape(raw.shape))}))
    aligned.sample_stats["align_score"] = (("chain", "draw"), result.scores.reshape(chains, draws))
    aligned.sample_stats["align_rmsd"] = (("chain", "draw"), rmsd(result.points, reference).reshape(chains, draws))
    aligned.posterior.attrs.update(
        {
            "align_method": method,
            "align_allow_reflection": int(allow_reflection),
            "align_mirrored_draws": int(np.sum(np.linalg.det(result.transforms[:, :3, :3]) < 0)),
        }
    )
    return aligned
