"""The model's log densities at the importance correction's proposal draws: the prior and
support-transform Jacobian (combine, when it draws the proposal:
:func:`cmcflow.combine.draw_proposal`) and a shard's own, untempered log-likelihood
(reweight, one job per shard), in batches of bounded memory.

Apart from :mod:`cmcflow.correct` so that the jobs that evaluate the model import JAX and
the model only, and the correct job (PSIS, the corrected posterior) neither JAX nor the
model; a reweight job imports no ArviZ or SciPy statistics either (about 1 s of each job).
Uses JAX (:func:`cmcflow.jaxenv.configure_jax` first).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density, potential_energy

from cmcflow.tempering import temper_priors
from cmcflow.transforms import latent_site_names

#: Each batch of the log-likelihood evaluation holds about this many (draw, row) elements.
BATCH_ELEMENTS = 2**22


def log_prior(model: Callable, kwargs: Mapping, draws: Mapping[str, np.ndarray], power: float) -> np.ndarray:
    """``power`` · (log p(T θ) + log |J_T(θ)|) ``(M,)`` at unconstrained draws ``{site: (M, …)}``:
    NumPyro's potential energy of the model with its likelihood hidden, tempered as the
    shards were (:class:`~cmcflow.tempering.temper_priors` tempers each site's Jacobian factor
    with the site, so the product of the K tempered shards holds the full prior and Jacobian
    once)."""
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


def observed_log_density(model: Callable, kwargs: Mapping, params: Mapping) -> jax.Array:
    """Σ over the observed sites of ``model(**kwargs)`` of their log densities at the
    constrained latent values ``params``: the log-likelihood, whatever the priors."""
    _, trace = log_density(model, (), kwargs, params)
    total = jnp.zeros(())
    for site in trace.values():
        if site["type"] == "sample" and site["is_observed"]:
            value = site["fn"].log_prob(site["value"])
            total = total + jnp.sum(value if site["scale"] is None else site["scale"] * value)
    return total


def log_likelihood_at(model: Callable, kwargs: Mapping, latent: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
    """ℓ_s at every constrained draw of the latent sites ``{site: (M, …)}``: ``(M,)``,
    evaluated in batches of about ``BATCH_ELEMENTS`` (draw, row) elements for ``rows`` rows,
    so memory stays bounded."""
    values = {name: jnp.asarray(value) for name, value in latent.items()}
    return np.asarray(_log_likelihoods(model, kwargs, values, max(1, BATCH_ELEMENTS // max(rows, 1))))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _log_likelihoods(model: Callable, kwargs: Mapping, latent: Mapping, batch: int) -> jax.Array:
    return jax.lax.map(lambda params: observed_log_density(model, kwargs, params), latent, batch_size=batch)
