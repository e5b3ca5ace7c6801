"""3-D structure of N points from noisy pairwise distance observations.

    coords_n ~ Normal(0, prior_sd · I₃)   (n = 0..N-1),      sigma ~ HalfNormal(noise_scale)
    distance_k | coords, sigma ~ StudentT(nu, |coords[i_k] − coords[j_k]|, sigma)

Input rows: ``i, j, distance``. The Student-t likelihood keeps wrong observations from
dragging the structure. The posterior is invariant under rotation, translation and
reflection of the cloud: the model is ``rigid`` and gets the align stage. Observed
distances can be ≤ 0 under noise: the likelihood takes them as they are; the MDS start
(which needs positive distances) clips them to ``MIN_DISTANCE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components, shortest_path

from cmcflow.errors import InputError
from cmcflow.models import POSITIVE, ModelSpec, Role
from cmcflow.models.rows import in_data_precision, pad_rows

if TYPE_CHECKING:
    import pandas as pd

#: Cα coordinates of human ubiquitin (PDB 1UBQ, public domain): the demo structure.
UBIQUITIN = Path(__file__).resolve().parents[1] / "data" / "ubiquitin_1ubq_ca.csv"
#: Demo data observe every pair of atoms closer than this (Å) ...
SIMULATED_CUTOFF = 12.0
#: ... with Student-t noise of this scale (Å) and degrees of freedom. The default scale
#: gives full-data NUTS on the demo (34,000 distances) a posterior sd near 0.18 Å per atom.
SIMULATED_NOISE_SCALE = 1.8
SIMULATED_NU = 4.0
#: Distances below this (Å) are clipped where positive distances are needed (MDS start).
MIN_DISTANCE = 0.1
#: Per-chain jitter (Å) of the MDS start, so chains start apart.
START_JITTER = 0.3


def structure_model(i, j, distance, mask, start_coords, prior_sd, noise_scale, nu):
    """``i, j (R,)`` point indices, ``distance (R,)`` Å, ``mask (R,)``; ``start_coords (N, 3)``
    fixes N (its values are only the MDS start)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    coords = numpyro.sample("coords", dist.Normal(0.0, prior_sd).expand([start_coords.shape[0], 3]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(noise_scale))
    coords, sigma = in_data_precision(distance, coords, sigma)
    # the tiny constant keeps the gradient finite where two points coincide (padded rows: i = j = 0)
    modelled = jnp.sqrt(jnp.sum((coords[i] - coords[j]) ** 2, axis=-1) + 1e-12)
    with numpyro.plate("rows", i.shape[0]):
        numpyro.sample("distance", dist.StudentT(nu, modelled, sigma).mask(mask), obs=distance)


#: Distinct partners a point needs: in 3-D a point observed against fewer can turn about
#: them without changing any observed distance, so the data cannot place it.
MIN_PARTNERS = 3


def table_facts(columns: dict[str, np.ndarray]) -> dict:
    """``num_points`` N = largest index + 1 over the whole table, after checking that the
    distances can place the points: no row pairs a point with itself; every index 0 … N − 1
    is observed (so a stray huge index is named, never allocated); the pairs connect all
    points; every point has at least ``MIN_PARTNERS`` distinct partners."""
    i, j = columns["i"].astype(np.int64), columns["j"].astype(np.int64)
    where = "columns 'i' and 'j'"
    same = int(np.sum(i == j))
    if same:
        raise InputError(f"{where}: {same} of {len(i)} rows pair a point with itself")
    observed = np.unique(np.concatenate([i, j]))
    num_points = int(observed[-1]) + 1
    if len(observed) < num_points:
        unobserved = num_points - len(observed)
        first = int(np.setdiff1d(np.arange(min(num_points, len(observed) + 1)), observed)[0])
        raise InputError(
            f"{where}: the largest index is {num_points - 1}, so {num_points} points, but {unobserved} of them "
            f"are never observed (the first: {first}); number the points 0 … N − 1"
        )
    pairs = np.unique(np.sort(np.stack([i, j], axis=1), axis=1), axis=0)
    partners = np.bincount(pairs.ravel(), minlength=num_points)
    few = np.flatnonzero(partners < MIN_PARTNERS)
    if len(few):
        raise InputError(
            f"{where}: {len(few)} of {num_points} points have fewer than {MIN_PARTNERS} distinct partners (point "
            f"{few[0]}: {partners[few[0]]}); distances to fewer points cannot place a point in 3-D"
        )
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(num_points, num_points))
    groups, labels = connected_components(graph, directed=False)
    if groups > 1:
        apart = int(np.flatnonzero(labels != labels[0])[0])
        raise InputError(
            f"{where}: the observed pairs split the {num_points} points into {groups} groups that no distance "
            f"connects (point 0 and point {apart} are in different ones); their relative placement is unknowable"
        )
    return {"num_points": num_points}


def mds_coordinates(i: np.ndarray, j: np.ndarray, distance: np.ndarray, num_points: int) -> np.ndarray:
    """Classical MDS ``(num_points, 3)`` of the mean observed distances, missing pairs completed
    by shortest paths (distances clipped to ``MIN_DISTANCE``); centred at the origin."""
    low, high = np.minimum(i, j), np.maximum(i, j)
    clipped = np.maximum(distance, MIN_DISTANCE)
    sums = coo_matrix((clipped, (low, high)), shape=(num_points, num_points)).toarray()
    counts = coo_matrix((np.ones_like(clipped), (low, high)), shape=(num_points, num_points)).toarray()
    mean = np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    paths = shortest_path(mean, directed=False)
    finite = np.isfinite(paths)
    paths[~finite] = paths[finite].max() if finite.any() else 1.0  # disconnected points: far away
    centring = np.eye(num_points) - 1.0 / num_points
    gram = -0.5 * centring @ paths**2 @ centring
    values, vectors = np.linalg.eigh(gram)
    top = np.argsort(values)[::-1][:3]
    return vectors[:, top] * np.sqrt(np.maximum(values[top], 0.0))


def featurize(columns: dict[str, np.ndarray], pad_to: int, facts: dict) -> dict[str, np.ndarray]:
    """``i, j (pad_to,)`` int64, ``distance (pad_to,)``, ``mask (pad_to,)``, ``start_coords (N, 3)``."""
    i, j = columns["i"].astype(np.int64), columns["j"].astype(np.int64)
    distance = np.asarray(columns["distance"], dtype=np.float64)
    return {
        "i": pad_rows(i, pad_to),
        "j": pad_rows(j, pad_to),
        "distance": pad_rows(distance, pad_to),
        "mask": pad_rows(np.ones(len(i), dtype=bool), pad_to),
        "start_coords": mds_coordinates(i, j, distance, facts["num_points"]),
    }


def observed_pairs(features: dict) -> np.ndarray:
    """``(P, 2)`` the distinct pairs ``i < j`` that the shard's real rows observe."""
    real = features["mask"].astype(bool)
    i, j = features["i"][real], features["j"][real]
    return np.unique(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1), axis=0)


def init_values(features: dict, options: dict, num_chains: int, rng: np.random.Generator) -> dict:
    """Each chain starts at the shard's MDS structure, jittered by ``START_JITTER`` Å."""
    start = features["start_coords"]
    return {
        "coords": start + rng.normal(scale=START_JITTER, size=(num_chains, *start.shape)),
        "sigma": 0.5 * options["noise_scale"] * np.exp(rng.normal(scale=0.1, size=num_chains)),
    }


def read_structure(path: Path = UBIQUITIN) -> np.ndarray:
    """``(N, 3)`` coordinates (Å) from a CSV with columns x, y, z ('#' lines are comments)."""
    import pandas as pd

    return pd.read_csv(path, comment="#")[["x", "y", "z"]].to_numpy(dtype=np.float64)


def simulate(
    rows: int, seed: int, points: int | None = None, noise_scale: float = SIMULATED_NOISE_SCALE
) -> tuple[pd.DataFrame, dict]:
    """Distance observations of ubiquitin's first ``points`` Cα atoms (all 76 by default):
    every pair closer than ``SIMULATED_CUTOFF`` observed in turn until ``rows`` rows, with
    Student-t noise of scale ``noise_scale`` Å."""
    import pandas as pd

    coords = read_structure()[:points]
    i, j = np.triu_indices(len(coords), k=1)
    true_distance = np.linalg.norm(coords[i] - coords[j], axis=1)
    close = true_distance < SIMULATED_CUTOFF
    i, j, true_distance = i[close], j[close], true_distance[close]
    pair = np.arange(rows) % len(i)
    rng = np.random.default_rng(seed)
    noise = noise_scale * rng.standard_t(SIMULATED_NU, size=rows)
    table = pd.DataFrame({"i": i[pair], "j": j[pair], "distance": true_distance[pair] + noise})
    truth = {"coords": coords.tolist(), "noise_scale": noise_scale, "nu": SIMULATED_NU, "pairs": int(len(i))}
    return table, truth


SPEC = ModelSpec(
    name="structure",
    numpyro_model=structure_model,
    featurize=featurize,
    featurizer_version="1",
    roles=(
        Role("i", "count", default="i", description="index of the first point"),
        Role("j", "count", default="j", description="index of the second point"),
        Role("distance", "real", default="distance", description="observed distance"),
    ),
    options={"prior_sd": 20.0, "noise_scale": 1.0, "nu": 4.0},
    option_ranges={"prior_sd": POSITIVE, "noise_scale": POSITIVE, "nu": POSITIVE},
    strata=("i", "j"),
    symmetry="rigid",
    point_site="coords",
    observed_pairs=observed_pairs,
    table_facts=table_facts,
    init_values=init_values,
    simulate=simulate,
)
