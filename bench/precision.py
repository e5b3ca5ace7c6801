"""Precision chosen by measurement (issue 13 a): float64, float32 and mixed.

1. **Speed**: the sample stage on one shard of P4's size (logistic, 125,000 rows x 20
   features, NUTS 500 + 500, 4 chains on 4 devices), each precision in its own process,
   repeated: sampling and compile seconds, leapfrog steps per draw; the likelihood as a
   sample job computes it (``sample.fused_likelihood``: the fused kernel where it applies,
   which is mixed precision).
2. **Accuracy**: the statistical tests (exact linear-Gaussian, CMC and the corrected
   posterior against full-data NUTS for every regression model, the structure model end to
   end, the likelihood's kernel against float64 and XLA) run in each precision
   (``CMCFLOW_TEST_PRECISION``): which pass, and the errors they print, in posterior sd.

The default (``jax.precision`` in the config schema) is the fastest precision whose
statistical tests all pass; precisions within ``EQUALLY_FAST`` of the fastest count as
equally fast, and of those the one with the most float64 wins (float64, then mixed, then
float32). P4 itself (``cmc_vs_full.py``) runs in the default.

    python bench/precision.py [--repeats 3] [--skip-tests | --keep-tests]
    python bench/precision.py --tables-only   # rewrite the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
from common import REPO, RESULTS, cell, spread, target, write_results

PRECISIONS = ("float64", "float32", "mixed")
ROWS, FEATURES = 125_000, 20
#: Sampling times within this factor of the fastest count as equally fast.
EQUALLY_FAST = 1.05
TESTS = [
    "tests/test_statistics.py",
    "tests/test_models.py",
    "tests/test_structure.py",
    "tests/test_real_data.py",
    "tests/test_fused.py",  # the likelihood's kernel in the precision, against float64 and XLA
]


def worker(precision: str) -> dict:
    """One sample job's NUTS on a P4-sized shard, in ``precision``."""
    sys.path.insert(0, str(REPO / "workflow"))
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=4, precision=precision, compilation_cache_dir=None)
    from cmcflow.fused import enable_in_job
    from cmcflow.models import get_model
    from cmcflow.models.rows import correlated_features
    from cmcflow.sample import NutsSettings, sample_features

    enable_in_job(True, None)  # as a sample job with the default sample.fused_likelihood

    spec = get_model("logistic")
    rng = np.random.default_rng(0)
    X = correlated_features(rng, ROWS, FEATURES)
    y = (rng.random(ROWS) < 1 / (1 + np.exp(-(X @ rng.normal(0, 0.5, FEATURES) - 0.5)))).astype(float)
    features = spec.featurize({"features": X, "label": y}, ROWS, {})
    settings = NutsSettings(
        num_warmup=500, num_samples=500, target_accept_prob=0.8, max_tree_depth=10, dense_mass=False
    )
    idata, report = sample_features(
        spec, features, {"prior_sd": 2.5}, num_shards=8, shard=0, seed=0, settings=settings, chains=4
    )
    beta = idata.posterior["beta"].values.reshape(-1, FEATURES)
    return {
        "sampling_seconds": report["sampling_seconds"],
        "compile_seconds": report["compile_seconds"],
        "steps_per_draw": float(idata.sample_stats["n_steps"].mean()),
        "min_ess_bulk": report["min_ess_bulk"],
        "beta_mean": beta.mean(axis=0).tolist(),
        "beta_sd": beta.std(axis=0).tolist(),
    }


def run_tests(precision: str) -> dict:
    """The statistical tests in ``precision``: outcome counts, failures, printed errors, wall."""
    # this checkout's package first, ahead of any editable install of another checkout
    env = {**os.environ, "CMCFLOW_TEST_PRECISION": precision, "PYTHONPATH": str(REPO / "workflow")}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *TESTS],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    seconds = time.perf_counter() - started
    tail = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}
    printed = [line for line in result.stdout.splitlines() if "sd" in line and ("error" in line or "ratio" in line)]
    return {
        "returncode": result.returncode,
        "counts": counts,
        "failed": re.findall(r"^FAILED (\S+)", result.stdout, flags=re.M),
        "printed": printed,
        "seconds": seconds,
    }


def largest_printed_error(printed: list[str]) -> float:
    """The largest 'mean error [...] sd' value the tests printed."""
    values = []
    for line in printed:
        match = re.search(r"mean \|?error\|? \[([^\]]*)\]", line)
        if match:
            values += [float(value) for value in match.group(1).split()]
    return max(values) if values else float("nan")


def main(repeats: int, skip_tests: bool, keep_tests: bool) -> None:
    """The speed runs, then the tests (none with ``skip_tests``; with ``keep_tests`` those
    recorded in the JSON, with the time they were run: for a change that moves only speed)."""
    runs = {precision: [] for precision in PRECISIONS}
    for _ in range(repeats):
        for precision in PRECISIONS:
            output = subprocess.run(
                [sys.executable, __file__, "--worker", precision], capture_output=True, text=True, check=True
            ).stdout
            runs[precision].append(json.loads(output.strip().splitlines()[-1]))
    if keep_tests:
        record = json.loads((RESULTS / "precision.json").read_text())
        write_report(runs, record["tests"], repeats, tests_written=tests_run_at(record))
        return
    tests = {} if skip_tests else {precision: run_tests(precision) for precision in PRECISIONS}
    write_report(runs, tests, repeats)


def tests_run_at(record: dict) -> str:
    """When the recorded statistical tests ran (older records: when the record was written)."""
    return record.get("tests_written", record["written"])


def choose(speed: dict, tests: dict) -> str:
    """The default: of the precisions whose tests pass, those within ``EQUALLY_FAST`` of the
    fastest; of these the one with the most float64 (float64, mixed, float32)."""
    passing = [p for p in ("float64", "mixed", "float32") if not tests or tests[p]["returncode"] == 0]
    fastest = min(speed[p]["sampling_seconds"]["median"] for p in passing)
    return next(p for p in passing if speed[p]["sampling_seconds"]["median"] <= EQUALLY_FAST * fastest)


def write_report(
    runs: dict, tests: dict, repeats: int, measured: str | None = None, tests_written: str | None = None
) -> None:
    """The JSON and the tables; ``tests_written``: when the tests ran, where not with the runs."""
    tests_at = tests_written or measured or time.strftime("%Y-%m-%d %H:%M:%S")
    reference = np.mean([run["beta_mean"] for run in runs["float64"]], axis=0)
    reference_sd = np.mean([run["beta_sd"] for run in runs["float64"]], axis=0)
    speed = {}
    for precision, entries in runs.items():
        speed[precision] = {
            "sampling_seconds": spread([entry["sampling_seconds"] for entry in entries]),
            "compile_seconds": spread([entry["compile_seconds"] for entry in entries]),
            "steps_per_draw": spread([entry["steps_per_draw"] for entry in entries]),
            "min_ess_bulk": spread([entry["min_ess_bulk"] for entry in entries]),
            # between-precision difference of the posterior means, in float64 posterior sd
            # (each run's own Monte Carlo error is ~0.02-0.03 sd)
            "largest_mean_shift_sd": spread(
                [float(np.max(np.abs(np.asarray(entry["beta_mean"]) - reference) / reference_sd)) for entry in entries]
            ),
        }
    chosen = choose(speed, tests)
    base = speed["float64"]["sampling_seconds"]["median"]
    targets = [
        target(
            "13a",
            "default precision: fastest whose statistical tests pass (sampling s of a P4 shard vs float64)",
            f"{chosen} ({speed[chosen]['sampling_seconds']['median']:.1f} s vs {base:.1f} s, "
            f"{speed[chosen]['sampling_seconds']['median'] / base:.2f}x)",
            f"fastest (within {EQUALLY_FAST:.2f}x) whose statistical tests pass",
            True,
        )
    ]
    table = [
        "# Precision: speed of a P4 shard and the statistical tests, per jax.precision (issue 13 a)",
        "",
        f"Sample stage on one logistic shard of {ROWS:,} rows x {FEATURES} features (P4's), NUTS 500 + 500, "
        f"4 chains on 4 devices; {repeats} runs each. Mean shift: largest |mean - float64's mean| over the 20 "
        "coefficients in float64 posterior sd (Monte Carlo error alone is ~0.02-0.03).",
        "",
        "| precision | sampling (s) | compile (s) | steps per draw | min bulk ESS | largest mean shift (sd) |",
        "|---|---|---|---|---|---|",
    ]
    for precision, entry in speed.items():
        table.append(
            f"| {precision} | {cell(entry['sampling_seconds'], 1)} | {cell(entry['compile_seconds'], 1)} | "
            f"{cell(entry['steps_per_draw'], 1)} | {cell(entry['min_ess_bulk'], 0)} | "
            f"{cell(entry['largest_mean_shift_sd'], 3)} |"
        )
    if tests:
        table += [
            "",
            f"Statistical tests ({', '.join(TESTS)}) per precision, run {tests_at}:",
            "",
            "| precision | passed | failed | largest mean error printed (sd) | wall (s) | failures |",
            "|---|---|---|---|---|---|",
        ]
        for precision, outcome in tests.items():
            table.append(
                f"| {precision} | {outcome['counts'].get('passed', 0)} | {outcome['counts'].get('failed', 0)} | "
                f"{largest_printed_error(outcome['printed']):.3f} | {outcome['seconds']:.0f} | "
                f"{', '.join(outcome['failed']) or '-'} |"
            )
    table += ["", f"Chosen default: **{chosen}**."]
    write_results(
        "precision",
        {
            "benchmark": "13a precision",
            "repeats": repeats,
            "runs": runs,
            "speed": speed,
            "tests": tests,
            "tests_written": tests_at,
            "chosen": chosen,
            "targets": targets,
        },
        table,
        measured,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-tests", action="store_true", help="speed only")
    parser.add_argument("--keep-tests", action="store_true", help="speed; the tests as recorded, with their date")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the table from the JSON")
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        print(json.dumps(worker(arguments.worker)))
    elif arguments.tables_only:
        record = json.loads((RESULTS / "precision.json").read_text())
        write_report(record["runs"], record["tests"], record["repeats"], record["written"], tests_run_at(record))
    else:
        main(arguments.repeats, arguments.skip_tests, arguments.keep_tests)
