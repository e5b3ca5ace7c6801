"""Parameter sweeps: an analysis' ``sweep:`` expanded into one analysis per grid point, and
which grid points share which stage's outputs.

A sweep maps dotted keys of the analysis' settings (``shard.num_shards``,
``model_options.prior_sd``) to lists of values. The grid is the product of its axes: each
key is an axis of its own, except the keys under ``zip``, which vary together (one axis;
their lists have one length). A grid point is the analysis with the point's values put in,
named ``<analysis>/<key>=<value>,…`` (each key by its last part, by the whole dotted key
where two swept keys share a last part).

Grid points share a stage's outputs where they agree on every setting the stage and the
stages before it read (:data:`STAGE_SETTINGS`): the first such point in grid order *owns*
the stage, and every other point's rules read the owner's files, so that Snakemake's DAG
holds one job per distinct input. JAX-free: it runs at parse time.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cmcflow.errors import ConfigError

#: Entries of ``sweep`` that are not swept keys.
SWEEP_OPTIONS = ("zip", "fulldata", "stability")

#: Settings a sweep cannot vary, and why.
UNSWEEPABLE = {
    "model": "every stage depends on it: give each model an analysis of its own",
    "sweep": "a sweep cannot sweep itself",
}

#: Characters a swept string value may hold (it becomes part of a path).
VALUE_PATTERN = re.compile(r"^[A-Za-z0-9_.+-]+$")

#: Each stage, and the analysis settings its outputs depend on, those of the stages before
#: it included. ``fulldata`` (NUTS on all rows) reads no shard setting: points that differ
#: only in how the rows are split share it.
#: (combine.second_order: the sample jobs compute the third derivatives it needs)
_SAMPLE = (
    "model",
    "input",
    "columns",
    "shard",
    "featurize",
    "model_options",
    "sample",
    "platform",
    "combine.second_order",
)
STAGE_SETTINGS = {
    "simulate": ("model", "input"),
    "shard": ("model", "input", "columns", "shard"),
    # a batch's features lie in its directory: shards_per_job decides which
    "featurize": ("model", "input", "columns", "shard", "featurize", "sample.shards_per_job"),
    "sample": _SAMPLE,
    "align": (*_SAMPLE, "align"),
    # combine draws the importance correction's proposal
    "combine": (*_SAMPLE, "align", "combine", "correct"),
    "correct": (*_SAMPLE, "align", "combine", "correct"),
    "fulldata": ("model", "input", "columns", "featurize", "model_options", "sample", "platform", "align"),
}


@dataclass(frozen=True)
class Sweep:
    """A swept analysis: its grid points' names, in grid order, and each point's values."""

    name: str
    #: the swept dotted keys, in config order (zip keys where the zip stands)
    keys: tuple[str, ...]
    #: point name -> {dotted key: value}
    points: dict
    #: the sweep's own settings: ``fulldata`` and ``stability`` (schema defaults filled in)
    options: dict


def grid(sweep: Mapping) -> list[dict]:
    """The grid points of a ``sweep`` section, in grid order (the last axis fastest): one
    ``{dotted key: value}`` per point."""
    axes = []
    for key, values in sweep.items():
        if key == "zip":
            keys = list(values)
            axes.append([dict(zip(keys, row)) for row in zip(*values.values())])
        elif key not in SWEEP_OPTIONS:
            axes.append([{key: value} for value in values])
    return [{k: v for part in combination for k, v in part.items()} for combination in itertools.product(*axes)]


def swept_keys(sweep: Mapping) -> list[str]:
    """The swept dotted keys of a ``sweep`` section, in config order."""
    keys = []
    for key, values in sweep.items():
        if key == "zip":
            keys += list(values)
        elif key not in SWEEP_OPTIONS:
            keys.append(key)
    return keys


def value_label(value) -> str:
    """How a swept value reads in a point's name: ``true``, ``8``, ``1.0``, ``1e-05``, ``draws``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def key_labels(keys: list[str]) -> dict[str, str]:
    """Each dotted key's label in point names: its last part, unless another swept key
    has the same last part (``shard.seed`` and ``sample.seed``: the whole keys)."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: key if last.count(part) > 1 else part for key, part in zip(keys, last)}


def point_name(analysis: str, point: Mapping, labels: Mapping[str, str]) -> str:
    """``logistic_demo/num_shards=8,prior_sd=1.0``."""
    return f"{analysis}/" + ",".join(f"{labels[key]}={value_label(value)}" for key, value in point.items())


def check_sweep_key(analysis: str, key: str, analysis_schema: Mapping) -> None:
    """``key`` names one setting of the analysis schema (a leaf, not a section) that may
    be swept; else :class:`ConfigError` naming the key and what is wrong."""
    where = f"analyses.{analysis}.sweep"
    parts = key.split(".")
    if parts[0] in UNSWEEPABLE:
        raise ConfigError(f"{where}: {parts[0]!r} cannot be swept: {UNSWEEPABLE[parts[0]]}")
    node = analysis_schema
    for depth, part in enumerate(parts):
        properties = node.get("properties", {})
        if part in properties:
            node = properties[part]
        elif isinstance(node.get("additionalProperties"), dict):  # model_options, columns
            node = node["additionalProperties"]
        else:
            known = ", ".join(sorted(properties)) or "none"
            section = ".".join(parts[:depth]) or "an analysis"
            raise ConfigError(f"{where}: unknown key {key!r} ({section} has: {known})")
    if "properties" in node:
        keys = ", ".join(f"{key}.{name}" for name in node["properties"])
        raise ConfigError(f"{where}: {key!r} is a section; sweep one of its keys ({keys})")


def check_sweep(analysis: str, sweep: Mapping, analysis_schema: Mapping) -> None:
    """What the schema cannot check of a ``sweep`` section: keys exist and may be swept, a
    key is swept once, zip lists have one length, values are distinct and path-safe."""
    where = f"analyses.{analysis}.sweep"
    keys = swept_keys(sweep)
    if not keys:
        raise ConfigError(f"{where}: no key is swept (give e.g. 'shard.num_shards: [4, 8, 16]')")
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"{where}: {', '.join(map(repr, repeated))} swept twice (alone and in zip)")
    for key in keys:
        check_sweep_key(analysis, key, analysis_schema)
    lengths = {key: len(values) for key, values in sweep.get("zip", {}).items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{key}: {length}" for key, length in lengths.items())
        raise ConfigError(f"{where}.zip: the lists must have one length (got {listed})")
    zipped = sweep.get("zip", {})
    axes = {key: values for key, values in sweep.items() if key not in SWEEP_OPTIONS}
    for key, values in {**axes, **zipped}.items():
        labels = [value_label(value) for value in values]
        for label in labels:
            if not VALUE_PATTERN.match(label):
                raise ConfigError(f"{where}.{key}: value {label!r} may hold only letters, digits and _ . + -")
        if key in axes and len(set(labels)) < len(labels):  # zip rows may repeat a value
            raise ConfigError(f"{where}.{key}: a value is listed twice ({', '.join(labels)})")


def with_value(settings: Mapping, key: str, value) -> dict:
    """A deep copy of ``settings`` with the dotted ``key`` set to ``value`` (sections made
    as needed: ``model_options.prior_sd`` where no ``model_options`` was given)."""
    result = copy.deepcopy(dict(settings))
    node = result
    *sections, leaf = key.split(".")
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = value
    return result


def expand_sweep(analysis: str, settings: Mapping, analysis_schema: Mapping) -> tuple[Sweep, dict[str, dict]]:
    """An analysis with a ``sweep`` -> its :class:`Sweep` and every grid point's settings
    (the analysis' own, without ``sweep``, with the point's values put in), by point name."""
    sweep = settings["sweep"]
    check_sweep(analysis, sweep, analysis_schema)
    keys = swept_keys(sweep)
    labels = key_labels(keys)
    base = {key: value for key, value in settings.items() if key != "sweep"}
    points, point_settings = {}, {}
    for point in grid(sweep):
        name = point_name(analysis, point, labels)
        if name in points:  # zip rows repeating another row
            raise ConfigError(f"analyses.{analysis}.sweep: grid point {name!r} appears twice")
        points[name] = point
        values = base
        for key, value in point.items():
            values = with_value(values, key, value)
        point_settings[name] = values
    options = {key: sweep[key] for key in ("fulldata", "stability") if key in sweep}
    return Sweep(analysis, tuple(keys), points, options), point_settings


def stage_key(settings: Mapping, stage: str) -> str:
    """The settings ``stage``'s outputs depend on (a section, or one dotted key), as one
    canonical string."""

    def value(key):
        found = settings
        for part in key.split("."):
            found = found.get(part) if isinstance(found, Mapping) else None
        return found

    return json.dumps({key: value(key) for key in STAGE_SETTINGS[stage]}, sort_keys=True)


def stage_owners(points: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
    """Point name -> {stage: the first point, in grid order, whose settings agree with its
    own on everything the stage reads} (:data:`STAGE_SETTINGS`). Owners are idempotent:
    the owner of a stage owns it for itself, and for every earlier stage it owns what the
    point's own owner of that stage does."""
    first: dict[tuple[str, str], str] = {}
    owners = {}
    for name, settings in points.items():
        owners[name] = {}
        for stage in STAGE_SETTINGS:
            owners[name][stage] = first.setdefault((stage, stage_key(settings, stage)), name)
    return owners
