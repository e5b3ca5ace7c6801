"""Shard diagnostics that tell a user what to change: NUTS trajectories that reach the
largest tree are counted per shard, logged, and explained in the report."""

from __future__ import annotations

import logging

from cmcflow.models import get_model, resolve_options
from cmcflow.report import tree_depth_advice
from cmcflow.sample import NutsSettings, sample_features


def tiny_run(max_tree_depth: int) -> dict:
    """NUTS on 200 rows of the linear-Gaussian demo data (3 correlated features)."""
    spec = get_model("linear_gaussian")
    table, _ = spec.simulate(200, 0, features=3)
    columns = {"features": table[["x0", "x1", "x2"]].to_numpy(), "label": table["y"].to_numpy()}
    settings = NutsSettings(
        num_warmup=100, num_samples=100, target_accept_prob=0.8, max_tree_depth=max_tree_depth, dense_mass=False
    )
    _, report = sample_features(
        spec,
        spec.featurize(columns, 256, {}),
        resolve_options(spec, {}),
        num_shards=1,
        shard=0,
        seed=0,
        settings=settings,
        chains=4,
    )
    return report


def test_tree_depth_saturation_is_counted_and_logged(caplog):
    """A limit of one doubling is reached on every iteration; the default limit of 10 on
    this easy posterior almost never."""
    with caplog.at_level(logging.WARNING, logger="cmcflow.sample"):
        saturated = tiny_run(max_tree_depth=1)
    assert saturated["tree_depth_saturation"] == 1.0
    assert "100% of iterations reached the largest tree (sample.max_tree_depth = 1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cmcflow.sample"):
        free = tiny_run(max_tree_depth=10)
    assert free["tree_depth_saturation"] < 0.1 and "largest tree" not in caplog.text


def test_report_advises_dense_mass_only_for_saturated_shards():
    records = [{"shard": 0, "tree_depth_saturation": 0.02}, {"shard": 1, "tree_depth_saturation": 0.98}, {"shard": 2}]
    advice = tree_depth_advice(records)
    assert "98% of iterations in 1 of 3 shards</b> (shards 1)" in advice
    assert "<code>sample.dense_mass: true</code>" in advice
    assert tree_depth_advice(records[:1]) == ""
