"""The logistic likelihood's one-pass kernel (cmcflow.fused) against XLA's sum of the same.

Whether the model uses the kernel is decided when the model is traced, and compiled
programs are kept per model and shapes: each test here uses shapes of its own (and the
module's programs are released after it, conftest), so that no program traced one way is
found by a test of the other.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmcflow import fused, transforms
from cmcflow.models import get_model, resolve_options
from cmcflow.sample import NutsSettings, sample_features
from cmcflow.transforms import model_kwargs, potential_derivatives

SPEC = get_model("logistic")


@pytest.fixture
def kernel_on(tmp_path, monkeypatch):
    """The kernel built into ``tmp_path`` and on, for this test only."""
    monkeypatch.setitem(fused._state, "enabled", False)
    monkeypatch.setitem(fused._state, "used", False)
    assert fused.enable(tmp_path)
    return tmp_path


def logistic_data(rows: int, features: int, seed: int):
    table, _ = SPEC.simulate(rows, seed, features=features)
    columns = {"features": table[[f"x{i}" for i in range(features)]].to_numpy(), "label": table["y"].to_numpy()}
    return SPEC.featurize(columns, rows, {})


def potential(kwargs, position):
    from numpyro.infer.util import potential_energy

    return potential_energy(SPEC.numpyro_model, (), kwargs, position)


# one chunk of the kernel's; several chunks (16,384 rows each) and a last step of a few rows
@pytest.mark.parametrize("rows", [2_900, 37_001])
def test_kernel_value_gradient_hessian_and_third_derivatives_match_xla(kernel_on, monkeypatch, rows):
    features = logistic_data(rows=rows, features=5, seed=1)
    kwargs = {
        name: jnp.asarray(value) if isinstance(value, np.ndarray) else value
        for name, value in model_kwargs(features, resolve_options(SPEC, {})).items()
    }
    position = {"intercept": jnp.asarray(0.2), "beta": jnp.asarray([0.5, -0.3, 0.1, 0.8, -1.2])}

    def evaluate():
        value, gradient = jax.value_and_grad(lambda p: potential(kwargs, p))(position)
        return value, gradient, *potential_derivatives(SPEC.numpyro_model, kwargs, position, third=True)

    fused_value, fused_gradient, fused_hessian, fused_third = evaluate()
    assert fused.used()
    # the kernel's programs kept beside the compilation cache, then loaded from there
    for _ in range(2):
        transforms._stored_derivatives.cache_clear()
        stored = potential_derivatives(SPEC.numpyro_model, kwargs, position, identity="test_fused")[0]
        np.testing.assert_array_equal(stored, fused_hessian)
        stored = potential_derivatives(SPEC.numpyro_model, kwargs, position, identity="test_fused", third=True)
        np.testing.assert_array_equal(stored[0], fused_hessian)
        np.testing.assert_array_equal(stored[1], fused_third)
    monkeypatch.setitem(fused._state, "enabled", False)
    jax.clear_caches()
    xla_value, xla_gradient, xla_hessian, xla_third = evaluate()
    # per-row terms in float32 either way, summed in float64 (kernel) or float32 blocks (XLA)
    np.testing.assert_allclose(fused_value, xla_value, rtol=1e-6)
    for site in position:
        np.testing.assert_allclose(fused_gradient[site], xla_gradient[site], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(fused_hessian, xla_hessian, rtol=1e-5, atol=1e-3)
    # the third derivatives (combine.second_order): the kernel's JVP rule differentiated again
    np.testing.assert_allclose(fused_third, xla_third, rtol=1e-5, atol=1e-3)


# fewer rows than a tile; whole tiles; several chunks and a last tile mostly padding
@pytest.mark.parametrize("rows", [100, 2_944, 37_003])
@pytest.mark.parametrize("data_dtype", ["float32", "float64"])
def test_the_kernel_reads_the_features_tiles_as_the_features(kernel_on, rows, data_dtype):
    """A job's layout (fused.device_layout): the kernel's value, gradient and batched values
    on the tiles are the same numbers as on XT (P, R), the same steps summed in the same
    order; the Hessian (XLA's products with the tiles) agrees to float32 rounding. Data in
    float32 (mixed: tiles of 128 rows) and float64 (64 rows)."""
    flat = model_kwargs(logistic_data(rows=rows, features=4, seed=7), resolve_options(SPEC, {}))
    flat = {name: value.astype(data_dtype) if name in ("XT", "y", "offset") else value for name, value in flat.items()}
    tiled = SPEC.device_layout(flat)
    tile_rows = fused.tile_rows(flat["XT"].dtype)
    assert tiled["XT"].shape == (-(-rows // tile_rows), 4, tile_rows)
    last_tile, last_row = divmod(rows - 1, tile_rows)
    np.testing.assert_array_equal(tiled["XT"][last_tile, :, last_row], flat["XT"][:, -1])
    assert not np.any(tiled["XT"][last_tile, :, last_row + 1 :])
    position = {"intercept": jnp.asarray(-0.4), "beta": jnp.asarray([0.3, -0.7, 0.2, 1.1])}
    coefficients = jnp.asarray(np.random.default_rng(1).normal(scale=0.5, size=(5, 5)))

    def evaluate(kwargs):
        value, gradient = jax.value_and_grad(lambda p: potential(kwargs, p))(position)
        data = [kwargs[name] for name in ("XT", "y", "offset", "mask")]
        values = jax.vmap(lambda coef: fused.logistic_log_likelihood(coef, *data))(coefficients)
        return value, gradient, values, potential_derivatives(SPEC.numpyro_model, kwargs, position)[0]

    (flat_value, flat_gradient, flat_values, flat_hessian) = evaluate(flat)
    (tiled_value, tiled_gradient, tiled_values, tiled_hessian) = evaluate(tiled)
    np.testing.assert_array_equal(tiled_value, flat_value)
    for site in position:
        np.testing.assert_array_equal(tiled_gradient[site], flat_gradient[site])
    np.testing.assert_array_equal(tiled_values, flat_values)
    np.testing.assert_allclose(tiled_hessian, flat_hessian, rtol=1e-5)


def test_tiles_only_where_the_kernel_computes_the_likelihood(kernel_on, monkeypatch):
    flat = model_kwargs(logistic_data(rows=300, features=2, seed=8), resolve_options(SPEC, {}))
    # weights: XLA's binomial sum, on XT as it is
    assert SPEC.device_layout({**flat, "weight": jnp.ones(300)})["XT"].ndim == 2
    tiled = SPEC.device_layout(flat)
    # tiles of a width the kernel's steps do not divide are refused, with the shapes it takes
    data = [tiled[name] for name in ("y", "offset", "mask")]
    odd = jnp.asarray(np.asarray(flat["XT"]).reshape(2, 3, 100).transpose(1, 0, 2))
    with pytest.raises(Exception, match=r"XT must be \(P, R\) or tiles"):
        jax.block_until_ready(fused.logistic_log_likelihood(jnp.zeros(3), odd, *data))
    monkeypatch.setitem(fused._state, "enabled", False)
    jax.clear_caches()
    assert SPEC.device_layout(flat)["XT"].ndim == 2
    position = {"intercept": jnp.asarray(0.0), "beta": jnp.zeros(2)}
    with pytest.raises(ValueError, match="tiles"):
        potential(tiled, position)


def test_kernel_maps_over_a_batch_of_parameters(kernel_on):
    features = model_kwargs(logistic_data(rows=1_700, features=2, seed=2), resolve_options(SPEC, {}))
    data = [jnp.asarray(features[name]) for name in ("XT", "y")]
    offset, mask = jnp.asarray(features["offset"]), jnp.asarray(features["mask"])
    coefficients = jnp.asarray([[0.1, -0.2, 0.3], [1.0, 0.5, -0.5], [0.0, 0.0, 0.0]])

    def log_likelihood(coef):
        return fused.logistic_log_likelihood(coef, *data, offset, mask)

    values, gradients = jax.jit(jax.vmap(jax.value_and_grad(log_likelihood)))(coefficients)
    for coef, value, gradient in zip(coefficients, values, gradients):
        eta = coef[:-1] @ np.asarray(features["XT"], np.float64) + coef[-1] + np.asarray(features["offset"])
        y = np.asarray(features["y"], np.float64)
        residual = y - 1 / (1 + np.exp(-eta))
        np.testing.assert_allclose(value, np.sum(y * eta - np.logaddexp(0, eta)), rtol=1e-5)
        expected = np.append(np.asarray(features["XT"], np.float64) @ residual, residual.sum())
        np.testing.assert_allclose(gradient, expected, rtol=1e-4, atol=1e-3)
    # NUTS sees a NaN as a divergence; a NaN gradient too, as XLA's
    value, gradient = jax.value_and_grad(log_likelihood)(jnp.full(3, jnp.nan))
    assert np.isnan(value) and np.isnan(gradient).all()


def test_values_at_a_batch_of_parameters_in_one_call(kernel_on, monkeypatch):
    """Reweight's path (cmcflow.likelihood): vmapped over the coefficients alone, one call
    of the values kernel per batch, whose values are the one-set kernel's, and the model's
    log-likelihood at proposal draws is XLA's (which sums in float32: 1e-6 relative)."""
    from cmcflow.likelihood import log_likelihood_at

    features = model_kwargs(logistic_data(rows=37_003, features=3, seed=6), resolve_options(SPEC, {}))
    data = [jnp.asarray(features[name]) for name in ("XT", "y", "offset", "mask")]
    coefficients = jnp.asarray(np.random.default_rng(0).normal(scale=0.5, size=(7, 4)))
    batched = jax.jit(jax.vmap(lambda coef: fused.logistic_log_likelihood(coef, *data)))
    precision = fused.KERNELS[(data[0].dtype.name, coefficients.dtype.name)][0]
    assert fused.target(precision, values=True) in batched.lower(coefficients).as_text()
    values = batched(coefficients)
    one_at_a_time = [fused.logistic_log_likelihood(coef, *data) for coef in coefficients]
    # the same float32 sums over steps of rows, which the compiler may associate otherwise
    np.testing.assert_allclose(values, one_at_a_time, rtol=1e-8)
    # batched data too: the one-set kernel, once per set
    stacked = jnp.stack([data[0], 2 * data[0]])
    both = jax.vmap(fused.logistic_log_likelihood, in_axes=(None, 0, None, None, None))(
        coefficients[0], stacked, *data[1:]
    )
    np.testing.assert_allclose(both[0], one_at_a_time[0], rtol=1e-8)

    kwargs = {name: jnp.asarray(value) if isinstance(value, np.ndarray) else value for name, value in features.items()}
    draws = {"beta": np.asarray(coefficients[:, :-1]), "intercept": np.asarray(coefficients[:, -1])}
    with_kernel = log_likelihood_at(SPEC.numpyro_model, kwargs, draws, rows=37_003)
    monkeypatch.setitem(fused._state, "enabled", False)
    jax.clear_caches()
    with_xla = log_likelihood_at(SPEC.numpyro_model, kwargs, draws, rows=37_003)
    np.testing.assert_allclose(with_kernel, values, rtol=1e-12)
    np.testing.assert_allclose(with_kernel, with_xla, rtol=1e-6)


def test_nuts_with_the_kernel_samples_the_same_posterior(kernel_on, monkeypatch):
    """Two NUTS runs of one shard, kernel and XLA: their means agree within Monte Carlo
    error (4 chains x 400 draws, ESS ~ 1,000: the difference of two means has sd ~ 0.045
    posterior sd; tolerance 0.2 sd is > 4 of those)."""
    features = logistic_data(rows=2_300, features=3, seed=3)
    settings = NutsSettings(
        num_warmup=300, num_samples=400, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )

    def posterior():
        idata, report = sample_features(
            SPEC, features, resolve_options(SPEC, {}), num_shards=2, shard=0, seed=5, settings=settings, chains=4
        )
        assert report["max_r_hat"] < 1.02
        return idata

    with_kernel = posterior()
    assert with_kernel.posterior.attrs["fused_likelihood"] == 1
    monkeypatch.setitem(fused._state, "enabled", False)
    monkeypatch.setitem(fused._state, "used", False)
    jax.clear_caches()
    from cmcflow.sample import job_sampler

    job_sampler.cache_clear()
    with_xla = posterior()
    assert with_xla.posterior.attrs["fused_likelihood"] == 0
    for site in ("intercept", "beta"):
        kernel_draws, xla_draws = with_kernel.posterior[site].values, with_xla.posterior[site].values
        sd = xla_draws.std(axis=(0, 1))
        assert np.all(np.abs(kernel_draws.mean(axis=(0, 1)) - xla_draws.mean(axis=(0, 1))) / sd < 0.2), site
        assert np.all(np.abs(kernel_draws.std(axis=(0, 1)) / sd - 1) < 0.15), site


def test_no_compiler_leaves_xla_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(fused._state, "registered", False)
    monkeypatch.setitem(fused._state, "enabled", False)
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger="cmcflow.fused"):
        assert not fused.enable(tmp_path / "kernels")
    assert "XLA computes the likelihood" in caplog.text
    features = model_kwargs(logistic_data(rows=100, features=2, seed=4), resolve_options(SPEC, {}))
    assert not fused.applies(*(jnp.asarray(features[name]) for name in ("XT", "y", "offset", "mask")))
    assert not list((tmp_path / "kernels").glob("*"))  # no half-written library


def test_a_compile_error_is_reported_and_leaves_no_library(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(fused._state, "registered", False)
    monkeypatch.setitem(fused._state, "enabled", False)
    monkeypatch.setattr(fused, "FLAGS", (*fused.FLAGS, "-include", "no_such_header.h"))
    with caplog.at_level(logging.WARNING, logger="cmcflow.fused"):
        assert not fused.enable(tmp_path)
    assert "did not build" in caplog.text and "no_such_header.h" in caplog.text
    assert not list(tmp_path.glob("*"))


def test_a_gpu_job_builds_no_kernel(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(fused._state, "enabled", False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with caplog.at_level(logging.INFO, logger="cmcflow.fused"):
        assert not fused.enable_in_job(True, str(tmp_path))
    assert "for CPU jobs" in caplog.text
    assert not fused.enabled()
    assert not list(tmp_path.rglob("*.so"))


#: each kernel's (data, coefficients) dtypes; float64 ones exist only in x64 processes
PRECISIONS = [
    pytest.param(
        data,
        coefficients,
        id=precision,
        marks=pytest.mark.skipif("float64" in (data, coefficients) and not jax.config.jax_enable_x64, reason="no x64"),
    )
    for (data, coefficients), (precision, *_) in fused.KERNELS.items()
]


@pytest.mark.parametrize(("data_dtype", "coef_dtype"), PRECISIONS)
def test_softplus_and_sigmoid_keep_their_relative_accuracy_far_into_the_tails(kernel_on, data_dtype, coef_dtype):
    """Each precision's kernel, with its own exp and log1p (polynomials): the value, gradient
    and batched values of rows whose eta spans the data type's range match float64 to the
    data type's accuracy (the gradient, a sum whose terms cancel, to it or within one epsilon
    of the sum of its terms' magnitudes: the AVX2 build sums in other lanes than the AVX-512
    one), and so do those of rows deep in the negative tail alone, where
    exp(eta) is far below the type's epsilon (log(1 + t) computed as log of a rounded 1 + t
    would be 0 there) and every term is tiny. The results have the coefficients' type."""
    single = data_dtype == "float32"
    reach, tail_start = (100, -17) if single else (700, -37)  # exp(tail_start) < epsilon / 2
    rtol, tail_rtol = (1e-6, 1e-5) if single else (1e-13, 1e-12)
    coefficients = jnp.asarray([[1.0, 0.0], [0.5, -0.3], [-0.2, 0.1]], coef_dtype)

    def evaluate(eta, y):
        xt = jnp.asarray(eta[None, :], data_dtype)
        data = (jnp.asarray(y, data_dtype), jnp.zeros(eta.size, data_dtype), jnp.ones(eta.size, bool))
        value, gradient = jax.value_and_grad(fused.logistic_log_likelihood)(coefficients[0], xt, *data)
        values = jax.vmap(lambda coef: fused.logistic_log_likelihood(coef, xt, *data))(coefficients)
        assert value.dtype == gradient.dtype == values.dtype == coef_dtype
        return value, gradient, values

    def float64(eta, y, coef):
        eta = coef[0] * eta.astype(np.float64) + coef[1]
        residual = y - 1 / (1 + np.exp(-eta))
        return np.sum(y * eta - np.logaddexp(0, eta)), residual

    rng = np.random.default_rng(3)
    everywhere = rng.uniform(-reach, reach, 3_000).astype(data_dtype)
    tail = rng.uniform(-reach, tail_start, 3_000).astype(data_dtype)
    for eta, y, tolerance in [
        (everywhere, (rng.random(everywhere.size) < 0.5).astype(np.float64), rtol),
        (tail, np.zeros(tail.size), tail_rtol),
    ]:
        value, gradient, values = evaluate(eta, y)
        exact = [float64(eta, y, np.asarray(coef, np.float64)) for coef in coefficients]
        expected_value, residual = exact[0]
        np.testing.assert_allclose(value, expected_value, rtol=tolerance)
        terms = np.stack([residual * eta.astype(np.float64), residual])  # the gradient's, per row
        exact_gradient = terms.sum(axis=1)
        # a sum whose terms cancel: to the tolerance, or within one epsilon of its terms' magnitudes
        bound = tolerance * np.abs(exact_gradient) + np.finfo(data_dtype).eps * np.abs(terms).sum(axis=1)
        np.testing.assert_array_less(np.abs(np.asarray(gradient) - exact_gradient), bound)
        np.testing.assert_allclose(values, [v for v, _ in exact], rtol=tolerance)
    # NUTS sees a NaN as a divergence; a NaN gradient too, as XLA's
    value, gradient, _ = evaluate(np.full(4, np.nan), np.zeros(4))
    assert np.isnan(value) and np.isnan(gradient).all()


@pytest.mark.skipif(not jax.config.jax_enable_x64, reason="float64 data need x64")
def test_dtypes_no_kernel_takes_are_refused_naming_them(kernel_on):
    data = (jnp.zeros((2, 300)), jnp.zeros(300), jnp.zeros(300), jnp.ones(300, bool))  # float64
    with pytest.raises(TypeError, match=r"not \('float64', 'float32'\)"):
        fused.logistic_log_likelihood(jnp.zeros(3, jnp.float32), *data)


CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(
    not CPUINFO.exists() or "avx512f" not in CPUINFO.read_text(), reason="this CPU builds the AVX2 code already"
)
def test_the_avx2_build_passes_the_kernel_tests(tmp_path):
    """Clusters without AVX-512 (AMD EPYC Rome and Milan, Intel before Skylake-SP) build the
    kernel's AVX2 code: built here with -mno-avx512f (through a compiler wrapper as $CXX), it
    passes this module's tests against XLA, on tiles, and of accuracy in the tails."""
    wrapper, used = tmp_path / "cxx", tmp_path / "used"
    wrapper.write_text(f'#!/bin/sh\ntouch {used}\nexec {os.environ.get("CXX", "g++")} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    tests = "match_xla or tiles_as or tails"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
        env=os.environ | {"CXX": str(wrapper)},
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-3000:]
    assert used.exists()
