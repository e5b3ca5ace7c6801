"""Reading an analysis' input table and checking it against the columns a model declares.

Every problem is reported as one line naming the file, the column and how many rows are
bad, so a scientist can fix the table without reading a traceback. What a valid table
cannot tell the model (a constant column, linearly dependent features) is a note, not an
error (:func:`design_notes`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from cmcflow.errors import InputError
from cmcflow.models import ModelSpec

log = logging.getLogger(__name__)

#: Largest magnitude a column value may have: sums, products and squares of values beyond it
#: lose every digit of precision (doubles hold integers exactly only to about 9e15) or overflow.
LARGEST_VALUE = 1e15
PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv",)


def _table_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    if suffix in CSV_SUFFIXES:
        return "csv"
    raise InputError(f"{path}: unsupported table format {suffix!r}; use Parquet (.parquet) or CSV (.csv)")


def check_header(path: Path, header: list[str]) -> None:
    """Raise :class:`InputError` naming the column names a CSV header repeats (pandas
    would read the second ``x0`` as ``x0.1``, Arrow would keep both)."""
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise InputError(f"{path}: column name(s) {', '.join(map(repr, repeated))} appear more than once in the header")


def csv_records(path: Path) -> int:
    """Check a CSV file's layout and count its data records (a quoted field may span lines):
    raise :class:`InputError` naming a repeated header name, or the first record whose
    number of fields differs from the header's (pandas would shift such a row's values into
    other columns, or pad it with NaN)."""
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return 0
        check_header(path, header)
        records = 0
        for record in reader:
            if not record:  # a blank line
                continue
            records += 1
            if len(record) != len(header):
                raise InputError(
                    f"{path}: data row {records} (line {reader.line_num}) has {len(record)} fields, "
                    f"the header has {len(header)}"
                )
    return records


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a Parquet or CSV table (format chosen by file suffix); a CSV file's layout is
    checked first (:func:`csv_records`)."""
    path = Path(path)
    table_format = _table_format(path)
    try:
        if table_format == "parquet":
            return pd.read_parquet(path)
        csv_records(path)
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (OSError, ValueError, csv.Error, pd.errors.ParserError) as error:
        raise InputError(f"{path}: cannot read the table: {error}") from error


def table_columns(path: str | os.PathLike) -> list[str]:
    """The table's column names, read from its header alone (a Parquet file's schema, a CSV
    file's first record): cheap enough to check a config against when Snakemake starts."""
    path = Path(path)
    table_format = _table_format(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (input.path is read relative to the directory Snakemake runs in)")
    try:
        if table_format == "parquet":
            return list(pq.read_schema(path).names)
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), [])
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as error:
        raise InputError(f"{path}: cannot read the table: {error}") from error
    check_header(path, header)
    return header


def check_columns_present(
    path: str | os.PathLike, present: Iterable, spec: ModelSpec, columns: Mapping[str, list[str]]
) -> None:
    """Raise :class:`InputError` naming every column of ``columns`` (role name -> column
    names) that is not among ``present``, the names the table at ``path`` has."""
    present = [str(name) for name in present]
    missing = [name for role in spec.roles for name in columns[role.name] if name not in present]
    if missing:
        raise InputError(
            f"{path}: column(s) {', '.join(map(repr, missing))} missing for model {spec.name!r}; "
            f"the table has columns {', '.join(map(repr, present))}"
        )


def count_rows(path: str | os.PathLike) -> int:
    """Number of data rows: Parquet metadata, or the CSV file's records, not lines (quoted
    line breaks count once; blank lines not at all). A CSV file is counted by Arrow's
    streaming reader (about 6x faster than :func:`csv_records` on a 200 MB file: the
    count runs at every dry run where ``shard.rows_per_shard`` sets K); a file it cannot
    read is read again by :func:`csv_records`, whose error names the record."""
    path = Path(path)
    if _table_format(path) == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    try:
        return _arrow_csv_records(path)
    except (OSError, pa.ArrowException):
        pass  # the slower reader below counts the same records, or names what is wrong
    try:
        return csv_records(path)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"{path}: cannot read the table: {error}") from error


def _arrow_csv_records(path: Path) -> int:
    """:func:`csv_records`' count from Arrow's streaming CSV reader, converting one column
    only, as text; raises where a record's field count differs from the header's."""
    header = table_columns(path)
    if not header:
        return 0
    reader = pa_csv.open_csv(
        path,
        parse_options=pa_csv.ParseOptions(newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(include_columns=header[:1], column_types={header[0]: pa.string()}),
    )
    return sum(batch.num_rows for batch in reader)


def _bad_rows(bad: np.ndarray, what: str, values: pd.Series | None = None) -> str:
    """``"3 of 2000 rows <what> (first: row 18)"`` for the boolean mask ``bad (rows,)``, with
    the first bad value where ``values`` are given; rows are counted from 1 in the table's
    order (a CSV's row r is its line r + 1, after the header)."""
    first = int(np.argmax(bad))
    value = "" if values is None else f", {values.iloc[first]!r}"
    return f"{int(bad.sum())} of {len(bad)} rows {what} (first: row {first + 1}{value})"


def _column_problems(values: pd.Series, kind: str) -> tuple[np.ndarray, list[str]]:
    """Convert one column to float64 and describe its bad rows (empty list: all good)."""
    if pd.api.types.is_bool_dtype(values):
        values = values.astype(np.int64)
    numeric = pd.to_numeric(values, errors="coerce")
    not_numeric = (numeric.isna() & values.notna()).to_numpy()
    if not_numeric.any():
        problem = _bad_rows(not_numeric, "are not numeric", values)
        if kind == "real" and not_numeric.sum() == values.notna().sum():  # text throughout: categories
            problem += (
                f"; to use categories as features, give each but one of its {values.nunique()} categories a 0/1 "
                "column (e.g. pandas.get_dummies(..., drop_first=True))"
            )
        return np.empty(0), [problem]
    array = numeric.to_numpy(dtype=np.float64, na_value=np.nan)
    problems = []
    non_finite = ~np.isfinite(array)
    if non_finite.any():
        problems.append(_bad_rows(non_finite, "are NaN or infinite"))
    finite = ~non_finite  # the rows below are finite ones: NaN and infinity are counted above
    with np.errstate(invalid="ignore"):
        huge = finite & (np.abs(array) > LARGEST_VALUE)
        if huge.any():
            problems.append(
                _bad_rows(huge, f"exceed {LARGEST_VALUE:.0e} in magnitude")
                + " (rescale the column: products and squares of such values overflow or lose all precision)"
            )
        if kind == "binary":
            outside = finite & (array != 0) & (array != 1)
            if outside.any():
                problems.append(_bad_rows(outside, "are outside the model's support {0, 1}"))
        elif kind == "count":
            outside = finite & ((array < 0) | (array != np.round(array)))
            if outside.any():
                problems.append(_bad_rows(outside, "are not non-negative integers"))
        elif kind == "weight":
            outside = finite & (array < 0)
            if outside.any():
                problems.append(_bad_rows(outside, "are negative (a weight is >= 0)"))
    return array, problems


def validate_table(
    table: pd.DataFrame, path: str | os.PathLike, spec: ModelSpec, columns: Mapping[str, list[str]]
) -> dict[str, np.ndarray]:
    """Check ``table`` against the model's roles; return the role columns as float64 arrays.

    ``path``: where the table came from (for messages only); ``columns``: role name ->
    column names (:func:`cmcflow.models.resolve_columns`). Returns column name -> float64
    array ``(rows,)`` for every declared column. Raises :class:`InputError`, one line
    listing every problem: no rows, missing columns, non-numeric values, NaN/inf, values
    outside the model's support.
    """
    if len(table) == 0:
        raise InputError(f"{path}: the table has no rows")
    check_columns_present(path, table.columns, spec, columns)
    kinds = {name: role.kind for role in spec.roles for name in columns[role.name]}
    arrays, problems = {}, []
    for name, kind in kinds.items():
        arrays[name], column_problems = _column_problems(table[name], kind)
        problems += [f"column {name!r}: {problem}" for problem in column_problems]
    if problems:
        raise InputError(f"{path}: " + "; ".join(problems))
    return arrays


#: Relative size (to the largest) below which an eigenvalue of the feature columns'
#: correlation matrix counts as zero: far above the rounding of its float64 sums (about
#: 1e-13 for a million rows), and two columns must correlate beyond 1 - 5e-10 to reach it.
DEPENDENT_EIGENVALUE = 1e-9
#: rows x P^2 (the multiply-adds of a P x P matrix from every row) beyond which the
#: dependence check of P feature columns is skipped: about 4 s on 2 cores.
MOST_CHECKED_PRODUCTS = 1e11


def correlation_matrix(columns: Sequence[np.ndarray], chunk_elements: int = 2**22) -> np.ndarray:
    """R = Z^T Z / n ``(P, P)`` of P non-constant columns ``(n,)``, Z each column centred
    and scaled to unit variance. Accumulated over blocks of about ``chunk_elements`` values,
    so memory stays bounded; centring before the products keeps a column whose mean is far
    beyond its spread exact."""
    means = np.array([column.mean() for column in columns])
    scales = np.array([column.std() for column in columns])
    rows = len(columns[0])
    step = max(1, chunk_elements // len(columns))
    gram = np.zeros((len(columns), len(columns)))
    for start in range(0, rows, step):
        block = (np.column_stack([column[start : start + step] for column in columns]) - means) / scales
        gram += block.T @ block
    return gram / rows


def dependences(columns: Sequence[np.ndarray], constant: bool) -> np.ndarray:
    """The linear dependences of P non-constant columns x_i ``(n,)``: ``(P, m)``
    orthonormal directions v with Σ_i v_i x_i / s_i the same in every row (s_i: column i's
    sd), which is 0 unless ``constant``.

    The v with a constant combination span the null space of the columns'
    :func:`correlation_matrix` (eigenvalues below ``DEPENDENT_EIGENVALUE`` x the largest);
    the combination's value is v·μ/s (μ_i: column i's mean), in units of one column's sd.
    ``constant``: the columns may combine with a constant (the model has an intercept, or a
    constant column), so every such v counts. Otherwise only those whose value is 0: where
    the values of the null space's directions, a vector of norm above √``DEPENDENT_EIGENVALUE``,
    are not, the directions orthogonal to it within the null space.
    """
    eigenvalues, eigenvectors = np.linalg.eigh(correlation_matrix(columns))
    null = eigenvectors[:, eigenvalues < DEPENDENT_EIGENVALUE * eigenvalues[-1]]
    if constant or not null.shape[1]:
        return null
    offsets = null.T @ np.array([column.mean() / column.std() for column in columns])  # (m,)
    if np.linalg.norm(offsets) <= np.sqrt(DEPENDENT_EIGENVALUE):
        return null
    _, _, rows = np.linalg.svd(offsets[None, :])  # rows[1:]: the directions orthogonal to offsets
    return null @ rows[1:].T


def design_notes(arrays: Mapping[str, np.ndarray], spec: ModelSpec, columns: Mapping[str, list[str]]) -> list[str]:
    """What the validated table's columns cannot tell the model, one sentence each.

    ``arrays``: column name -> float64 ``(rows,)`` (:func:`validate_table`); ``columns``:
    role name -> column names. Feature columns are those of roles of several real columns.
    Notes (never errors: a proper prior still identifies what the data do not, and a user
    may mean it):

    - a column of a required role that takes one value in every row, except a feature of a
      model without an intercept (``spec.intercept``) that is not 0: that is its intercept;
    - feature columns linearly dependent, together with a constant where the model has an
      intercept or a constant feature column (:func:`dependences`), naming the columns with
      weight in a dependence. The data then leave a direction of the coefficients to the
      prior alone.
    """
    features = {role.name for role in spec.roles if role.multiple and role.kind == "real"}
    rows = len(next(iter(arrays.values())))
    notes = []
    for role in spec.roles:
        for name in [] if role.optional else columns[role.name]:
            value = arrays[name][0]
            if np.all(arrays[name] == value) and not (role.name in features and not spec.intercept and value != 0):
                notes.append(f"column {name!r} ({role.name}) is {value:g} in every row")
    for role in spec.roles:
        if role.name not in features:
            continue
        varying = [name for name in columns[role.name] if np.any(arrays[name] != arrays[name][0])]
        if rows * len(varying) ** 2 > MOST_CHECKED_PRODUCTS:
            log.info("%d %s columns: their linear dependence is not checked (too many)", len(varying), role.name)
            continue
        # a model without an intercept: its constant columns (not 0) are one; two are dependent
        constants = [] if spec.intercept else [name for name in columns[role.name] if name not in varying]
        constants = [name for name in constants if arrays[name][0] != 0]
        null = np.zeros((len(varying), 0))
        if len(varying) >= 2:
            null = dependences([arrays[name] for name in varying], constant=spec.intercept or bool(constants))
        count = null.shape[1] + max(len(constants) - 1, 0)
        if not count:
            continue
        involved = [name for name, weight in zip(varying, np.linalg.norm(null, axis=1)) if weight > 1e-3]
        involved = constants + involved if (null.shape[1] or len(constants) > 1) else involved
        relation = (
            "one of them is a linear combination of the others"
            if count == 1
            else f"{count} of them are linear combinations of the others"
        )
        notes.append(
            f"columns {', '.join(map(repr, involved))} ({role.name})"
            f"{' and a constant' if spec.intercept else ''} are linearly dependent: {relation}"
        )
    return notes
