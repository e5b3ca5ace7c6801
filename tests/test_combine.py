"""Combination pieces: block-diagonal consensus against NumPyro's, generalised Procrustes."""

from __future__ import annotations

import numpy as np
from numpyro.infer.hmc_util import consensus

from cmcflow.align import align_kabsch
from cmcflow.align_draws import generalised_procrustes, rmsd
from cmcflow.combine import block_consensus, flatten, point_blocks, unflatten

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
