"""Batched rigid superposition of 3-D point clouds, distributed over JAX devices with ``shard_map``.

The shared core of the aligners: one calling convention for flat batches ``ref (B, N, 3)``,
``fit (B, M, 3)`` with boolean masks ``(B, N)``, ``(B, M)`` and optional per-point
weights; the batch is padded to a multiple of the device count inside
(:func:`pad_batch`), and callers never reshape it. Padded pairs and padded points carry
zero weight: they never produce NaN and never win.

* :func:`align_kabsch`: the closed-form least-squares (Kabsch/Procrustes) superposition of
  labelled points (point i of ``fit`` corresponds to point i of ``ref``);
* :func:`cmcflow.overlay.align_overlay`: the Gaussian volume overlap, for unlabelled points.

Both score a superposition by the Tanimoto overlap of Gaussian volumes (ROCS style)
      V_AB = Σ_ij w_i w_j π^1.5 exp(−(α/2)|r_i − r_j|²) / (2α)^1.5,
      score = V_AB / (V_AA + V_BB − V_AB)  ∈ [0, 1].
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

#: Gaussian width of the overlap (ROCS; 0.81 Å⁻² for atoms).
DEFAULT_ALPHA = 0.81
#: Name of the 1-D device mesh axis over which pairs are distributed.
PAIRS = "pairs"


class Alignment(NamedTuple):
    """Result for a batch of B pairs.

    points: ``(B, M, 3)`` the fit points moved onto the reference.
    transforms: ``(B, 4, 4)`` homogeneous transforms [[L, t], [0, 1]]; det L = −1 if mirrored.
    scores: ``(B,)`` Tanimoto overlap score of the aligned pair, in [0, 1].
    """

    points: np.ndarray
    transforms: np.ndarray
    scores: np.ndarray


def weighted_centroid(points: jax.Array, weights: jax.Array) -> jax.Array:
    """``(N, 3), (N,) -> (3,)``; the origin for an all-zero weight vector."""
    total = jnp.sum(weights)
    return jnp.sum(weights[:, None] * points, axis=0) / jnp.where(total > 0, total, 1.0)


def overlap_volume(a: jax.Array, wa: jax.Array, b: jax.Array, wb: jax.Array, alpha: float) -> jax.Array:
    """V_AB = (π / 2α)^{3/2} Σ_ij wa_i wb_j exp(−α/2 |a_i − b_j|²) of two weighted point sets
    ``(N, 3), (N,)`` and ``(M, 3), (M,)``.

    The squared distances come from |a|² + |b|² − 2 a·bᵀ, one small matrix product, after
    moving both sets by a's weighted centroid (distances do not change; centred norms keep the
    expansion's rounding small). Broadcasting ``a[:, None] − b[None]`` to ``(N, M, 3)`` reduces
    over an innermost axis of 3, which XLA's CPU code vectorises poorly: the overlay ran about
    2× slower that way on the 13d drug pairs (bench/align_drugs.py), with the same scores.
    """
    origin = weighted_centroid(a, wa)
    a, b = a - origin, b - origin
    squared = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2 * a @ b.T
    return jnp.sum(wa[:, None] * wb[None, :] * jnp.exp(-0.5 * alpha * squared)) * (math.pi / (2 * alpha)) ** 1.5


def tanimoto(v_ab: jax.Array, v_aa: jax.Array, v_bb: jax.Array) -> jax.Array:
    """V_AB / (V_AA + V_BB − V_AB), and 0 where the denominator vanishes (padded pairs)."""
    denominator = v_aa + v_bb - v_ab
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where(denominator > 0, v_ab / safe, 0.0)


def kabsch_linear(ref, fit, weights, allow_reflection: bool) -> jax.Array:
    """Orthogonal ``L (3, 3)`` minimising Σ w_i |L (fit_i − c_fit) − (ref_i − c_ref)|²."""
    centred_ref = ref - weighted_centroid(ref, weights)
    centred_fit = fit - weighted_centroid(fit, weights)
    u, _, vt = jnp.linalg.svd((weights[:, None] * centred_fit).T @ centred_ref)
    if allow_reflection:
        return vt.T @ u.T
    d = jnp.sign(jnp.linalg.det(vt.T @ u.T))
    return vt.T @ jnp.diag(jnp.array([1.0, 1.0, 1.0]).at[2].set(jnp.where(d == 0, 1.0, d))) @ u.T


def homogeneous(linear: jax.Array, translation: jax.Array) -> jax.Array:
    return jnp.eye(4).at[:3, :3].set(linear).at[:3, 3].set(translation)


def kabsch_pair(ref, fit, ref_w, fit_w, allow_reflection: bool, alpha: float):
    """Least-squares superposition of labelled points: ``(aligned, transform, score)``."""
    weights = ref_w * fit_w
    linear = kabsch_linear(ref, fit, weights, allow_reflection)
    translation = weighted_centroid(ref, weights) - linear @ weighted_centroid(fit, weights)
    aligned = fit @ linear.T + translation
    v_ab = overlap_volume(ref, ref_w, aligned, fit_w, alpha)
    score = tanimoto(v_ab, overlap_volume(ref, ref_w, ref, ref_w, alpha), overlap_volume(fit, fit_w, fit, fit_w, alpha))
    return aligned, homogeneous(linear, translation), score


def pair_mesh(devices: int) -> Mesh:
    """The 1-D mesh (axis :data:`PAIRS`) of JAX's first ``devices`` devices."""
    available = jax.devices()
    if devices > len(available):
        raise ValueError(f"{devices} devices requested, JAX sees {len(available)}")
    return Mesh(np.asarray(available[:devices]), (PAIRS,))


def pair_sharding(devices: int) -> NamedSharding:
    """Arrays split along their leading (pair) axis over :func:`pair_mesh`."""
    return NamedSharding(pair_mesh(devices), P(PAIRS))


def distributed(batch_function, devices: int):
    """``jit(shard_map(batch_function))`` over a 1-D mesh of ``devices`` devices: every
    argument and result is split along its leading (pair) axis, so each device gets its
    own slice of the batch."""
    mesh = pair_mesh(devices)
    # check_vma=False: the batch functions start their loops from constants (zeros, identity
    # matrices) that the varying-axes check wants cast with lax.pcast; pairs are independent
    # (no collectives), so the check guards nothing here.
    return jax.jit(jax.shard_map(batch_function, mesh=mesh, in_specs=P(PAIRS), out_specs=P(PAIRS), check_vma=False))


def masked_weights(ref, fit, ref_mask, fit_mask, ref_weights, fit_weights):
    """Float ``ref (B, N, 3)``, ``fit (B, M, 3)`` and their masked weights ``(B, N)``, ``(B, M)``."""
    ref, fit = np.asarray(ref, dtype=float), np.asarray(fit, dtype=float)
    if ref.ndim != 3 or fit.ndim != 3 or ref.shape[-1] != 3 or fit.shape[-1] != 3 or len(ref) != len(fit):
        raise ValueError(f"need ref (B, N, 3) and fit (B, M, 3), got {ref.shape} and {fit.shape}")
    ref_w = np.asarray(ref_mask, dtype=float) * (1.0 if ref_weights is None else np.asarray(ref_weights, dtype=float))
    fit_w = np.asarray(fit_mask, dtype=float) * (1.0 if fit_weights is None else np.asarray(fit_weights, dtype=float))
    return ref, fit, ref_w, fit_w


def pad_batch(arrays, devices: int) -> list[np.ndarray]:
    """The arrays with zero pairs appended, to a multiple of ``devices`` pairs."""
    pad = -len(arrays[0]) % devices
    return [np.concatenate([array, np.zeros((pad, *array.shape[1:]))]) for array in arrays]


@functools.cache
def _kabsch_function(allow_reflection: bool, alpha: float, devices: int):
    return distributed(
        jax.vmap(functools.partial(kabsch_pair, allow_reflection=allow_reflection, alpha=alpha)), devices
    )


def align_kabsch(
    ref, fit, mask, *, allow_reflection: bool, weights=None, alpha: float = DEFAULT_ALPHA, devices: int | None = None
) -> Alignment:
    """Closed-form superposition of B pairs of labelled points ``(B, N, 3)`` with one mask ``(B, N)``."""
    devices = devices or jax.device_count()
    arrays = masked_weights(ref, fit, mask, mask, weights, weights)
    points, transforms, scores = _kabsch_function(allow_reflection, alpha, devices)(*pad_batch(arrays, devices))
    batch = len(arrays[0])
    return Alignment(np.asarray(points)[:batch], np.asarray(transforms)[:batch], np.asarray(scores)[:batch])


def rmsd(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root-mean-square distance between ``(…, N, 3)`` clouds, over points."""
    return np.sqrt(np.mean(np.sum((a - b) ** 2, axis=-1), axis=-1))


def superpose(reference: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``points (N, 3)`` moved by the proper rigid motion that best fits them onto
    ``reference (N, 3)`` (:func:`kabsch_linear`, equal weights, no reflection)."""
    linear = kabsch_linear(jnp.asarray(reference), jnp.asarray(points), jnp.ones(len(points)), allow_reflection=False)
    return (points - points.mean(axis=0)) @ np.asarray(linear).T + reference.mean(axis=0)
