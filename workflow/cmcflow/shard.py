"""The shard stage: validate the input table and split its rows into K shards.

The split is a seeded permutation cut into K contiguous pieces (sizes differ by at most
one row); within a shard rows keep their input order. Each shard file holds the model's
columns (validated, float64) and ``row``, the row's 0-based position in the input table.

Output: one directory per analysis holding ``shard-0000.parquet`` … and ``manifest.json``,
published atomically (a failed job leaves no directory behind).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from cmcflow.errors import InputError
from cmcflow.io import atomic_directory, write_json_atomic
from cmcflow.models import ModelSpec, role_arrays
from cmcflow.table import read_table, validate_table

log = logging.getLogger(__name__)


def resolve_num_shards(num_shards: int | None, rows_per_shard: int | None, rows: int | None) -> int:
    """K from ``num_shards``, or ``ceil(rows / rows_per_shard)`` (exactly one must be given)."""
    if (num_shards is None) == (rows_per_shard is None):
        raise InputError("set exactly one of shard.num_shards and shard.rows_per_shard")
    if num_shards is not None:
        return num_shards
    assert rows is not None, "rows_per_shard needs the row count"
    return max(1, math.ceil(rows / rows_per_shard))


def split_rows(rows: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """Row indices of each of ``num_shards`` shards: a seeded permutation cut evenly.

    Returns K sorted int64 arrays that partition ``range(rows)``; their sizes differ by at
    most one.
    """
    if num_shards > rows:
        raise InputError(f"{num_shards} shards requested but the table has only {rows} rows")
    permutation = np.random.default_rng(seed).permutation(rows)
    return [np.sort(part) for part in np.array_split(permutation, num_shards)]


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
) -> dict:
    """Validate the table at ``table_path`` and write its shards and manifest to ``shard_dir``.

    The manifest (JSON) records the input, the columns by role, the ignored columns, the
    row count of every shard and the model's facts about the whole table; the featurize
    stage reads the padded size and the facts from it.
    """
    table = read_table(table_path)
    arrays = validate_table(table, table_path, spec, columns)
    parts = split_rows(len(table), num_shards, seed)
    validated = pd.DataFrame(arrays)
    facts = spec.table_facts(role_arrays(validated, columns, spec))
    manifest = {
        "input": str(table_path),
        "model": spec.name,
        "rows": len(table),
        "num_shards": num_shards,
        "seed": seed,
        "columns": dict(columns),
        "ignored_columns": [str(name) for name in table.columns if name not in arrays],
        "shard_rows": [len(rows) for rows in parts],
        "facts": facts,
    }
    with atomic_directory(shard_dir) as tmp:
        for index, rows in enumerate(parts):
            shard = validated.iloc[rows].reset_index(drop=True)
            shard.insert(0, "row", rows)
            shard.to_parquet(tmp / shard_file_name(index), index=False)
        write_json_atomic(tmp / MANIFEST_NAME, manifest)
    log.info(
        "%s: %d rows -> %d shards of %d-%d rows; columns not used by the model: %s",
        table_path, len(table), num_shards, min(manifest["shard_rows"]), max(manifest["shard_rows"]),
        manifest["ignored_columns"] or "none",
    )
    return manifest
