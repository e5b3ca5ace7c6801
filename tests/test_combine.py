"""Combination pieces: block-diagonal consensus against NumPyro's, generalised Procrustes,
the distance location of rigid models."""

from __future__ import annotations

import numpy as np
import pytest
from numpyro.infer.hmc_util import consensus
from test_align import random_rotation

from cmcflow.align import generalised_procrustes
from cmcflow.consensus import block_consensus, covariance_noise, flatten, point_blocks, unflatten
from cmcflow.locate import distance_consensus, distance_moments, fit_to_distances, locate_by_distances, pair_distances
from cmcflow.models.structure import SIMULATED_CUTOFF, read_structure
from cmcflow.runs import failed_run, read_run, write_run
from cmcflow.superposition import align_kabsch, rmsd, superpose


def gaussian_subposteriors(rng, shards=4, draws=500, dimension=7):
    subposteriors = []
    for _ in range(shards):
        factor = rng.normal(size=(dimension, dimension))
        subposteriors.append(rng.normal(size=dimension) + rng.normal(size=(draws, dimension)) @ factor)
    return subposteriors


def test_one_block_is_full_covariance_consensus_and_singletons_are_diagonal():
    subposteriors = gaussian_subposteriors(np.random.default_rng(0))
    dimension = subposteriors[0].shape[1]
    full = np.asarray(consensus([{"x": s} for s in subposteriors], diagonal=False)["x"])
    diagonal = np.asarray(consensus([{"x": s} for s in subposteriors], diagonal=True)["x"])
    np.testing.assert_allclose(
        block_consensus(subposteriors, [np.arange(dimension)]).draws(), full, rtol=1e-7, atol=1e-9
    )
    singletons = [np.array([i]) for i in range(dimension)]
    np.testing.assert_allclose(block_consensus(subposteriors, singletons).draws(), diagonal, rtol=1e-7, atol=1e-9)


def test_point_blocks_partition_the_parameters():
    draws = {"coords": np.zeros((5, 4, 3)), "sigma": np.zeros(5), "beta": np.zeros((5, 2))}
    sites = list(draws)
    blocks = point_blocks(draws, sites, "coords")
    assert [list(block) for block in blocks[:4]] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert list(blocks[4]) == [12, 13, 14]
    flat = flatten({name: np.random.default_rng(1).normal(size=v.shape) for name, v in draws.items()}, sites)
    assert flat.shape == (5, 15)
    np.testing.assert_array_equal(flatten(unflatten(flat, draws, sites), sites), flat)


def test_generalised_procrustes_recovers_the_shape():
    rng = np.random.default_rng(2)
    shape = rng.normal(scale=5.0, size=(25, 3))
    clouds = np.stack(
        [
            (shape + rng.normal(scale=0.05, size=shape.shape)) @ random_rotation(rng).T + rng.normal(size=3)
            for _ in range(40)
        ]
    )
    mean, rounds = generalised_procrustes(clouds, allow_reflection=False)
    assert rounds < 100
    np.testing.assert_allclose(mean.mean(axis=0), 0.0, atol=1e-9)
    moved = align_kabsch(mean[None], shape[None], np.ones((1, 25), bool), allow_reflection=False).points[0]
    assert rmsd(moved, mean) < 0.05


def ubiquitin_fragment(points=30):
    """``(points, 3)`` Cα atoms and ``(P, 2)`` their pairs closer than the simulation cutoff."""
    atoms = read_structure()[:points]
    first, second = np.triu_indices(points, k=1)
    close = np.linalg.norm(atoms[first] - atoms[second], axis=1) < SIMULATED_CUTOFF
    return atoms, np.stack([first[close], second[close]], axis=1)


def test_distance_consensus_weights_each_pair_by_its_precision():
    # two points on the x axis; shard A's distance draws have mean 3, sd 0.1; B's mean 4, sd 0.2
    offsets = np.array([-1.0, 1.0] * 50)
    shard_a, shard_b = (np.zeros((100, 2, 3)) for _ in range(2))
    shard_a[:, 1, 0] = 3.0 + 0.1 * offsets
    shard_b[:, 1, 0] = 4.0 + 0.2 * offsets
    pair = np.array([[0, 1]])
    distances, precision = distance_consensus([distance_moments(shard, pair) for shard in (shard_a, shard_b)])
    np.testing.assert_allclose(distances, [(3 / 0.1**2 + 4 / 0.2**2) / (1 / 0.1**2 + 1 / 0.2**2)])  # 3.2
    np.testing.assert_allclose(precision, [1 / 0.1**2 + 1 / 0.2**2])


def test_fit_to_distances_recovers_the_structure_from_its_observed_pairs():
    atoms, pairs = ubiquitin_fragment()
    start = atoms + np.random.default_rng(3).normal(scale=0.5, size=atoms.shape)
    fitted = fit_to_distances(pair_distances(atoms[None], pairs)[0], np.ones(len(pairs)), pairs, start)
    assert rmsd(superpose(atoms, fitted), atoms) < 1e-4


def test_locate_by_distances_removes_the_contraction_of_a_spread_out_mean():
    # Every draw has the true shape, turned by a random rotation of about 0.3 rad: the mean
    # of the draws is a contracted cloud, the mean of every distance is the true distance.
    rng = np.random.default_rng(4)
    atoms, pairs = ubiquitin_fragment()
    centre = atoms.mean(axis=0)

    def turned_draws(count):
        draws = []
        for _ in range(count):
            axis = rng.normal(size=3)
            angle = rng.normal(scale=0.3)
            k = np.cross(np.eye(3), axis / np.linalg.norm(axis))  # K x = axis × x, as a matrix
            rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
            draws.append((atoms - centre) @ rotation.T + centre + rng.normal(scale=0.01, size=atoms.shape))
        return np.stack(draws)

    shards = [turned_draws(400) for _ in range(3)]
    combined = np.mean(shards, axis=0)  # any draws with the contracted mean
    assert rmsd(superpose(atoms, combined.mean(axis=0)), atoms) > 0.2
    located, shift = locate_by_distances(combined, [distance_moments(shard, pairs) for shard in shards], pairs)
    assert rmsd(superpose(atoms, located.mean(axis=0)), atoms) < 0.02
    np.testing.assert_allclose(located - located.mean(axis=0), combined - combined.mean(axis=0), atol=1e-12)
    assert shift > 0.2
    # the located structure sits in the combined draws' frame: superposing it changes nothing
    mean = located.mean(axis=0)
    np.testing.assert_allclose(superpose(combined.mean(axis=0), mean), mean, atol=1e-8)
    assert shift == pytest.approx(rmsd(mean, combined.mean(axis=0)))


def test_read_run_gives_what_arviz_reads_for_a_run_and_a_failure_record(tmp_path):
    """A run written without xarray (``write_run``) reads back in ArviZ as it was (booleans,
    text coordinates, attributes), and combine's fast reader returns the same groups,
    values, dims, coordinates and attributes as ``az.from_netcdf``."""
    import arviz as az
    import xarray as xr

    rng = np.random.default_rng(0)
    draws = {
        "beta": rng.normal(size=(4, 30, 3)),
        "sigma": rng.gamma(2.0, size=(4, 30)),
        "coords": rng.normal(size=(4, 30, 5, 3)),
    }
    run = az.from_dict(
        posterior=draws,
        sample_stats={"diverging": np.zeros((4, 30), dtype=bool)},
        dims={"coords": ["point", "axis"]},
        coords={"axis": ["x", "y", "z"]},
        attrs={"shard": 3, "rows": 250, "compile_seconds": 1.5, "model": "structure"},
    )
    run.add_groups(unconstrained_posterior={"beta": draws["beta"], "sigma": np.log(draws["sigma"])})
    write_run(run, {}, tmp_path / "run.nc", tmp_path / "run.json")
    write_run(*failed_run(5, "NUTS raised: bad init"), tmp_path / "failed.nc", tmp_path / "failed.json")

    written = az.from_netcdf(tmp_path / "run.nc")  # what ArviZ reads is what was written
    for group in run.groups():
        xr.testing.assert_identical(written[group], run[group])
    for name in ("run.nc", "failed.nc"):
        expected, read = az.from_netcdf(tmp_path / name), read_run(tmp_path / name)
        assert set(read.groups()) == set(expected.groups()) - {"sample_stats"}
        for group in read.groups():
            xr.testing.assert_identical(read[group], expected[group])


def ar1_draws(rng, chains, per_chain, dimension, rho):
    """``(chains · per_chain, dimension)`` chain-major AR(1) draws with unit marginal variance."""
    draws = np.empty((chains, per_chain, dimension))
    draws[:, 0] = rng.normal(size=(chains, dimension))
    for step in range(1, per_chain):
        draws[:, step] = rho * draws[:, step - 1] + np.sqrt(1 - rho**2) * rng.normal(size=(chains, dimension))
    return draws.reshape(chains * per_chain, dimension)


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_covariance_noise_counts_the_autocorrelation_of_the_draws(rho):
    """For AR(1) chains with independent unit-variance coordinates, Σ_ij Var(Σ̂_ij) is
    (tr(Σ)² + ‖Σ‖²_F) / S times (1 + ρ²) / (1 − ρ²) (products of the draws are AR(1) in ρ²):
    1 for independent draws, 2.92 at ρ = 0.7. 50 blocks of 4 coordinates average the
    estimate (20 batches each; relative sd of the mean ≈ 0.05)."""
    rng = np.random.default_rng(5)
    chains, per_chain, blocks, size = 4, 1000, 50, 4
    values = ar1_draws(rng, chains, per_chain, blocks * size, rho).reshape(chains * per_chain, blocks, size)
    iid = (size**2 + size) / (chains * per_chain)  # Σ = I
    ratio = covariance_noise(values, chains).mean() / iid
    assert ratio == pytest.approx((1 + rho**2) / (1 - rho**2), rel=0.15)


def exchangeable_gaussian_shards(rng, shards=8, chains=4, per_chain=250, dimension=20):
    """K subposteriors that share one correlated covariance Σ and differ in their means as
    random shards of one data set do (μ_s − μ ~ N(0, Σ)); returns them (chain-major) and
    the mean and covariance of their exact Gaussian product."""
    factor = np.linalg.cholesky(0.6 * np.ones((dimension, dimension)) + 0.4 * np.eye(dimension))
    scale = np.exp(rng.normal(scale=0.5, size=dimension))
    root = scale[:, None] * factor
    means = rng.normal(size=dimension) + rng.normal(size=(shards, dimension)) @ root.T
    draws = [mean + rng.normal(size=(chains * per_chain, dimension)) @ root.T for mean in means]
    return draws, means.mean(axis=0), root @ root.T / shards


def test_auto_shrinkage_removes_the_noise_of_the_weights_for_exchangeable_shards():
    """20 correlated parameters, 1,000 draws per shard, 8 shards: the weights' sampling noise
    moves the raw consensus mean off the exact product mean; auto shrinkage takes λ near 1
    (measured over 10 seeds: λ 0.75–1, median 1) and cuts the error from rms 0.117 to 0.037
    product sd (the means' Monte Carlo error alone is 1/√(8 · 1000) ≈ 0.011; the pooled
    shape's own noise makes up most of the rest)."""
    errors = {0.0: [], "auto": []}
    for seed in range(10):
        shards, mean, covariance = exchangeable_gaussian_shards(np.random.default_rng([11, seed]))
        sd = np.sqrt(np.diag(covariance))
        for shrinkage in errors:
            accumulator = block_consensus(shards, [np.arange(20)], shrinkage=shrinkage, chains=4)
            errors[shrinkage].append((accumulator.draws().mean(axis=0) - mean) / sd)
            if shrinkage == "auto":
                assert min(accumulator.intensities) > 0.6, accumulator.intensities
    rms = {shrinkage: float(np.sqrt(np.mean(np.square(values)))) for shrinkage, values in errors.items()}
    assert rms["auto"] < 0.05 and rms[0.0] > 2 * rms["auto"], rms


def heterogeneous_gaussian_shards(rng, shards=6, dimension=7, draws=2000):
    """K subposteriors whose covariances differ in shape (Σ_s = A_s A_sᵀ, A_s = I + N(0, 0.5²))
    and whose means are consistent with one θ (μ_s ~ N(θ, Σ_s)); returns them and the mean
    and sd of their exact Gaussian product."""
    theta, subposteriors, precisions, weighted = rng.normal(size=dimension), [], [], []
    for _ in range(shards):
        root = np.linalg.cholesky(
            (factor := np.eye(dimension) + 0.5 * rng.normal(size=(dimension, dimension))) @ factor.T
        )
        mean = theta + root @ rng.normal(size=dimension)
        subposteriors.append(mean + rng.normal(size=(draws, dimension)) @ root.T)
        precisions.append(np.linalg.inv(root @ root.T))
        weighted.append(precisions[-1] @ mean)
    covariance = np.linalg.inv(sum(precisions))
    return subposteriors, covariance @ sum(weighted), np.sqrt(np.diag(covariance))


def test_auto_shrinkage_stays_out_where_shard_shapes_differ():
    """Shards of truly different shapes get λ ≈ 0 and the raw consensus' accuracy
    (measured over 10 seeds: λ ≤ 0.002, rms error 0.0567 against 0.0566 product sd)."""
    errors = {0.0: [], "auto": []}
    for seed in range(10):
        subposteriors, mean, sd = heterogeneous_gaussian_shards(np.random.default_rng([5, seed]))
        for shrinkage in errors:
            accumulator = block_consensus(subposteriors, [np.arange(7)], shrinkage=shrinkage, chains=4)
            errors[shrinkage].append((accumulator.draws().mean(axis=0) - mean) / sd)
            if shrinkage == "auto":
                assert max(accumulator.intensities) < 0.01, accumulator.intensities
    rms = {shrinkage: float(np.sqrt(np.mean(np.square(values)))) for shrinkage, values in errors.items()}
    assert rms["auto"] <= 1.05 * rms[0.0], rms
