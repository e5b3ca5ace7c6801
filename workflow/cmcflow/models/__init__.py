"""The model registry: what a model is to cmcflow, and how a name in the config finds one.

A model is a :class:`ModelSpec`: a NumPyro model function, a featurizer that turns a
table of rows into padded arrays, the input columns it needs (by *role*), its own
hyperparameters, its symmetry, and optional hooks (facts about the whole table, initial
values). Model modules import neither JAX nor pandas at module level (the NumPyro model
imports NumPyro inside its body, ``simulate`` imports pandas), so the shard stage reads a
model's column declaration without importing JAX, and the jobs that only evaluate the
model on featurized arrays (sample, reweight) do not import pandas.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import math
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from cmcflow.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

#: Value kinds a column can declare; :mod:`cmcflow.table` checks each row against them:
#: real (finite), binary (0 or 1), count (non-negative integer: counts, point indices),
#: weight (finite, non-negative).
COLUMN_KINDS = ("real", "binary", "count", "weight")


@dataclass(frozen=True)
class Role:
    """One input the model reads from the table.

    ``multiple`` roles take a list of columns (e.g. regression features), single roles one
    column. ``default`` names the column(s) used when the config does not map the role. An
    ``optional`` role without a default that the config does not map is left out: the
    featurizer then sees no array for it (e.g. a regression without an offset).
    """

    name: str
    kind: str
    multiple: bool = False
    default: str | tuple[str, ...] | None = None
    description: str = ""
    optional: bool = False

    def __post_init__(self) -> None:
        if self.kind not in COLUMN_KINDS:
            raise ValueError(f"role {self.name!r}: kind must be one of {COLUMN_KINDS}")


#: The range of a scale, a standard deviation or degrees of freedom: (0, ∞).
POSITIVE = (0.0, math.inf)


def no_table_facts(columns: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The default ``table_facts``: a model that needs nothing about the whole table."""
    return {}


def same_layout(kwargs: dict) -> dict:
    """The default ``device_layout``: the model's arrays as the featurizer laid them out."""
    return kwargs


@dataclass(frozen=True)
class ModelSpec:
    """Everything cmcflow needs to know about a model.

    Attributes:
        name: registry name, recorded in outputs and in the feature-cache key.
        numpyro_model: ``model(**features, **options)``; its latent sample sites are the
            parameters that consensus Monte Carlo combines (all of them are global).
        featurize: ``featurize(columns, pad_to, facts) -> dict[str, np.ndarray]`` where
            ``columns`` maps role name to a float64 array ``(rows,)`` or ``(rows, n)`` and
            ``facts`` is what ``table_facts`` found; every row-indexed output is padded to
            ``pad_to`` rows and a boolean ``mask`` marks real rows.
        featurizer_version: bump when ``featurize`` changes its output; part of the cache key.
        roles: the input columns by role.
        option_ranges: option name -> the open interval (low, high) its value must lie in
            (e.g. :data:`POSITIVE` for a scale), checked when Snakemake starts.
        options: the model's own hyperparameters with their defaults (``model_options``
            in the config overrides them).
        strata: roles whose rows the shard stage deals evenly over the shards when the
            config's ``shard.stratify_by`` is ``model`` (its default); e.g. the structure
            model's ``("i", "j")`` gives every shard an equal share of each pair's
            observations. Empty: a plain random split.
        symmetry: ``"none"``, or ``"rigid"`` when the latent site ``point_site`` holds a
            point cloud ``(N, 3)`` whose posterior is invariant under rigid motions (and
            reflection): such models get the align stage.
        point_site: the point-cloud site of a rigid model.
        observed_pairs: ``observed_pairs(features) -> (P, 2)`` int array: for a rigid model
            whose data are distances between points, the pairs of points a shard's data
            observe. Combine then places the combined structure where it fits the consensus
            of those distances (see :func:`cmcflow.locate.locate_by_distances`).
        intercept: the model adds an intercept to a linear predictor of its feature columns
            (the columns of its roles of several real columns). The shard stage then notes
            a feature that never varies, and features linearly dependent together with a
            constant (:func:`cmcflow.table.design_notes`); without one, a constant feature
            is the model's intercept, and only columns that are 0 throughout, or linearly
            dependent among themselves, are noted.
        table_facts: ``table_facts(columns) -> dict`` of JSON values computed once from
            the whole validated table by the shard stage (e.g. the number of points, which
            every shard must share); may raise :class:`cmcflow.errors.InputError`.
        init_values: ``init_values(features, options, num_chains, rng) -> {site: (chains, …)}``
            constrained initial values, or ``None`` for NumPyro's dispersed uniform start.
        simulate: ``simulate(rows, seed, **shape) -> (table, truth)`` for demo data (shape:
            the config's other ``input.simulate`` keys, e.g. ``features``), or ``None``.
        device_layout: ``device_layout(kwargs) -> kwargs``: the model's keyword arguments
            (:func:`cmcflow.transforms.model_kwargs`) laid out for how this process computes
            the model, as sample and reweight jobs call it (the logistic model: the fused
            kernel's feature tiles, :func:`cmcflow.fused.device_layout`); the same values.
    """

    name: str
    numpyro_model: Callable[..., None]
    featurize: Callable[[Mapping[str, np.ndarray], int, Mapping[str, Any]], dict[str, np.ndarray]]
    featurizer_version: str
    roles: tuple[Role, ...]
    options: Mapping[str, float] = field(default_factory=dict)
    option_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    strata: tuple[str, ...] = ()
    symmetry: str = "none"
    point_site: str | None = None
    intercept: bool = False
    observed_pairs: Callable[[Mapping[str, np.ndarray]], np.ndarray] | None = None
    table_facts: Callable[[Mapping[str, np.ndarray]], dict[str, Any]] = no_table_facts
    init_values: Callable[..., dict[str, np.ndarray]] | None = None
    simulate: Callable[..., tuple[pd.DataFrame, dict[str, Any]]] | None = None
    device_layout: Callable[[dict], dict] = same_layout

    def __post_init__(self) -> None:
        if self.symmetry not in ("none", "rigid"):
            raise ValueError(f"model {self.name!r}: symmetry must be 'none' or 'rigid'")
        if (self.symmetry == "rigid") != (self.point_site is not None):
            raise ValueError(f"model {self.name!r}: a rigid model names its point_site, and only a rigid one")
        if self.observed_pairs is not None and self.point_site is None:
            raise ValueError(f"model {self.name!r}: observed_pairs needs a point_site")
        unranged = set(self.option_ranges) - set(self.options)
        if unranged:
            raise ValueError(f"model {self.name!r}: option_ranges {sorted(unranged)} are not options of the model")
        unknown = set(self.strata) - {role.name for role in self.roles}
        if unknown:
            raise ValueError(f"model {self.name!r}: strata {sorted(unknown)} are not roles of the model")


def source_digest(function: Callable) -> str:
    """A digest (16 hex digits) of the source of the module that defines ``function``; empty
    where Python has no source for it. Snakemake does not see edits to a model's module:
    this digest, in the rules' ``params`` and in the feature-cache key, makes an edit rerun
    what it touches and never serve features of an older featurizer."""
    try:
        source = inspect.getsource(inspect.getmodule(function))
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def role_arrays(table: pd.DataFrame, columns: Mapping[str, list[str]], spec: ModelSpec) -> dict[str, np.ndarray]:
    """Role name -> float64 ``(rows, n_columns)`` for multiple roles, ``(rows,)`` for single ones."""
    arrays = {}
    for role in spec.roles:
        if not columns.get(role.name):  # an optional role the config leaves out
            continue
        values = table[columns[role.name]].to_numpy(dtype=np.float64)
        arrays[role.name] = values if role.multiple else values[:, 0]
    return arrays


def _builtin_models() -> dict[str, ModelSpec]:
    from cmcflow.models import counts, linear, linear_gaussian, logistic, structure

    specs = (linear.SPEC, linear_gaussian.SPEC, logistic.SPEC, counts.POISSON, counts.NEGATIVE_BINOMIAL, structure.SPEC)
    return {spec.name: spec for spec in specs}


def get_model(name: str) -> ModelSpec:
    """A built-in model by name, or a user's ``ModelSpec`` by ``"module:attribute"``."""
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            spec = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            details = "".join(traceback.format_exception(error))
            raise ConfigError(f"model {name!r} cannot be loaded: {error}", details) from None
        except Exception as error:  # the module itself raised (a syntax error, a bad ModelSpec …)
            frame = traceback.extract_tb(error.__traceback__)[-1]
            where = f" (at {frame.filename}:{frame.lineno})" if not isinstance(error, SyntaxError) else ""
            raise ConfigError(
                f"model {name!r} cannot be loaded: its module raised {type(error).__name__}: {error}{where}",
                "".join(traceback.format_exception(error)),
            ) from None
        if not isinstance(spec, ModelSpec):
            raise ConfigError(f"model {name!r} is a {type(spec).__name__}, not a cmcflow ModelSpec")
        return spec
    builtins = _builtin_models()
    if name not in builtins:
        raise ConfigError(
            f"unknown model {name!r}; built-in models: {', '.join(sorted(builtins))}, "
            "or give your own as 'module:attribute'"
        )
    return builtins[name]


def resolve_columns(
    spec: ModelSpec, columns: Mapping[str, Any], simulated_features: int | None = None
) -> dict[str, list[str]]:
    """Map every role of ``spec`` to its column names.

    Order of precedence: the config's ``columns`` mapping, then the role's default, then
    (for simulated input) the names the simulator writes: ``x0 … x{P-1}`` for a multiple
    role. Returns role name -> list of column names (one element for single roles).
    """
    unknown = sorted(set(columns) - {role.name for role in spec.roles})
    if unknown:
        raise ConfigError(
            f"model {spec.name!r} has no column role(s) {unknown}; its roles are {[role.name for role in spec.roles]}"
        )
    resolved: dict[str, list[str]] = {}
    for role in spec.roles:
        value = columns.get(role.name, role.default)
        if value is None and role.multiple and simulated_features is not None:
            value = [f"x{i}" for i in range(simulated_features)]
        if value is None and role.optional:
            resolved[role.name] = []
            continue
        if value is None:
            raise ConfigError(f"model {spec.name!r} needs columns for role {role.name!r} ({role.description})")
        names = [value] if isinstance(value, str) else list(value)
        if not role.multiple and len(names) != 1:
            raise ConfigError(f"role {role.name!r} of model {spec.name!r} takes one column, got {names}")
        if not names:
            raise ConfigError(f"role {role.name!r} of model {spec.name!r} needs at least one column")
        resolved[role.name] = names
    places: dict[str, list[str]] = {}  # column -> the roles it is given for, once per mention
    for role, names in resolved.items():
        for name in names:
            places.setdefault(name, []).append(role)
    repeated = {name: roles for name, roles in places.items() if len(roles) > 1}
    if repeated:
        raise ConfigError(
            f"model {spec.name!r}: each column can fill one place only, but "
            + "; ".join(
                f"column {name!r} is listed {len(roles)} times as {roles[0]}"
                if len(set(roles)) == 1
                else f"column {name!r} is given as {' and '.join(dict.fromkeys(roles))}"
                for name, roles in repeated.items()
            )
        )
    return resolved


def resolve_options(spec: ModelSpec, options: Mapping[str, Any]) -> dict[str, float]:
    """The model's hyperparameters: ``spec.options`` overridden by the config's
    ``model_options``, each inside its ``spec.option_ranges`` interval."""
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise ConfigError(f"model {spec.name!r} has no option(s) {unknown}; its options are {dict(spec.options)}")
    resolved = {**spec.options, **options}
    for name, (low, high) in spec.option_ranges.items():
        value = resolved[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
            interval = f"> {low:g}" if high == math.inf else f"in ({low:g}, {high:g})"
            raise ConfigError(f"model_options.{name} = {value!r}: model {spec.name!r} needs it {interval}")
    return resolved
