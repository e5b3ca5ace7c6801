"""The reweight stage's math: a shard's own, untempered log-likelihood at the proposal's
draws, in batches of bounded memory. Apart from :mod:`cmcflow.correct` so that a reweight job
(one per shard) imports JAX and the model only, not ArviZ or SciPy's statistics (about 1 s
of each job). Uses JAX (:func:`cmcflow.jaxenv.configure_jax` first).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import log_density

from cmcflow.transforms import constrain_draws

#: Each batch of the log-likelihood evaluation holds about this many (draw, row) elements.
BATCH_ELEMENTS = 2**22


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


def shard_log_likelihood(model: Callable, kwargs: Mapping, draws: Mapping[str, np.ndarray], rows: int) -> np.ndarray:
    """ℓ_s at every unconstrained draw ``{site: (M, …)}``: ``(M,)``, evaluated in batches of
    about ``BATCH_ELEMENTS`` (draw, row) elements for ``rows`` rows, so memory stays bounded."""
    constrained = constrain_draws(model, kwargs, draws, batch_ndims=1)
    latent = {name: jnp.asarray(constrained[name]) for name in draws}
    return np.asarray(_log_likelihoods(model, kwargs, latent, max(1, BATCH_ELEMENTS // max(rows, 1))))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _log_likelihoods(model: Callable, kwargs: Mapping, latent: Mapping, batch: int) -> jax.Array:
    return jax.lax.map(lambda params: observed_log_density(model, kwargs, params), latent, batch_size=batch)
