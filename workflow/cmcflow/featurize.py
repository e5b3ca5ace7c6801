"""The featurize stage: a shard's rows -> the model's padded arrays, cached by content.

Padding: the row axis of every shard of an analysis is padded to one size (the largest
shard rounded up to ``pad_multiple``), with a boolean ``mask``, so every shard compiles to
the same XLA program (and analyses of similar size share compiled programs).

Cache: an entry is ``<cache_dir>/<key[:2]>/<key>.npz`` with ``<key>.sha256`` beside it.
``key = sha256(model name, featurizer version and source, featurize params, shard content
by role)``, so identical shards of different analyses share an entry. Entries are written atomically
(temporary file + rename), checked against their digest on every read, and recomputed if
the check fails. Arrays are stored without pickling and loaded with ``allow_pickle=False``.

pandas is imported by the functions that read shard tables, not by the module: jobs that
only load features (sample, reweight) do not pay its import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cmcflow.io import decode_arrays, encode_arrays, read_arrays, read_json, write_bytes_atomic, write_json_atomic
from cmcflow.models import ModelSpec, role_arrays, source_digest
from cmcflow.shard import MANIFEST_NAME, shard_file_name

log = logging.getLogger(__name__)


def padded_size(shard_rows: list[int], pad_multiple: int) -> int:
    """The largest shard's row count rounded up to a multiple of ``pad_multiple``."""
    return -(-max(shard_rows) // pad_multiple) * pad_multiple


def cache_key(arrays: Mapping[str, np.ndarray], spec: ModelSpec, params: Mapping[str, object]) -> str:
    """sha256 hex digest of the model, the featurizer (version and its module's source),
    featurize params and shard content."""
    digest = hashlib.sha256()
    header = {
        "model": spec.name,
        "featurizer_version": spec.featurizer_version,
        "featurizer_source": source_digest(spec.featurize),
        "params": dict(params),
    }
    digest.update(json.dumps(header, sort_keys=True).encode())
    for role in sorted(arrays):
        array = np.ascontiguousarray(arrays[role])
        digest.update(f"|{role}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_features(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a featurize output (``.npz``), loaded without pickling."""
    return read_arrays(path)


class FeatureCache:
    """Content-addressed store of encoded feature arrays, shared across analyses and runs."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.directory / key[:2]
        return folder / f"{key}.npz", folder / f"{key}.sha256"

    def get(self, key: str) -> bytes | None:
        """The entry's bytes if present and intact; ``None`` on a miss, or on an entry that
        cannot be read, fails its digest or does not decode (whatever the exception: the
        cache only saves time, so any doubt is a miss and the features are recomputed)."""
        data_path, digest_path = self._paths(key)
        try:
            data, expected = data_path.read_bytes(), digest_path.read_text().strip()
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001 - unreadable for any reason: recompute
            log.warning("feature cache entry %s cannot be read (%s); recomputing", data_path, error)
            return None
        if hashlib.sha256(data).hexdigest() != expected:
            log.warning("feature cache entry %s is corrupt (digest mismatch); recomputing", data_path)
            return None
        try:
            decode_arrays(data)
        except Exception as error:  # noqa: BLE001 - e.g. BadZipFile, EOFError with a matching digest
            log.warning("feature cache entry %s cannot be decoded (%s); recomputing", data_path, error)
            return None
        return data

    def put(self, key: str, data: bytes) -> bool:
        """Store ``data`` atomically, the digest last (a half-written entry is a miss), and
        say whether it was stored. A cache that cannot be written (read-only, full, over
        quota, deleted meanwhile) only costs time: the failure is logged, never raised."""
        data_path, digest_path = self._paths(key)
        try:
            # other jobs may be writing the same entry: leave their temporary files alone
            write_bytes_atomic(data_path, data, own_output=False)
            write_bytes_atomic(digest_path, hashlib.sha256(data).hexdigest().encode(), own_output=False)
        except OSError as error:
            log.warning("feature cache entry %s could not be written (%s); carrying on without it", data_path, error)
            return False
        return True


def featurize_shard(
    shard_dir: str | os.PathLike,
    shard_index: int,
    features_path: str | os.PathLike,
    info_path: str | os.PathLike,
    spec: ModelSpec,
    columns: Mapping[str, list[str]],
    pad_multiple: int,
    cache_dir: str | os.PathLike,
) -> dict:
    """Write shard ``shard_index``'s padded feature arrays to ``features_path`` (through the cache).

    ``info_path`` receives a JSON record: cache key, hit or miss, rows, padded size.
    """
    import pandas as pd

    manifest = read_json(Path(shard_dir) / MANIFEST_NAME)
    pad_to = padded_size(manifest["shard_rows"], pad_multiple)
    shard = pd.read_parquet(Path(shard_dir) / shard_file_name(shard_index))
    arrays = role_arrays(shard, columns, spec)
    key = cache_key(arrays, spec, {"pad_to": pad_to, "facts": manifest["facts"]})
    cache = FeatureCache(cache_dir)
    data = cache.get(key)
    hit = data is not None
    if data is None:
        data = encode_arrays(spec.featurize(arrays, pad_to, manifest["facts"]))
        cache.put(key, data)
    log.info("feature cache %s: key %s (%d rows padded to %d)", "hit" if hit else "miss", key, len(shard), pad_to)
    write_bytes_atomic(features_path, data)
    info = {"cache_key": key, "cache_hit": hit, "rows": len(shard), "padded_rows": pad_to}
    write_json_atomic(info_path, info)
    return info


def all_rows_features(
    shard_dir: str | os.PathLike, spec: ModelSpec, columns: Mapping[str, list[str]], pad_multiple: int
) -> dict[str, np.ndarray]:
    """Features of all rows of an analysis (input order), for the full-data reference run.

    Built from the validated shards, so the full-data run sees exactly the rows CMC sees.
    """
    import pandas as pd

    manifest = read_json(Path(shard_dir) / MANIFEST_NAME)
    shards = [pd.read_parquet(Path(shard_dir) / shard_file_name(index)) for index in range(manifest["num_shards"])]
    table = pd.concat(shards).sort_values("row", kind="stable")
    return spec.featurize(role_arrays(table, columns, spec), padded_size([len(table)], pad_multiple), manifest["facts"])
