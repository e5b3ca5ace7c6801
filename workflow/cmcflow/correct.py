"""The correction stages: measure, and remove, the error of a consensus combination against
the exact posterior by importance sampling (:mod:`cmcflow.importance`).

1. ``propose`` (:func:`cmcflow.importance.propose`): M draws in the unconstrained space from the Gaussian
   product of the kept shards' approximations (written by combine), or from a Student-t of
   the same location and scale, with their proposal log densities.
2. ``reweight``, one job per shard (:func:`cmcflow.likelihood.shard_log_likelihood`): the shard's own,
   untempered log-likelihood at every proposal draw, a bounded batch at a time.
3. ``correct`` (:func:`correct_draws`): log weights from the prior, the Jacobian of the
   support transforms and the log-likelihoods of every shard that did not fail (screened-
   out ones included: :func:`write_correction`); Pareto-smoothed importance sampling; k̂, the effective sample size,
   the corrected posterior (resampled draws) and how far the combination was from it.

Not for rigid models: their aligned coordinates have a rank-deficient covariance, so the
Gaussian product is no proposal for them. Uses JAX (:func:`cmcflow.jaxenv.configure_jax`
first).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from numpyro import handlers
from numpyro.infer.util import potential_energy

from cmcflow import importance
from cmcflow.consensus import unflatten_draws
from cmcflow.io import atomic_path, read_arrays, read_json, write_json_atomic
from cmcflow.jaxenv import PRECISION
from cmcflow.runs import read_run, summary_table, write_netcdf
from cmcflow.tempering import temper_priors
from cmcflow.transforms import constrain_draws, latent_site_names

log = logging.getLogger(__name__)


def log_prior(model: Callable, kwargs: Mapping, draws: Mapping[str, np.ndarray], power: float) -> np.ndarray:
    """``power`` · (log p(T θ) + log |J_T(θ)|) ``(M,)`` at unconstrained draws ``{site: (M, …)}``:
    NumPyro's potential energy of the model with its likelihood hidden, tempered as the
    shards were (NumPyro scales each site's Jacobian term with the site, so the product of
    the K tempered shards holds the full prior and Jacobian once)."""
    prior = prior_model(model, tuple(latent_site_names(model, kwargs)), power)
    return -np.asarray(_potential_energies(prior, kwargs, {name: jnp.asarray(value) for name, value in draws.items()}))


@functools.cache
def prior_model(model: Callable, latent_sites: tuple[str, ...], power: float) -> Callable:
    """``model`` with its observed sites hidden (NumPyro's own Jacobian factors
    ``_<site>_log_det`` kept) and its priors tempered to ``power``."""

    def prior_only(**model_kwargs):
        jacobians = {f"_{name}_log_det" for name in latent_sites}
        with handlers.block(hide_fn=lambda site: site.get("is_observed", False) and site["name"] not in jacobians):
            model(**model_kwargs)

    return temper_priors(prior_only, power=power)


@functools.partial(jax.jit, static_argnums=0)
def _potential_energies(model: Callable, kwargs: Mapping, draws: Mapping) -> jax.Array:
    return jax.lax.map(lambda params: potential_energy(model, (), kwargs, params), draws, batch_size=256)


def correct_draws(
    proposal: Mapping[str, np.ndarray],
    log_likelihoods: Sequence[np.ndarray],
    log_priors: np.ndarray,
    num_resampled: int,
    seed: int,
) -> tuple[np.ndarray, dict]:
    """The corrected posterior's unconstrained draws ``(num_resampled, D)`` (systematic
    resampling of the PSIS-weighted proposal draws) and the figures: k̂, the effective
    sample size, the weighted mean and sd of every flat parameter, the verdict."""
    log_target = log_priors + np.sum(log_likelihoods, axis=0)
    log_weights, khat = importance.smoothed_weights(log_target, proposal["log_density"])
    mean, sd = importance.weighted_moments(proposal["draws"], log_weights)
    indices = importance.resample(log_weights, num_resampled, np.random.default_rng(seed))
    figures = {
        "khat": khat,
        "reliable": khat < importance.KHAT_RELIABLE,
        "effective_sample_size": importance.effective_sample_size(log_weights),
        "proposal_draws": len(log_weights),
        "verdict": importance.verdict(khat),
        "unconstrained_mean": mean.tolist(),
        "unconstrained_sd": sd.tolist(),
    }
    return proposal["draws"][indices], figures


def corrected_idata(
    draws: np.ndarray, layout: str, model: Callable, kwargs: Mapping, dims: Mapping[str, list[str]]
) -> az.InferenceData:
    """Resampled unconstrained draws ``(M, D)`` as InferenceData (one chain): ``posterior``
    (constrained, with deterministic sites) and ``unconstrained_posterior``."""
    unconstrained = {name: value[None] for name, value in unflatten_draws(draws, layout).items()}
    constrained = constrain_draws(model, kwargs, unconstrained, batch_ndims=2)
    return az.InferenceData(
        posterior=az.dict_to_dataset(constrained, library=None, dims=dims),
        unconstrained_posterior=az.dict_to_dataset(unconstrained, library=None),
    )


def shifts_in_sd(corrected: pd.DataFrame, combined: pd.DataFrame) -> pd.Series:
    """How far the combination's mean was from the corrected one, per parameter, in the
    corrected posterior's sd: (combined mean − corrected mean) / corrected sd."""
    common = combined.index.intersection(corrected.index)
    return (combined.loc[common, "mean"] - corrected.loc[common, "mean"]) / corrected.loc[common, "sd"]


def write_correction(model: Callable, kwargs: Mapping, inputs, outputs, settings: Mapping) -> dict:
    """The ``correct`` job: read the proposal, every shard's log-likelihoods and combine's
    shard record; write the corrected posterior (NetCDF), its summary (CSV) and the
    importance record (JSON: k̂, ESS, verdict, and how far the combination's mean was from
    the corrected one, per parameter, in corrected sd). ``inputs``/``outputs``: the rule's
    named paths. Returns the importance record.

    The target is the exact posterior (the whole prior) of the rows of every shard whose
    NUTS run did not fail: shards that screening left out of the combination are in it, so
    an exclusion can never quietly change what the result is about; where their rows
    disagree with the others, the proposal misses the target and k̂ says so."""
    proposal = read_arrays(inputs.proposal)
    layout = str(proposal["layout"])
    shards = read_json(inputs.shards)
    target = [shard for shard in range(shards["num_shards"]) if shard not in shards["failed"]]
    log_likelihoods = [read_arrays(inputs.log_likelihoods[shard])["log_likelihood"] for shard in target]
    priors = log_prior(model, kwargs, unflatten_draws(proposal["draws"], layout), 1.0)
    resampled, figures = correct_draws(proposal, log_likelihoods, priors, len(priors), settings["seed"])
    combined = read_run(inputs.combined, groups=("posterior",))
    dims = {name: list(combined.posterior[name].dims[2:]) for name in combined.posterior.data_vars}
    idata = corrected_idata(resampled, layout, model, kwargs, dims)
    summary = summary_table(idata)
    shifts = shifts_in_sd(summary, pd.read_csv(inputs.combined_summary, index_col="parameter"))
    record = {
        **{key: value for key, value in figures.items() if not key.startswith("unconstrained_")},
        "proposal": settings["proposal"],
        **({"df": settings["df"]} if settings["proposal"] == "student_t" else {}),
        "target_shards": target,
        "precision": PRECISION.name,
        # screened out of the combination (the proposal), but their rows are in the target
        "screened_out": sorted(set(target) - set(shards["used"])),
        "largest_combined_shift_sd": float(shifts.abs().max()),
        "combined_shift_sd": {name: float(value) for name, value in shifts.items()},
    }
    log.info("%s; ESS %.0f of %d draws", record["verdict"], record["effective_sample_size"], len(priors))
    idata.posterior.attrs.update(
        {key: record[key] for key in ("khat", "effective_sample_size", "verdict", "proposal", "precision")}
    )
    write_netcdf(idata, outputs.posterior)
    with atomic_path(outputs.summary) as tmp:
        summary.to_csv(tmp, index_label="parameter")
    write_json_atomic(outputs.importance, record)
    return record
