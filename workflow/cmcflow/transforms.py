"""A NumPyro model evaluated on batches of draws: its arguments, its latent sites, and its
support transforms between the constrained and the unconstrained space.

Uses JAX: the caller must have run :func:`cmcflow.jaxenv.configure_jax` first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding
from numpyro import handlers
from numpyro.infer import init_to_uniform
from numpyro.infer.util import constrain_fn, potential_energy, unconstrain_fn

from cmcflow import fused
from cmcflow.jaxenv import PRECISION
from cmcflow.stored_programs import program_key, stored_program, stored_programs_dir


def parameter_dtype() -> np.dtype:
    """The parameters' floating type: float64 in JAX's x64 mode, else float32."""
    return jax.dtypes.canonicalize_dtype(np.float64)


#: Draws pushed through the model at once by :func:`map_draws`.
TRANSFORM_BATCH = 256


def model_kwargs(features: Mapping[str, np.ndarray], options: Mapping[str, float]) -> dict:
    """Keyword arguments of ``model(**features, **options)``: feature arrays on the device,
    floating ones in the data type of the process's ``jax.precision``
    (:data:`cmcflow.jaxenv.PRECISION`)."""
    return {**{name: device_array(value, PRECISION.data_dtype) for name, value in features.items()}, **options}


def device_array(value: np.ndarray, data_dtype: str) -> jax.Array:
    """``value`` on the device; in ``data_dtype`` if it is floating."""
    return jnp.asarray(value, dtype=data_dtype if np.issubdtype(np.asarray(value).dtype, np.floating) else None)


def latent_site_names(model: Callable, kwargs: Mapping) -> list[str]:
    """Names of the latent (unobserved) sample sites of ``model(**kwargs)``, in trace order.

    The model is traced at NumPyro's uniform initial values rather than at prior draws, so
    priors that cannot be sampled (a flat ``ImproperUniform``) trace too; abstractly
    (``jax.eval_shape``), so that no operation of the model runs or is compiled."""
    names = []

    def trace_names():
        seeded = handlers.substitute(handlers.seed(model, 0), substitute_fn=init_to_uniform)
        trace = handlers.trace(seeded).get_trace(**kwargs)
        names.extend(name for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"])

    jax.eval_shape(trace_names)
    return names


def map_draws(function: Callable, draws: Mapping[str, np.ndarray], batch_ndims: int) -> dict[str, np.ndarray]:
    """Apply ``function`` (one draw -> dict) to every draw, ``TRANSFORM_BATCH`` draws at a time.

    ``draws[name]`` has ``batch_ndims`` leading draw axes (e.g. ``(chain, draw, …)``).
    Bounded batches keep memory flat when the model touches every data row per draw.
    """
    lead = next(iter(draws.values())).shape[:batch_ndims]
    flat = {name: jnp.reshape(value, (-1, *value.shape[batch_ndims:])) for name, value in draws.items()}
    mapped = jax.lax.map(function, flat, batch_size=TRANSFORM_BATCH)
    return {name: np.asarray(value).reshape(*lead, *value.shape[1:]) for name, value in mapped.items()}


def unconstrain_draws(
    model: Callable, kwargs: Mapping, draws: Mapping[str, np.ndarray], batch_ndims: int
) -> dict[str, np.ndarray]:
    """Constrained draws ``{site: (*batch, …)}`` -> the same draws in the unconstrained space."""
    return map_draws(lambda values: unconstrain_fn(model, (), kwargs, values), draws, batch_ndims)


def constrain_draws(
    model: Callable, kwargs: Mapping, draws: Mapping[str, np.ndarray], batch_ndims: int
) -> dict[str, np.ndarray]:
    """Unconstrained draws ``{site: (*batch, …)}`` -> every site of the model (latent sites
    constrained to their support, and deterministic sites)."""
    return map_draws(lambda position: constrain_fn(model, (), kwargs, position), draws, batch_ndims)


def split_static(kwargs: Mapping) -> tuple[dict, tuple | None]:
    """The model's keyword arguments as ``(arrays, static)``: the arrays, which a compiled
    program takes as arguments, and everything else (options: numbers, strings) as sorted
    ``(name, value)`` pairs that key the program; ``static`` is ``None`` where an option
    cannot key one (unhashable: a list)."""
    arrays = {name: value for name, value in kwargs.items() if isinstance(value, (jax.Array, np.ndarray))}
    static = tuple(sorted((name, value) for name, value in kwargs.items() if name not in arrays))
    try:
        hash(static)
    except TypeError:
        return arrays, None
    return arrays, static


def potential_derivatives(
    model: Callable,
    kwargs: Mapping,
    position: Mapping[str, np.ndarray],
    identity: str | None = None,
    third: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The Hessian H ``(D, D)`` of ``model(**kwargs)``'s potential energy U = −log p(θ, y) in
    the unconstrained space (log-Jacobians of the support transforms included) at ``position``
    ``{site: (…)}``, the sites flattened in the given order, each row-major (as
    :func:`cmcflow.consensus.flatten`), and with ``third`` its third derivatives
    T_ijk = ∂³U / ∂θ_i ∂θ_j ∂θ_k ``(D, D, D)`` (else ``None``). At a posterior's centre H is
    the precision of the posterior's Gaussian (Laplace) approximation: a weight computed from
    the model, without the Monte Carlo noise of a covariance estimated from draws; T is how
    far the posterior is from Gaussian, to the next order (:mod:`cmcflow.second_order`). One
    compiled program per model, options, shapes and order: the data arrays are its arguments.

    ``identity``: what the model is, for later processes (its source's digest, its
    tempering, the likelihood it computes with); given, and with a persistent compilation
    cache, the traced program is kept there (:func:`cmcflow.stored_programs.stored_program`)
    and a later job loads it instead of tracing the model again.
    """
    shapes = tuple((name, tuple(np.shape(value))) for name, value in position.items())
    flat = np.concatenate([np.ravel(value) for value in position.values()]).astype(parameter_dtype())
    arrays, static = split_static(kwargs)
    if static is None:  # options that cannot key a program: one of this call's own
        result = jax.jit(lambda flat: _derivatives(model, (), shapes, third, kwargs, flat))(flat)
    elif identity is None or (directory := stored_programs_dir()) is None:
        result = _compiled_derivatives(model, static, shapes, third, arrays, flat)
    else:
        specs = tuple((name, np.shape(value), np.dtype(value.dtype).name) for name, value in sorted(arrays.items()))
        result = _stored_derivatives(model, static, shapes, third, specs, identity, directory)(arrays, flat)
    hessian, third_derivatives = result
    return np.asarray(hessian), None if third_derivatives is None else np.asarray(third_derivatives)


@functools.cache
def _stored_derivatives(
    model: Callable, static: tuple, shapes: tuple, third: bool, specs: tuple, identity: str, directory: Path
) -> Callable:
    """The derivatives' program for data arrays of ``specs`` ``((name, shape, dtype), …)``,
    loaded from ``directory`` or traced and kept there: one per process and key."""
    arguments = (
        {name: jax.ShapeDtypeStruct(shape, dtype) for name, shape, dtype in specs},
        jax.ShapeDtypeStruct((sum(int(np.prod(shape, dtype=int)) for _, shape in shapes),), parameter_dtype()),
    )
    # the kernel, where enabled, is in the traced program: a process without it traces its own
    settings = (identity, static, shapes, f"fused_likelihood={fused.enabled()}")
    key = program_key(
        "hessian and third derivatives" if third else "hessian", settings, jax.tree.leaves(arguments), devices=1
    )
    program = jax.jit(functools.partial(_derivatives, model, static, shapes, third))
    sharding = SingleDeviceSharding(jax.devices()[0])
    return stored_program(program, arguments, sharding, key, directory, custom_calls=fused.TARGETS)


def flat_potential(model: Callable, kwargs: Mapping, shapes: tuple) -> Callable[[jax.Array], jax.Array]:
    """``model(**kwargs)``'s potential energy U = −log p(θ, y) in the unconstrained space as a
    function of the flat vector θ ``(D,)``: the sites ``shapes`` ``((name, shape), …)`` in
    order, each row-major."""
    sizes = [int(np.prod(shape, dtype=int)) for _, shape in shapes]
    splits = np.cumsum(sizes)[:-1].tolist()

    def potential(flat):
        parts = jnp.split(flat, splits)
        params = {name: part.reshape(shape) for (name, shape), part in zip(shapes, parts)}
        return potential_energy(model, (), kwargs, params)

    return potential


def _derivatives(
    model: Callable, static: tuple, shapes: tuple, third: bool, arrays: Mapping, flat: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    hessian = jax.hessian(flat_potential(model, {**arrays, **dict(static)}, shapes))
    if not third:
        return hessian(flat), None
    # forward over the Hessian's program one direction θ_k at a time, ∂_k H ``(D, D)`` each:
    # the memory stays the Hessian's own (all D directions at once hold D² tangents per row)
    values, slices = jax.lax.map(
        lambda direction: jax.jvp(hessian, (flat,), (direction,)), jnp.eye(flat.size, dtype=flat.dtype)
    )
    return values[0], jnp.moveaxis(slices, 0, -1)


_compiled_derivatives = jax.jit(_derivatives, static_argnums=(0, 1, 2, 3))
