"""Row helpers: padding and the regression layout (XT, y, mask) for featurizers, and the
data precision for models."""

from __future__ import annotations

import numpy as np


def pad_rows(array: np.ndarray, pad_to: int) -> np.ndarray:
    """Zero-pad the leading (row) axis of ``array`` to ``pad_to`` rows."""
    rows = array.shape[0]
    if rows > pad_to:
        raise ValueError(f"{rows} rows do not fit the padded size {pad_to}")
    padding = [(0, pad_to - rows)] + [(0, 0)] * (array.ndim - 1)
    return np.pad(array, padding)


def regression_features(columns: dict[str, np.ndarray], pad_to: int, facts: dict) -> dict[str, np.ndarray]:
    """``XT (P, pad_to)`` float64, ``y (pad_to,)`` float64, ``mask (pad_to,)`` bool.

    ``XT`` is the feature matrix transposed, one row per feature (each feature's values
    contiguous in memory): a model computes the linear predictor as ``beta @ XT``, and both
    products its gradient needs, β·XT and XT r, stream memory in order (the layout was
    chosen by measurement: ``bench/results/roofline.md``). Regression needs no facts
    about the whole table (``facts`` is empty).
    """
    features = np.asarray(columns["features"], dtype=np.float64)
    label = np.asarray(columns["label"], dtype=np.float64).reshape(-1)
    mask = np.ones(label.shape[0], dtype=bool)
    return {
        "XT": np.ascontiguousarray(pad_rows(features, pad_to).T),
        "y": pad_rows(label, pad_to),
        "mask": pad_rows(mask, pad_to),
    }


def in_data_precision(data, *parameters):
    """``parameters`` cast to the floating type of the array ``data`` (one value, or a tuple).

    A model computes its per-row terms from parameters cast this way, so they are computed
    in the data's type: float32 under ``jax.precision: mixed`` (float32 data, float64
    parameters), where the matrix-vector products that read the data then stream half the
    bytes; a no-op under ``float64`` and ``float32``. The gradient flows back through the
    cast to the float64 parameters.
    """
    cast = tuple(parameter.astype(data.dtype) for parameter in parameters)
    return cast[0] if len(cast) == 1 else cast


def correlated_features(rng: np.random.Generator, rows: int, features: int, rho: float = 0.5) -> np.ndarray:
    """``(rows, features)`` standard-normal columns with AR(1) correlation ``rho``^|i-j|."""
    lags = np.abs(np.subtract.outer(np.arange(features), np.arange(features)))
    cholesky = np.linalg.cholesky(rho**lags)
    return rng.standard_normal((rows, features)) @ cholesky.T


def offset_regression_features(columns: dict[str, np.ndarray], pad_to: int, facts: dict) -> dict[str, np.ndarray]:
    """:func:`regression_features` and ``offset (pad_to,)`` float64: each row's known
    additive term on the linear predictor's scale (e.g. the log of an exposure time or a
    population), 0 where the table has no offset column."""
    arrays = regression_features(columns, pad_to, facts)
    return arrays | {"offset": pad_rows(optional_column(columns, "offset", 0.0), pad_to)}


def weighted_regression_features(columns: dict[str, np.ndarray], pad_to: int, facts: dict) -> dict[str, np.ndarray]:
    """:func:`offset_regression_features` and, where the table has a weight column,
    ``weight (pad_to,)`` float64: each row's weight on the log-likelihood (a row of weight w
    counts as w identical rows), 0 on padding rows. Without one there is no ``weight``
    array: the model then counts every row once."""
    arrays = offset_regression_features(columns, pad_to, facts)
    if columns.get("weight") is None:
        return arrays
    return arrays | {"weight": pad_rows(optional_column(columns, "weight", 1.0), pad_to)}


def optional_column(columns: dict[str, np.ndarray], role: str, default: float) -> np.ndarray:
    """The ``role`` column as float64 ``(rows,)``, or ``default`` on every row without one."""
    values = columns.get(role)
    if values is None:
        return np.full(len(columns["label"]), default)
    return np.asarray(values, dtype=np.float64).reshape(-1)
