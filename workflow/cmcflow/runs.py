"""Shard runs on disk: the record every sampling stage writes and every later stage reads.

A run is an ArviZ InferenceData with ``posterior`` (constrained draws, run facts in its
attributes), ``unconstrained_posterior`` (the same draws in the unconstrained space, what
combine uses) and ``sample_stats``; beside it a diagnostics JSON. A sample job whose NUTS
run raised writes a *failure record* instead (:func:`failed_run`): a ``posterior`` group
with no draws and the error in its attributes.

A sample job holds its run as a plain mapping, group name -> :class:`Group` (:data:`Run`:
numpy arrays, their dimensions and the group's attributes), and writes it without importing
xarray or ArviZ (their imports were much of a sample job's own overhead:
bench/results/compile_cache.md); the stages after it read runs as ArviZ InferenceData
(:func:`read_run`). Both have the same
groups and are written by :func:`write_run`.

This module imports neither JAX nor the sampler, so every stage can read and write runs,
nor xarray, pandas or ArviZ until a function that uses them is called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from cmcflow import convergence
from cmcflow.io import atomic_path, write_json_atomic

if TYPE_CHECKING:
    import arviz as az
    import pandas as pd
    import xarray as xr


@dataclass
class Group:
    """One group of a run, as a netCDF group holds it: ``variables`` ``{name: (dims,
    values)}``, ``coords`` ``{dim: values}`` (the dimensions' coordinates; ArviZ's draws have
    integer ones, ``0 … n − 1``) and ``attrs``. What an xarray Dataset of the group holds,
    as plain numpy (:meth:`to_dataset`, :meth:`from_dataset`)."""

    variables: dict[str, tuple[tuple[str, ...], np.ndarray]]
    coords: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        """The values of variable ``name``."""
        return self.variables[name][1]

    def __contains__(self, name: str) -> bool:
        return name in self.variables

    def arrays(self) -> dict[str, np.ndarray]:
        """``{name: values}`` of every variable, in order."""
        return {name: values for name, (_, values) in self.variables.items()}

    @classmethod
    def from_dataset(cls, dataset: xr.Dataset) -> Group:
        """The group an xarray Dataset holds; raises ``ValueError`` for a coordinate that is
        not a dimension's (a netCDF group of a run has none)."""
        extra = [name for name in dataset.coords if name not in dataset.dims]
        if extra:
            raise ValueError(f"a run's groups have coordinates of dimensions only, not {extra}")
        return cls(
            {name: (variable.dims, variable.values) for name, variable in dataset.data_vars.items()},
            {name: coordinate.values for name, coordinate in dataset.coords.items()},
            dict(dataset.attrs),
        )

    def to_dataset(self) -> xr.Dataset:
        """The group as an xarray Dataset."""
        import xarray as xr

        return xr.Dataset(self.variables, coords=self.coords, attrs=self.attrs)


#: A run as a sample job holds it: group name -> group, in ArviZ's layout.
Run = Mapping[str, Group]


def run_groups(run: Run | az.InferenceData) -> dict[str, Group]:
    """A run's groups, from a :data:`Run` or from ArviZ InferenceData."""
    if all(isinstance(group, Group) for group in run.values()):
        return dict(run)
    return {name: Group.from_dataset(run[name]) for name in run.groups()}  # InferenceData


def draws_group(arrays: Mapping[str, np.ndarray], library=None) -> Group:
    """Draws ``{name: (chains, draws, *shape)}`` as one group in ArviZ's layout (as
    ``arviz.dict_to_dataset`` lays it out): dimensions ``chain``, ``draw``, ``<name>_dim_<i>``,
    each with integer coordinates; ``created_at``, and the sampling ``library`` (a module) and
    its version, in the attributes."""
    variables, coords = {}, {}
    for name, values in arrays.items():
        values = np.asarray(values)
        dims = ("chain", "draw", *(f"{name}_dim_{axis}" for axis in range(values.ndim - 2)))
        variables[name] = (dims, values)
        coords.update({dim: np.arange(size) for dim, size in zip(dims, values.shape)})
    attrs = {"created_at": datetime.now(UTC).isoformat()}
    if library is not None:
        attrs |= {"inference_library": library.__name__, "inference_library_version": library.__version__}
    return Group(variables, coords, attrs)


def diagnostics(run: Run, var_names: list[str]) -> dict:
    """Diagnostics of one run (:mod:`cmcflow.convergence`, ArviZ's estimators): per element
    of the ``var_names`` sites rank-normalised split R-hat, bulk/tail ESS and the Monte Carlo
    error of the mean (``parameters``, ArviZ's labels) and their extremes; divergences,
    E-BFMI per chain, and the share of iterations whose trajectory reached NUTS' largest tree
    (``tree_depth_saturation``; the limit is the run's ``nuts_max_tree_depth`` attribute).
    ArviZ InferenceData: :func:`run_groups` first."""
    posterior, stats = run["posterior"], run["sample_stats"]
    table = {}
    for name in var_names:
        values = posterior[name]
        flat = values.reshape(*values.shape[:2], -1)
        for column, label in enumerate(element_labels(name, values.shape[2:])):
            table[label] = convergence.element_diagnostics(flat[:, :, column])
    diverging = stats["diverging"]
    bfmi = convergence.bfmi(stats["energy"])
    max_depth = posterior.attrs.get("nuts_max_tree_depth")
    saturation = {}
    if max_depth is not None and "tree_depth" in stats:
        saturation["tree_depth_saturation"] = float(np.mean(stats["tree_depth"] >= max_depth))
    return {
        **saturation,
        "max_r_hat": max(row["r_hat"] for row in table.values()),
        "min_ess_bulk": min(row["ess_bulk"] for row in table.values()),
        "min_ess_tail": min(row["ess_tail"] for row in table.values()),
        "divergences": int(diverging.sum()),
        "divergence_rate": float(diverging.mean()),
        "bfmi": [float(value) for value in bfmi],
        "min_bfmi": float(np.min(bfmi)),
        "parameters": table,
    }


def summary_table(idata: az.InferenceData) -> pd.DataFrame:
    """Mean, sd, 5% and 95% quantiles of every posterior element (ArviZ ``summary``)."""
    import arviz as az

    quantiles = {"5%": lambda x: np.quantile(x, 0.05), "95%": lambda x: np.quantile(x, 0.95)}
    table = az.summary(idata, kind="stats", stat_funcs=quantiles, round_to="none")
    return table[["mean", "sd", "5%", "95%"]]


def failed_run(shard: int, error: str) -> tuple[Run, dict]:
    """What a sample job writes when NUTS raised on its shard: no draws, the error. Combine
    then applies ``combine.on_failed_shard`` (fail the run, or go on without the shard)."""
    attrs = {"failed": 1, "shard": shard, "error": error}
    report = {"failed": True, "shard": shard, "error": error}
    return {"posterior": Group({"failed": ((), np.array(1))}, attrs=attrs)}, report


#: What an XLA error says when the device ran out of memory.
XLA_OUT_OF_MEMORY = "RESOURCE_EXHAUSTED"


def is_transient(error: BaseException) -> bool:
    """Whether an error raised while sampling may not recur on a retry: out of memory
    (Python's or XLA's) or input/output. Such errors fail the job, so that the profile's
    ``retries`` resubmit it (with more memory and time); any other error is the model's on
    this shard and is recorded by :func:`failed_run`."""
    return isinstance(error, (MemoryError, OSError)) or XLA_OUT_OF_MEMORY in str(error)


def is_failed(idata: az.InferenceData) -> bool:
    """Whether the run is a :func:`failed_run` record."""
    return bool(idata.posterior.attrs.get("failed", 0))


def unconstrained_draws(run: az.InferenceData) -> tuple[dict[str, np.ndarray], tuple[int, int]]:
    """``{site: (chains · draws, …)}`` of a run's ``unconstrained_posterior``, and (chains, draws)."""
    group = run.unconstrained_posterior
    chains, draws = group.sizes["chain"], group.sizes["draw"]
    flat = {name: group[name].values.reshape(chains * draws, *group[name].shape[2:]) for name in group.data_vars}
    return flat, (chains, draws)


def element_labels(name: str, shape: tuple[int, ...]) -> list[str]:
    """ArviZ's labels of a site's elements, row-major: ``beta[0]``, ``coords[3, 1]``, ``sigma``."""
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, index))}]" for index in np.ndindex(*shape)]


def constrained_moments(shard: int, posterior) -> pd.DataFrame:
    """Mean and sd over all draws of every element of every site of a shard's ``posterior``
    group (constrained): rows (shard, parameter, mean, sd)."""
    import pandas as pd

    rows = []
    for name, values in posterior.data_vars.items():
        flat = values.values.reshape(-1, int(np.prod(values.shape[2:], dtype=int)))
        labels = element_labels(name, values.shape[2:])
        rows.append(
            pd.DataFrame({"shard": shard, "parameter": labels, "mean": flat.mean(axis=0), "sd": flat.std(axis=0)})
        )
    return pd.concat(rows, ignore_index=True)


def read_run(
    path: str | os.PathLike, groups: tuple[str, ...] = ("posterior", "unconstrained_posterior", "curvature")
) -> az.InferenceData:
    """The ``groups`` of a run written by :func:`write_run`, read eagerly; a group the file
    lacks (a :func:`failed_run` record has only ``posterior``) is left out.

    Read straight from HDF5 with h5py: ``az.from_netcdf`` opens every group through
    xarray's decoding layer, which costs combine tens of times more per file, and combine
    reads every shard once or twice.
    Kept: variables with their dimension names, dimension coordinates, group attributes.
    Not kept: variables' own attributes (the only one :func:`write_group` writes marks a
    boolean, which this reads as int8) and netCDF's internal bookkeeping attributes.
    """
    import arviz as az
    import h5py

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
            datasets[name] = Group(data, coords, attrs).to_dataset()
    return az.InferenceData(**datasets)


def write_run(
    run: Run | az.InferenceData, report: dict, netcdf_path: str | os.PathLike, diagnostics_path: str | os.PathLike
) -> None:
    """Write the run's NetCDF (:func:`write_netcdf`) and its diagnostics JSON, each atomically."""
    write_netcdf(run, netcdf_path)
    write_json_atomic(diagnostics_path, report)


def write_netcdf(run: Run | az.InferenceData, path: str | os.PathLike) -> None:
    """Write a run atomically, each group a netCDF group (:func:`write_group`): the file
    ``InferenceData.to_netcdf`` writes, without xarray or ArviZ (a sample job imports
    neither)."""
    import h5netcdf

    with atomic_path(path) as tmp, h5netcdf.File(tmp, "w") as file:
        for name, group in run_groups(run).items():
            write_group(file.create_group(name), group)


def write_group(out, group: Group) -> None:
    """``group`` into the empty netCDF group ``out`` (an ``h5netcdf.Group``) as xarray encodes
    it: dimensions with their coordinates; numbers zlib-compressed (but scalars); text as
    variable-length strings; booleans as int8 marked ``dtype: bool`` (netCDF has no boolean
    type; xarray reads them back as booleans). Attributes must be numbers or strings
    (``TypeError``)."""
    import h5py

    for key, value in group.attrs.items():
        if isinstance(value, (bool, np.bool_)) or value is None:
            raise TypeError(f"attribute {key!r} is {value!r}: netCDF attributes are numbers and strings")
        out.attrs[key] = value
    sizes = {dim: size for dims, values in group.variables.values() for dim, size in zip(dims, np.shape(values))}
    out.dimensions = sizes | {dim: len(values) for dim, values in group.coords.items()}
    arrays = {dim: ((dim,), values) for dim, values in group.coords.items()} | group.variables
    for key, (dims, values) in arrays.items():
        values, attrs, options = np.asarray(values), {}, {}
        if values.dtype == np.bool_:
            values, attrs = values.astype(np.int8), {"dtype": "bool"}
        if values.dtype.kind in "US":
            values, options = values.astype(object), {"dtype": h5py.string_dtype()}
        elif values.ndim:
            options = {"compression": "gzip"}
        out.create_variable(key, dims, data=values, **options).attrs.update(attrs)


def write_combined(
    idata: az.InferenceData,
    shards: dict,
    moments: pd.DataFrame,
    netcdf_path: str | os.PathLike,
    summary_path: str | os.PathLike,
    shards_path: str | os.PathLike,
    moments_path: str | os.PathLike,
) -> pd.DataFrame:
    """Write the combined NetCDF, the summary CSV, the shard record (JSON) and the shards'
    moments (CSV), each atomically."""
    with atomic_path(moments_path) as tmp:
        moments.to_csv(tmp, index=False)
    write_netcdf(idata, netcdf_path)
    summary = summary_table(idata)
    with atomic_path(summary_path) as tmp:
        summary.to_csv(tmp, index_label="parameter")
    write_json_atomic(shards_path, shards)
    return summary
