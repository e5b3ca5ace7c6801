"""The featurize stage: one padded shape per analysis; a content-addressed, verified cache."""

from __future__ import annotations

import errno
import hashlib
import json
import logging

import numpy as np
import pandas as pd
import pytest

from cmcflow import featurize as featurize_module
from cmcflow.featurize import FeatureCache, featurize_shard, load_features
from cmcflow.io import write_bytes_atomic
from cmcflow.models import get_model, resolve_columns
from cmcflow.shard import shard_table

LOGISTIC = get_model("logistic")
COLUMNS = resolve_columns(LOGISTIC, {"features": ["x0", "x1"], "label": "y"})


def make_shards(directory, rows=101, num_shards=3, seed=0):
    rng = np.random.default_rng(1)
    source = directory.parent / f"{directory.name}.parquet"
    pd.DataFrame({"x0": rng.normal(size=rows), "x1": rng.normal(size=rows), "y": rng.integers(0, 2, rows)}).to_parquet(
        source
    )
    shard_table(source, directory, num_shards, LOGISTIC, COLUMNS, seed=seed)
    return directory


def featurize(shard_dir, index, out_dir, cache_dir):
    info = featurize_shard(
        shard_dir, index, out_dir / f"{index}.npz", out_dir / f"{index}.json", LOGISTIC, COLUMNS, 16, cache_dir
    )
    return info, load_features(out_dir / f"{index}.npz")


def test_every_shard_is_padded_to_one_shape(tmp_path):
    shards = make_shards(tmp_path / "a")
    results = [featurize(shards, index, tmp_path, tmp_path / "cache") for index in range(3)]
    shapes = {features["XT"].shape for _, features in results}
    assert shapes == {(2, 48)}  # 2 features; largest shard 34 rows -> next multiple of 16
    assert [int(features["mask"].sum()) for _, features in results] == [34, 34, 33]
    for _, features in results:
        assert not features["XT"][:, ~features["mask"]].any() and not features["y"][~features["mask"]].any()


def test_identical_shards_of_another_analysis_hit_the_cache(tmp_path):
    cache = tmp_path / "cache"
    first, first_features = featurize(make_shards(tmp_path / "a"), 1, tmp_path / "out_a", cache)
    second, second_features = featurize(make_shards(tmp_path / "b"), 1, tmp_path / "out_b", cache)
    assert (first["cache_hit"], second["cache_hit"]) == (False, True)
    assert first["cache_key"] == second["cache_key"]
    assert all(np.array_equal(first_features[name], second_features[name]) for name in first_features)
    other_split, _ = featurize(make_shards(tmp_path / "c", seed=5), 1, tmp_path / "out_c", cache)
    assert other_split["cache_hit"] is False
    assert json.loads((tmp_path / "out_b" / "1.json").read_text())["cache_hit"] is True


def test_corrupt_entry_is_recomputed_not_served(tmp_path):
    cache_dir = tmp_path / "cache"
    shards = make_shards(tmp_path / "a")
    info, good = featurize(shards, 0, tmp_path / "out1", cache_dir)
    entry = next(cache_dir.rglob(f"{info['cache_key']}.npz"))
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    assert FeatureCache(cache_dir).get(info["cache_key"]) is None
    again, recomputed = featurize(shards, 0, tmp_path / "out2", cache_dir)
    assert again["cache_hit"] is False
    assert all(np.array_equal(good[name], recomputed[name]) for name in good)
    assert FeatureCache(cache_dir).get(info["cache_key"]) is not None  # repaired
    third, _ = featurize(shards, 0, tmp_path / "out3", cache_dir)
    assert third["cache_hit"] is True


def test_entry_without_digest_is_a_miss(tmp_path):
    cache_dir = tmp_path / "cache"
    info, _ = featurize(make_shards(tmp_path / "a"), 0, tmp_path / "out", cache_dir)
    next(cache_dir.rglob("*.sha256")).unlink()
    assert FeatureCache(cache_dir).get(info["cache_key"]) is None


@pytest.mark.parametrize(
    "fault",
    [
        OSError(errno.EROFS, "Read-only file system"),
        OSError(errno.ENOSPC, "No space left on device"),
        FileNotFoundError(errno.ENOENT, "cache deleted meanwhile"),
    ],
    ids=["read-only", "full", "deleted"],
)
def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch, caplog, fault):
    """Writing the entry fails (root ignores permissions, so the fault is injected where the
    entry is written): the job warns, writes its features, and a later run recomputes."""

    def failing_write(path, data, *, own_output=True):
        if not own_output:  # the cache's entries, not the job's own outputs
            raise fault
        write_bytes_atomic(path, data)

    shards = make_shards(tmp_path / "a")
    monkeypatch.setattr(featurize_module, "write_bytes_atomic", failing_write)
    with caplog.at_level(logging.WARNING, logger="cmcflow.featurize"):
        info, features = featurize(shards, 0, tmp_path / "out1", tmp_path / "cache")
    assert info["cache_hit"] is False and "could not be written" in caplog.text
    monkeypatch.undo()
    again, recomputed = featurize(shards, 0, tmp_path / "out2", tmp_path / "cache")
    assert again["cache_hit"] is False
    assert all(np.array_equal(features[name], recomputed[name]) for name in features)


def test_a_malformed_entry_with_a_matching_digest_is_recomputed_and_replaced(tmp_path):
    cache_dir = tmp_path / "cache"
    shards = make_shards(tmp_path / "a")
    info, good = featurize(shards, 0, tmp_path / "out1", cache_dir)
    entry = next(cache_dir.rglob(f"{info['cache_key']}.npz"))
    for garbage in (b"PK\x03\x04 not a zip archive", b""):  # BadZipFile, EOFError
        entry.write_bytes(garbage)
        entry.with_suffix(".sha256").write_text(hashlib.sha256(garbage).hexdigest())
        assert FeatureCache(cache_dir).get(info["cache_key"]) is None
        again, recomputed = featurize(shards, 0, tmp_path / "out2", cache_dir)
        assert again["cache_hit"] is False
        assert all(np.array_equal(good[name], recomputed[name]) for name in good)
        assert FeatureCache(cache_dir).get(info["cache_key"]) is not None  # replaced


def test_a_killed_writers_temporary_file_is_removed_by_the_next_run(tmp_path):
    target = tmp_path / "samples" / "shard-0000.nc"
    target.parent.mkdir()
    stale = target.parent / ".shard-0000.nc.abc123.tmp"
    stale.write_bytes(b"half a file")
    other = target.parent / ".shard-0001.nc.def456.tmp"  # another output's: left alone
    other.write_bytes(b"")
    write_bytes_atomic(target, b"done")
    assert target.read_bytes() == b"done" and not stale.exists() and other.exists()
    assert sorted(path.name for path in target.parent.iterdir()) == [".shard-0001.nc.def456.tmp", "shard-0000.nc"]


USER_FEATURIZER = """
import dataclasses

from cmcflow.models.logistic import SPEC as LOGISTIC
from cmcflow.models.rows import weighted_regression_features


def featurize(columns, pad_to, facts):
    return weighted_regression_features(columns, pad_to, facts)


SPEC = dataclasses.replace(LOGISTIC, name="mine", featurize=featurize)
"""


def test_an_edited_featurizer_never_gets_the_old_features(tmp_path, monkeypatch):
    """Editing a user's featurizer module without bumping its featurizer_version changes
    the cache key (a miss, features computed again) and the analysis' featurizer digest (the
    rule's params: Snakemake reruns featurize)."""
    from cmcflow.config import resolve_analysis
    from cmcflow.featurize import cache_key

    module = tmp_path / "user_featurizer.py"
    module.write_text(USER_FEATURIZER)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "x.csv").write_text("x0,y\n1,0\n")  # the config's columns are checked against its header
    settings = {
        "model": "user_featurizer:SPEC",
        "input": {"path": str(tmp_path / "x.csv")},
        "columns": {"features": ["x0"]},
        "model_options": {},
        "shard": {"num_shards": 2, "stratify_by": "model"},
        "combine": {"second_order": False},
    }
    arrays = {"features": np.ones((3, 1)), "label": np.ones(3)}
    before = (cache_key(arrays, get_model("user_featurizer:SPEC"), {}), resolve_analysis("a", settings))
    module.write_text(USER_FEATURIZER.replace("return weighted", "columns = dict(columns)\n    return weighted"))
    after = (cache_key(arrays, get_model("user_featurizer:SPEC"), {}), resolve_analysis("a", settings))
    assert before[0] != after[0]
    assert before[1].featurizer_source != after[1].featurizer_source
    assert before[1].model_source == after[1].model_source  # the NumPyro model lives in cmcflow.models.logistic
