"""The pre-flight: a model that cannot run stops the run before any sample job, with one line
naming the site; a model that runs passes with its starting potential and gradient."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pandas as pd
import pytest
from conftest import Workflow, tiny_config

from cmcflow.errors import InputError
from cmcflow.models import get_model
from cmcflow.preflight import preflight

LOGISTIC = get_model("logistic")


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    columns = {"features": rng.normal(size=(200, 3)), "label": (rng.random(200) < 0.5).astype(float)}
    return LOGISTIC.featurize(columns, 256, {})


def out_of_support_count(**features_and_options):
    LOGISTIC.numpyro_model(**features_and_options)
    numpyro.sample("count", dist.Poisson(1.0), obs=-1.0)


def nan_gradient(**features_and_options):
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.factor("f", jnp.where(b > 100.0, jnp.sqrt(b - 100.0), 0.0))  # finite, but d/db is NaN


def bad_scale(**features_and_options):
    numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("c", dist.Normal(0.0, -1.0))


def raises_in_log_density(**features_and_options):
    numpyro.sample("b", dist.Normal(0.0, 1.0))
    numpyro.sample("c", FailingNormal(0.0, 1.0))


class FailingNormal(dist.Normal):
    """What a truncated Student-t prior did in NumPyro 0.15 without TensorFlow Probability."""

    def log_prob(self, value):
        raise ImportError("Please install tensorflow_probability>=0.18 for betaincinv")


def run(model, features):
    spec = dataclasses.replace(LOGISTIC, name=model.__name__, numpyro_model=model)
    return preflight(spec, features, LOGISTIC.options, num_shards=4, seed=0)


def test_a_model_that_runs_passes_with_a_finite_start(features):
    found = run(LOGISTIC.numpyro_model, features)
    assert found["sites"] == ["beta", "intercept"]
    assert np.isfinite(found["potential_energy"]) and np.isfinite(found["max_abs_gradient"])


@pytest.mark.parametrize(
    "model,message",
    [
        (out_of_support_count, r"model 'out_of_support_count': the log density .* site 'count' has log density -inf$"),
        (nan_gradient, r"model 'nan_gradient': .*: the gradient with respect to site 'b' is not finite$"),
        (
            bad_scale,
            r"model 'bad_scale' raised after site 'b' \(.*test_preflight\.py, line \d+\) on shard 0: "
            r"ValueError: Normal distribution got invalid scale parameter\.$",
        ),
        (
            raises_in_log_density,
            r"model 'raises_in_log_density' raised in the log density of site 'c' \(.*\) on shard 0: ImportError",
        ),
    ],
    ids=["infinite-log-density", "nan-gradient", "raises-between-sites", "raises-in-a-log-density"],
)
def test_a_model_that_cannot_run_is_one_line_naming_the_site(features, model, message):
    with pytest.raises(InputError, match=message) as error:
        run(model, features)
    assert "\n" not in str(error.value)


BROKEN_MODEL = """
import dataclasses

import numpyro
import numpyro.distributions as dist

from cmcflow.models.logistic import SPEC as LOGISTIC


def broken(**features_and_options):
    LOGISTIC.numpyro_model(**features_and_options)
    numpyro.sample("noise", dist.HalfNormal(-1.0))


BROKEN = dataclasses.replace(LOGISTIC, name="broken", numpyro_model=broken)
"""


@pytest.mark.workflow
def test_a_model_that_cannot_run_stops_the_run_before_any_sample_job(tmp_path):
    (tmp_path / "broken_model.py").write_text(BROKEN_MODEL)
    rng = np.random.default_rng(1)
    table = pd.DataFrame(rng.normal(size=(1000, 3)), columns=["x0", "x1", "x2"])
    table["y"] = (rng.random(1000) < 0.5).astype(int)
    table.to_csv(tmp_path / "data.csv", index=False)
    config = tiny_config(
        model="broken_model:BROKEN",
        input={"path": "data.csv"},
        columns={"features": ["x0", "x1", "x2"], "label": "y"},
        shard={"num_shards": 4, "seed": 0},
    )
    workflow = Workflow(tmp_path, config, env={"PYTHONPATH": str(tmp_path)})
    result = workflow.run("--keep-going", check=False)
    assert result.returncode != 0
    line = (
        "cmcflow: error: model 'broken' raised after site 'y' (" + str(tmp_path / "broken_model.py") + ", line 12) "
        "on shard 0: ValueError: Normal distribution got invalid scale parameter."
    )
    assert line in result.stderr
    assert "Error in rule preflight" in result.stderr
    assert not (tmp_path / "results/tiny/samples").exists()  # no sample job ran, even with --keep-going
