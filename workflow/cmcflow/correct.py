"""The correction stages: measure, and remove, the error of a consensus combination against
the exact posterior by importance sampling (:mod:`cmcflow.importance`).

1. combine draws the proposal (:func:`cmcflow.combine.draw_proposal`): M draws in the
   unconstrained space from the Gaussian product of the kept shards' approximations, or
   from a Student-t of the same location and scale, with their proposal log densities,
   the prior and Jacobian at each, and each draw constrained.
2. ``reweight``, one job per shard (:func:`cmcflow.likelihood.log_likelihood_at`): the shard's own,
   untempered log-likelihood at every proposal draw, a bounded batch at a time.
3. ``correct`` (:func:`correct_draws`): log weights from the prior, the Jacobian of the
   support transforms and the log-likelihoods of every shard that did not fail (screened-
   out ones included: :func:`write_correction`); Pareto-smoothed importance sampling; k̂,
   the effective sample size, the corrected posterior (resampled draws; its summary from
   the weighted draws) and how far the combination was from it.

Not for rigid models: their aligned coordinates have a rank-deficient covariance, so the
Gaussian product is no proposal for them. NumPy, pandas and ArviZ: the correct job neither
imports JAX nor evaluates the model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import arviz as az
import numpy as np
import pandas as pd

from cmcflow import importance
from cmcflow.consensus import constrained_sites, unflatten_draws
from cmcflow.io import atomic_path, read_arrays, read_json, write_json_atomic
from cmcflow.runs import read_run, summary_table, write_netcdf

log = logging.getLogger(__name__)


class Correction(NamedTuple):
    """The PSIS-smoothed, normalised ``log_weights (M,)`` of the proposal's draws, the
    ``indices (num_resampled,)`` of its resample, and the figures."""

    log_weights: np.ndarray
    indices: np.ndarray
    figures: dict


def correct_draws(
    proposal: Mapping[str, np.ndarray],
    log_likelihoods: Sequence[np.ndarray],
    log_priors: np.ndarray,
    num_resampled: int,
    seed: int,
) -> Correction:
    """The importance weights of the proposal's draws, the indices into them that make the
    corrected posterior's draws (systematic resampling of the PSIS-weighted draws), and the
    figures: k̂, the effective sample size, whether they make the result reliable
    (:func:`cmcflow.importance.is_reliable`), the weighted mean and sd of every flat
    parameter, the verdict."""
    log_target = log_priors + np.sum(log_likelihoods, axis=0)
    log_weights, khat = importance.smoothed_weights(log_target, proposal["log_density"])
    mean, sd = importance.weighted_moments(proposal["draws"], log_weights)
    indices = importance.resample(log_weights, num_resampled, np.random.default_rng(seed))
    effective_sample_size = importance.effective_sample_size(log_weights)
    figures = {
        "khat": khat,
        "reliable": importance.is_reliable(khat, effective_sample_size),
        "effective_sample_size": effective_sample_size,
        "proposal_draws": len(log_weights),
        "verdict": importance.verdict(khat, effective_sample_size),
        "unconstrained_mean": mean.tolist(),
        "unconstrained_sd": sd.tolist(),
    }
    return Correction(log_weights, indices, figures)


def corrected_idata(
    proposal: Mapping[str, np.ndarray], indices: np.ndarray, dims: Mapping[str, list[str]]
) -> az.InferenceData:
    """The proposal's draws at ``indices`` (resampled) as InferenceData of one chain:
    ``posterior`` (the constrained sites combine stored, deterministic ones included) and
    ``unconstrained_posterior``."""
    unconstrained = unflatten_draws(proposal["draws"][indices], str(proposal["layout"]))
    constrained = constrained_sites(proposal)
    return az.InferenceData(
        posterior=az.dict_to_dataset(
            {name: value[indices][None] for name, value in constrained.items()}, library=None, dims=dims
        ),
        unconstrained_posterior=az.dict_to_dataset(
            {name: value[None] for name, value in unconstrained.items()}, library=None
        ),
    )


def weighted_summary(
    constrained: Mapping[str, np.ndarray], log_weights: np.ndarray, labelled: pd.DataFrame
) -> pd.DataFrame:
    """The corrected posterior's summary from the weighted draws themselves: mean, sd, 5%
    and 95% quantile of every element of the sites ``{site: (M, …)}`` under ``log_weights
    (M,)``, in the rows of ``labelled`` (ArviZ's summary of the same sites, in the same
    order: its labels). The weighted estimates keep the proposal's quasi-Monte Carlo
    precision; a resample's mean adds noise of about 1/√M sd."""
    values = np.concatenate([value.reshape(len(log_weights), -1) for value in constrained.values()], axis=1)
    if values.shape[1] != len(labelled):
        raise ValueError(f"{values.shape[1]} weighted elements for {len(labelled)} summary rows")
    mean, sd = importance.weighted_moments(values, log_weights)
    low, high = importance.weighted_quantiles(values, log_weights, np.array([0.05, 0.95]))
    return pd.DataFrame({"mean": mean, "sd": sd, "5%": low, "95%": high}, index=labelled.index)


def shifts_in_sd(corrected: pd.DataFrame, combined: pd.DataFrame) -> pd.Series:
    """How far the combination's mean was from the corrected one, per parameter, in the
    corrected posterior's sd: (combined mean − corrected mean) / corrected sd."""
    common = combined.index.intersection(corrected.index)
    return (combined.loc[common, "mean"] - corrected.loc[common, "mean"]) / corrected.loc[common, "sd"]


def write_correction(inputs, outputs, settings: Mapping) -> dict:
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
    shards = read_json(inputs.shards)
    target = [shard for shard in range(shards["num_shards"]) if shard not in shards["failed"]]
    reweighted = [read_arrays(inputs.log_likelihoods[shard]) for shard in target]
    log_likelihoods = [arrays["log_likelihood"] for arrays in reweighted]
    draws = len(proposal["log_prior"])
    correction = correct_draws(proposal, log_likelihoods, proposal["log_prior"], draws, settings["seed"])
    figures = correction.figures
    combined = read_run(inputs.combined, groups=("posterior",))
    dims = {name: list(combined.posterior[name].dims[2:]) for name in combined.posterior.data_vars}
    idata = corrected_idata(proposal, correction.indices, dims)
    constrained = constrained_sites(proposal)
    summary = weighted_summary(
        {name: constrained[name] for name in idata.posterior.data_vars}, correction.log_weights, summary_table(idata)
    )
    shifts = shifts_in_sd(summary, pd.read_csv(inputs.combined_summary, index_col="parameter"))
    record = {
        **{key: value for key, value in figures.items() if not key.startswith("unconstrained_")},
        "proposal": settings["proposal"],
        # 2: half the draws from the product of every shard, the screened-out ones too
        "proposal_components": int(proposal["components"]),
        **({"df": settings["df"]} if settings["proposal"] == "student_t" else {}),
        "target_shards": target,
        # the log-likelihoods' (the reweight jobs')
        "precision": str(reweighted[0]["precision"]),
        # screened out of the combination (the proposal), but their rows are in the target
        "screened_out": sorted(set(target) - set(shards["used"])),
        "largest_combined_shift_sd": float(shifts.abs().max()),
        "combined_shift_sd": {name: float(value) for name, value in shifts.items()},
    }
    log.log(
        logging.INFO if record["reliable"] else logging.WARNING,
        "%s; ESS %.0f of %d draws",
        record["verdict"],
        record["effective_sample_size"],
        draws,
    )
    idata.posterior.attrs.update(
        {key: record[key] for key in ("khat", "effective_sample_size", "verdict", "proposal", "precision")}
    )
    write_netcdf(idata, outputs.posterior)
    with atomic_path(outputs.summary) as tmp:
        summary.to_csv(tmp, index_label="parameter")
    write_json_atomic(outputs.importance, record)
    return record
