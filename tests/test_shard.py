"""The shard stage: deterministic, balanced splits; one-line errors for bad tables; no JAX."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from cmcflow.errors import ConfigError, InputError
from cmcflow.models import get_model, resolve_columns
from cmcflow.shard import (
    MANIFEST_NAME,
    resolve_num_shards,
    resolve_strata,
    shard_file_name,
    shard_table,
    split_rows,
)

LOGISTIC = get_model("logistic")
COLUMNS = resolve_columns(LOGISTIC, {"features": ["x0", "x1"], "label": "y"})


def logistic_table(rows: int = 50) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {"x0": rng.normal(size=rows), "x1": rng.normal(size=rows), "y": rng.integers(0, 2, rows), "note": "kept out"}
    )


@pytest.mark.parametrize("rows,num_shards", [(10, 3), (1001, 8), (8, 8)])
def test_split_is_a_balanced_deterministic_partition(rows, num_shards):
    parts = split_rows(rows, num_shards, seed=7)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(rows))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    again = split_rows(rows, num_shards, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_rows(rows, num_shards, seed=8)))


@pytest.mark.parametrize("rows,num_shards,num_strata", [(34000, 8, 850), (1001, 8, 3), (50, 8, 40)])
def test_stratified_split_deals_every_stratum_evenly(rows, num_shards, num_strata):
    strata = np.random.default_rng(1).integers(0, num_strata, rows)
    parts = split_rows(rows, num_shards, seed=7, strata=strata)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(rows))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = np.stack([np.bincount(strata[part], minlength=num_strata) for part in parts])  # (K, strata)
    assert (counts.max(axis=0) - counts.min(axis=0)).max() <= 1
    again = split_rows(rows, num_shards, seed=7, strata=strata)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_rows(rows, num_shards, seed=8, strata=strata)))


def test_structure_shards_are_stratified_by_pair(tmp_path):
    structure = get_model("structure")
    table, _ = structure.simulate(rows=34000, seed=1)
    source = tmp_path / "distances.parquet"
    table.to_parquet(source)
    columns = resolve_columns(structure, {})
    manifest = shard_table(source, tmp_path / "shards", 8, structure, columns, seed=0, strata=structure.strata)
    assert manifest["stratified_by"] == ["i", "j"]
    per_shard = [pd.read_parquet(tmp_path / "shards" / shard_file_name(k)).groupby(["i", "j"]).size() for k in range(8)]
    counts = pd.concat(per_shard, axis=1).fillna(0)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1  # 40 observations per pair: 5 in every shard


def test_strata_must_be_single_column_roles():
    assert resolve_strata("model", LOGISTIC) == ()
    assert resolve_strata(["label"], LOGISTIC) == ("label",)
    with pytest.raises(InputError, match=r"\['features'\] are not single-column roles of model 'logistic'"):
        resolve_strata(["features"], LOGISTIC)
    with pytest.raises(InputError, match=r"\['pair'\] are not single-column roles"):
        resolve_strata(["pair"], get_model("structure"))


def test_num_shards_from_rows_per_shard():
    assert resolve_num_shards(None, 100, 1001) == 11
    assert resolve_num_shards(5, None, None) == 5
    with pytest.raises(InputError):
        resolve_num_shards(5, 100, 1000)


def test_shard_table_writes_shards_and_manifest(tmp_path):
    source = tmp_path / "table.csv"
    logistic_table(50).to_csv(source, index=False)
    manifest = shard_table(source, tmp_path / "shards", 4, LOGISTIC, COLUMNS, seed=1)
    assert manifest["shard_rows"] == [13, 13, 12, 12]
    assert manifest["ignored_columns"] == ["note"]
    shards = [pd.read_parquet(tmp_path / "shards" / shard_file_name(i)) for i in range(4)]
    rows = np.sort(np.concatenate([shard["row"] for shard in shards]))
    assert np.array_equal(rows, np.arange(50))
    assert (tmp_path / "shards" / MANIFEST_NAME).exists()
    # published with the modes open()/mkdir() would give, not the private ones of temp files
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "shards").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "shards" / MANIFEST_NAME).stat().st_mode & 0o777 == 0o666 & ~umask


def with_values(column: str, rows: list[int], value) -> pd.DataFrame:
    """The 50-row logistic table with ``value`` written into ``rows`` of ``column``."""
    table = logistic_table(50).astype({column: object})
    table.loc[rows, column] = value
    return table


BAD_TABLES = {
    "missing column": (logistic_table().drop(columns="x1"), r"column\(s\) 'x1' missing"),
    "NaN": (with_values("x1", [3, 4], np.nan), r"column 'x1': 2 of 50 rows are NaN or infinite \(first: row 4\)"),
    "infinite": (with_values("x1", [9], np.inf), r"column 'x1': 1 of 50 rows are NaN or infinite \(first: row 10\)$"),
    "non-numeric": (
        with_values("x1", [5], "abc"),
        r"column 'x1': 1 of 50 rows are not numeric \(first: row 6, 'abc'\)",
    ),
    "categories": (
        logistic_table().assign(x1=["north"] * 25 + ["south"] * 25),
        r"column 'x1': 50 of 50 rows are not numeric \(first: row 1, 'north'\); to use categories as features, "
        r"give each but one of its 2 categories a 0/1 column \(e\.g\. pandas\.get_dummies",
    ),
    "empty": (logistic_table().iloc[:0], r"the table has no rows"),
    "huge": (
        with_values("x1", [7], 1e308),
        r"column 'x1': 1 of 50 rows exceed 1e\+15 in magnitude \(first: row 8\) \(rescale",
    ),
    "label outside support": (
        with_values("y", [0, 1, 2], 2),
        r"column 'y': 3 of 50 rows are outside the model's support \{0, 1\} \(first: row 1\)",
    ),
}


@pytest.mark.parametrize(
    "columns, message",
    [
        ({"features": ["a", "y"], "label": "y"}, "column 'y' is given as features and label"),
        ({"features": ["a", "b", "a"], "label": "y"}, "column 'a' is listed 2 times as features"),
        ({"features": ["a"], "label": "y", "weight": "a"}, "column 'a' is given as features and weight"),
    ],
)
def test_a_column_in_two_places_is_named_with_its_places(columns, message):
    with pytest.raises(ConfigError, match=message):
        resolve_columns(LOGISTIC, columns)


def test_count_and_weight_columns_name_their_first_bad_row():
    from cmcflow.table import validate_table

    table = pd.DataFrame({"x0": [0.1, 0.2, 0.3, 0.4], "y": [0, 2, 1.5, -1], "w": [1, -2, 1, 1]})
    poisson = get_model("poisson")
    with pytest.raises(InputError, match=r"column 'y': 2 of 4 rows are not non-negative integers \(first: row 3\)"):
        validate_table(table, "t.csv", poisson, resolve_columns(poisson, {"features": ["x0"], "label": "y"}))
    weighted = resolve_columns(LOGISTIC, {"features": ["x0"], "label": "y", "weight": "w"})
    with pytest.raises(InputError, match=r"column 'w': 1 of 4 rows are negative \(a weight is >= 0\) \(first: row 2\)"):
        validate_table(table.assign(y=[0, 1, 1, 0]), "t.csv", LOGISTIC, weighted)


@pytest.mark.parametrize("case", sorted(BAD_TABLES))
def test_bad_table_gives_one_line_error_and_no_output(tmp_path, case):
    table, message = BAD_TABLES[case]
    source = tmp_path / "bad.csv"
    table.to_csv(source, index=False)
    with pytest.raises(InputError, match=message) as error:
        shard_table(source, tmp_path / "shards", 2, LOGISTIC, COLUMNS, seed=0)
    text = str(error.value)
    assert "\n" not in text and text.startswith(str(source))
    assert not (tmp_path / "shards").exists()
    assert [path.name for path in tmp_path.iterdir()] == ["bad.csv"]


def test_shard_stage_does_not_import_jax(tmp_path):
    source = tmp_path / "table.parquet"
    logistic_table(20).to_parquet(source)
    code = f"""
import sys
from cmcflow.models import get_model, resolve_columns
from cmcflow.shard import shard_table
spec = get_model("logistic")
shard_table({str(source)!r}, {str(tmp_path / "shards")!r}, 2, spec,
            resolve_columns(spec, {{"features": ["x0", "x1"]}}), seed=0)
import cmcflow.featurize, cmcflow.report
assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))
"""
    subprocess.run([sys.executable, "-c", code], check=True)


CSV_LAYOUT_FAULTS = {
    "repeated header": ("x0,x0,y\n1,2,0\n3,4,1\n", r"column name\(s\) 'x0' appear more than once in the header"),
    "a row too long": ("x0,x1,y\n1,2,0,7\n3,4,1\n", r"data row 1 \(line 2\) has 4 fields, the header has 3"),
    "a row too short": ("x0,x1,y\n1,2,0\n3,4\n", r"data row 2 \(line 3\) has 2 fields, the header has 3"),
}


@pytest.mark.parametrize("case", sorted(CSV_LAYOUT_FAULTS))
def test_a_misshapen_csv_is_named_for_what_is_wrong(tmp_path, case):
    """pandas reads a repeated header as 'x0.1' (then 'x1' is reported missing), shifts a
    first row with one field too many into other columns, pads a short row with NaN."""
    text, message = CSV_LAYOUT_FAULTS[case]
    source = tmp_path / "bad.csv"
    source.write_text(text)
    with pytest.raises(InputError, match=message):
        shard_table(source, tmp_path / "shards", 2, LOGISTIC, COLUMNS, seed=0)
    assert not (tmp_path / "shards").exists()


@pytest.mark.parametrize("case", sorted(CSV_LAYOUT_FAULTS))
def test_counting_rows_names_what_is_wrong_with_a_misshapen_csv(tmp_path, case):
    """Arrow's fast count would keep a repeated name and stops at a bad record: the count
    that sets K from shard.rows_per_shard (at parse time) names the fault as the shard job does."""
    from cmcflow.table import count_rows

    text, message = CSV_LAYOUT_FAULTS[case]
    source = tmp_path / "bad.csv"
    source.write_text(text)
    with pytest.raises(InputError, match=message):
        count_rows(source)


def test_rows_are_counted_as_records_not_lines(tmp_path):
    from cmcflow.table import count_rows

    source = tmp_path / "quoted.csv"
    source.write_text('x0,x1,y,note\n1,2,0,"two\nlines"\n3,4,1,plain\n\n')
    assert count_rows(source) == 2 == len(pd.read_csv(source))
    source.write_text("")
    assert count_rows(source) == 0


def ring_with_chords(points: int) -> list[tuple[int, int]]:
    """Every point observed against its 3 next neighbours along a ring: connected, and 6
    distinct partners each."""
    return [(a, (a + step) % points) for a in range(points) for step in (1, 2, 3)]


STRUCTURE_FAULTS = {
    "a stray huge index": (
        ring_with_chords(10) + [(0, 10**9)],
        r"the largest index is 1000000000, so 1000000001 points, but 999999990 of them are never observed "
        r"\(the first: 10\)",
    ),
    "a gap": ([(a, b) for a, b in ring_with_chords(12) if 5 not in (a, b)], r"never observed \(the first: 5\)"),
    "two groups": (
        ring_with_chords(8) + [(a + 8, b + 8) for a, b in ring_with_chords(8)],
        r"split the 16 points into 2 groups that no distance connects \(point 0 and point 8",
    ),
    "a single pair": ([(0, 1)] * 5, r"2 of 2 points have fewer than 3 distinct partners \(point 0: 1\)"),
}


@pytest.mark.parametrize("case", sorted(STRUCTURE_FAULTS))
def test_structure_tables_that_distances_cannot_place_are_refused(tmp_path, case):
    pairs, message = STRUCTURE_FAULTS[case]
    spec = get_model("structure")
    table = pd.DataFrame(pairs, columns=["i", "j"]).assign(distance=3.8)
    source = tmp_path / "pairs.parquet"
    table.to_parquet(source)
    with pytest.raises(InputError, match=message):
        shard_table(source, tmp_path / "shards", 2, spec, resolve_columns(spec, {}), seed=0)
    assert not (tmp_path / "shards").exists()
    spec.table_facts(
        {"i": np.array([a for a, _ in ring_with_chords(9)]), "j": np.array([b for _, b in ring_with_chords(9)])}
    )


def test_columns_the_data_cannot_tell_apart_are_noted_in_the_manifest(tmp_path, caplog):
    """A constant feature and a feature that is a linear combination of others (with a
    constant, in a model with an intercept) are noted, not refused; independent columns,
    even one whose mean is a million times its spread, are not; in a model without an
    intercept a constant column is the intercept, not a note; the notes reach the manifest
    (the report shows them)."""
    from cmcflow.table import design_notes

    rng = np.random.default_rng(2)
    rows = 20_000
    table = pd.DataFrame({name: rng.normal(size=rows) for name in ("a", "b", "c")})
    table["year"] = 1e6 + rng.normal(size=rows)
    table["one"] = 1.0
    table["d"] = 2 * table["a"] - 3 * table["c"] + 1
    table["y"] = rng.integers(0, 2, rows)
    arrays = {name: table[name].to_numpy(dtype=float) for name in table}

    def notes(*features):
        return design_notes(arrays, LOGISTIC, resolve_columns(LOGISTIC, {"features": list(features)}))

    assert notes("a", "b", "c", "year") == []
    assert notes("a", "b", "one") == ["column 'one' (features) is 1 in every row"]
    assert notes("a", "b", "c", "d", "year") == [
        "columns 'a', 'c', 'd' (features) and a constant are linearly dependent: one of them is a linear "
        "combination of the others"
    ]
    arrays["e"] = arrays["a"] + arrays["b"]
    assert notes("a", "b", "c", "d", "e") == [
        "columns 'a', 'b', 'c', 'd', 'e' (features) and a constant are linearly dependent: 2 of them are linear "
        "combinations of the others"
    ]
    arrays["y"] = np.zeros(rows)
    assert notes("a") == ["column 'y' (label) is 0 in every row"]

    no_intercept = get_model("linear_gaussian")  # its constant column is its intercept
    arrays["f"] = 2 * arrays["a"] - 3 * arrays["c"]
    arrays["zero"] = np.zeros(rows)
    arrays["y"] = rng.normal(size=rows)

    def notes_without_intercept(*features):
        return design_notes(arrays, no_intercept, resolve_columns(no_intercept, {"features": list(features)}))

    assert notes_without_intercept("one", "a", "c", "year") == []
    assert notes_without_intercept("a", "c", "d") == []
    assert notes_without_intercept("one", "a", "c", "d") == [
        "columns 'one', 'a', 'c', 'd' (features) are linearly dependent: one of them is a linear combination of "
        "the others"
    ]
    arrays["two"] = np.full(rows, 2.0)
    assert notes_without_intercept("one", "two", "a") == [
        "columns 'one', 'two' (features) are linearly dependent: one of them is a linear combination of the others"
    ]
    assert notes_without_intercept("a", "c", "f", "zero") == [
        "column 'zero' (features) is 0 in every row",
        "columns 'a', 'c', 'f' (features) are linearly dependent: one of them is a linear combination of the others",
    ]

    source = tmp_path / "table.parquet"
    table.to_parquet(source)
    columns = resolve_columns(LOGISTIC, {"features": ["a", "b", "one"]})
    manifest = shard_table(source, tmp_path / "shards", 2, LOGISTIC, columns, seed=0)
    assert manifest["notes"] == ["column 'one' (features) is 1 in every row"]
    assert f"{source}: column 'one' (features) is 1 in every row" in caplog.text


def test_the_report_shows_the_data_notes_with_what_to_do():
    from cmcflow.report import data_notes_section

    assert data_notes_section([]) == ""
    section = data_notes_section(["column 'one' (features) is 1 in every row"])
    assert "<li>column &#x27;one&#x27; (features) is 1 in every row</li>" in section
    assert "<code>columns.features</code>" in section
