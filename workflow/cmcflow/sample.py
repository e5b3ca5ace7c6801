"""The sample stage: NUTS on one shard's features, with the prior tempered to the power 1/K.

One chain per JAX device (``chain_method="parallel"``); the caller must have run
:func:`cmcflow.jaxenv.configure_jax` before importing this module.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer import MCMC, NUTS, init_to_uniform
from numpyro.infer.util import unconstrain_fn

from cmcflow.io import atomic_path, write_json_atomic
from cmcflow.jaxenv import COMPILE_CLOCK
from cmcflow.models import ModelSpec
from cmcflow.tempering import temper_priors

log = logging.getLogger(__name__)

#: NUTS per-draw statistics kept in ``sample_stats`` (ArviZ adds ``tree_depth``).
EXTRA_FIELDS = ("diverging", "num_steps", "energy")
#: Draws pushed through the model at once when mapping them to the unconstrained space.
TRANSFORM_BATCH = 256
#: Without a model's own start, initial values are drawn uniformly in (-radius, radius) in
#: the unconstrained space, independently per chain, so chains start dispersed.
INIT_RADIUS = 2.0


@dataclass(frozen=True)
class NutsSettings:
    """NUTS settings of one analysis (the config's ``sample`` section)."""

    num_warmup: int
    num_samples: int
    target_accept_prob: float
    max_tree_depth: int
    dense_mass: bool


def sampling_key(seed: int, shard: int) -> jax.Array:
    """PRNG key of one sampling run: the analysis seed folded with the shard index.

    The full-data run uses ``shard = -1`` (folded as 2**32 - 1), distinct from every shard.
    """
    return jax.random.fold_in(jax.random.PRNGKey(seed), shard % 2**32)


def model_kwargs(features: Mapping[str, np.ndarray], options: Mapping[str, float]) -> dict:
    """Keyword arguments of ``model(**features, **options)``: feature arrays on the device."""
    return {**{name: jnp.asarray(value) for name, value in features.items()}, **options}


def latent_site_names(model, kwargs: Mapping) -> list[str]:
    """Names of the latent (unobserved) sample sites of ``model(**kwargs)``, in trace order."""
    trace = handlers.trace(handlers.seed(model, 0)).get_trace(**kwargs)
    return [
        name for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]
    ]


def map_draws(function, draws: Mapping[str, np.ndarray], batch_ndims: int) -> dict[str, np.ndarray]:
    """Apply ``function`` (one draw -> dict) to every draw, ``TRANSFORM_BATCH`` draws at a time.

    ``draws[name]`` has ``batch_ndims`` leading draw axes (e.g. ``(chain, draw, …)``).
    Bounded batches keep memory flat when the model touches every data row per draw.
    """
    lead = next(iter(draws.values())).shape[:batch_ndims]
    flat = {name: jnp.reshape(value, (-1, *value.shape[batch_ndims:])) for name, value in draws.items()}
    mapped = jax.lax.map(function, flat, batch_size=TRANSFORM_BATCH)
    return {name: np.asarray(value).reshape(*lead, *value.shape[1:]) for name, value in mapped.items()}


def run_nuts(
    model,
    kwargs: Mapping,
    *,
    prior_power: float,
    settings: NutsSettings,
    num_chains: int,
    rng_key: jax.Array,
    init_params: Mapping[str, jax.Array] | None = None,
    chain_method: str = "parallel",
) -> MCMC:
    """NUTS on ``temper_priors(model, prior_power)(**kwargs)``, ``num_chains`` chains.

    ``init_params``: unconstrained initial values ``{site: (num_chains, …)}``; without them
    every chain starts from its own uniform draw in (-2, 2) in the unconstrained space.
    ``chain_method``: NumPyro's; the stage always runs ``"parallel"`` (one chain per
    device), ``bench/sample_chains.py`` compares it with ``"sequential"`` and ``"vectorized"``.
    """
    kernel = NUTS(
        temper_priors(model, power=prior_power),
        target_accept_prob=settings.target_accept_prob,
        max_tree_depth=settings.max_tree_depth,
        dense_mass=settings.dense_mass,
        init_strategy=init_to_uniform(radius=INIT_RADIUS),
    )
    mcmc = MCMC(
        kernel,
        num_warmup=settings.num_warmup,
        num_samples=settings.num_samples,
        num_chains=num_chains,
        chain_method=chain_method,
        progress_bar=False,
    )
    mcmc.run(rng_key, init_params=init_params, extra_fields=EXTRA_FIELDS, **kwargs)
    # JAX dispatches asynchronously: wait for the draws so that timings mean something.
    jax.block_until_ready(mcmc.get_samples())
    return mcmc


def diagnostics(idata: az.InferenceData, var_names: list[str]) -> dict:
    """ArviZ diagnostics of one run: rank-normalised split R-hat, bulk/tail ESS, divergences, BFMI."""
    table = az.summary(idata, var_names=var_names, kind="diagnostics", round_to="none")
    diverging = idata.sample_stats["diverging"].values
    bfmi = az.bfmi(idata)
    return {
        "max_r_hat": float(table["r_hat"].max()),
        "min_ess_bulk": float(table["ess_bulk"].min()),
        "min_ess_tail": float(table["ess_tail"].min()),
        "divergences": int(diverging.sum()),
        "divergence_rate": float(diverging.mean()),
        "bfmi": [float(value) for value in bfmi],
        "min_bfmi": float(np.min(bfmi)),
        "parameters": table.to_dict(orient="index"),
    }


def initial_values(spec: ModelSpec, features, options, kwargs, num_chains: int, seed: int, shard: int):
    """The model's own per-chain start (``spec.init_values``), unconstrained; or ``None``."""
    if spec.init_values is None:
        return None
    rng = np.random.default_rng([seed, shard % 2**32])
    constrained = spec.init_values(features, options, num_chains, rng)
    return map_draws(lambda values: unconstrain_fn(spec.numpyro_model, (), kwargs, values), constrained, batch_ndims=1)


def sample_features(
    spec: ModelSpec,
    features: Mapping[str, np.ndarray],
    options: Mapping[str, float],
    *,
    num_shards: int,
    shard: int,
    seed: int,
    settings: NutsSettings,
    devices: int,
    chain_method: str = "parallel",
) -> tuple[az.InferenceData, dict]:
    """NUTS on shard ``shard`` (or on all rows: ``num_shards=1``, ``shard=-1``), one chain
    per device (``chain_method`` as in :func:`run_nuts`).

    Returns the InferenceData (``posterior``, ``unconstrained_posterior``, ``sample_stats``;
    run facts in ``posterior.attrs``) and its diagnostics dict.
    """
    model = spec.numpyro_model
    kwargs = model_kwargs(features, options)
    compile_before = COMPILE_CLOCK.seconds
    started = time.perf_counter()
    mcmc = run_nuts(
        model,
        kwargs,
        prior_power=1.0 / num_shards,
        settings=settings,
        num_chains=devices,
        rng_key=sampling_key(seed, shard),
        init_params=initial_values(spec, features, options, kwargs, devices, seed, shard),
        chain_method=chain_method,
    )
    wall = time.perf_counter() - started
    compile_seconds = COMPILE_CLOCK.seconds - compile_before

    latents = latent_site_names(model, kwargs)
    idata = az.from_numpyro(mcmc, log_likelihood=False)
    samples = mcmc.get_samples(group_by_chain=True)
    unconstrained = map_draws(
        lambda position: unconstrain_fn(model, (), kwargs, position),
        {name: samples[name] for name in latents},
        batch_ndims=2,
    )
    idata = az.InferenceData(
        posterior=idata.posterior,
        unconstrained_posterior=az.dict_to_dataset(unconstrained, library=None),
        sample_stats=idata.sample_stats,
    )
    run_facts = {
        "num_shards": num_shards,
        "rows": int(np.sum(features["mask"])),
        "padded_rows": int(np.shape(features["mask"])[0]),
        "devices": len(jax.devices()),
        "num_chains": devices,
        "seed": seed,
        "shard": shard,
        "compile_seconds": compile_seconds,
        "sampling_seconds": wall - compile_seconds,
        "persistent_cache_hits": COMPILE_CLOCK.persistent_cache_hits,
        **{f"nuts_{name}": int(value) if isinstance(value, bool) else value for name, value in asdict(settings).items()},
    }
    idata.posterior.attrs.update(run_facts)
    report = {**run_facts, **diagnostics(idata, latents)}
    log.info(
        "%d chains x %d draws: compile %.1f s, sampling %.1f s, max R-hat %.3f, min bulk ESS %.0f, %d divergences",
        devices, settings.num_samples, compile_seconds, wall - compile_seconds,
        report["max_r_hat"], report["min_ess_bulk"], report["divergences"],
    )
    return idata, report


def failed_run(shard: int, error: str) -> tuple[az.InferenceData, dict]:
    """What a sample job writes when NUTS raised on its shard: no draws, the error. Combine
    then applies ``combine.on_failed_shard`` (fail the run, or go on without the shard)."""
    import xarray as xr

    attrs = {"failed": 1, "shard": shard, "error": error}
    return az.InferenceData(posterior=xr.Dataset({"failed": 1}, attrs=attrs)), {"failed": True, "shard": shard, "error": error}


def is_failed(idata: az.InferenceData) -> bool:
    """Whether the run is a :func:`failed_run` record."""
    return bool(idata.posterior.attrs.get("failed", 0))


def read_run(path: str | os.PathLike, groups: tuple[str, ...] = ("posterior", "unconstrained_posterior")) -> az.InferenceData:
    """The ``groups`` of a run written by :func:`write_run` (or by the align stage), read
    eagerly; a group the file lacks (a :func:`failed_run` record has only ``posterior``)
    is left out.

    Written by hand for combine, which reads every shard's run once or twice:
    ``az.from_netcdf`` opens every group through xarray's decoding layer (0.06-0.15 s a
    file), while reading the named groups straight from HDF5 takes a few milliseconds.
    Kept: variables with their dimension names, dimension coordinates, group attributes.
    Not kept: variables' own attributes (ArviZ writes none; the NaN ``_FillValue`` of float
    variables changes nothing) and netCDF's internal bookkeeping attributes.
    """
    import h5py
    import xarray as xr

    def attribute(value):  # as netCDF readers give it: str, and a one-element array as a scalar
        if isinstance(value, np.ndarray) and value.shape == (1,):
            value = value[0]
        return value.decode() if isinstance(value, bytes) else value

    def values(variable):  # strings (e.g. coordinate labels) as str, like netCDF readers
        return variable.asstr()[()] if h5py.check_string_dtype(variable.dtype) else variable[()]

    datasets = {}
    with h5py.File(path, "r") as file:
        for name in groups:
            if name not in file:
                continue
            data, coords = {}, {}
            for key, variable in file[name].items():
                if attribute(variable.attrs.get("CLASS")) == "DIMENSION_SCALE":
                    # a dimension; netCDF marks one without a coordinate variable by this NAME
                    if not attribute(variable.attrs.get("NAME", "")).startswith("This is a netCDF dimension"):
                        coords[key] = values(variable)
                    continue
                dims = tuple(dim[0].name.rsplit("/", 1)[-1] for dim in variable.dims)
                data[key] = (dims, values(variable))
            attrs = {key: attribute(value) for key, value in file[name].attrs.items() if not key.startswith("_N")}
            datasets[name] = xr.Dataset(data, coords=coords, attrs=attrs)
    return az.InferenceData(**datasets)


def write_run(idata: az.InferenceData, report: dict, netcdf_path: str | os.PathLike, diagnostics_path: str | os.PathLike) -> None:
    """Write the run's NetCDF and diagnostics JSON, each atomically."""
    with atomic_path(netcdf_path) as tmp:
        idata.to_netcdf(str(tmp), engine="h5netcdf")
    write_json_atomic(diagnostics_path, report)
