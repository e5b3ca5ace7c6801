"""A user's own model by 'module:attribute': the README's example, run as written."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Workflow, tiny_config

from cmcflow.combine import combine_runs
from cmcflow.likelihood import log_prior
from cmcflow.models import ModelSpec, Role
from cmcflow.models.rows import regression_features
from cmcflow.sample import NutsSettings, sample_features
from cmcflow.shard import split_rows
from cmcflow.transforms import model_kwargs

pytestmark = pytest.mark.workflow


def readme_model_source() -> str:
    """The Python block of the README that starts with '# my_models.py'."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"```python\n(# my_models\.py\n.*?)```", readme, flags=re.DOTALL)
    assert match, "README has no '# my_models.py' example"
    return match.group(1)


def test_readme_poisson_model_runs_end_to_end(tmp_path):
    (tmp_path / "my_models.py").write_text(readme_model_source())
    rng = np.random.default_rng(4)
    beta = np.array([0.3, -0.2, 0.5])
    X = rng.normal(0.0, 0.5, size=(2000, 3))
    table = pd.DataFrame(X, columns=["a", "b", "c"])
    table["count"] = rng.poisson(np.exp(X @ beta))
    table.to_csv(tmp_path / "counts.csv", index=False)
    config = tiny_config(
        model="my_models:POISSON",
        input={"path": "counts.csv"},
        columns={"features": ["a", "b", "c"], "label": "count"},
    )
    Workflow(tmp_path, config, env={"PYTHONPATH": str(tmp_path)}).run()
    summary = pd.read_csv(tmp_path / "results/tiny/combined/summary.csv", index_col="parameter")
    z = (summary["mean"].to_numpy() - beta) / summary["sd"].to_numpy()
    assert np.all(np.abs(z) < 4), z


def flat_prior_model(XT, y, mask, noise_sd):
    """Linear regression with a flat prior on the coefficients, as Stan users write it."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints

    beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real, (), event_shape=(XT.shape[0],)))
    with numpyro.plate("rows", XT.shape[1]):
        numpyro.sample("y", dist.Normal(beta @ XT, noise_sd).mask(mask), obs=y)


def test_a_flat_prior_is_tempered_sampled_and_combined():
    """A flat prior to any power is flat: the shards sample, combine and correct, and the
    result is the exact posterior N(β̂_OLS, σ² (XᵀX)⁻¹) (4 shards, within 0.15 sd)."""
    spec = ModelSpec(
        "flat", flat_prior_model, regression_features, "1",
        (Role("features", "real", multiple=True), Role("label", "real", default="y")), options={"noise_sd": 1.0},
    )  # fmt: skip
    rng = np.random.default_rng(6)
    X = rng.normal(size=(2000, 3))
    y = X @ np.array([0.5, -1.0, 0.2]) + rng.normal(size=2000)
    settings = NutsSettings(
        num_warmup=300, num_samples=500, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )
    runs, kwargs = [], None
    for shard, rows in enumerate(split_rows(2000, 4, seed=0)):
        features = regression_features({"features": X[rows], "label": y[rows]}, 512, {})
        kwargs = model_kwargs(features, spec.options)
        runs.append(sample_features(spec, features, spec.options, num_shards=4, shard=shard, seed=0,
                                    settings=settings, chains=4)[0])  # fmt: skip
    combined = combine_runs(runs, flat_prior_model, kwargs, "consensus", 0, shrinkage="auto", weights="hessian")
    mean = np.linalg.solve(X.T @ X, X.T @ y)
    sd = np.sqrt(np.diag(np.linalg.inv(X.T @ X)))
    draws = combined.posterior["beta"].values.reshape(-1, 3)
    assert np.all(np.abs(draws.mean(axis=0) - mean) / sd < 0.15)
    np.testing.assert_allclose(draws.std(axis=0) / sd, 1.0, atol=0.1)
    assert np.all(log_prior(flat_prior_model, kwargs, {"beta": draws[:5]}, power=0.25) == 0.0)


@pytest.mark.parametrize(
    "source,message",
    [
        ("def broken(:\n", r"its module raised SyntaxError: invalid syntax \(broken_model\.py, line 1\)"),
        ("raise RuntimeError('no licence server')\n", r"its module raised RuntimeError: no licence server \(at .*"),
    ],
    ids=["syntax", "raises"],
)
def test_a_user_model_that_cannot_be_imported_is_one_line(tmp_path, monkeypatch, source, message):
    from cmcflow.errors import ConfigError
    from cmcflow.models import get_model

    (tmp_path / "broken_model.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=message) as error:
        get_model("broken_model:SPEC")
    assert "\n" not in str(error.value)


def test_a_user_model_that_raises_is_one_line_and_its_traceback_in_a_log(tmp_path):
    (tmp_path / "broken_model.py").write_text(
        "def helper():\n    raise RuntimeError('no licence server')\n\nhelper()\n"
    )
    workflow = Workflow(tmp_path, tiny_config(model="broken_model:SPEC"), env={"PYTHONPATH": str(tmp_path)})
    result = workflow.run("--dry-run", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    lines = [line for line in output.splitlines() if "cmcflow config error" in line]
    assert len(lines) == 1, output
    assert "its module raised RuntimeError: no licence server" in lines[0]
    assert lines[0].endswith("(traceback in .snakemake/log/cmcflow-config-error.log)")
    logged = (tmp_path / ".snakemake/log/cmcflow-config-error.log").read_text()
    assert (
        lines[0]
        .split("cmcflow config error: ")[1]
        .startswith(logged.splitlines()[0].split("cmcflow config error: ")[1][:40])
    )
    assert "Traceback (most recent call last)" in logged and "in helper" in logged
