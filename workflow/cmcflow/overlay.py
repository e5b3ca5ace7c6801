"""Gaussian-overlay (ROCS-style) rigid alignment of unlabelled 3-D point clouds.

Maximise the Tanimoto overlap of Gaussian volumes (:mod:`cmcflow.superposition`) over
rigid motions x ↦ L x + t: BFGS on (rotation, translation) from several starts per pair
(identity, principal-axes alignments, well-spread rotations, and the Kabsch solution when
points correspond), all starts of all pairs of a device's batch in one ``lax.while_loop``
that stops when every score has settled. The BFGS is written here, one trial step per
iteration and no inner line-search loop, because vmapped over starts an optax L-BFGS
iteration (zoom line search) cost 5–8 values and gradients of the score. No
correspondence between points is needed. With ``allow_reflection`` the mirrored fit is
tried too (distance data cannot tell a structure from its mirror image) and the better
kept: its transform has det L = −1.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cmcflow.stored_programs import program_key, stored_program, stored_programs_dir
from cmcflow.superposition import (
    DEFAULT_ALPHA,
    Alignment,
    distributed,
    homogeneous,
    kabsch_linear,
    masked_weights,
    overlap_volume,
    pair_sharding,
    tanimoto,
    weighted_centroid,
)

#: Mirror through the y-z plane: composed with a proper rotation it gives det −1.
MIRROR = np.diag([-1.0, 1.0, 1.0])
#: Which of the fit's principal axes (by variance, largest first) the principal-axes starts
#: put on the reference's first, second and third: ``matched`` pairs largest with largest;
#: ``cyclic`` adds the two cyclic shifts (two different molecules need not order their
#: axes alike); ``all`` every order. Each order gives 4 proper rotations (the axes' signs).
AXIS_ORDERS = {
    "matched": ((0, 1, 2),),
    "cyclic": ((0, 1, 2), (1, 2, 0), (2, 0, 1)),
    "all": tuple(itertools.permutations(range(3))),
}
#: Armijo's sufficient-decrease constant: a trial step is kept if f(x + s) ≤ f(x) + ARMIJO · gᵀs.
ARMIJO = 1e-4
#: A rejected trial step is shortened to between these fractions of itself.
SHRINK = (0.1, 0.5)
#: Floor of a divisor that may be 0 (an empty pair): float32's smallest normal number.
TINY = float(np.finfo(np.float32).tiny)
#: Length of the first trial step (in the parameters' units, about Å of displacement).
FIRST_STEP = 0.5
#: Widths that programs are compiled for are multiples of this many points.
WIDTH_STEP = 8
#: Pairs per device in one distributed call; a width's last call is padded with empty pairs.
#: One is fastest on CPU devices: a call runs until its slowest pair settles.
PAIRS_PER_DEVICE = 1
#: What one more program (tracing and compiling it) costs, in pairs aligned at 32 points:
#: about 3.7 s against about 1.8 ms per such pair on 2 CPU cores of a slow host (20 GB/s).
PROGRAM_COST_PAIRS = 2000


@dataclass(frozen=True)
class OverlaySettings:
    """Settings of the overlay optimisation (hashable: they key the compiled function).

    ``iterations``: the most BFGS iterations; ``axis_orders``: a key of
    :data:`AXIS_ORDERS`; a pair settles once its best score has changed by no more than
    ``tolerance`` in each of ``patience`` iterations in a row (a rejected trial step leaves a
    start's score as it was for an iteration).
    """

    iterations: int
    axis_orders: str
    spread_starts: int
    allow_reflection: bool
    use_correspondence: bool
    alpha: float = DEFAULT_ALPHA
    tolerance: float = 1e-9
    patience: int = 3

    @property
    def starts_per_pair(self) -> int:
        """Identity + 4 principal-axes per axis order + spread rotations (+ Kabsch), doubled
        with reflection."""
        proper = 1 + 4 * len(AXIS_ORDERS[self.axis_orders]) + self.spread_starts + int(self.use_correspondence)
        return proper * (2 if self.allow_reflection else 1)


def quaternion_matrix(q: jax.Array) -> jax.Array:
    """Rotation matrix ``(3, 3)`` of the quaternion ``q = (w, x, y, z)`` after normalisation."""
    norm = jnp.sqrt(jnp.sum(q**2))
    w, x, y, z = q / jnp.where(norm > 0, norm, 1.0)
    return jnp.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def principal_axes(points: jax.Array, weights: jax.Array) -> jax.Array:
    """Columns: the weighted principal axes of ``points``, largest variance first."""
    centred = points - weighted_centroid(points, weights)
    covariance = (weights[:, None] * centred).T @ centred
    _, vectors = jnp.linalg.eigh(covariance)
    return vectors[:, ::-1]


def principal_axes_rotations(ref, ref_w, fit, fit_w, orders) -> jax.Array:
    """``(4 · len(orders), 3, 3)`` proper rotations taking the fit's principal axes onto the
    reference's: for each order ``o`` in ``orders`` (the fit's axes, by index, put on the
    reference's first, second and third), one rotation per sign choice of the first two
    (the third sign keeps det = +1)."""
    axes_ref, axes_fit = principal_axes(ref, ref_w), principal_axes(fit, fit_w)
    handedness = jnp.linalg.det(axes_ref) * jnp.linalg.det(axes_fit)
    rotations = []
    for order in orders:
        permutation = np.eye(3)[list(order)]  # row i picks the fit's axis order[i]
        parity = np.linalg.det(permutation)
        for s1, s2 in itertools.product((1.0, -1.0), repeat=2):
            signs = jnp.array([s1, s2, s1 * s2 * parity * handedness])
            rotations.append(axes_ref @ (signs[:, None] * permutation) @ axes_fit.T)
    return jnp.stack(rotations)


def spread_rotations(count: int) -> np.ndarray:
    """``(count, 3, 3)`` rotations spread evenly over SO(3) (super-Fibonacci quaternions,
    Alexa 2022), deterministic; ``(0, 3, 3)`` for none."""
    phi, psi = math.sqrt(2.0), 1.533751168755204288118041
    s = np.arange(count) + 0.5
    r, big_r = np.sqrt(s / count), np.sqrt(1.0 - s / count)
    alpha, beta = 2 * np.pi * s / phi, 2 * np.pi * s / psi
    quaternions = np.stack([r * np.sin(alpha), r * np.cos(alpha), big_r * np.sin(beta), big_r * np.cos(beta)], -1)
    return np.asarray(jax.vmap(quaternion_matrix)(jnp.asarray(quaternions.reshape(count, 4))))


def start_linear_maps(ref, ref_w, fit, fit_w, spread: jax.Array, settings: OverlaySettings) -> jax.Array:
    """``(S, 3, 3)`` starting linear maps (applied to the centred fit) for one pair;
    ``spread`` holds the ``(spread_starts, 3, 3)`` well-spread rotations."""

    def proper_starts(moving):
        orders = AXIS_ORDERS[settings.axis_orders]
        starts = [jnp.eye(3)[None], principal_axes_rotations(ref, ref_w, moving, fit_w, orders), spread]
        if settings.use_correspondence:
            starts.append(kabsch_linear(ref, moving, ref_w * fit_w, allow_reflection=False)[None])
        return jnp.concatenate(starts)

    starts = proper_starts(fit)
    if settings.allow_reflection:
        mirror = jnp.asarray(MIRROR)
        # mirror the fit first, then rotate it: the linear map is R @ MIRROR (det −1)
        mirrored_starts = proper_starts(fit @ mirror.T) @ mirror
        starts = jnp.concatenate([starts, mirrored_starts])
    return starts


def overlay_pair_setup(ref, fit, ref_w, fit_w, spread, settings: OverlaySettings):
    """What one pair's optimisation needs: ``starts (S, 3, 3)``, the centroids ``c_ref``,
    ``c_fit (3,)``, the fit's radius of gyration ``radius`` (Å; 1 for an empty fit) and the
    self-overlaps ``V_AA``, ``V_BB`` (computed once: V_BB is invariant under rigid motion)."""
    alpha = settings.alpha
    c_fit = weighted_centroid(fit, fit_w)
    radius = jnp.sqrt(jnp.sum(fit_w[:, None] * (fit - c_fit) ** 2) / jnp.maximum(jnp.sum(fit_w), TINY))
    return {
        "starts": start_linear_maps(ref, ref_w, fit, fit_w, spread, settings),
        "c_ref": weighted_centroid(ref, ref_w),
        "c_fit": c_fit,
        "radius": jnp.where(radius > 0, radius, 1.0),
        "v_aa": overlap_volume(ref, ref_w, ref, ref_w, alpha),
        "v_bb": overlap_volume(fit, fit_w, fit, fit_w, alpha),
    }


def overlay_linear(x, start, setup) -> jax.Array:
    """``(3, 3)`` linear map R(x) · start of the parameters ``x (6,)``: R is the rotation of
    the quaternion (1, x[:3] / radius) (Gibbs' vector, measured in the fit's radius of
    gyration so that a unit of rotation moves the fit's points about as far as a unit of
    translation x[3:], in Å)."""
    return quaternion_matrix(jnp.concatenate([jnp.ones(1), x[:3] / setup["radius"]])) @ start


def overlay_score(x, start, ref, fit, ref_w, fit_w, setup, alpha):
    """Tanimoto score of the fit moved by ``p ↦ R(x) start (p − c_fit) + c_ref + x[3:]``."""
    moved = (fit - setup["c_fit"]) @ overlay_linear(x, start, setup).T + setup["c_ref"] + x[3:]
    return tanimoto(overlap_volume(ref, ref_w, moved, fit_w, alpha), setup["v_aa"], setup["v_bb"])


class BfgsLane(NamedTuple):
    """One start's BFGS state: position ``x (n,)``, loss ``f``, gradient ``g (n,)``, inverse
    Hessian estimate ``h (n, n)``, length of the next trial step ``step`` (1 after an
    accepted step) and ``fresh`` (no step accepted yet: ``h`` is still the first guess)."""

    x: jax.Array
    f: jax.Array
    g: jax.Array
    h: jax.Array
    step: jax.Array
    fresh: jax.Array


def bfgs_start(value_and_grad, x) -> BfgsLane:
    """The lane at ``x``: first trial ``x − FIRST_STEP · g / |g|``."""
    f, g = value_and_grad(x)
    h = jnp.eye(len(x)) * FIRST_STEP / jnp.maximum(jnp.linalg.norm(g), TINY)
    return BfgsLane(x, f, g, h, jnp.ones(()), jnp.ones((), dtype=bool))


def bfgs_iteration(value_and_grad, lane: BfgsLane) -> BfgsLane:
    """One trial of x + step · d with d = −h g (−g where that is not a descent direction), at
    the cost of one value and gradient, with no inner loop (vmapped lanes stay in step).

    Accepted when the loss falls by Armijo's rule, f(x + s) ≤ f + ARMIJO · gᵀs; h then gets
    BFGS's update (Nocedal & Wright, eq. 6.17; first rescaled to (sᵀy / yᵀy) I, eq. 6.20)

        h ← (I − ρ s yᵀ) h (I − ρ y sᵀ) + ρ s sᵀ,   s = Δx, y = Δg, ρ = 1 / sᵀy,

    skipped unless sᵀy > 0, and the next trial is a whole step again. Rejected, x stays and
    the next trial is shortened to the minimum of the quadratic through f, gᵀd and the
    trial's loss, kept within :data:`SHRINK` of the trial."""
    d = -lane.h @ lane.g
    descent = lane.g @ d < 0
    d = jnp.where(descent, d, -lane.g)
    slope = lane.g @ d * lane.step  # gᵀs of the trial step s = step · d
    x = lane.x + lane.step * d
    f, g = value_and_grad(x)
    accepted = jnp.isfinite(f) & (f <= lane.f + ARMIJO * slope)
    s, y = x - lane.x, g - lane.g
    sy = s @ y
    curved = sy > 0
    h = jnp.where(lane.fresh, jnp.eye(len(x)) * sy / jnp.maximum(y @ y, TINY), lane.h)
    rho = 1.0 / jnp.where(curved, sy, 1.0)
    v = jnp.eye(len(x)) - rho * jnp.outer(s, y)
    h = jnp.where(curved, v @ h @ v.T + rho * jnp.outer(s, s), lane.h)
    curvature = 2 * (f - lane.f - slope)  # of the quadratic along d, times step²
    shortened = jnp.where(curvature > 0, -slope / jnp.where(curvature > 0, curvature, 1.0), SHRINK[0])
    shortened = lane.step * jnp.clip(shortened, *SHRINK)
    return BfgsLane(
        x=jnp.where(accepted, x, lane.x),
        f=jnp.where(accepted, f, lane.f),
        g=jnp.where(accepted, g, lane.g),
        h=jnp.where(accepted, h, lane.h),
        step=jnp.where(accepted, 1.0, shortened),
        fresh=lane.fresh & ~accepted,
    )


def overlay_batch(ref, fit, ref_w, fit_w, *, spread, settings: OverlaySettings):
    """Best rigid overlay of a batch of b pairs ``(b, N, 3)``, ``(b, M, 3)`` with weights
    ``(b, N)``, ``(b, M)``: ``(aligned (b, M, 3), transforms (b, 4, 4), scores (b,))``.

    Every start of every pair runs BFGS (:func:`bfgs_iteration`) on the 6 parameters of
    :func:`overlay_score` inside one ``lax.while_loop``, vmapped over pairs and starts. A pair
    settles (its parameters stop changing) once its best score over the starts has changed
    by no more than ``settings.tolerance`` in each of ``settings.patience`` iterations in a
    row; the loop ends when every pair has settled, or after ``settings.iterations``
    iterations. Vmapped lanes run in lockstep, so a fixed iteration count (or waiting for
    every start) would spend most of the time on starts that have converged or cannot win;
    settling per pair keeps each pair's result independent of the batch it is in.
    """
    setup = jax.vmap(lambda *pair: overlay_pair_setup(*pair, spread, settings))(ref, fit, ref_w, fit_w)
    pairs = (ref, fit, ref_w, fit_w, setup)

    def lane_value_and_grad(start, pair):
        return jax.value_and_grad(lambda x: -overlay_score(x, start, *pair, settings.alpha))

    def per_lane(function):  # over pairs, then starts
        return jax.vmap(jax.vmap(function, in_axes=(0, 0, None)))

    iterate = per_lane(lambda lane, start, pair: bfgs_iteration(lane_value_and_grad(start, pair), lane))

    def step(carry):
        lanes, best, quiet, iteration = carry
        active = quiet < settings.patience

        def keep_settled(new, current):  # a settled pair keeps its parameters from now on
            return jnp.where(active.reshape(-1, *[1] * (new.ndim - 1)), new, current)

        lanes = jax.tree.map(keep_settled, iterate(lanes, setup["starts"], pairs), lanes)
        now_best = jnp.max(jnp.where(jnp.isnan(lanes.f), -jnp.inf, -lanes.f), axis=1)  # the loss is −score
        quiet = jnp.where(jnp.abs(now_best - best) <= settings.tolerance, quiet + 1, 0)
        return lanes, now_best, quiet, iteration + 1

    def keep_going(carry):
        _, _, quiet, iteration = carry
        return (iteration < settings.iterations) & jnp.any(quiet < settings.patience)

    b, starts = setup["starts"].shape[:2]
    lanes = per_lane(lambda x, start, pair: bfgs_start(lane_value_and_grad(start, pair), x))(
        jnp.zeros((b, starts, 6)), setup["starts"], pairs
    )
    carry = (lanes, jnp.full(b, -jnp.inf), jnp.zeros(b, dtype=int), 0)
    lanes, *_ = jax.lax.while_loop(keep_going, step, carry)

    def best_of_pair(lanes, fit, setup):
        scores = jnp.where(jnp.isnan(lanes.f), -jnp.inf, -lanes.f)
        best = jnp.argmax(scores)
        linear = overlay_linear(lanes.x[best], setup["starts"][best], setup)
        translation = setup["c_ref"] + lanes.x[best, 3:] - linear @ setup["c_fit"]
        return fit @ linear.T + translation, homogeneous(linear, translation), scores[best]

    return jax.vmap(best_of_pair)(lanes, fit, setup)


def occupied_widths(ref_w: np.ndarray, fit_w: np.ndarray, step: int) -> np.ndarray:
    """Per pair, the width that holds every weighted point of its reference and of its fit:
    the last nonzero weight's position + 1 on either side, rounded up to a multiple of
    ``step`` but not past the arrays' widths. Weights ``(B, N)``, ``(B, M)``; returns ``(B,)``."""

    def last(weights):
        return weights.shape[1] - np.argmax(weights[:, ::-1] != 0, axis=1)  # 0 weights only: full width

    rounded = -(-np.maximum(last(ref_w), last(fit_w)) // step) * step
    return np.minimum(rounded, max(ref_w.shape[1], fit_w.shape[1]))


def width_plan(widths: np.ndarray, program_cost: float) -> np.ndarray:
    """The width each pair is padded to, one program per distinct result: the subset of the
    distinct ``widths`` that minimises

        programs × program_cost + Σ_pairs (padded width / 32)²,

    the cost of compiling against that of padding (a pair's work grows with the product of
    its two widths), both in pairs aligned at 32 points. Exact, by dynamic programming over
    the sorted distinct widths: a pair goes to the smallest chosen width that holds it, and
    the largest width is always chosen. ``widths`` ``(B,)`` -> ``(B,)``."""
    values, counts = np.unique(widths, return_counts=True)
    below = np.concatenate([[0], np.cumsum(counts)])  # pairs of the first k distinct widths
    best, cut = np.full(len(values) + 1, np.inf), np.zeros(len(values) + 1, dtype=int)
    best[0] = 0.0
    for j in range(1, len(values) + 1):  # the first j distinct widths, the j-th chosen
        for i in range(j):  # widths i..j-1 padded to the j-th
            cost = best[i] + program_cost + (below[j] - below[i]) * (values[j - 1] / 32) ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i
    padded, j = np.empty(len(values), dtype=int), len(values)
    while j > 0:
        padded[cut[j] : j], j = values[j - 1], cut[j]
    return padded[np.searchsorted(values, widths)]


@functools.cache
def _overlay_program(settings: OverlaySettings, devices: int, per_call: int, width: int, directory: Path | None):
    """The distributed overlay for calls of ``per_call`` pairs of ``width`` points, one per
    (settings, devices, shape): traced once and kept in ``directory``
    (:func:`cmcflow.stored_programs.stored_program`), or traced as usual where that is ``None``."""
    spread = jnp.asarray(spread_rotations(settings.spread_starts))
    function = distributed(functools.partial(overlay_batch, spread=spread, settings=settings), devices)
    dtype = jax.dtypes.canonicalize_dtype(np.float64)
    points, weights = ((per_call, width, 3), (per_call, width))
    specs = [jax.ShapeDtypeStruct(shape, dtype) for shape in (points, points, weights, weights)]
    key = program_key("overlay", settings, specs, devices)
    return stored_program(function, specs, pair_sharding(devices), key, directory)


def align_overlay(
    ref,
    fit,
    ref_mask,
    fit_mask,
    *,
    settings: OverlaySettings,
    ref_weights=None,
    fit_weights=None,
    devices: int | None = None,
) -> Alignment:
    """Gaussian-overlay alignment of B pairs ``ref (B, N, 3)``, ``fit (B, M, 3)`` with masks
    ``(B, N)``, ``(B, M)``, distributed over ``devices`` (default: all).

    Pairs are padded to a few widths (:func:`width_plan`: a new width is compiled only where
    the padding it saves outweighs a compilation) and aligned ``devices ×
    PAIRS_PER_DEVICE`` at a time, so that a batch of any size and mix compiles one program
    per chosen width; a pair's result does not depend on its width or call. With a
    persistent compilation cache, each program is traced once per host type and code
    version and kept beside it (:mod:`cmcflow.stored_programs`): later jobs load it.
    """
    devices = devices or jax.device_count()
    ref, fit, ref_w, fit_w = masked_weights(ref, fit, ref_mask, fit_mask, ref_weights, fit_weights)
    widths = width_plan(occupied_widths(ref_w, fit_w, WIDTH_STEP), PROGRAM_COST_PAIRS)
    wide = int(widths.max())
    padded = [
        np.pad(a, [(0, 0), (0, max(wide - a.shape[1], 0))] + [(0, 0)] * (a.ndim - 2)) for a in (ref, fit, ref_w, fit_w)
    ]
    transforms, scores = np.zeros((len(ref), 4, 4)), np.zeros(len(ref))
    directory = stored_programs_dir()
    for width in np.unique(widths):
        pairs = np.flatnonzero(widths == width)
        per_call = min(devices * PAIRS_PER_DEVICE, len(pairs) + -len(pairs) % devices)
        for start in range(0, len(pairs), per_call):
            chunk = pairs[start : start + per_call]
            group = [
                np.concatenate([a[chunk, :width], np.zeros((per_call - len(chunk), width, *a.shape[2:]))])
                for a in padded
            ]
            program = _overlay_program(settings, devices, per_call, int(width), directory)
            _, call_transforms, call_scores = program(*group)
            transforms[chunk] = np.asarray(call_transforms)[: len(chunk)]
            scores[chunk] = np.asarray(call_scores)[: len(chunk)]
    points = fit @ np.swapaxes(transforms[:, :3, :3], 1, 2) + transforms[:, None, :3, 3]
    return Alignment(points, transforms, scores)
