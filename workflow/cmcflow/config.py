"""The workflow's configuration, resolved once when Snakemake starts: for every analysis its
model, columns, hyperparameters, shard count and strata.

The config file is checked against ``workflow/schemas/config.schema.yaml`` first (the
one place for defaults, which Snakemake's validation then fills in; :func:`check_config`
words a violation as one line naming the key); what the schema cannot check (a model's own
columns and options, a shard count that needs the table's row count) is checked here too.
Both raise :class:`~cmcflow.errors.ConfigError`. JAX-free, so it is testable without
Snakemake and cheap at parse time.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cache, cached_property
from pathlib import Path

import yaml

from cmcflow.errors import ConfigError, InputError
from cmcflow.models import ModelSpec, get_model, resolve_columns, resolve_options, source_digest
from cmcflow.shard import resolve_num_shards, resolve_strata, shard_id
from cmcflow.sweep import Sweep, expand_sweep, stage_owners
from cmcflow.table import check_columns_present, count_rows, table_columns

#: The config schema of the workflow this package belongs to.
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


@dataclass(frozen=True)
class Analysis:
    """One analysis of the config, resolved: model columns and options, shard count."""

    name: str
    settings: dict
    columns: dict
    options: dict
    num_shards: int
    strata: tuple
    rigid: bool
    #: digests of the source of the model's and the featurizer's modules (:func:`source_digest`)
    model_source: str = ""
    featurizer_source: str = ""
    #: a grid point of a sweep: the swept analysis' name (its values: the Sweep's ``points``)
    sweep: str | None = None
    #: stage -> the analysis whose outputs of that stage this one reads (itself, or the
    #: first grid point of its sweep that agrees on every setting the stage reads)
    owners: dict = field(default_factory=dict)

    def owner(self, stage: str) -> str:
        return self.owners.get(stage, self.name)

    def platform(self, stage: str) -> str:
        """Where the JAX stage ``stage`` (sample, align or fulldata) runs: "cpu" or "gpu"."""
        platform = self.settings["platform"]
        return platform if isinstance(platform, str) else platform.get(stage, "cpu")

    @property
    def simulated(self) -> bool:
        return "simulate" in self.settings["input"]

    @property
    def corrected(self) -> bool:
        """Whether the combination is importance-corrected (never for rigid models)."""
        return self.settings["correct"]["enabled"] and not self.rigid

    @cached_property
    def shard_ids(self) -> list[str]:
        return [shard_id(index) for index in range(self.num_shards)]

    @property
    def shards_per_job(self) -> int:
        return self.settings["sample"]["shards_per_job"]

    @cached_property
    def batches(self) -> dict[str, list[str]]:
        """Batch id -> the shard ids one sample job runs (consecutive shards,
        ``sample.shards_per_job`` of them, fewer in the last batch)."""
        size = self.shards_per_job
        ids = self.shard_ids
        return {shard_id(start // size): ids[start : start + size] for start in range(0, len(ids), size)}

    def batch_of(self, shard: str) -> str:
        """The id of the batch that samples shard ``shard``."""
        return shard_id(int(shard) // self.shards_per_job)


def resolve_analysis(name: str, settings: Mapping) -> Analysis:
    """One analysis' settings (validated, defaults filled in) -> :class:`Analysis`; a
    :class:`ConfigError` names the analysis (``analyses.<name>: …``), as does an
    :class:`InputError` of its input table's header (a column the config names that the
    table lacks), found here before any job runs."""
    try:
        return _resolve_analysis(name, settings)
    except InputError as error:  # a model option the model lacks, a column in two places or not in the table
        raise ConfigError(f"analyses.{name}: {error}", getattr(error, "details", "")) from None


def _resolve_analysis(name: str, settings: Mapping) -> Analysis:
    simulate = settings["input"].get("simulate")
    spec = get_model(settings["model"])
    columns = resolve_columns(spec, settings["columns"], simulate and simulate.get("features"))
    table = None if simulate else input_table(settings["input"]["path"])
    if table is not None:
        check_columns_present(table.path, table.columns, spec, columns)
    options = resolve_options(spec, settings["model_options"])
    shard = settings["shard"]
    rows = None
    if "rows_per_shard" in shard:
        rows = simulate["rows"] if table is None else table.rows
    num_shards = resolve_num_shards(shard.get("num_shards"), shard.get("rows_per_shard"), rows)
    if simulate:
        check_simulate_settings(spec, simulate)
    strata = resolve_strata(shard["stratify_by"], spec)
    return Analysis(
        name,
        dict(settings),
        columns,
        options,
        num_shards,
        strata,
        rigid=spec.symmetry == "rigid",
        model_source=source_digest(spec.numpyro_model),
        featurizer_source=source_digest(spec.featurize),
    )


@dataclass
class InputTable:
    """What parsing reads of an analysis' input table: its column names and, only where
    asked (``shard.rows_per_shard``; for a CSV file, a read of every record), its rows."""

    path: str

    @cached_property
    def columns(self) -> list[str]:
        return table_columns(self.path)

    @cached_property
    def rows(self) -> int:
        return count_rows(self.path)


def input_table(path: str) -> InputTable:
    """The table at ``path``, read once per version of the file (modification time and
    size) however many analyses or a sweep's grid points name it."""
    try:
        stat = Path(path).stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        stamp = None  # no such file: InputTable.columns says so
    return _input_table(path, stamp)


@cache
def _input_table(path: str, stamp: tuple[int, int] | None) -> InputTable:
    return InputTable(path)


def resolve_analyses(config: Mapping) -> tuple[dict[str, Analysis], dict[str, Sweep]]:
    """Every analysis of a validated config by name, each grid point of a swept analysis
    (:mod:`cmcflow.sweep`) as an analysis of its own with the stages it shares pointed to
    their owners; and the sweeps, by the swept analysis' name."""
    analyses, sweeps = {}, {}
    for name, settings in config["analyses"].items():
        if "sweep" not in settings:
            analyses[name] = resolve_analysis(name, settings)
            continue
        sweep, points = expand_sweep(name, settings, schema()["$defs"]["analysis"])
        for point, point_settings in points.items():
            check_analysis(f"analyses.{point}", point_settings)
        owners = stage_owners(points)
        for point, point_settings in points.items():
            resolved = resolve_analysis(point, point_settings)
            analyses[point] = replace(resolved, sweep=name, owners=owners[point])
        sweeps[name] = sweep
    return analyses, sweeps


def check_simulate_settings(spec: ModelSpec, simulate: Mapping) -> None:
    """The model has a simulator, and it takes the ``input.simulate`` keys given."""
    if spec.simulate is None:
        raise ConfigError(f"model {spec.name!r} has no simulator; give input.path")
    shape = {key: value for key, value in simulate.items() if key not in ("rows", "seed")}
    try:
        inspect.signature(spec.simulate).bind(simulate["rows"], simulate["seed"], **shape)
    except TypeError as error:
        raise ConfigError(f"input.simulate of model {spec.name!r}: {error}") from None


@cache
def schema() -> dict:
    """The config schema, parsed."""
    return yaml.safe_load(SCHEMA.read_text())


def schema_default(*keys: str):
    """The schema's default for an analysis setting, e.g. ``("combine", "method")``."""
    node = schema()["$defs"]["analysis"]
    for key in keys:
        node = node["properties"][key]
    return node["default"]


#: Keys of earlier releases, and what replaced them.
RENAMED_KEYS = {"enable_x64": "jax.enable_x64 became jax.precision (float64, float32 or mixed)"}


def check_config(config: Mapping) -> None:
    """Raise :class:`ConfigError` with one line naming the key path and the rule broken where
    ``config`` does not match the schema (jsonschema's most relevant error, reworded), so
    that a user never reads a dump of the schema. Snakemake's ``validate`` runs after it
    and fills in the defaults."""
    check_against(schema(), config, "")


def check_analysis(where: str, settings: Mapping) -> None:
    """:func:`check_config` for one analysis' settings (a sweep's grid point), the key path
    in the message starting with ``where``."""
    check_against({"$ref": "#/$defs/analysis", "$defs": schema()["$defs"]}, settings, where)


def check_against(rules: Mapping, value: Mapping, where: str) -> None:
    """Raise :class:`ConfigError`, one line naming the key path (``where`` first) and the
    rule broken, where ``value`` breaks the JSON schema ``rules``."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    error = best_match(Draft202012Validator(rules).iter_errors(dict(value)))
    if error is None:
        return
    path = ".".join([where] * bool(where) + [str(part) for part in error.absolute_path])
    path = path or "the config's top level"
    node, value = error.schema, error.instance
    if error.validator == "additionalProperties":
        unknown = sorted(set(value) - set(node.get("properties", {})))
        known = ", ".join(sorted(node.get("properties", {})))
        message = f"unknown key(s) {', '.join(map(repr, unknown))} (known here: {known})"
        message += "".join(f"; {RENAMED_KEYS[key]}" for key in unknown if key in RENAMED_KEYS)
    elif error.validator == "required":
        missing = [name for name in error.validator_value if name not in value]
        message = f"missing required key(s) {', '.join(map(repr, missing))}"
    elif error.validator in ("oneOf", "anyOf", "minProperties", "maxProperties") and "description" in node:
        message = f"give {node['description']} (got {value!r})"
    else:
        message = error.message
    raise ConfigError(f"{path}: {message}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key repeated within one mapping (plain YAML keeps the
    last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                lines = f"lines {seen[key] + 1} and {key_node.start_mark.line + 1}"
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping ({lines})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def check_config_files(paths) -> None:
    """Raise :class:`ConfigError` naming the file, line and column of the first YAML error or
    repeated key in any existing config file of ``paths``."""
    for path in map(Path, paths):
        if not path.exists():
            continue
        try:
            yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or str(error)
            raise ConfigError(f"{path}{where}: {problem}") from None
