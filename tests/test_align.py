"""The alignment kernel: exact recovery, padding, device counts, overlay vs Kabsch."""

from __future__ import annotations

import numpy as np
import pytest

from cmcflow.overlay import (
    AXIS_ORDERS,
    MIRROR,
    SHRINK,
    OverlaySettings,
    align_overlay,
    bfgs_iteration,
    bfgs_start,
    occupied_widths,
    principal_axes,
    principal_axes_rotations,
    quaternion_matrix,
    spread_rotations,
    width_plan,
)
from cmcflow.superposition import align_kabsch

SETTINGS = OverlaySettings(
    iterations=30, axis_orders="matched", spread_starts=8, allow_reflection=True, use_correspondence=False
)


def random_rotation(rng) -> np.ndarray:
    q = rng.normal(size=4)
    return np.asarray(quaternion_matrix(q / np.linalg.norm(q)))


def rotation_angle(a: np.ndarray, b: np.ndarray) -> float:
    """Angle (rad) of the rotation a⁻¹b."""
    return float(np.arccos(np.clip((np.trace(a.T @ b) - 1) / 2, -1, 1)))


def moved_clouds(rng, batch, points, mirrored):
    """Reference clouds (B, N, 3) ~ a small protein's spread, and rigidly moved copies.

    Returns ref, fit and the true linear maps L (fit = L⁻¹ … i.e. ref = L fit + t).
    """
    ref = rng.normal(scale=5.0, size=(batch, points, 3))
    rotations = np.stack([random_rotation(rng) for _ in range(batch)])
    linear_to_fit = rotations @ MIRROR if mirrored else rotations
    fit = np.einsum("bij,bnj->bni", linear_to_fit, ref) + rng.normal(scale=3.0, size=(batch, 1, 3))
    return ref, fit, np.linalg.inv(linear_to_fit)


@pytest.mark.parametrize("mirrored", [False, True], ids=["proper", "mirrored"])
def test_random_rigid_motion_is_recovered(mirrored):
    rng = np.random.default_rng(1)
    ref, fit, truth = moved_clouds(rng, batch=6, points=25, mirrored=mirrored)
    mask = np.ones(ref.shape[:2], dtype=bool)
    result = align_overlay(ref, fit, mask, mask, settings=SETTINGS)
    assert np.all(result.scores >= 0.999), result.scores
    linear = result.transforms[:, :3, :3]
    assert np.allclose(np.linalg.det(linear), -1.0 if mirrored else 1.0)
    errors = [
        rotation_angle(linear[b] @ (MIRROR if mirrored else np.eye(3)), truth[b] @ (MIRROR if mirrored else np.eye(3)))
        for b in range(6)
    ]
    assert max(errors) <= 1e-3, errors
    assert np.allclose(result.points, ref, atol=1e-3)


def test_bfgs_reaches_the_minimum_of_an_ill_conditioned_quadratic():
    """f(x) = ½ (x − c)ᵀ A (x − c) in 6 dimensions, A of condition number 100: BFGS with exact
    curvature pairs and whole steps ends at c: within 40 iterations (here f falls below 1e-20
    after 30; its first 20 learn the curvature)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, c = jnp.asarray(q @ np.diag(np.geomspace(1, 100, 6)) @ q.T), jnp.asarray(rng.normal(size=6))
    value_and_grad = jax.value_and_grad(lambda x: 0.5 * (x - c) @ a @ (x - c))
    lane = bfgs_start(value_and_grad, jnp.zeros(6))
    for _ in range(40):
        lane = bfgs_iteration(value_and_grad, lane)
    np.testing.assert_allclose(lane.x, c, atol=1e-8)


def test_a_bfgs_trial_that_does_not_descend_is_rejected_and_shortened():
    """A trial 100× too long raises f = ½|x − c|²: x, f and the estimate stay, and the next
    trial is the quadratic's minimum (1/100 of the step) kept within SHRINK of it (1/10);
    once more rejected (10× too long), the third trial lands on c."""
    import jax
    import jax.numpy as jnp

    c = jnp.ones(6)
    value_and_grad = jax.value_and_grad(lambda x: 0.5 * jnp.sum((x - c) ** 2))
    lane = bfgs_start(value_and_grad, jnp.zeros(6))._replace(h=100 * jnp.eye(6))
    after = bfgs_iteration(value_and_grad, lane)
    np.testing.assert_array_equal(after.x, lane.x)
    np.testing.assert_array_equal(after.h, lane.h)
    assert float(after.f) == float(lane.f) and bool(after.fresh)
    assert float(after.step) == pytest.approx(SHRINK[0])
    again = bfgs_iteration(value_and_grad, after)
    np.testing.assert_array_equal(again.x, lane.x)
    np.testing.assert_allclose(bfgs_iteration(value_and_grad, again).x, c)


def test_reflection_is_not_tried_unless_allowed():
    rng = np.random.default_rng(2)
    ref, fit, _ = moved_clouds(rng, batch=2, points=25, mirrored=True)
    mask = np.ones(ref.shape[:2], dtype=bool)
    proper_only = OverlaySettings(
        iterations=30, axis_orders="matched", spread_starts=8, allow_reflection=False, use_correspondence=False
    )
    result = align_overlay(ref, fit, mask, mask, settings=proper_only)
    assert np.allclose(np.linalg.det(result.transforms[:, :3, :3]), 1.0)
    assert np.all(result.scores < 0.9)


def test_masked_padded_batch_equals_unpadded_pairs():
    """Pairs of different sizes padded into one batch give what each pair gives alone."""
    rng = np.random.default_rng(3)
    sizes = [12, 20, 17]
    pairs = [moved_clouds(rng, batch=1, points=n, mirrored=False)[:2] for n in sizes]
    width = max(sizes) + 3
    ref = np.zeros((3, width, 3))
    fit = np.full((3, width, 3), 1e3)  # padded points far away: must not matter
    mask = np.zeros((3, width), dtype=bool)
    for b, (r, f) in enumerate(pairs):
        ref[b, : sizes[b]], fit[b, : sizes[b]], mask[b, : sizes[b]] = r[0], f[0], True
    batch = align_overlay(ref, fit, mask, mask, settings=SETTINGS)
    for b, (r, f) in enumerate(pairs):
        alone = align_overlay(r, f, np.ones((1, sizes[b]), bool), np.ones((1, sizes[b]), bool), settings=SETTINGS)
        np.testing.assert_allclose(batch.transforms[b], alone.transforms[0], atol=1e-6)
        np.testing.assert_allclose(batch.scores[b], alone.scores[0], atol=1e-8)
    assert np.all(np.isfinite(batch.points)) and np.all(np.isfinite(batch.scores))


@pytest.mark.parametrize("batch", [5, 8])
def test_one_two_and_four_devices_agree(batch):
    rng = np.random.default_rng(4)
    ref, fit, _ = moved_clouds(rng, batch=batch, points=15, mirrored=False)
    fit = fit + rng.normal(scale=0.3, size=fit.shape)  # noisy: the optimum is not trivial
    mask = np.ones(ref.shape[:2], dtype=bool)
    results = {d: align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=d) for d in (1, 2, 4)}
    kabsch = {d: align_kabsch(ref, fit, mask, allow_reflection=False, devices=d) for d in (1, 2, 4)}
    for d in (2, 4):
        np.testing.assert_allclose(results[d].transforms, results[1].transforms, atol=1e-5)
        np.testing.assert_allclose(results[d].scores, results[1].scores, atol=1e-5)
        np.testing.assert_allclose(kabsch[d].transforms, kabsch[1].transforms, atol=1e-5)


def test_overlay_and_kabsch_agree_on_noise_free_labelled_clouds():
    rng = np.random.default_rng(5)
    ref, fit, _ = moved_clouds(rng, batch=4, points=30, mirrored=False)
    mask = np.ones(ref.shape[:2], dtype=bool)
    overlay = align_overlay(ref, fit, mask, mask, settings=SETTINGS)
    kabsch = align_kabsch(ref, fit, mask, allow_reflection=False)
    np.testing.assert_allclose(overlay.transforms, kabsch.transforms, atol=1e-5)
    np.testing.assert_allclose(kabsch.scores, 1.0, atol=1e-10)


def test_occupied_widths_hold_every_weighted_point_of_either_side_in_steps():
    ref_w, fit_w = np.zeros((4, 30)), np.zeros((4, 28))
    ref_w[0, :5], fit_w[0, :5] = 1.0, 1.0  # 5, 5 -> 8
    ref_w[1, [2, 20]], fit_w[1, :7] = 1.0, 1.0  # last weighted point 20 -> 24
    ref_w[2, :30], fit_w[2, :28] = 1.0, 1.0  # 30 (not rounded past the arrays)
    ref_w[3, :8], fit_w[3, :3] = 1.0, 1.0  # 8
    assert list(occupied_widths(ref_w, fit_w, step=8)) == [8, 24, 30, 8]


def test_width_plan_compiles_a_width_only_where_the_padding_it_saves_pays_for_it():
    widths = np.array([16] * 100 + [24] * 3 + [48] * 50)
    # free programs: every width its own; dear programs: one width for all
    np.testing.assert_array_equal(width_plan(widths, program_cost=0.0), widths)
    np.testing.assert_array_equal(width_plan(widths, program_cost=1e6), np.full(len(widths), 48))
    # in between (a program costs 50): padding the 100 pairs of 16 to 48 would cost
    # 100 x (2.25 - 0.25) = 200 > 50, so 16 keeps its program; padding the 3 pairs of 24 to 48
    # costs 3 x (2.25 - 0.5625) = 5 < 50, so 24 has none
    plan = width_plan(widths, program_cost=50.0)
    np.testing.assert_array_equal(plan, [16] * 100 + [48] * 53)

    # the plan minimises programs x cost + sum (width / 32)^2 over every choice of widths
    def cost(padded):
        return len(np.unique(padded)) * 50.0 + np.sum((padded / 32) ** 2)

    alternatives = [[16] * 100 + [24] * 3 + [48] * 50, [24] * 103 + [48] * 50, [48] * 153]
    assert all(cost(plan) <= cost(np.array(other)) for other in alternatives)


def test_a_large_mixed_batch_compiles_one_program_per_planned_width(monkeypatch):
    """More pairs than one call holds, of two planned widths (programs made cheap, so that
    40 pairs get two): one program each, and every pair's score as when aligned alone."""
    import jax

    from cmcflow import overlay

    monkeypatch.setattr(overlay, "PROGRAM_COST_PAIRS", 1.0)

    rng = np.random.default_rng(8)
    sizes = np.where(np.arange(40) < 36, 10, 30)  # 36 small pairs (more than one call holds), 4 large
    ref, fit = np.zeros((40, 30, 3)), np.zeros((40, 30, 3))
    mask = np.arange(30) < sizes[:, None]
    for b, n in enumerate(sizes):
        r, f, _ = moved_clouds(rng, batch=1, points=int(n), mirrored=False)
        ref[b, :n], fit[b, :n] = r[0], f[0]
    assert sorted(set(width_plan(occupied_widths(mask * 1.0, mask * 1.0, 8), 1.0))) == [16, 30]
    jax.clear_caches()
    overlay._overlay_program.cache_clear()
    result = align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=2)
    assert overlay._overlay_program.cache_info().currsize == 2  # 16: 18 calls of 2 pairs; 30: 2 of 2
    alone = align_overlay(ref[[0, 39]], fit[[0, 39]], mask[[0, 39]], mask[[0, 39]], settings=SETTINGS, devices=2)
    np.testing.assert_allclose(result.scores[[0, 39]], alone.scores, atol=1e-8)
    np.testing.assert_allclose(result.scores, 1.0, atol=1e-6)


def test_overlay_without_spread_starts():
    """``align.spread_starts: 0`` leaves the identity, principal-axes and Kabsch starts, and
    still finds the exact superposition of a moved copy."""
    rng = np.random.default_rng(9)
    ref = rng.normal(scale=3.0, size=(2, 12, 3))
    fit = ref @ random_rotation(rng).T + 1.5
    mask = np.ones((2, 12), dtype=bool)
    settings = OverlaySettings(
        iterations=50, axis_orders="matched", spread_starts=0, allow_reflection=False, use_correspondence=True
    )
    assert spread_rotations(0).shape == (0, 3, 3) and settings.starts_per_pair == 6
    result = align_overlay(ref, fit, mask, mask, settings=settings, devices=2)
    np.testing.assert_allclose(result.points, ref, atol=1e-5)
    np.testing.assert_allclose(result.scores, 1.0, atol=1e-9)


@pytest.mark.parametrize("orders", sorted(AXIS_ORDERS))
def test_principal_axes_starts_are_distinct_proper_rotations_between_the_two_frames(orders):
    """Every principal-axes start is a proper rotation that puts each of the fit's principal
    axes on one of the reference's (up to sign), 4 per axis order and no two alike; ``all``
    gives all 24 such rotations, ``matched`` pairs largest with largest."""
    rng = np.random.default_rng(3)
    ref, fit = rng.normal(scale=[4.0, 2.0, 1.0], size=(2, 20, 3))
    fit = fit @ MIRROR  # a left-handed frame on one side: the starts stay proper all the same
    weights = np.ones(20)
    rotations = np.asarray(principal_axes_rotations(ref, weights, fit, weights, AXIS_ORDERS[orders]))
    assert rotations.shape == (4 * len(AXIS_ORDERS[orders]), 3, 3)
    np.testing.assert_allclose(
        rotations @ np.swapaxes(rotations, 1, 2), np.broadcast_to(np.eye(3), rotations.shape), atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-12)
    frame_map = np.asarray(principal_axes(ref, weights)).T @ rotations @ np.asarray(principal_axes(fit, weights))
    np.testing.assert_allclose(np.abs(frame_map), np.round(np.abs(frame_map)), atol=1e-12)  # signed permutations
    assert len({tuple(np.round(m).ravel()) for m in frame_map}) == len(rotations)
    if orders == "matched":
        np.testing.assert_allclose(np.abs(frame_map), np.broadcast_to(np.eye(3), frame_map.shape), atol=1e-12)
    settings = OverlaySettings(
        iterations=1, axis_orders=orders, spread_starts=4, allow_reflection=True, use_correspondence=True
    )
    assert settings.starts_per_pair == 2 * (1 + len(rotations) + 4 + 1)


def test_overlay_programs_are_stored_once_and_loaded_with_identical_results(tmp_path, monkeypatch):
    """With a compilation cache, the overlay's traced program is kept on disk, and a later
    process (here: in-memory caches cleared) loads it instead of tracing, with the same
    transforms and scores as a fresh trace; an unreadable stored program is traced again and
    replaced; without a cache nothing is stored."""
    from cmcflow import overlay, stored_programs

    exports = []
    real_export = stored_programs.export.export
    monkeypatch.setattr(
        stored_programs.export, "export", lambda f, **options: exports.append(f) or real_export(f, **options)
    )
    rng = np.random.default_rng(10)
    ref, fit, _ = moved_clouds(rng, batch=2, points=12, mirrored=False)
    mask = np.ones((2, 12), dtype=bool)

    def align(directory):
        monkeypatch.setattr(overlay, "stored_programs_dir", lambda: directory)
        overlay._overlay_program.cache_clear()
        return align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=2)

    traced = align(None)
    assert exports == []
    store = tmp_path / "exported"
    for expected_exports in (1, 1):  # traced and stored, then loaded
        result = align(store)
        assert len(exports) == expected_exports
        np.testing.assert_array_equal(result.transforms, traced.transforms)
        np.testing.assert_array_equal(result.scores, traced.scores)
    (stored,) = store.glob("*.jaxexport")
    stored.write_bytes(b"not a program")
    result = align(store)
    assert len(exports) == 2 and list(store.iterdir()) == [stored] and stored.stat().st_size > 1000
    np.testing.assert_array_equal(result.scores, traced.scores)
    with pytest.warns(UserWarning, match="could not store a traced program"):
        result = align(stored / "exported")  # under a file: cannot be created, even by root
    np.testing.assert_array_equal(result.scores, traced.scores)


def test_stored_program_keys_name_settings_shapes_and_devices():
    import jax

    from cmcflow.stored_programs import program_key

    specs = [jax.ShapeDtypeStruct((2, 16, 3), np.float32)]
    key = program_key("overlay", SETTINGS, specs, 2)
    assert key == program_key("overlay", SETTINGS, specs, 2)
    other_settings = OverlaySettings(**{**SETTINGS.__dict__, "spread_starts": SETTINGS.spread_starts + 1})
    assert key != program_key("overlay", other_settings, specs, 2)
    assert key != program_key("overlay", SETTINGS, [jax.ShapeDtypeStruct((2, 24, 3), np.float32)], 2)
    assert key != program_key("overlay", SETTINGS, specs, 4)
