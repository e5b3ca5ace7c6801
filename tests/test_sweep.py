"""Parameter sweeps (``sweep:`` in an analysis): expansion into grid points, the stages grid
points share (dry-run job counts), and the sweep report's K-stability check on a model whose
CMC is exact at every K (linear-Gaussian) and on one that drifts (logistic regression with
a few dozen rows per shard)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, Workflow, correction_jobs, tiny_config
from snakemake.utils import validate

from cmcflow.compare import in_frame, k_stability, shift, verdict
from cmcflow.config import SCHEMA, check_config, resolve_analyses
from cmcflow.errors import ConfigError
from cmcflow.runs import element_labels
from cmcflow.screening import DISAGREEMENT_P_VALUE
from cmcflow.sweep import grid, key_labels, point_name


def resolved(sweep: dict, **overrides):
    """Analyses and sweeps of the tiny config with ``sweep`` added to its analysis."""
    config = tiny_config(sweep=sweep, **overrides)
    check_config(config)
    validate(config, str(SCHEMA))
    return resolve_analyses(config)


def test_a_sweep_expands_to_the_product_of_its_keys_with_zip_keys_paired():
    sweep = {
        "combine.method": ["consensus", "parametric"],
        "zip": {"sample.num_warmup": [100, 200, 300], "sample.num_samples": [100, 200, 100]},
    }
    points = grid(sweep)
    assert len(points) == 2 * 3
    assert points[1] == {"combine.method": "consensus", "sample.num_warmup": 200, "sample.num_samples": 200}
    analyses, sweeps = resolved(sweep)
    names = list(sweeps["tiny"].points)
    assert names[0] == "tiny/method=consensus,num_warmup=100,num_samples=100"
    assert list(analyses) == names  # the swept analysis itself is not run, its points are
    point = analyses["tiny/method=parametric,num_warmup=300,num_samples=100"]
    assert point.settings["combine"]["method"] == "parametric"
    assert (point.settings["sample"]["num_warmup"], point.settings["sample"]["num_samples"]) == (300, 100)
    assert point.settings["combine"]["seed"] == 0  # defaults filled in as for any analysis
    assert "sweep" not in point.settings and point.sweep == "tiny"


def test_point_names_are_readable_and_unambiguous():
    assert key_labels(["shard.seed", "sample.seed", "model_options.prior_sd"]) == {
        "shard.seed": "shard.seed",
        "sample.seed": "sample.seed",
        "model_options.prior_sd": "prior_sd",
    }
    labels = key_labels(["shard.num_shards", "model_options.prior_sd", "sample.dense_mass"])
    point = {"shard.num_shards": 8, "model_options.prior_sd": 1.0, "sample.dense_mass": True}
    assert point_name("demo", point, labels) == "demo/num_shards=8,prior_sd=1.0,dense_mass=true"


def test_a_swept_model_option_is_set_where_the_analysis_gave_none():
    analyses, _ = resolved({"model_options.prior_sd": [1.0, 5.0]})
    assert [analysis.options["prior_sd"] for analysis in analyses.values()] == [1.0, 5.0]


@pytest.mark.parametrize(
    ("sweep", "overrides", "message"),
    [
        ({"model": ["linear"]}, {}, "'model' cannot be swept"),
        ({"shard.num_shard": [2]}, {}, "unknown key 'shard.num_shard' (shard has: num_shards, rows_per_shard, seed"),
        ({"combine.screen": [1]}, {}, "'combine.screen' is a section; sweep one of its keys"),
        ({"zip": {"shard.seed": [0, 1], "sample.seed": [0]}}, {}, "the lists must have one length"),
        ({"shard.seed": [0, 0]}, {}, "a value is listed twice"),
        ({"combine.method": ["a b"]}, {}, "value 'a b' may hold only"),
        ({"fulldata": True}, {}, "no key is swept"),
        ({"shard.seed": [1], "zip": {"shard.seed": [2]}}, {}, "'shard.seed' swept twice"),
        (
            {"shard.num_shards": ["many"]},
            {},
            "analyses.tiny/num_shards=many.shard.num_shards: 'many' is not of type 'integer'",
        ),
        (
            {"shard.rows_per_shard": [100]},
            {},
            "analyses.tiny/rows_per_shard=100.shard: give exactly one of num_shards",
        ),
        ({"model_options.prior_scale": [1.0]}, {}, "prior_scale"),
    ],
)
def test_a_bad_sweep_is_one_line_naming_the_key(sweep, overrides, message):
    with pytest.raises(ConfigError) as error:
        resolved(sweep, **overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_grid_points_own_a_stage_where_they_first_differ_in_what_it_reads():
    analyses, _ = resolved({"combine.method": ["consensus", "parametric"], "model_options.prior_sd": [1.0, 2.0]})
    first, *_ = analyses
    second = analyses["tiny/method=consensus,prior_sd=2.0"]
    third = analyses["tiny/method=parametric,prior_sd=1.0"]
    # a prior edit: its own sampling on the first point's shards and features
    owners = [second.owner(stage) for stage in ("shard", "featurize", "sample", "combine")]
    assert owners == [first, first, second.name, second.name]
    # another combination: the first point's draws, its own combine
    assert [third.owner(stage) for stage in ("featurize", "sample", "combine")] == [first, first, third.name]
    analyses, _ = resolved({"shard.num_shards": [2, 4]})
    last = analyses["tiny/num_shards=4"]
    assert (last.owner("simulate"), last.owner("shard"), last.owner("fulldata")) == (
        "tiny/num_shards=2",
        last.name,
        "tiny/num_shards=2",
    )  # one full-data run serves every K


def without_correction(config: dict) -> dict:
    config = copy.deepcopy(config)
    for analysis in config["analyses"].values():
        analysis["correct"] = {"enabled": False}
    return config


def test_grid_points_share_the_jobs_of_the_stages_they_agree_on(tmp_path):
    config = tiny_config(
        shard={"num_shards": 4}, sweep={"combine.method": ["consensus", "parametric", "consensus_diag"]}
    )
    workflow = Workflow(tmp_path, config)
    assert workflow.planned_jobs() == {
        "simulate": 1,
        "shard": 1,
        "featurize": 4,
        "preflight": 1,
        "sample": 4,
        "combine": 3,
        **{rule: 3 * count for rule, count in correction_jobs(4).items()},
        "report": 3,
        "sweep_report": 1,
        "all": 1,
    }
    prior = tiny_config(shard={"num_shards": 4}, sweep={"model_options.prior_sd": [1.0, 2.5]})
    assert Workflow(tmp_path, without_correction(prior)).planned_jobs() == {
        "simulate": 1,
        "shard": 1,
        "featurize": 4,
        "preflight": 2,
        "sample": 8,
        "combine": 2,
        "report": 2,
        "sweep_report": 1,
        "all": 1,
    }
    # another split of the same rows: everything from shard on runs again, simulate does not
    seeds = tiny_config(shard={"num_shards": 2}, sweep={"shard.seed": [0, 1]})
    assert Workflow(tmp_path, without_correction(seeds)).planned_jobs() == {
        "simulate": 1,
        "shard": 2,
        "featurize": 4,
        "preflight": 2,
        "sample": 4,
        "combine": 2,
        "report": 2,
        "sweep_report": 1,
        "all": 1,
    }
    shards = tiny_config(sweep={"shard.num_shards": [2, 3], "fulldata": True})
    assert Workflow(tmp_path, without_correction(shards)).planned_jobs() == {
        "simulate": 1,
        "shard": 2,
        "featurize": 5,
        "preflight": 2,
        "sample": 5,
        "combine": 2,
        "sample_fulldata": 1,
        "report": 2,
        "sweep_report": 1,
        "all": 1,
    }


#: K-stability cases: linear-Gaussian (every shard's posterior is Gaussian: CMC is exact at
#: every K) and logistic regression on 1,000 rows, whose 40-row shards at K = 25 have
#: skewed posteriors that the Gaussian product misplaces.
STABILITY_CONFIG = {
    "results_dir": "results",
    "feature_cache_dir": "cache/features",
    "jax": {"compilation_cache_dir": "cache/jax"},
    "analyses": {
        "gaussian": {
            "model": "linear_gaussian",
            "input": {"simulate": {"rows": 4000, "features": 3, "seed": 2}},
            "shard": {"num_shards": 2},
            "featurize": {"pad_multiple": 64},
            "sample": {"num_warmup": 300, "num_samples": 500, "shards_per_job": 8},
            "correct": {"enabled": False},
            "sweep": {"shard.num_shards": [2, 4, 8], "fulldata": True},
        },
        "drifting": {
            "model": "logistic",
            "input": {"simulate": {"rows": 1000, "features": 3, "seed": 4}},
            "shard": {"num_shards": 2},
            "featurize": {"pad_multiple": 8},
            "sample": {"num_warmup": 300, "num_samples": 500, "shards_per_job": 13},
            "combine": {"min_shards_fraction": 0.1},
            "correct": {"enabled": False},
            "sweep": {"shard.num_shards": [2, 25], "fulldata": True},
        },
    },
}


@pytest.fixture(scope="module")
def stability_run(tmp_path_factory):
    workflow = Workflow(tmp_path_factory.mktemp("sweep"), STABILITY_CONFIG)
    workflow.run(timeout=900)
    return workflow


def comparison(workflow: Workflow, sweep: str) -> dict:
    return json.loads((workflow.workdir / f"results/{sweep}/sweep/comparison.json").read_text())


def test_k_stability_holds_at_every_k_where_cmc_is_exact(stability_run):
    (series,) = comparison(stability_run, "gaussian")["stability"]["series"]
    assert series["reference"] == "full data"
    assert [row["num_shards"] for row in series["rows"]] == [2, 4, 8]
    assert series["stable_up_to"] == 8, series["rows"]
    # every shard's posterior is Gaussian and one model describes every row: Q ~ χ², no alarm
    assert all(row["disagreement_p"] > DISAGREEMENT_P_VALUE for row in series["rows"]), series["rows"]
    assert series["verdict"] == "stable up to K = 8, the largest K swept"
    page = (stability_run.workdir / "results/gaussian/sweep/report.html").read_text()
    assert "stable up to K = 8" in page and "Distance between grid points" in page
    assert "The shards' disagreement per grid point" in page
    assert all(f"num_shards={k}</th>" in page for k in (2, 4, 8)), "a row per grid point"


def test_k_stability_finds_the_drift_of_shards_too_small_for_a_gaussian(stability_run):
    (series,) = comparison(stability_run, "drifting")["stability"]["series"]
    small, large = series["rows"]
    assert small["stable"] and small["max_mean_shift"] < 0.2, small
    # 40 rows per shard: the combination moves by far more than its Monte Carlo error
    assert not large["stable"] and large["max_mean_shift"] > 0.5, large
    # ... while the shards agree with each other (measured: p 0.45): skewed shards all lean the
    # same way, a bias their disagreement Q cannot see and only the drift (or the correction) shows
    print(f"disagreement p: K = 2 {small['disagreement_p']:.3g}, K = 25 {large['disagreement_p']:.3g}")
    assert large["disagreement_p"] > DISAGREEMENT_P_VALUE, large
    assert series["verdict"] == "stable up to K = 2"


def test_editing_one_grid_value_reruns_that_point_only(stability_run):
    assert stability_run.planned_jobs() == {}
    edited = copy.deepcopy(STABILITY_CONFIG)
    edited["analyses"]["gaussian"]["sweep"]["shard.num_shards"] = [2, 4, 16]
    assert stability_run.planned_jobs(config=edited) == {
        "shard": 1,
        "featurize_batch": 2,
        "preflight": 1,
        "sample_batch": 2,
        "combine": 1,
        "report": 1,
        "sweep_report": 1,
        "all": 1,
    }


def test_the_example_sweep_config_is_valid():
    config = yaml.safe_load((REPO / "config/sweep.yaml").read_text())
    check_config(config)
    validate(config, str(SCHEMA))
    _, sweeps = resolve_analyses(config)
    assert sweeps


def cloud_summary(points: np.ndarray, sds: np.ndarray, sigma: float = 1.0) -> pd.DataFrame:
    """A combined summary of a point cloud ``coords (n, 3)`` and a scalar ``sigma``."""
    labels = element_labels("coords", points.shape) + ["sigma"]
    means = np.append(points.ravel(), sigma)
    sd = np.append(sds.ravel(), 0.1)
    return pd.DataFrame(
        {"mean": means, "sd": sd, "5%": means - 1.645 * sd, "95%": means + 1.645 * sd},
        index=pd.Index(labels, name="parameter"),
    )


def test_point_clouds_are_compared_in_one_frame():
    rng = np.random.default_rng(0)
    points, sds = rng.normal(size=(12, 3)) * 5, np.full((12, 3), 0.2)
    reference = cloud_summary(points, sds)
    rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    rotation *= np.sign(np.linalg.det(rotation))  # proper
    moved = cloud_summary(points @ rotation.T + [3.0, -1.0, 2.0], sds)
    assert shift(moved, reference)["max_mean_shift"] > 10  # another frame: far apart as numbers
    framed = in_frame(moved, reference, "coords", allow_reflection=False)
    assert shift(framed, in_frame(reference, reference, "coords", False))["max_mean_shift"] < 1e-8
    mirrored = cloud_summary(points * [1, 1, -1], sds)
    assert shift(in_frame(mirrored, reference, "coords", False), reference)["max_mean_shift"] > 1
    assert shift(in_frame(mirrored, reference, "coords", True), reference)["max_mean_shift"] < 1e-8
    shifted = cloud_summary(points, sds, sigma=1.05)  # the scalar keeps its own frame: 0.05 / 0.1
    assert shift(in_frame(shifted, reference, "coords", True), reference)["max_mean_shift"] == pytest.approx(0.5)


def test_the_verdict_is_the_largest_k_below_which_every_k_held():
    reference = pd.DataFrame({"mean": [0.0, 1.0], "sd": [1.0, 2.0]}, index=["a", "b"])

    def moved(mean_shift, sd_ratio):
        return pd.DataFrame({"mean": [mean_shift, 1.0], "sd": [sd_ratio, 2.0]}, index=["a", "b"])

    series = [
        (8, "k8", moved(0.3, 1.0)),
        (2, "k2", moved(0.1, 1.05)),
        (4, "k4", moved(0.1, 1.15)),
        (16, "k16", moved(0.0, 1.0)),
    ]
    rows, stable_up_to = k_stability(series, (1, "full data", reference), max_mean_shift=0.2, max_sd_change=0.1)
    assert [row["num_shards"] for row in rows] == [2, 4, 8, 16]
    assert [row["stable"] for row in rows] == [True, False, False, True]
    assert stable_up_to == 2 and verdict(stable_up_to, rows, "full data") == "stable up to K = 2"
    _, none_stable = k_stability(series[:1], (1, "full data", reference), 0.2, 0.1)
    assert none_stable is None
    warned = verdict(2, rows, "num_shards=2", reference_excluded=1)
    assert warned.startswith("stable up to K = 2; but the reference (num_shards=2) left 1 shard(s) out")


def test_a_sweep_over_one_table_reads_its_header_and_counts_its_rows_once(tmp_path, monkeypatch):
    """Every grid point names the same input: parsing reads the file once per version of it
    (a CSV's count reads every record), and again once it changes."""
    import cmcflow.config

    source = tmp_path / "data.csv"
    source.write_text("x0,y\n" + "".join(f"{i / 10},{i % 2}\n" for i in range(100)))
    reads = {"columns": 0, "rows": 0}
    for what, function in (("columns", "table_columns"), ("rows", "count_rows")):

        def counted(path, what=what, original=getattr(cmcflow.config, function)):
            reads[what] += 1
            return original(path)

        monkeypatch.setattr(cmcflow.config, function, counted)
    overrides = {"input": {"path": str(source)}, "columns": {"features": ["x0"]}, "shard": {"rows_per_shard": 25}}
    analyses, _ = resolved({"shard.seed": [0, 1, 2, 3]}, **overrides)
    assert {analysis.num_shards for analysis in analyses.values()} == {4}
    assert reads == {"columns": 1, "rows": 1}
    source.write_text("x0,y\n" + "".join(f"{i / 10},{i % 2}\n" for i in range(101)))
    analyses, _ = resolved({"shard.seed": [0, 1]}, **overrides)
    assert {analysis.num_shards for analysis in analyses.values()} == {5}
    assert reads == {"columns": 2, "rows": 2}
