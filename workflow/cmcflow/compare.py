"""Posteriors compared in posterior sd units: the distances between a sweep's grid points,
and the K-stability check (does the combined posterior move as the shard count K grows?).

Every comparison reads posterior summaries (one row per parameter element, with its
``mean`` and ``sd``: ``summary.csv`` of combine or of the full-data run). For parameter
``p`` of posteriors ``a`` and a reference ``r``:

    mean shift  d_p = |mean_a,p − mean_r,p| / sd_r,p
    sd change   c_p = |sd_a,p / sd_r,p − 1|

and a posterior is *stable* against the reference when max_p d_p ≤ τ_mean and
max_p c_p ≤ τ_sd (``sweep.stability`` in the config). Between two grid points, where
neither is the reference, the distance is max_p |mean_a,p − mean_b,p| / sd̄_p with
sd̄_p = sqrt((sd_a,p² + sd_b,p²) / 2).

Point clouds (rigid models) have no common frame between runs: before comparing, each
posterior's mean cloud is moved onto the reference's by the least-squares rigid motion
(orthogonal Procrustes, mirror images allowed where the alignment allows them), and each
point's coordinates get its isotropic sd, sqrt((sd_x² + sd_y² + sd_z²) / 3), which no
rotation changes. JAX-free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.linalg import orthogonal_procrustes


def read_summary(path) -> pd.DataFrame:
    """A ``summary.csv`` (index: parameter; columns mean, sd, 5%, 95%)."""
    return pd.read_csv(path, index_col="parameter")


def point_rows(summary: pd.DataFrame, site: str) -> tuple[list[str], np.ndarray]:
    """The labels ``site[i, j]`` of a point-cloud site in ``summary``, in row-major order,
    and their (point, axis) indices ``(n · 3, 2)``."""
    pattern = re.compile(rf"^{re.escape(site)}\[(\d+), (\d+)\]$")
    labels = [label for label in summary.index if pattern.match(label)]
    indices = np.array([[int(part) for part in pattern.match(label).groups()] for label in labels])
    return labels, indices


def frame_free(summary: pd.DataFrame, reference: pd.DataFrame, site: str, allow_reflection: bool) -> pd.DataFrame:
    """``summary`` with its point cloud ``site`` moved onto ``reference``'s (orthogonal
    Procrustes of the centred mean clouds; a proper rotation unless ``allow_reflection``)
    and every point's sd made isotropic. The other parameters are unchanged; ``5%`` and
    ``95%`` of the cloud, not rotation-invariant, are dropped to NaN."""
    labels, indices = point_rows(summary, site)
    shape = (indices[:, 0].max() + 1, 3)
    means = np.zeros(shape)
    means[indices[:, 0], indices[:, 1]] = summary.loc[labels, "mean"]
    target = np.zeros(shape)
    target[indices[:, 0], indices[:, 1]] = reference.loc[labels, "mean"]
    centred, target_centre = means - means.mean(axis=0), target.mean(axis=0)
    rotation, _ = orthogonal_procrustes(centred, target - target_centre)
    if not allow_reflection and np.linalg.det(rotation) < 0:
        u, _, vt = np.linalg.svd(centred.T @ (target - target_centre))
        u[:, -1] *= -1
        rotation = u @ vt
    moved = centred @ rotation + target_centre
    variances = np.zeros(shape)
    variances[indices[:, 0], indices[:, 1]] = summary.loc[labels, "sd"] ** 2
    isotropic = np.sqrt(variances.mean(axis=1))
    result = summary.copy()
    result.loc[labels, "mean"] = moved[indices[:, 0], indices[:, 1]]
    result.loc[labels, "sd"] = isotropic[indices[:, 0]]
    result.loc[labels, ["5%", "95%"]] = np.nan
    return result


def in_frame(summary: pd.DataFrame, reference: pd.DataFrame, site: str | None, allow_reflection: bool) -> pd.DataFrame:
    """``summary`` in the reference's frame (:func:`frame_free`); unchanged where the model
    has no point-cloud ``site``."""
    return summary if site is None else frame_free(summary, reference, site, allow_reflection)


def common_frame(
    summaries: Mapping[str, pd.DataFrame], reference: pd.DataFrame, site: str | None, allow_reflection: bool
) -> dict[str, pd.DataFrame]:
    """Every summary of ``summaries`` :func:`in_frame` of ``reference``."""
    return {name: in_frame(summary, reference, site, allow_reflection) for name, summary in summaries.items()}


def shift(summary: pd.DataFrame, reference: pd.DataFrame) -> dict:
    """Against ``reference``: the largest mean shift in reference sd and its parameter, the
    median shift (a few parameters can move while the rest hold), the largest sd change,
    and the sd ratios' range (the formulas of this module)."""
    reference = reference.loc[summary.index]
    mean_shift = (summary["mean"] - reference["mean"]).abs() / reference["sd"]
    ratio = summary["sd"] / reference["sd"]
    return {
        "max_mean_shift": float(mean_shift.max()),
        "worst_parameter": str(mean_shift.idxmax()),
        "median_mean_shift": float(mean_shift.median()),
        "max_sd_change": float((ratio - 1).abs().max()),
        "min_sd_ratio": float(ratio.min()),
        "max_sd_ratio": float(ratio.max()),
    }


def distance(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """max_p |mean_a,p − mean_b,p| / sqrt((sd_a,p² + sd_b,p²) / 2)."""
    b = b.loc[a.index]
    return float(((a["mean"] - b["mean"]).abs() / np.sqrt((a["sd"] ** 2 + b["sd"] ** 2) / 2)).max())


def distance_matrix(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """:func:`distance` between every two posteriors, ``(n, n)``, labelled by name."""
    names = list(summaries)
    values = [[distance(summaries[a], summaries[b]) for b in names] for a in names]
    return pd.DataFrame(values, index=names, columns=names)


def k_stability(
    by_shards: Sequence[tuple[int, str, pd.DataFrame]],
    reference: tuple[int, str, pd.DataFrame],
    max_mean_shift: float,
    max_sd_change: float,
) -> tuple[list[dict], int | None]:
    """The K-stability check of one series of grid points that differ only in K.

    ``by_shards``: (K, name, summary) per point; ``reference``: (K, name, summary) of the
    reference (the full-data run, K = 1, or the smallest K). Returns one row per K, in
    increasing K, with :func:`shift` against the reference and ``stable`` (both bounds
    held), and the largest K up to which every K is stable (None if the smallest fails).
    """
    rows = []
    for shards, name, summary in sorted(by_shards, key=lambda item: item[0]):
        row = {"num_shards": shards, "point": name, **shift(summary, reference[2])}
        row["stable"] = row["max_mean_shift"] <= max_mean_shift and row["max_sd_change"] <= max_sd_change
        rows.append(row)
    stable_up_to = None
    for row in rows:
        if not row["stable"]:
            break
        stable_up_to = row["num_shards"]
    return rows, stable_up_to


def verdict(stable_up_to: int | None, rows: Sequence[dict], reference_name: str, reference_excluded: int = 0) -> str:
    """The K-stability check's sentence (with a warning where the reference combination
    left shards out: it is then a posterior of fewer rows than the others)."""
    largest = rows[-1]["num_shards"]
    if stable_up_to is None:
        sentence = f"not stable at any K swept (K = {rows[0]['num_shards']} already moved against {reference_name})"
    elif stable_up_to == largest:
        sentence = f"stable up to K = {largest}, the largest K swept"
    else:
        sentence = f"stable up to K = {stable_up_to}"
    if reference_excluded:
        sentence += (
            f"; but the reference ({reference_name}) left {reference_excluded} shard(s) out, so it is a "
            "posterior of fewer rows: compare against full data (sweep.fulldata: true)"
        )
    return sentence
