"""The workflow end to end: outputs, reruns driven by config edits, errors, lint.

One tiny logistic analysis (3,000 rows, 2 shards, with the default settings: the
second-order term, ``combine.second_order``, among them) runs once for the module; the rerun checks are dry runs against
its results.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zipfile

import arviz as az
import numpy as np
import pandas as pd
import pytest
from conftest import PRECISION, REPO, Workflow, correction_jobs, tiny_config

from cmcflow.consensus import unflatten_draws
from cmcflow.io import read_arrays
from cmcflow.resources import draws_mem_mb, light_mem_mb, sample_mem_mb
from cmcflow.screening import DISAGREEMENT_P_VALUE

pytestmark = pytest.mark.workflow

RESULTS = "results/tiny"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Workflow:
    workflow = Workflow(tmp_path_factory.mktemp("tiny"), tiny_config())
    workflow.first_run = workflow.run()
    return workflow


def edited(workflow: Workflow, section: str, key: str, value) -> dict:
    config = copy.deepcopy(workflow.config)
    config["analyses"]["tiny"].setdefault(section, {})[key] = value
    return config


def test_every_output_is_produced(finished):
    results = finished.workdir / RESULTS
    expected = [
        "input/simulated.parquet",
        "input/truth.json",
        "shards/manifest.json",
        "shards/shard-0000.parquet",
        "shards/shard-0001.parquet",
        "features/shard-0000.npz",
        "features/shard-0001.json",
        "samples/shard-0000.nc",
        "samples/shard-0001.diagnostics.json",
        "combined/posterior.nc",
        "combined/summary.csv",
        "combined/shards.json",
        "combined/shard_moments.csv",
        "report/report.html",
        "report/shards.png",
        "report/posterior.png",
        "logs/sample/shard-0000.log",
        "benchmarks/sample/shard-0001.tsv",
    ]
    assert [name for name in expected if not (results / name).is_file()] == []
    summary = pd.read_csv(results / "combined/summary.csv", index_col="parameter")
    assert list(summary.columns) == ["mean", "sd", "5%", "95%"]
    assert set(summary.index) == {"intercept", "beta[0]", "beta[1]", "beta[2]"}
    truth = json.loads((results / "input/truth.json").read_text())
    z = (summary.loc[["beta[0]", "beta[1]", "beta[2]"], "mean"] - truth["beta"]) / summary["sd"].iloc[:3].to_numpy()
    assert np.all(np.abs(z) < 4), z
    shards = json.loads((results / "combined/shards.json").read_text())
    assert set(shards.pop("max_abs_z")) == {"0", "1"}
    assert 0.0 < shards.pop("proposal_seconds") < 60.0  # combine drew the correction's proposal
    disagreement = shards.pop("disagreement")  # the simulated data follow the model: no alarm
    # the model describes both shards: the term is small (|δ| ~ the shards' Monte Carlo noise)
    second_order = shards.pop("second_order")
    assert second_order["applied"] and set(second_order["shift_sd"]) == {"intercept", "beta[0]", "beta[1]", "beta[2]"}
    assert second_order["max_abs_shift_sd"] == max(map(abs, second_order["shift_sd"].values())) < 0.2
    assert disagreement["degrees_of_freedom"] == (2 - 1) * 4 and disagreement["p_value"] > DISAGREEMENT_P_VALUE
    proposal = read_arrays(results / "combined/gaussian.npz")
    assert proposal["draws"].shape == (4096, 4) and proposal["log_prior"].shape == (4096,)
    unconstrained = unflatten_draws(proposal["draws"], str(proposal["layout"]))
    np.testing.assert_allclose(proposal["constrained:beta"], unconstrained["beta"], rtol=1e-6)  # a real site: T = id
    assert shards == {
        "method": "consensus",
        "covariance": "full covariance",
        "covariance_shrinkage": 0.0,  # Hessian weights (the default) have no sampling noise to shrink
        "weights": "inverse Hessian at the shard's posterior mean",
        "weighed_by_draws": [],
        "precision": PRECISION,  # jax.precision, as every output records it
        "failed": [],
        "space": "unconstrained",
        "streaming": False,
        "num_shards": 2,
        "used": [0, 1],
        "excluded": [],
        "prior_power": 1.0,
        "max_outlier_z": 5,
    }
    moments = pd.read_csv(results / "combined/shard_moments.csv")
    assert list(moments.columns) == ["shard", "parameter", "mean", "sd"] and len(moments) == 2 * 4
    report = (results / "report/report.html").read_text()
    assert "Shard diagnostics" in report and "beta[2]" in report and "Time per stage" in report
    assert f"The kept shards' means disagree by Q = {disagreement['statistic']:.1f}" in report
    assert "at max tree depth" in report
    assert f"moved the combination by up to {second_order['max_abs_shift_sd']:.3f} posterior sd" in report
    assert report.count("src='data:image/png;base64,") == 2  # both figures embedded
    for figure in ("shards.png", "posterior.png"):
        assert (results / "report" / figure).read_bytes().startswith(b"\x89PNG")


def test_sample_job_runs_four_chains_on_four_devices(finished):
    idata = az.from_netcdf(finished.workdir / RESULTS / "samples/shard-0000.nc")
    assert idata.posterior.attrs["devices"] == 4
    assert idata.posterior.sizes["chain"] == 4
    assert {"unconstrained_posterior", "sample_stats", "curvature"} <= set(idata.groups())
    assert idata.curvature["precision"].shape == (4, 4)  # intercept and 3 coefficients
    assert idata.curvature["third_derivatives"].shape == (4, 4, 4)  # combine.second_order, the default
    assert {"diverging", "tree_depth", "energy"} <= set(idata.sample_stats.data_vars)
    diagnostics = json.loads((finished.workdir / RESULTS / "samples/shard-0000.diagnostics.json").read_text())
    assert diagnostics["max_r_hat"] < 1.05 and diagnostics["num_shards"] == 2
    assert 0.0 <= diagnostics["tree_depth_saturation"] <= 1.0
    # the default sample.fused_likelihood: the one-pass kernel, in every precision on the CPU
    assert idata.posterior.attrs["fused_likelihood"] == 1


def test_compilation_cache_is_shared_by_jobs(finished):
    assert any((finished.workdir / "cache/jax").iterdir())
    second = az.from_netcdf(finished.workdir / RESULTS / "samples/shard-0001.nc").posterior.attrs
    first = az.from_netcdf(finished.workdir / RESULTS / "samples/shard-0000.nc").posterior.attrs
    assert max(first["persistent_cache_hits"], second["persistent_cache_hits"]) > 0


def test_a_run_ends_saying_where_its_reports_are_and_what_to_read_first(finished):
    output = finished.first_run.stdout + finished.first_run.stderr
    summary = output[output.index("cmcflow: results/tiny/report/report.html") :].splitlines()
    assert summary[1].startswith("  how exact: k̂ = ") and "the corrected posterior is exact" in summary[1]
    assert summary[2].startswith("  the shards agree: Q = ") and "degrees of freedom (p " in summary[2]
    assert summary[3].startswith("  second order: moved the combination by up to ")  # combine.second_order, the default


def test_second_run_executes_nothing(finished):
    assert finished.planned_jobs() == {}


def test_sampling_edit_reruns_sample_combine_report_only(finished):
    jobs = finished.planned_jobs(config=edited(finished, "sample", "num_samples", 160))
    assert jobs == {"sample": 2, "combine": 1, **correction_jobs(2), "report": 1, "all": 1}


def test_combine_edit_reruns_combine_and_report_only(finished):
    jobs = finished.planned_jobs(config=edited(finished, "combine", "method", "parametric"))
    assert jobs == {"combine": 1, **correction_jobs(2), "report": 1, "all": 1}


def test_correct_edit_reruns_combine_which_draws_the_proposal_and_the_correction(finished):
    jobs = finished.planned_jobs(config=edited(finished, "correct", "draws", 500))
    assert jobs == {"combine": 1, **correction_jobs(2), "report": 1, "all": 1}


def test_turning_the_correction_off_reruns_combine_and_report_only(finished):
    jobs = finished.planned_jobs(config=edited(finished, "correct", "enabled", False))
    assert jobs == {"combine": 1, "report": 1, "all": 1}


def test_the_second_order_term_edit_samples_again(finished):
    """The sample jobs compute the third derivatives only where combine.second_order asks."""
    jobs = finished.planned_jobs(config=edited(finished, "combine", "second_order", False))
    assert jobs == {"sample": 2, "combine": 1, **correction_jobs(2), "report": 1, "all": 1}


def test_shard_edit_reruns_everything_downstream_of_shard(finished):
    jobs = finished.planned_jobs(config=edited(finished, "shard", "seed", 1))
    expected = {"shard": 1, "featurize": 2, "preflight": 1, "sample": 2, "combine": 1, "report": 1, "all": 1}
    assert jobs == expected | correction_jobs(2)


def test_fulldata_target_runs_nuts_on_all_rows(finished):
    finished.run("fulldata")
    full = az.from_netcdf(finished.workdir / RESULTS / "fulldata/posterior.nc").posterior
    assert full.attrs["rows"] == 3000 and full.attrs["num_shards"] == 1
    combined = pd.read_csv(finished.workdir / RESULTS / "combined/summary.csv", index_col="parameter")
    reference = pd.read_csv(finished.workdir / RESULTS / "fulldata/summary.csv", index_col="parameter")
    error = (combined["mean"] - reference["mean"]).abs() / reference["sd"]
    assert error.max() < 0.5, error  # short chains (150 draws): a sanity bound, see test_statistics


def test_bad_input_fails_with_one_line_and_leaves_no_outputs(tmp_path):
    table = pd.DataFrame({"x0": [0.1, 0.2, np.nan, 0.4], "y": [0, 1, 1, 0]})
    table.to_csv(tmp_path / "data.csv", index=False)
    config = tiny_config(input={"path": "data.csv"}, columns={"features": ["x0"]})
    result = Workflow(tmp_path, config).run(check=False)
    assert result.returncode != 0
    message = "cmcflow: error: data.csv: column 'x0': 1 of 4 rows are NaN or infinite (first: row 3)"
    log = (tmp_path / "results/tiny/logs/shard.log").read_text().strip().splitlines()
    assert log[-1] == message
    assert message in result.stderr  # on the terminal too, without --show-failed-logs
    assert not (tmp_path / "results/tiny/shards").exists()


@pytest.mark.parametrize(
    "input_path,features,message",
    [
        (
            "data.csv",
            ["x0", "age"],
            "analyses.tiny: data.csv: column(s) 'age' missing for model 'logistic'; the table has columns 'x0', 'y'",
        ),
        ("data.xlsx", ["x0"], "analyses.tiny: data.xlsx: unsupported table format '.xlsx'; use Parquet"),
        ("dta.csv", ["x0"], "analyses.tiny: dta.csv: no such file"),
        ("twice.csv", ["x0"], "analyses.tiny: twice.csv: column name(s) 'x0' appear more than once in the header"),
    ],
    ids=["missing column", "format", "no file", "repeated name"],
)
def test_a_table_the_config_cannot_read_stops_the_dry_run(tmp_path, input_path, features, message):
    """The table's header is read when Snakemake starts: no shard job is submitted to learn
    that a column is missing."""
    pd.DataFrame({"x0": [0.1, 0.2], "y": [0, 1]}).to_csv(tmp_path / "data.csv", index=False)
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    (tmp_path / "twice.csv").write_text("x0,x0,y\n1,2,0\n")
    config = tiny_config(input={"path": input_path}, columns={"features": features})
    result = Workflow(tmp_path, config).run("--dry-run", check=False)
    assert result.returncode != 0
    assert f"cmcflow config error: {message}" in result.stderr + result.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda c: c["analyses"]["tiny"].update(sampl={}),
            "cmcflow config error: analyses.tiny: unknown key(s) 'sampl'",
        ),
        (
            lambda c: c["analyses"]["tiny"]["shard"].update(num_shards="two"),
            "analyses.tiny.shard.num_shards: 'two' is not of type 'integer'",
        ),
        (lambda c: c["analyses"]["tiny"].pop("input"), "analyses.tiny: missing required key(s) 'input'"),
        (
            lambda c: c["analyses"]["tiny"]["shard"].update(rows_per_shard=100),
            "analyses.tiny.shard: give exactly one of num_shards (K) or rows_per_shard",
        ),
        (
            lambda c: c["analyses"]["tiny"].update(model_options={"prior_scale": 1.0}),
            "analyses.tiny: model 'logistic' has no option(s) ['prior_scale']",
        ),
        (
            lambda c: c["analyses"]["tiny"].update(columns={"features": ["x0", "y"]}),
            "analyses.tiny: model 'logistic': each column can fill one place only, but column 'y' is given as "
            "features and label",
        ),
        (
            lambda c: c["analyses"]["tiny"].update(model_options={"prior_sd": -1}),
            "model_options.prior_sd = -1: model 'logistic' needs it > 0",
        ),
        (lambda c: c["analyses"]["tiny"].update(model="logit"), "unknown model 'logit'"),
        (
            lambda c: c["analyses"]["tiny"]["shard"].update(stratify_by=["feature"]),
            "shard.stratify_by: ['feature'] are not single-column roles of model 'logistic'",
        ),
        (
            lambda c: c["analyses"]["tiny"].update(platform="tpu"),
            "analyses.tiny.platform: give 'cpu' or 'gpu' for the JAX stages that can run on a GPU",
        ),
        (
            lambda c: c["analyses"]["tiny"].update(platform={"sampel": "gpu"}),
            "analyses.tiny.platform: unknown key(s) 'sampel' (known here: align, fulldata, sample)",
        ),
    ],
    ids=[
        *("typo", "type", "no input", "both shard counts", "model option", "column twice", "option range", "model"),
        "strata",
        *("platform", "platform stage"),
    ],
)
def test_bad_config_fails_at_parse_time_naming_the_key(tmp_path, edit, message):
    config = tiny_config()
    edit(config)
    result = Workflow(tmp_path, config).run("--dry-run", check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert len((result.stderr + result.stdout).splitlines()) < 30  # a message, never a dump of the schema
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize(
    "text,message",
    [
        (
            "analyses:\n  tiny:\n    model: logistic\n    shard: {num_shards: 2}\n    shard: {num_shards: 3}\n",
            "config.yaml, line 5, column 5: key 'shard' appears twice in one mapping (lines 4 and 5)",
        ),
        ("analyses:\n  tiny:\n    model: logistic\n   shard: {num_shards: 2\n", "config.yaml, line 4, column 4: "),
    ],
    ids=["repeated key", "invalid YAML"],
)
def test_a_config_file_yaml_cannot_read_as_written_is_named_with_its_line(tmp_path, text, message):
    """The workflow's config/config.yaml, as a user edits it (a file given by --configfile
    with invalid YAML is refused by Snakemake itself first, without its line)."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(text)
    result = snakemake_in(tmp_path, "-n")
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "cmcflow config error: " in output and message in output, output


def snakemake_in(directory, *args: str) -> subprocess.CompletedProcess:
    """Snakemake on this checkout's Snakefile, run in ``directory`` with ``args``."""
    command = [sys.executable, "-m", "snakemake", *args, "--snakefile", str(REPO / "Snakefile")]
    return subprocess.run(command, capture_output=True, text=True, cwd=directory, timeout=120)


def test_lint_reports_nothing():
    result = snakemake_in(REPO, "--lint")
    lints = {
        line.strip()[2:].rstrip(":")
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip().startswith("* ")
    }
    assert result.returncode == 0 and lints == set(), result.stdout + result.stderr


def test_parsing_imports_this_checkouts_package(tmp_path):
    """Snakemake parses the rules with the cmcflow of this checkout (workflow/), the code its
    jobs run, even where another cmcflow comes first on the import path."""
    shadow = tmp_path / "shadow/cmcflow"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('an installed cmcflow, not this checkout')\n")
    workflow = Workflow(tmp_path, tiny_config(), env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert workflow.planned_jobs()["sample"] == 2


def test_model_option_edit_reruns_sample_onwards_only(finished):
    config = copy.deepcopy(finished.config)
    config["analyses"]["tiny"]["model_options"] = {"prior_sd": 2.0}
    assert finished.planned_jobs(config=config) == {
        "preflight": 1,
        "sample": 2,
        "combine": 1,
        **correction_jobs(2),
        "report": 1,
        "all": 1,
    }


def test_memory_estimates_cover_measured_peaks(finished):
    """Each rule's mem_mb estimate (attempt 1) is at least the job's measured peak RSS."""
    results = finished.workdir / RESULTS

    def peak_mb(benchmark):
        return float(pd.read_csv(results / "benchmarks" / benchmark, sep="\t")["max_rss"].iloc[0])

    def size_mb(*paths):
        return sum((results / path).stat().st_size for path in paths) / 2**20

    posteriors = ["samples/shard-0000.nc", "samples/shard-0001.nc"]
    cases = {
        "sample/shard-0000.tsv": sample_mem_mb(size_mb("features/shard-0000.npz")),
        "combine.tsv": draws_mem_mb(size_mb(*posteriors)),
        "shard.tsv": light_mem_mb(size_mb("input/simulated.parquet")),
        "featurize/shard-0000.tsv": light_mem_mb(0),
        "report.tsv": light_mem_mb(0),
    }
    for benchmark, estimate in cases.items():
        assert estimate >= peak_mb(benchmark), (benchmark, estimate, peak_mb(benchmark))


def test_snakemake_report_holds_the_figures(finished, tmp_path):
    finished.run("--report", str(tmp_path / "report.zip"))
    names = zipfile.ZipFile(tmp_path / "report.zip").namelist()
    assert any(name.endswith("/shards.png") for name in names) and any(
        name.endswith("/posterior.png") for name in names
    )
