"""Combination pieces: block-diagonal consensus against NumPyro's, generalised Procrustes,
the distance location of rigid models."""

from __future__ import annotations

import numpy as np
import pytest
from numpyro.infer.hmc_util import consensus

from cmcflow.align import align_kabsch
from cmcflow.align_draws import generalised_procrustes, rmsd
from cmcflow.combine import (
    block_consensus,
    distance_consensus,
    fit_to_distances,
    flatten,
    locate_by_distances,
    pair_distances,
    point_blocks,
    superpose,
    unflatten,
)
from cmcflow.models.structure import SIMULATED_CUTOFF, read_structure

from test_align import random_rotation


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
    np.testing.assert_allclose(block_consensus(subposteriors, [np.arange(dimension)]), full, rtol=1e-7, atol=1e-9)
    singletons = [np.array([i]) for i in range(dimension)]
    np.testing.assert_allclose(block_consensus(subposteriors, singletons), diagonal, rtol=1e-7, atol=1e-9)


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
        [(shape + rng.normal(scale=0.05, size=shape.shape)) @ random_rotation(rng).T + rng.normal(size=3) for _ in range(40)]
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
    distances, precision = distance_consensus([shard_a, shard_b], np.array([[0, 1]]))
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
    located, shift = locate_by_distances(combined, shards, pairs)
    assert rmsd(superpose(atoms, located.mean(axis=0)), atoms) < 0.02
    np.testing.assert_allclose(located - located.mean(axis=0), combined - combined.mean(axis=0), atol=1e-12)
    assert shift > 0.2
    # the located structure sits in the combined draws' frame: superposing it changes nothing
    mean = located.mean(axis=0)
    np.testing.assert_allclose(superpose(combined.mean(axis=0), mean), mean, atol=1e-8)
    assert shift == pytest.approx(rmsd(mean, combined.mean(axis=0)))


def test_read_run_gives_what_arviz_reads_for_a_run_and_a_failure_record(tmp_path):
    """Combine's fast reader returns the same groups, values, dims, coordinates and
    attributes as ``az.from_netcdf``."""
    import arviz as az
    import xarray as xr

    from cmcflow.sample import failed_run, read_run, write_run

    rng = np.random.default_rng(0)
    draws = {"beta": rng.normal(size=(4, 30, 3)), "sigma": rng.gamma(2.0, size=(4, 30)), "coords": rng.normal(size=(4, 30, 5, 3))}
    run = az.from_dict(
        posterior=draws, sample_stats={"diverging": np.zeros((4, 30), dtype=bool)},
        dims={"coords": ["point", "axis"]}, coords={"axis": ["x", "y", "z"]},
        attrs={"shard": 3, "rows": 250, "compile_seconds": 1.5, "model": "structure"},
    )
    run.add_groups(unconstrained_posterior={"beta": draws["beta"], "sigma": np.log(draws["sigma"])})
    write_run(run, {}, tmp_path / "run.nc", tmp_path / "run.json")
    write_run(*failed_run(5, "NUTS raised: bad init"), tmp_path / "failed.nc", tmp_path / "failed.json")

    for name in ("run.nc", "failed.nc"):
        expected, read = az.from_netcdf(tmp_path / name), read_run(tmp_path / name)
        assert set(read.groups()) == set(expected.groups()) - {"sample_stats"}
        for group in read.groups():
            xr.testing.assert_identical(read[group], expected[group])
