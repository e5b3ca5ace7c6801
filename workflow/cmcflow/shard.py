"""The shard stage: validate the input table and split its rows into K shards.

The split is a seeded permutation cut into K contiguous pieces (sizes differ by at most
one row); within a shard rows keep their input order. A *stratified* split (the config's
``shard.stratify_by``, by default the model's own ``strata``) also deals the rows of every
stratum (rows with equal values in the stratifying columns) evenly over the shards. That
makes the shards representative of the whole table: every subposterior sees about the same
share of every kind of observation, which is what consensus Monte Carlo assumes (a plain
random split of the structure demo leaves some atom pairs unobserved in some shards, whose
posteriors then differ in shape: bench/results/structure_accuracy.md). Each shard file
holds the model's columns (validated, float64) and ``row``, the row's 0-based position in
the input table.

Output: one directory per analysis holding ``shard-0000.parquet`` … and ``manifest.json``,
published atomically (a failed job leaves no directory behind).

pandas and the table readers are imported inside :func:`shard_table`: the modules that
import this one for its file names (featurize, and through it the sample and reweight
jobs) do not pay their import.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from cmcflow.errors import InputError
from cmcflow.io import atomic_directory, write_json_atomic
from cmcflow.models import ModelSpec, role_arrays

log = logging.getLogger(__name__)


def resolve_num_shards(num_shards: int | None, rows_per_shard: int | None, rows: int | None) -> int:
    """K from ``num_shards``, or ``ceil(rows / rows_per_shard)`` (exactly one must be given)."""
    if (num_shards is None) == (rows_per_shard is None):
        raise InputError("set exactly one of shard.num_shards and shard.rows_per_shard")
    if num_shards is not None:
        return num_shards
    assert rows is not None, "rows_per_shard needs the row count"
    return max(1, math.ceil(rows / rows_per_shard))


def split_rows(rows: int, num_shards: int, seed: int, strata: np.ndarray | None = None) -> list[np.ndarray]:
    """Row indices of each of ``num_shards`` shards: a seeded permutation cut evenly.

    ``strata``: an optional stratum code per row ``(rows,)``. Rows are then ordered by
    stratum (randomly within one) and dealt to the shards in turn, so that every stratum's
    rows are spread over the shards with counts differing by at most one.

    Returns K sorted int64 arrays that partition ``range(rows)``; their sizes differ by at
    most one.
    """
    if num_shards > rows:
        raise InputError(f"{num_shards} shards requested but the table has only {rows} rows")
    permutation = np.random.default_rng(seed).permutation(rows)
    if strata is None:
        return [np.sort(part) for part in np.array_split(permutation, num_shards)]
    dealt = permutation[np.argsort(strata[permutation], kind="stable")]
    shard_of_row = np.empty(rows, dtype=np.int64)
    shard_of_row[dealt] = np.arange(rows) % num_shards
    # one stable sort by shard (row order kept within a shard), then cut by shard sizes:
    # O(rows log rows) whatever K
    rows_by_shard = np.argsort(shard_of_row, kind="stable")
    return np.split(rows_by_shard, np.cumsum(np.bincount(shard_of_row, minlength=num_shards))[:-1])


def resolve_strata(stratify_by: str | list[str], spec: ModelSpec) -> tuple[str, ...]:
    """The roles to stratify by: the model's own ``strata`` for ``"model"``, else the list
    given (``[]``: a plain random split). Each must be a single-column role of the model."""
    strata = spec.strata if stratify_by == "model" else tuple(stratify_by)
    single = {role.name for role in spec.roles if not role.multiple}
    unknown = [name for name in strata if name not in single]
    if unknown:
        raise InputError(
            f"shard.stratify_by: {unknown} are not single-column roles of model {spec.name!r} "
            f"(its roles: {sorted(single)})"
        )
    return strata


def stratum_codes(arrays: Mapping[str, np.ndarray], strata: tuple[str, ...]) -> np.ndarray | None:
    """One integer per row naming its stratum (equal values in every ``strata`` role), or
    ``None`` when there are no strata."""
    if not strata:
        return None
    keys = np.stack([arrays[name] for name in strata], axis=1)
    return np.unique(keys, axis=0, return_inverse=True)[1].reshape(-1)


MANIFEST_NAME = "manifest.json"


def shard_id(index: int) -> str:
    """The shard's name in every file name of the workflow (the ``{shard}`` wildcard): ``0007``."""
    return f"{index:04d}"


def shard_file_name(index: int) -> str:
    """File name of shard ``index`` inside the shard directory."""
    return f"shard-{shard_id(index)}.parquet"


def shard_table(
    table_path: str | os.PathLike,
    shard_dir: str | os.PathLike,
    num_shards: int,
    spec: ModelSpec,
    columns: Mapping[str, list[str]],
    seed: int,
    strata: Sequence[str] = (),
) -> dict:
    """Validate the table at ``table_path`` and write its shards and manifest to ``shard_dir``.

    The manifest (JSON) records the input, the columns by role, the ignored columns, the
    row count of every shard, the strata, the model's facts about the whole table and the
    notes on what its columns cannot tell (:func:`cmcflow.table.design_notes`; the report
    shows them); the featurize stage reads the padded size and the facts from it.
    """
    import pandas as pd

    from cmcflow.table import design_notes, read_table, validate_table

    strata = resolve_strata(list(strata), spec)
    table = read_table(table_path)
    arrays = validate_table(table, table_path, spec, columns)
    notes = design_notes(arrays, spec, columns)
    for note in notes:
        log.warning("%s: %s", table_path, note)
    validated = pd.DataFrame(arrays)
    by_role = role_arrays(validated, columns, spec)
    parts = split_rows(len(table), num_shards, seed, stratum_codes(by_role, strata))
    facts = spec.table_facts(by_role)
    manifest = {
        "input": str(table_path),
        "model": spec.name,
        "rows": len(table),
        "num_shards": num_shards,
        "seed": seed,
        "stratified_by": list(strata),
        "columns": dict(columns),
        "ignored_columns": [str(name) for name in table.columns if name not in arrays],
        "shard_rows": [len(rows) for rows in parts],
        "facts": facts,
        "notes": notes,
    }
    with atomic_directory(shard_dir) as tmp:
        for index, rows in enumerate(parts):
            shard = validated.iloc[rows].reset_index(drop=True)
            shard.insert(0, "row", rows)
            shard.to_parquet(tmp / shard_file_name(index), index=False)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    log.info(
        "%s: %d rows -> %d shards of %d-%d rows (%s); columns not used by the model: %s",
        table_path,
        len(table),
        num_shards,
        min(manifest["shard_rows"]),
        max(manifest["shard_rows"]),
        f"stratified by {', '.join(strata)}" if strata else "random split",
        manifest["ignored_columns"] or "none",
    )
    return manifest
