"""Pre-flight: the model run once on a shard's features before any sample job starts.

A model that cannot run (it raises, or its log density or gradient is not finite where
NUTS would start) would otherwise fail every sample job, and be reported only at combine.
Here it stops the run with one line naming the site.

Uses JAX: the caller must have run :func:`cmcflow.jaxenv.configure_jax` first.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping

import jax
import numpy as np
from numpyro import handlers
from numpyro.infer import init_to_uniform
from numpyro.infer.util import initialize_model, potential_energy, unconstrain_fn
from numpyro.primitives import Messenger

from cmcflow.errors import InputError
from cmcflow.models import ModelSpec
from cmcflow.sample import INIT_RADIUS, sampling_key
from cmcflow.tempering import temper_priors
from cmcflow.transforms import model_kwargs

#: NumPyro's message when no initial point with a finite log density and gradient was found.
NO_VALID_START = "Cannot find valid initial parameters"


class SiteTracker(Messenger):
    """Records the site a model is at: ``started`` (the last site whose message began) and
    ``finished`` (the last site whose value was set)."""

    def __init__(self):
        super().__init__()
        self.started = self.finished = None

    def process_message(self, msg):
        if msg["type"] in ("sample", "deterministic", "param"):
            self.started = msg["name"]

    def postprocess_message(self, msg):
        if msg["type"] in ("sample", "deterministic", "param"):
            self.finished = msg["name"]


def model_line(error: BaseException, model: Callable) -> str:
    """`` (file, line N)`` of the deepest frame of ``error`` in ``model``'s source file, or ''."""
    source = getattr(getattr(model, "__code__", None), "co_filename", None)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def uniform_start_trace(model: Callable, kwargs: Mapping, rng_key: jax.Array, tracker: SiteTracker):
    """The model's trace at NUTS' first candidate start (uniform in (-2, 2) unconstrained)."""
    start = handlers.substitute(handlers.seed(model, rng_key), substitute_fn=init_to_uniform(radius=INIT_RADIUS))
    with tracker:
        return handlers.trace(start).get_trace(**kwargs)


def raising_site(model: Callable, kwargs: Mapping, rng_key: jax.Array) -> tuple[str, BaseException] | None:
    """Where the model raises at NUTS' first candidate start: while running (at a site, or
    between two: the site last begun and the one last finished) or in a site's log density;
    with the error. ``None`` where it does not raise there."""
    tracker = SiteTracker()
    try:
        trace = uniform_start_trace(model, kwargs, rng_key, tracker)
    except Exception as error:
        if tracker.started is None:
            return "before its first site", error
        if tracker.started != tracker.finished:
            return f"at site '{tracker.started}'", error
        return f"after site '{tracker.finished}'", error
    for name, site in trace.items():
        if site["type"] == "sample":
            try:
                site["fn"].log_prob(site["value"])
            except Exception as error:
                return f"in the log density of site '{name}'", error
    return None


def nonfinite_sites(model: Callable, kwargs: Mapping, rng_key: jax.Array) -> list[str]:
    """What is not finite at NUTS' first candidate start: every site whose log density is
    not, then every latent site whose gradient is not."""
    trace = uniform_start_trace(model, kwargs, rng_key, SiteTracker())
    found = []
    for name, site in trace.items():
        if site["type"] == "sample":
            log_density = np.sum(np.asarray(site["fn"].log_prob(site["value"])))
            if not np.isfinite(log_density):
                found.append(f"site '{name}' has log density {log_density}")
    if found:
        return found
    latents = {
        name: site["value"] for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]
    }
    position = unconstrain_fn(model, (), kwargs, latents)
    gradient = jax.grad(lambda z: potential_energy(model, (), kwargs, z))(position)
    return [
        f"the gradient with respect to site '{name}' is not finite"
        for name, value in gradient.items()
        if not np.all(np.isfinite(value))
    ]


def preflight(spec: ModelSpec, features: Mapping[str, np.ndarray], options: Mapping, *, num_shards: int, seed: int):
    """Find NUTS' initial point of the tempered model on ``features`` as a sample job would,
    and evaluate the potential energy and its gradient there.

    Returns ``{"sites", "potential_energy", "max_abs_gradient", "seconds"}``. Raises
    :class:`~cmcflow.errors.InputError`, one line naming the site, where the model raises or
    no start with a finite log density and gradient is found in NumPyro's 100 tries.
    """
    model = temper_priors(spec.numpyro_model, power=1.0 / num_shards)
    kwargs = model_kwargs(features, options)
    rng_key = sampling_key(seed, 0)
    started = time.perf_counter()
    try:
        info = initialize_model(rng_key, model, init_strategy=init_to_uniform(radius=INIT_RADIUS), model_kwargs=kwargs)
    except Exception as error:
        if NO_VALID_START in str(error):
            found = "; ".join(nonfinite_sites(model, kwargs, rng_key)) or "no single site is to blame"
            raise InputError(
                f"model '{spec.name}': the log density or its gradient is not finite at every start NUTS "
                f"tried on shard 0: {found}"
            ) from error
        where, raised = raising_site(model, kwargs, rng_key) or ("while NUTS set up its start", error)
        raise InputError(
            f"model '{spec.name}' raised {where}{model_line(raised, spec.numpyro_model)} on shard 0: "
            f"{type(raised).__name__}: {' '.join(str(raised).split())}"
        ) from error
    gradient = info.param_info.z_grad
    return {
        "sites": sorted(info.param_info.z),
        "potential_energy": float(info.param_info.potential_energy),
        "max_abs_gradient": float(max(np.max(np.abs(value)) for value in jax.tree.leaves(gradient))),
        "seconds": time.perf_counter() - started,
    }
