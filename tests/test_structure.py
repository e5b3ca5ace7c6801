"""The structure model end to end: shard, featurize (MDS start), sample, align, combine.

20 Cα atoms of ubiquitin, 2,000 distance observations with Student-t noise (scale 0.5 Å,
4 degrees of freedom, so sd 0.71 Å), K = 2. The bound on the combined mean comes from the
combined posterior's own spread: if the posterior is calibrated, the squared error of its
mean per atom has expectation tr Σ_n (the atom's posterior variance summed over x, y, z),
so RMSD(mean, truth) ≈ sqrt(mean_n tr Σ_n). We allow twice that, which also absorbs the
CMC approximation; measured here: RMSD 0.27 Å against sqrt(mean tr Σ) = 0.32 Å.
"""

from __future__ import annotations

import json

import arviz as az
import numpy as np
import pytest
from conftest import Workflow, tiny_config

from cmcflow.superposition import align_kabsch, rmsd

pytestmark = pytest.mark.workflow


@pytest.fixture(scope="module")
def structure_run(tmp_path_factory) -> Workflow:
    config = tiny_config(
        model="structure",
        input={"simulate": {"rows": 2000, "points": 20, "seed": 0, "noise_scale": 0.5}},
        # both shards featurized and sampled in one job each: align and combine read the batches' files
        sample={"num_warmup": 200, "num_samples": 200, "shards_per_job": 2},
    )
    workflow = Workflow(tmp_path_factory.mktemp("structure"), config)
    workflow.run()
    return workflow


def test_combined_structure_recovers_the_truth(structure_run):
    results = structure_run.workdir / "results/tiny"
    truth = np.asarray(json.loads((results / "input/truth.json").read_text())["coords"])
    draws = az.from_netcdf(results / "combined/posterior.nc").posterior["coords"].values.reshape(-1, 20, 3)
    mean = draws.mean(axis=0)
    in_truth_frame = align_kabsch(truth[None], mean[None], np.ones((1, 20), bool), allow_reflection=True).points[0]
    error = float(rmsd(in_truth_frame, truth))
    spread = float(np.sqrt(draws.var(axis=0).sum(axis=-1).mean()))
    assert error <= 2 * spread, (error, spread)
    assert error < 1.0


def test_align_stage_outputs_and_covariance_choice(structure_run):
    results = structure_run.workdir / "results/tiny"
    shards = json.loads((results / "combined/shards.json").read_text())
    assert shards["covariance"].startswith("per-point 3x3 blocks")
    assert shards["location"].startswith("distance consensus over ") and shards["location_shift_rmsd"] >= 0
    manifest = json.loads((results / "shards/manifest.json").read_text())
    assert manifest["stratified_by"] == ["i", "j"]
    reference = json.loads((results / "aligned/reference.json").read_text())
    assert np.asarray(reference["coords"]).shape == (20, 3)
    aligned = az.from_netcdf(results / "aligned/shard-0000.nc")
    assert {"align_score", "align_rmsd"} <= set(aligned.sample_stats.data_vars)
    diagnostics = json.loads((results / "aligned/shard-0000.diagnostics.json").read_text())
    assert diagnostics["mean_align_rmsd"] < 2.0
    assert "Shard diagnostics" in (results / "report/report.html").read_text()


def test_align_stage_is_only_in_rigid_models_dags(structure_run, tmp_path):
    logistic = Workflow(tmp_path, tiny_config())
    jobs = logistic.planned_jobs()
    assert "align" not in jobs and "align_reference" not in jobs and jobs["sample"] == 2
    assert structure_run.planned_jobs() == {}


def test_the_fulldata_run_of_a_structure_is_aligned_into_one_frame(structure_run):
    """The full-data run of a rigid model is aligned before its diagnostics and summary are
    computed, and its aligned chains share one frame: the median R-hat over the coordinates
    is near 1 and the mean recovers the truth as the combination's does.

    The median, not the largest: a chain may sit for a hundred draws or more in a local mode
    where one point is flipped through the plane of its partners (a worse fit, larger
    sigma), which R-hat rightly flags on that point and its neighbours, and which no frame
    removes. Over 12 runs of this test's data (seeds 0–5, the data as the program's
    arguments and closed over), three had such a chain: max R-hat 1.17–1.32, median
    1.009–1.017, and 1.05–1.09 for the same draws unaligned. The bound 1.03 lies between.
    """
    structure_run.run("fulldata")
    results = structure_run.workdir / "results/tiny"
    diagnostics = json.loads((results / "fulldata/diagnostics.json").read_text())
    assert diagnostics["mean_align_rmsd"] > 0
    r_hat = np.array([row["r_hat"] for label, row in diagnostics["parameters"].items() if label.startswith("coords")])
    full = az.from_netcdf(results / "fulldata/posterior.nc")
    assert "align_rmsd" in full.sample_stats
    # the diagnostics are the written (aligned) draws' own
    np.testing.assert_allclose(np.sort(r_hat), np.sort(az.rhat(full.posterior)["coords"].values.ravel()), atol=1e-3)
    assert np.median(r_hat) < 1.03, np.median(r_hat)
    truth = np.asarray(json.loads((results / "input/truth.json").read_text())["coords"])
    mean = full.posterior["coords"].values.reshape(-1, 20, 3).mean(axis=0)
    in_truth_frame = align_kabsch(truth[None], mean[None], np.ones((1, 20), bool), allow_reflection=True).points[0]
    assert float(rmsd(in_truth_frame, truth)) < 1.0
