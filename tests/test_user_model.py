"""A user's own model by 'module:attribute': the README's example, run as written."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Workflow, tiny_config

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
