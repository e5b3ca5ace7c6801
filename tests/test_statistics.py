"""Correctness in units of posterior sd.

* ``linear_gaussian``: the full posterior is exact and Gaussian, and the product of the K
  tempered subposteriors equals it, so consensus Monte Carlo is exact up to Monte Carlo
  error. With 4 chains x 1000 draws per shard (ESS ~ 2000-4000), the combined mean's MC
  error is ~ 0.02-0.03 posterior sd. Measured with these seeds and the default Hessian
  weights: mean error <= 0.025 sd (equal shards), 0.039 (unequal); with draw weights and
  the default shrinkage it was <= 0.045 sd (<= 0.056 without shrinkage), sd ratios
  0.98-1.00, correlation error <= 0.022; the issue's tolerances (0.1 sd, 0.85-1.15, 0.1)
  hold with room for a change of NumPyro's or XLA's random streams. Over 10 seeded repeats
  (K=4, shorter chains; Hessian weights) the mean |error| was 0.022-0.026 sd (equal shards)
  and 0.012-0.022 sd (sizes 1:2:3:4), the mean sd ratio 0.993-1.005 (with draw weights:
  0.034-0.073, 0.033-0.048 and 0.987-1.001).
* ``logistic``: CMC against full-data NUTS on the same rows; the subposteriors are close to
  Gaussian with 1000 rows each. Measured: mean error <= 0.054 full-data sd with Hessian
  weights (0.104 with draw weights and shrinkage, 0.077 without; tolerance 0.2).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_rtol

from cmcflow.combine import CombineSettings, combine_runs, combine_shards
from cmcflow.config import schema_default
from cmcflow.consensus import WEIGHTS as WEIGHTS_USED
from cmcflow.featurize import padded_size
from cmcflow.models import get_model, resolve_options
from cmcflow.models.linear_gaussian import exact_posterior
from cmcflow.sample import NutsSettings, sample_features
from cmcflow.shard import split_rows
from cmcflow.transforms import model_kwargs

DEVICES = 4
SETTINGS = NutsSettings(num_warmup=500, num_samples=1000, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False)


def simulated(model_name: str, rows: int, features: int, seed: int):
    spec = get_model(model_name)
    options = resolve_options(spec, {})
    table, _ = spec.simulate(rows, seed, features=features)
    X = table[[f"x{i}" for i in range(features)]].to_numpy()
    return spec, options, X, table["y"].to_numpy().astype(float)


def shard_runs(spec, options, X, y, parts, settings=SETTINGS, seed=11, third_derivatives=False):
    """Sample every shard as the sample stage does: the runs, and each shard's model arguments.
    Every shard of one padded size runs one compiled program (``one_program``);
    ``third_derivatives``: as with ``combine.second_order``."""
    pad_to = padded_size([len(rows) for rows in parts], 64)
    runs, kwargs = [], []
    for index, rows in enumerate(parts):
        features = spec.featurize({"features": X[rows], "label": y[rows]}, pad_to, {})
        idata, _ = sample_features(
            spec,
            features,
            options,
            num_shards=len(parts),
            shard=index,
            seed=seed,
            settings=settings,
            chains=DEVICES,
            third_derivatives=third_derivatives,
        )
        runs.append(idata)
        kwargs.append(model_kwargs(features, options))
    return runs, kwargs


WEIGHTS = schema_default("combine", "weights")


def run_cmc(spec, options, X, y, parts, method="consensus", settings=SETTINGS, seed=11, weights=WEIGHTS):
    """Sample every shard as the sample stage does, then combine as the combine stage does."""
    runs, kwargs = shard_runs(spec, options, X, y, parts, settings, seed)
    # like the combine rule: the model is traced on one shard's features for its transforms
    return combine_runs(
        runs,
        spec.numpyro_model,
        kwargs[-1],
        method,
        seed=0,
        shrinkage=schema_default("combine", "covariance_shrinkage"),
        weights=weights,
    )


def flat_draws(idata, name):
    values = idata.posterior[name].values
    return values.reshape(values.shape[0] * values.shape[1], -1)


def unequal_parts(rows: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """Shards with sizes proportional to 1, 2, …, K (largest ~ 8x the smallest for K=8)."""
    permutation = np.random.default_rng(seed).permutation(rows)
    cuts = np.cumsum(np.arange(1, num_shards + 1))[:-1] * rows // (num_shards * (num_shards + 1) // 2)
    return [np.sort(part) for part in np.split(permutation, cuts)]


@pytest.mark.parametrize("shard_sizes", ["equal", "unequal"])
def test_linear_gaussian_matches_exact_posterior(shard_sizes):
    spec, options, X, y = simulated("linear_gaussian", rows=2000, features=3, seed=5)
    num_shards = 8
    parts = split_rows(len(y), num_shards, seed=0) if shard_sizes == "equal" else unequal_parts(len(y), num_shards, 0)
    if shard_sizes == "unequal":
        assert max(map(len, parts)) >= 7 * min(map(len, parts))
    draws = flat_draws(run_cmc(spec, options, X, y, parts), "beta")

    mean, covariance = exact_posterior(X, y, options["prior_sd"], options["noise_sd"])
    sd = np.sqrt(np.diag(covariance))
    mean_error = np.abs(draws.mean(axis=0) - mean) / sd
    sd_ratio = draws.std(axis=0) / sd
    correlation_error = np.abs(np.corrcoef(draws.T) - covariance / np.outer(sd, sd)).max()
    print(
        f"{shard_sizes}: mean error {np.round(mean_error, 3)} sd, sd ratio {np.round(sd_ratio, 3)}, "
        f"correlation error {correlation_error:.3f}"
    )
    assert mean_error.max() <= 0.1, mean_error
    assert np.all((0.85 <= sd_ratio) & (sd_ratio <= 1.15)), sd_ratio
    assert correlation_error <= 0.1, correlation_error


#: Ten repeats, kept cheap for CI: small data, 4 shards, 4 chains x (300 + 500) draws.
REPEAT_SETTINGS = NutsSettings(
    num_warmup=300, num_samples=500, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
)


@pytest.mark.parametrize("shard_sizes", ["equal", "unequal"])
def test_linear_gaussian_over_ten_seeded_repeats(shard_sizes):
    """Issue 5: with NUTS subposteriors, over 10 seeded repeats (new data, new split, new
    sampler seed each), the mean |error| of the combined mean is <= 0.1 posterior sd and the
    mean sd ratio is within 0.85-1.15, for every coefficient, for equal shards and for shards
    of sizes 1:2:3:4. 2,000 draws per shard give a Monte Carlo error of about 0.03 sd on the
    combined mean."""
    errors, ratios = [], []
    for repeat in range(10):
        spec, options, X, y = simulated("linear_gaussian", rows=800, features=3, seed=100 + repeat)
        parts = split_rows(len(y), 4, seed=repeat) if shard_sizes == "equal" else unequal_parts(len(y), 4, repeat)
        draws = flat_draws(run_cmc(spec, options, X, y, parts, settings=REPEAT_SETTINGS, seed=repeat), "beta")
        mean, covariance = exact_posterior(X, y, options["prior_sd"], options["noise_sd"])
        sd = np.sqrt(np.diag(covariance))
        errors.append(np.abs(draws.mean(axis=0) - mean) / sd)
        ratios.append(draws.std(axis=0) / sd)
    mean_error, sd_ratio = np.mean(errors, axis=0), np.mean(ratios, axis=0)
    print(f"{shard_sizes}: mean |error| {np.round(mean_error, 3)} sd, mean sd ratio {np.round(sd_ratio, 3)}")
    assert np.all(mean_error <= 0.1), mean_error
    assert np.all((0.85 <= sd_ratio) & (sd_ratio <= 1.15)), sd_ratio


def test_logistic_cmc_matches_full_data_nuts():
    spec, options, X, y = simulated("logistic", rows=4000, features=3, seed=2)
    combined = run_cmc(spec, options, X, y, split_rows(len(y), 4, seed=0))
    full, _ = sample_features(
        spec,
        spec.featurize({"features": X, "label": y}, padded_size([len(y)], 64), {}),
        options,
        num_shards=1,
        shard=-1,
        seed=11,
        settings=SETTINGS,
        chains=DEVICES,
    )
    for name in ("intercept", "beta"):
        reference = flat_draws(full, name)
        error = np.abs(flat_draws(combined, name).mean(axis=0) - reference.mean(axis=0)) / reference.std(axis=0)
        print(f"{name}: mean error {np.round(error, 3)} full-data sd")
        assert error.max() <= 0.2, (name, error)


def test_hessian_weights_are_the_exact_shard_precisions_of_a_gaussian_model():
    """For linear_gaussian a shard's tempered potential is quadratic: its Hessian is
    I / (K prior_sd²) + X_sᵀX_s / noise_sd², wherever it is taken, and the product of the K
    shards' Gaussians is the exact posterior. So with Hessian weights the combination's
    Gaussian is the exact posterior's covariance to rounding, its mean is the exact mean up
    to the Monte Carlo error of the shard means, and a shard without a usable Hessian is
    weighed by its draws and named."""
    spec, options, X, y = simulated("linear_gaussian", rows=1200, features=3, seed=7)
    parts = split_rows(len(y), 4, seed=0)
    runs, kwargs = shard_runs(spec, options, X, y, parts, settings=REPEAT_SETTINGS)
    for run, rows in zip(runs, parts):
        expected = np.eye(3) / (4 * options["prior_sd"] ** 2) + X[rows].T @ X[rows] / options["noise_sd"] ** 2
        np.testing.assert_allclose(run.curvature["precision"].values, expected, rtol=data_rtol(1e-10))
    settings = CombineSettings("consensus", 0, 0.0, None, 1.0, "fail", "hessian", False)
    combination = combine_shards(runs.__getitem__, len(runs), spec.numpyro_model, kwargs[0], settings)
    mean, covariance = exact_posterior(X, y, options["prior_sd"], options["noise_sd"])
    np.testing.assert_allclose(combination.gaussian["covariance"], covariance, rtol=data_rtol(1e-8))
    error = np.abs(combination.gaussian["mean"] - mean) / np.sqrt(np.diag(covariance))
    assert error.max() <= 0.1, error
    assert combination.record["weights"] == WEIGHTS_USED["hessian"] and combination.record["weighed_by_draws"] == []

    runs[2].curvature["precision"] = (("flat_row", "flat_column"), -np.eye(3))  # not positive definite
    combination = combine_shards(runs.__getitem__, len(runs), spec.numpyro_model, kwargs[0], settings)
    assert combination.record["weighed_by_draws"] == [2]
    assert not np.allclose(combination.gaussian["covariance"], covariance, rtol=1e-3)


def test_chains_vectorised_on_one_device_as_on_a_gpu_match_the_exact_posterior():
    """The GPU layout (cmcflow.jaxenv.chain_layout): every chain on one device, vectorised,
    here on this process' first CPU device standing in for the GPU. Four chains, as in
    parallel, and the exact posterior of the linear-Gaussian model to Monte Carlo error
    (0.1 sd: 6 times the standard error of a mean of ~4,000 effective draws, 3 coefficients)."""
    spec, options, X, y = simulated("linear_gaussian", rows=2000, features=3, seed=5)
    features = spec.featurize({"features": X, "label": y}, padded_size([len(y)], 64), {})
    run, report = sample_features(
        spec,
        features,
        options,
        num_shards=1,
        shard=-1,
        seed=3,
        settings=SETTINGS,
        chains=DEVICES,
        chain_method="vectorized",
    )
    assert run.posterior.sizes["chain"] == DEVICES and report["chain_method"] == "vectorized"
    assert report["max_r_hat"] < 1.01
    mean, covariance = exact_posterior(X, y, options["prior_sd"], options["noise_sd"])
    draws = flat_draws(run, "beta")
    error = np.abs(draws.mean(axis=0) - mean) / np.sqrt(np.diag(covariance))
    assert error.max() <= 0.1, error


def test_one_job_compiles_nuts_and_the_hessian_once_for_shards_of_one_shape():
    """Several shards in one job (``sample.shards_per_job``, ``one_program``) run the first
    shard's programs: for the next shard of the same shapes nothing is lowered or compiled
    (NumPyro's own ``"parallel"`` traces and loads the chains' program again for every run:
    0.2 of a 0.7 s shard), and its draws are those of NumPyro's own program, closed over the
    shard's data. A shard of another padded size compiles its own: the clock counts."""
    spec, options, X, y = simulated("logistic", rows=600, features=3, seed=8)
    settings = NutsSettings(
        num_warmup=100, num_samples=100, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )

    def run(rows, pad_to, shard, one_program=True):
        features = spec.featurize({"features": X[rows], "label": y[rows]}, pad_to, {})
        return sample_features(
            spec,
            features,
            options,
            num_shards=3,
            shard=shard,
            seed=0,
            settings=settings,
            chains=DEVICES,
            one_program=one_program,
        )

    first = run(np.arange(0, 200), 256, 0)[1]
    assert first["tracing_seconds"] > 0.0 and first["compile_seconds"] > 0.0  # timed apart from sampling
    second, report = run(np.arange(200, 400), 256, 1)
    assert report["compile_seconds"] == 0.0
    alone, _ = run(np.arange(200, 400), 256, 1, one_program=False)
    np.testing.assert_array_equal(second.posterior["beta"].values, alone.posterior["beta"].values)
    assert run(np.arange(400, 600), 320, 2)[1]["compile_seconds"] > 0.0


#: A sample job of one shard of the logistic model (arguments: shard, compilation cache,
#: precision), as scripts/sample.py runs it: prints its compile seconds.
SHARD_JOB = """
import json, sys
from cmcflow.jaxenv import configure_jax
configure_jax(devices=4, precision=sys.argv[3], compilation_cache_dir=sys.argv[2])
from cmcflow.featurize import padded_size
from cmcflow.models import get_model, resolve_options
from cmcflow.sample import NutsSettings, sample_run
spec, shard = get_model("logistic"), int(sys.argv[1])
table, _ = spec.simulate(400, 8, features=3)
part = table.iloc[200 * shard : 200 * (shard + 1)]
features = spec.featurize({"features": part[["x0", "x1", "x2"]].to_numpy(), "label": part["y"].to_numpy()}, 256, {})
settings = NutsSettings(num_warmup=100, num_samples=100, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False)
options = resolve_options(spec, {})
run, report = sample_run(spec, features, options, num_shards=2, shard=shard, seed=0, settings=settings, chains=4)
# the Hessian as this process traces it, against the run's (a program stored by the first job)
import numpy as np
from cmcflow.sample import tempered
from cmcflow.stored_programs import stored_programs_dir
from cmcflow.transforms import model_kwargs, potential_derivatives
mean = {name: values.mean(axis=(0, 1)) for name, values in run["unconstrained_posterior"].arrays().items()}
traced = potential_derivatives(tempered(spec.numpyro_model, 0.5), model_kwargs(features, options), mean)[0]
stored = sorted(path.name for path in stored_programs_dir().iterdir())
print(json.dumps({"compile_seconds": report["compile_seconds"], "stored_programs": stored,
                  "hessian_as_traced": bool(np.array_equal(run["curvature"]["precision"], traced))}))
"""


def test_a_sample_job_loads_the_programs_another_shards_job_compiled(tmp_path):
    """A sample job runs NUTS with the data as the program's arguments (``one_program``), so
    the next shard's job, in a process of its own, finds the program in the persistent
    cache instead of compiling it again (a program closed over the data would be new for
    every shard); and it loads the Hessian's program the first job traced and stored
    beside the cache, which gives the Hessian a fresh trace gives, bit for bit."""
    import json
    import subprocess
    import sys

    from cmcflow.jaxenv import PRECISION

    def job(shard):
        arguments = [sys.executable, "-c", SHARD_JOB, str(shard), str(tmp_path), PRECISION.name]
        done = subprocess.run(arguments, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, following = job(0), job(1)
    seconds = first["compile_seconds"], following["compile_seconds"]
    print(f"compile seconds: first job {seconds[0]:.2f}, next shard's job {seconds[1]:.2f}")
    assert seconds[1] < 0.5 * seconds[0], seconds
    assert len(first["stored_programs"]) == 1 and following["stored_programs"] == first["stored_programs"]
    assert first["hessian_as_traced"] and following["hessian_as_traced"]
