"""P4 — consensus Monte Carlo (K = 8) against full-data NUTS: logistic regression, 10^6 rows,
20 features (targets: projected cluster wall <= 0.2x full data; mean error <= 0.1
full-data sd; sd ratio 0.9-1.1; the importance-corrected posterior within 0.03 sd, sd ratio
0.95-1.05, its wall (combine drawing the proposal + the slowest reweight + correct) <= 0.2x
one sample job).

Runs the workflow itself (``snakemake --cores 2 all fulldata``): every sample job is its
own process, one at a time (each takes both cores), as a cluster would run them side by
side. From the rules' ``benchmark:`` files: the projected cluster wall is the slowest
sample job plus the combine job; summed CPU time is over all sample jobs and combine; the
correction's jobs (reweight, correct) are timed in a second pass of their own, one job at a
time, as the sample jobs are, and their imports in fresh processes (3 each).
Accuracy compares the combined draws (the defaults: Hessian weights, the second-order term),
the corrected posterior (its summary: the weighted draws' means and sds), and the same shard
runs combined again in this process without the second-order term and with draw weights,
with a long full-data NUTS reference run once in its own directory (the same rows, 4 chains
x (500 + 2,500) draws, so that its own Monte Carlo error is well below 0.03 sd), in its
posterior sd, for every coefficient; the timed full-data
job (500 + 500, the shards' settings) is compared too. Repeats rerun sample,
sample_fulldata and combine with the same seeds (``--forcerun``), so draws repeat exactly
and only the timings vary.

Usage: python bench/cmc_vs_full.py [--repeats 3] [--workdir /tmp/cmcflow-bench/cmc-vs-full] [--more]
(``--more``: add runs to those already made in the working directory; the reference is kept
in ``<workdir>-reference`` and reused.)
Writes bench/results/cmc_vs_full.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import arviz as az
import numpy as np
import pandas as pd
from common import (
    cell,
    import_seconds,
    logistic_analysis,
    schema_default,
    snakemake,
    spread,
    target,
    workflow_config,
    write_results,
)

ROWS, FEATURES, NUM_SHARDS = 1_000_000, 20, 8
ANALYSIS = "p4"
TARGETS = {"wall_ratio": 0.2, "mean_error": 0.1, "sd_ratio": (0.9, 1.1)}
#: Draws per chain of the accuracy reference (full-data NUTS, run once): about 10,000 in all,
#: so that each mean's Monte Carlo error is about 0.01 sd and the largest of 21 about 0.025
REFERENCE_SAMPLES = 2500
#: P4's slowest sample job when issue 13 was filed (float64), and its target: <= 0.55x, with
#: P4's accuracy targets (mean error, sd ratios) still met
SLOWEST_SHARD_BEFORE, SLOWEST_SHARD_TARGET = 112.0, 0.55
#: What a reweight job and the correct job import before their own work (scripts/reweight.py,
#: scripts/correct.py), timed in fresh processes: the part of the correction's wall that no
#: faster computation shortens.
JOB_IMPORTS = {
    "reweight": "from cmcflow.jaxenv import configure_jax; configure_jax(1, 'mixed', None); "
    "import cmcflow.script, cmcflow.consensus, cmcflow.featurize, cmcflow.fused, cmcflow.io, cmcflow.likelihood, "
    "cmcflow.transforms; from cmcflow.models import get_model; get_model('logistic')",
    "correct": "import cmcflow.script, cmcflow.correct",
}


def benchmark(path: Path) -> dict:
    """Wall and CPU seconds of one job from its ``benchmark:`` file."""
    with open(path) as handle:
        row = next(csv.DictReader(handle, delimiter="\t"))
    return {"wall": float(row["s"]), "cpu": float(row["cpu_time"])}


def proposal_seconds(results: Path) -> float:
    """How long the combine job took to draw the proposal (its shard record)."""
    return json.loads((results / "combined" / "shards.json").read_text())["proposal_seconds"]


def timings(results: Path) -> dict:
    samples = [benchmark(path) for path in sorted((results / "benchmarks" / "sample").glob("shard-*.tsv"))]
    combine, full = (
        benchmark(results / "benchmarks" / "combine.tsv"),
        benchmark(results / "benchmarks" / "sample_fulldata.tsv"),
    )
    reweights = [benchmark(path) for path in sorted((results / "benchmarks" / "reweight").glob("shard-*.tsv"))]
    correct = benchmark(results / "benchmarks" / "correct.tsv")
    # on a cluster the reweight jobs run side by side: combine's proposal, the slowest reweight, correct
    correction = proposal_seconds(results) + max(job["wall"] for job in reweights) + correct["wall"]
    diagnostics = [json.loads(path.read_text()) for path in (results / "samples").glob("shard-*.diagnostics.json")]
    slowest = max(job["wall"] for job in samples)
    return {
        "correction_wall": correction,
        "correction_ratio": correction / slowest,
        "curvature_seconds": max(record["curvature_seconds"] for record in diagnostics),
        "slowest_shard_wall": slowest,
        "combine_wall": combine["wall"],
        "projected_cluster_wall": slowest + combine["wall"],
        "cmc_cpu": sum(job["cpu"] for job in samples) + combine["cpu"],
        "full_data_wall": full["wall"],
        "full_data_cpu": full["cpu"],
        "wall_ratio": (slowest + combine["wall"]) / full["wall"],
    }


def flat_draws(posterior, name: str) -> np.ndarray:
    """``(chains · draws, elements)`` of one site."""
    values = posterior[name].values
    return values.reshape(values.shape[0] * values.shape[1], -1)


def error_figures(errors: np.ndarray, ratios: np.ndarray) -> dict:
    """The largest and mean |mean error| (sd) and the range of sd ratios over coefficients."""
    return {
        "max_mean_error_sd": float(errors.max()),
        "mean_mean_error_sd": float(errors.mean()),
        "min_sd_ratio": float(ratios.min()),
        "max_sd_ratio": float(ratios.max()),
    }


def accuracy(posterior, full) -> dict:
    """Largest |mean error| (full-data sd) and the range of sd ratios over all coefficients,
    of a posterior against the full-data one."""
    errors, ratios = [], []
    for name in ("intercept", "beta"):
        cmc, reference = flat_draws(posterior, name), flat_draws(full, name)
        errors.append(np.abs(cmc.mean(axis=0) - reference.mean(axis=0)) / reference.std(axis=0))
        ratios.append(cmc.std(axis=0) / reference.std(axis=0))
    return error_figures(np.concatenate(errors), np.concatenate(ratios))


def summary_accuracy(summary, full) -> dict:
    """:func:`accuracy` of a posterior given by its summary table (mean and sd per element,
    ArviZ's labels: the corrected posterior's weighted estimates)."""
    errors, ratios = [], []
    for name in ("intercept", "beta"):
        reference = flat_draws(full, name)
        labels = [name] if reference.shape[1] == 1 else [f"{name}[{i}]" for i in range(reference.shape[1])]
        rows = summary.loc[labels]
        errors.append(np.abs(rows["mean"].to_numpy() - reference.mean(axis=0)) / reference.std(axis=0))
        ratios.append(rows["sd"].to_numpy() / reference.std(axis=0))
    return error_figures(np.concatenate(errors), np.concatenate(ratios))


def reference_run(directory: Path) -> tuple[Path, dict]:
    """The accuracy reference: full-data NUTS on P4's rows with ``REFERENCE_SAMPLES`` draws
    per chain, in ``directory`` (run once and kept: it depends on the data and the sampler
    alone). Its results directory and ``{"wall": s, "ess_bulk_median": …, "draws": …}``."""
    analysis = logistic_analysis(
        rows=ROWS, features=FEATURES, num_shards=NUM_SHARDS, num_warmup=500, num_samples=REFERENCE_SAMPLES
    )
    config = workflow_config({ANALYSIS: analysis}, directory)
    results = Path(config["results_dir"]) / ANALYSIS
    if not (results / "fulldata" / "posterior.nc").exists():
        snakemake(directory, config, "--cores", "2", "fulldata", timeout=6 * 3600)
    diagnostics = json.loads((results / "fulldata" / "diagnostics.json").read_text())
    return results, {
        "wall": benchmark(results / "benchmarks" / "sample_fulldata.tsv")["wall"],
        "ess_bulk_median": float(np.median([site["ess_bulk"] for site in diagnostics["parameters"].values()])),
        "draws": 4 * REFERENCE_SAMPLES,
    }


def correction_bound(results: Path, imports: dict) -> str:
    """What the correction's wall is made of (the last run's), and how much of each job is
    its imports (``imports``: :data:`JOB_IMPORTS`' seconds in fresh processes)."""
    walls = {
        "proposal": proposal_seconds(results),
        "reweight": max(benchmark(path)["wall"] for path in (results / "benchmarks" / "reweight").glob("*.tsv")),
        "correct": benchmark(results / "benchmarks" / "correct.tsv")["wall"],
    }
    slowest = max(benchmark(path)["wall"] for path in (results / "benchmarks" / "sample").glob("shard-*.tsv"))
    return (
        f"combine's proposal {walls['proposal']:.1f} s, the slowest reweight job {walls['reweight']:.1f} s (its "
        f"imports alone {imports['reweight']['median']:.1f} s, timed in fresh processes: JAX, NumPyro; then the "
        f"model's set-up and the log-likelihood at every draw), correct {walls['correct']:.1f} s (its imports alone "
        f"{imports['correct']['median']:.1f} s: ArviZ, with SciPy, xarray and Matplotlib; then PSIS and the "
        f"corrected posterior's NetCDF), against a sample job of {slowest:.1f} s"
    )


def reference_noise_bound(reference: dict, fixed: dict) -> str:
    """What the reference's own Monte Carlo error makes of the corrected posterior's largest
    error against it: each mean carries sd 1/sqrt(ESS_reference) (in posterior sd; the
    corrected estimate's own error is far smaller, bench/results/importance_qmc.md), and the
    largest of 21 such errors is about E max_21 |N(0, 1)| of it."""
    noise = np.sqrt(1 / reference["ess_bulk_median"])
    largest = np.abs(np.random.default_rng(0).standard_normal((100_000, 21))).max(axis=1).mean()
    return (
        f"Monte Carlo error of the reference alone: full-data NUTS with a median bulk ESS of "
        f"{reference['ess_bulk_median']:.0f} ({reference['draws']} draws) gives each mean an error of sd "
        f"{noise:.3f} posterior sd, and the largest of 21 is expected near {noise * largest:.3f} "
        f"(measured {fixed['max_mean_error_sd']:.3f})"
    )


def recombined(results: Path, weights: str, second_order: bool):
    """The combined posterior of the same shard runs with other ``weights`` and
    ``second_order`` (in this process, as the combine job would with them edited; JAX
    configured as :func:`main` does)."""
    from cmcflow.combine import CombineSettings, combine_shards
    from cmcflow.featurize import load_features
    from cmcflow.models import get_model, resolve_options
    from cmcflow.runs import read_run
    from cmcflow.transforms import model_kwargs

    spec = get_model("logistic")
    paths = sorted((results / "samples").glob("shard-*.nc"))
    settings = CombineSettings(
        "consensus", 0, schema_default("combine", "covariance_shrinkage"), None, 1.0, "fail", weights, second_order
    )
    kwargs = model_kwargs(load_features(results / "features" / "shard-0000.npz"), resolve_options(spec, {}))
    return combine_shards(lambda shard: read_run(paths[shard]), len(paths), spec.numpyro_model, kwargs, settings).idata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cmcflow-bench/cmc-vs-full"))
    parser.add_argument("--more", action="store_true", help="add --repeats runs to those already in --workdir")
    args = parser.parse_args()
    if not args.more:
        shutil.rmtree(args.workdir, ignore_errors=True)
    analysis = logistic_analysis(rows=ROWS, features=FEATURES, num_shards=NUM_SHARDS, num_warmup=500, num_samples=500)
    config = workflow_config({ANALYSIS: analysis}, args.workdir)
    results = Path(config["results_dir"]) / ANALYSIS
    done = args.workdir / "runs.json"  # every run so far, so that a session can add runs later
    runs = json.loads(done.read_text()) if args.more else []
    for _ in range(args.repeats):
        rerun = (
            ["--forcerun", "sample", "sample_fulldata", "combine", "reweight", "correct"]
            if (results / "combined").exists()
            else []
        )
        snakemake(args.workdir, config, "--cores", "2", "all", "fulldata", *rerun, timeout=6 * 3600)
        # the correction's jobs once more, alone: above, the correct job (one thread) may share
        # the two cores with another one-thread job, as it would not on a cluster
        correction = ["--forcerun", "reweight", "correct"]
        snakemake(args.workdir, config, "--cores", "2", str(results / "corrected" / "summary.csv"), *correction)
        runs.append(timings(results))
        done.write_text(json.dumps(runs, indent=2))
        print(runs[-1], flush=True)
    figures = {key: spread([run[key] for run in runs]) for key in runs[0]}
    imports = {job: import_seconds(statement) for job, statement in JOB_IMPORTS.items()}
    reference_results, reference = reference_run(args.workdir.with_name(f"{args.workdir.name}-reference"))
    full = az.from_netcdf(reference_results / "fulldata" / "posterior.nc").posterior
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=1, precision="float64", compilation_cache_dir=None)  # for recombined()
    qualities = {
        "combined": accuracy(az.from_netcdf(results / "combined" / "posterior.nc").posterior, full),
        "corrected": summary_accuracy(pd.read_csv(results / "corrected" / "summary.csv", index_col="parameter"), full),
        "corrected, resampled draws": accuracy(az.from_netcdf(results / "corrected" / "posterior.nc").posterior, full),
        "combined, first order": accuracy(recombined(results, "hessian", second_order=False).posterior, full),
        "combined, draw weights": accuracy(recombined(results, "draws", second_order=False).posterior, full),
        "full-data NUTS, 4 x 500 (the timed job)": accuracy(
            az.from_netcdf(results / "fulldata" / "posterior.nc").posterior, full
        ),
    }
    importance = json.loads((results / "corrected" / "importance.json").read_text())
    quality, fixed = qualities["combined"], qualities["corrected"]
    precision = az.from_netcdf(results / "samples" / "shard-0000.nc").posterior.attrs["precision"]
    ratio = figures["wall_ratio"]["median"]
    low, high = TARGETS["sd_ratio"]
    targets = [
        target(
            "P4",
            "CMC projected cluster wall / full-data NUTS wall (10^6 x 20 logistic, K = 8)",
            f"{ratio:.3f}",
            f"<= {TARGETS['wall_ratio']}",
            ratio <= TARGETS["wall_ratio"],
        ),
        target(
            "P4",
            "CMC mean error, largest over 21 coefficients",
            f"{quality['max_mean_error_sd']:.3f} sd",
            f"<= {TARGETS['mean_error']} sd",
            quality["max_mean_error_sd"] <= TARGETS["mean_error"],
        ),
        target(
            "P4",
            "CMC / full-data sd ratio, range over 21 coefficients",
            f"{quality['min_sd_ratio']:.3f}–{quality['max_sd_ratio']:.3f}",
            f"{low}–{high}",
            low <= quality["min_sd_ratio"] and quality["max_sd_ratio"] <= high,
        ),
        target(
            "P4",
            "corrected mean error, largest over 21 coefficients; sd ratios",
            f"{fixed['max_mean_error_sd']:.3f} sd; {fixed['min_sd_ratio']:.3f}–{fixed['max_sd_ratio']:.3f} "
            f"(k-hat {importance['khat']:.2f})",
            "<= 0.03 sd; 0.95–1.05",
            fixed["max_mean_error_sd"] <= 0.03 and 0.95 <= fixed["min_sd_ratio"] and fixed["max_sd_ratio"] <= 1.05,
            reference_noise_bound(reference, fixed),
        ),
        target(
            "13b",
            f"P4's slowest sample job / its {SLOWEST_SHARD_BEFORE:.0f} s in float64 (accuracy targets met)",
            f"{figures['slowest_shard_wall']['median'] / SLOWEST_SHARD_BEFORE:.2f} "
            f"({figures['slowest_shard_wall']['median']:.1f} s, jax.precision {precision})",
            f"<= {SLOWEST_SHARD_TARGET}",
            figures["slowest_shard_wall"]["median"] / SLOWEST_SHARD_BEFORE <= SLOWEST_SHARD_TARGET
            and quality["max_mean_error_sd"] <= TARGETS["mean_error"]
            and low <= quality["min_sd_ratio"]
            and quality["max_sd_ratio"] <= high,
        ),
        target(
            "P4",
            "correction wall (combine's proposal + slowest reweight + correct) / slowest sample job",
            f"{figures['correction_ratio']['median']:.3f}",
            "<= 0.2",
            figures["correction_ratio"]["median"] <= 0.2,
            correction_bound(results, imports),
        ),
    ]
    labels = {
        "slowest_shard_wall": "slowest sample job (wall s)",
        "combine_wall": "combine job (wall s)",
        "projected_cluster_wall": "projected cluster wall (s)",
        "full_data_wall": "full-data NUTS job (wall s)",
        "wall_ratio": "projected cluster wall / full data",
        "cmc_cpu": "CMC CPU s (all sample jobs + combine)",
        "full_data_cpu": "full-data CPU s",
        "curvature_seconds": "Hessian and third derivatives in the sample job, slowest shard (s)",
        "correction_wall": "correction wall: combine's proposal + slowest reweight + correct (s)",
        "correction_ratio": "correction wall / slowest sample job",
    }
    table = [
        f"# P4 CMC (K = {NUM_SHARDS}) vs full-data NUTS, logistic, {ROWS:,} rows x {FEATURES} features, 4 chains "
        f"x (500 + 500) draws "
        f"(median (min–max) of {len(runs)} run(s))",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {labels[key]} | {cell(figures[key], 3 if 'ratio' in key else 1)} |" for key in labels],
        *[
            f"| {name}: largest mean error (full-data sd); sd ratios | {q['max_mean_error_sd']:.3f} (mean over "
            f"coefficients {q['mean_mean_error_sd']:.3f}); {q['min_sd_ratio']:.3f}–{q['max_sd_ratio']:.3f} |"
            for name, q in qualities.items()
        ],
        f"| importance correction: k-hat; ESS of {importance['proposal_draws']} | {importance['khat']:.2f}; "
        f"{importance['effective_sample_size']:.0f} |",
        "",
        f"Errors and sd ratios against full-data NUTS with 4 x {REFERENCE_SAMPLES:,} draws (run once, "
        f"{reference['wall'] / 60:.0f} min; median bulk ESS {reference['ess_bulk_median']:.0f}), in its posterior sd. "
        "combined: the defaults (`combine.weights: hessian`, `second_order: true`); combined, first order: the "
        "same shard runs combined in this process with `second_order: false`; combined, draw weights: the same "
        "with `weights: draws` and `covariance_shrinkage: auto`; corrected: the importance-corrected posterior's "
        "summary (the weighted draws' means and sds, `corrected/summary.csv`); corrected, resampled draws: "
        "`corrected/posterior.nc`; full-data NUTS, 4 x 500: the timed full-data job.",
    ]
    write_results(
        "cmc_vs_full",
        {
            "benchmark": "P4 CMC vs full data",
            "repeats": len(runs),
            "runs": runs,
            "figures": figures,
            "accuracy": qualities,
            "importance": {key: importance[key] for key in ("khat", "effective_sample_size", "proposal_draws")},
            "correction_job_imports": imports,
            "reference": reference,
            "targets": targets,
        },
        table,
    )


if __name__ == "__main__":
    main()
