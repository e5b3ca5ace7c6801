"""P3 — alignment throughput: the batched shard_map overlay over 1, 2 and 4 devices against
a straightforward per-pair loop with early stopping, at equal or better mean score.

Molecules: contiguous fragments of 20, 30, 40, 50 or 60 Cα atoms of ubiquitin (real
protein geometry; five sizes, so the per-size baseline compiles five programs),
each paired with a randomly rotated, translated, noisy (0.3 Å) copy of itself; one in
four copies is mirrored (reflection allowed). The pairs come padded to 60 points with
masks; ``align_overlay`` pads them to the widths it plans (``width_plan``) and aligns one
pair per device per call. The baseline runs the same optimiser (same starts, per-start BFGS,
a pair stops as soon as its best score settles) pair by pair, each at its own size, on
one device with no padding (one compilation per size, done before timing); its scores
equal the batched path's, so the comparison is at equal mean score by construction.

Usage: python bench/align_throughput.py [--pairs 64] [--repeats 3]
Writes bench/results/align_throughput.json and .md. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import sys

from common import REPO, cell, machine, spread, target, timed, write_results

sys.path.insert(0, str(REPO / "workflow"))
from cmcflow.jaxenv import configure_jax  # noqa: E402

configure_jax(devices=4, precision="float64", compilation_cache_dir=None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cmcflow.models.structure import read_structure  # noqa: E402
from cmcflow.overlay import MIRROR, OverlaySettings, align_overlay, overlay_batch, quaternion_matrix, spread_rotations  # noqa: E402

SETTINGS = OverlaySettings(
    iterations=100, axis_orders="matched", spread_starts=8, allow_reflection=True, use_correspondence=False
)
SIZES = (20, 30, 40, 50, 60)
TARGET = 2.0  # issue 6: shard_map >= 2x the per-pair loop


def make_pairs(count: int, seed: int = 0):
    """Fragments of ubiquitin (``SIZES`` atoms) and moved, noisy copies; padded to 60 with masks."""
    rng = np.random.default_rng(seed)
    atoms = read_structure()
    width = 60
    ref, fit = np.zeros((count, width, 3)), np.zeros((count, width, 3))
    mask = np.zeros((count, width), dtype=bool)
    for b in range(count):
        size = int(rng.choice(SIZES))
        start = int(rng.integers(0, len(atoms) - size + 1))
        fragment = atoms[start : start + size]
        q = rng.normal(size=4)
        linear = np.asarray(quaternion_matrix(q / np.linalg.norm(q)))
        if b % 4 == 3:
            linear = linear @ MIRROR
        moved = (fragment + rng.normal(scale=0.3, size=fragment.shape)) @ linear.T + rng.normal(scale=5, size=3)
        ref[b, :size], fit[b, :size], mask[b, :size] = fragment, moved, True
    return ref, fit, mask


def cores_busy(seconds: list[float], cpu_seconds: list[float]) -> float:
    """Median over repeats of CPU seconds per wall second: how many cores a path keeps busy."""
    return float(np.median(np.asarray(cpu_seconds) / np.asarray(seconds)))


def run_loop(ref, fit, mask, function):
    """Every pair on its own, at its own size (no padding), through ``function``."""
    scores = []
    for b in range(len(ref)):
        size = int(mask[b].sum())
        weights = jnp.ones((1, size))
        _, _, score = function(jnp.asarray(ref[b : b + 1, :size]), jnp.asarray(fit[b : b + 1, :size]), weights, weights)
        scores.append(float(score[0]))
    return np.asarray(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ref, fit, mask = make_pairs(args.pairs)
    rows = []
    for devices in (1, 2, 4):
        align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=devices)  # compile
        seconds, cpu, result = timed(
            lambda: align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=devices), args.repeats
        )
        rows.append(
            {
                "path": f"shard_map, {devices} device(s)",
                "seconds": spread(seconds),
                "cores_busy": cores_busy(seconds, cpu),
                "mean_score": float(result.scores.mean()),
            }
        )
        print(rows[-1], flush=True)

    starts = jnp.asarray(spread_rotations(SETTINGS.spread_starts))
    loop = jax.jit(functools.partial(overlay_batch, spread=starts, settings=SETTINGS))
    run_loop(ref, fit, mask, loop)  # compile every size
    print("per-pair loop compiled", flush=True)
    seconds, cpu, scores = timed(lambda: run_loop(ref, fit, mask, loop), args.repeats)
    rows.append(
        {
            "path": "per-pair loop, early stopping",
            "seconds": spread(seconds),
            "cores_busy": cores_busy(seconds, cpu),
            "mean_score": float(scores.mean()),
        }
    )
    baseline = rows[-1]
    for row in rows:
        row["pairs_per_second"] = args.pairs / row["seconds"]["median"]
    for row in rows:
        row["speedup_vs_loop"] = row["pairs_per_second"] / baseline["pairs_per_second"]
    best = max(rows[:-1], key=lambda row: row["speedup_vs_loop"])
    met = best["speedup_vs_loop"] >= TARGET and best["mean_score"] >= baseline["mean_score"] - 1e-6
    cores = machine()["cores"]
    bound = (
        f"the per-pair loop already keeps {baseline['cores_busy']:.2f} of the {cores} cores busy (XLA's own "
        f"threads), and the "
        f"devices are virtual CPU devices on those same cores, so they add no compute: {TARGET}x the loop would need "
        f"{TARGET * baseline['cores_busy']:.1f} cores of the same work. The batched path also does more work, "
        f"not less: "
        "a batch runs until its slowest pair settles."
    )
    targets = [
        target(
            "P3",
            "align pairs/s, best shard_map row / per-pair loop (equal or better mean score)",
            f"{best['speedup_vs_loop']:.2f}x ({best['path']})",
            f">= {TARGET}x",
            met,
            bound,
        )
    ]
    table = [
        f"# P3 align throughput ({args.pairs} pairs of 20–60 atoms, {SETTINGS.starts_per_pair} starts/pair, "
        f"median (min–max) of {args.repeats})",
        "",
        "| path | pairs/s | seconds | cores busy (CPU s / wall s) | mean score | × loop |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['path']} | {r['pairs_per_second']:.1f} | {cell(r['seconds'])} | {r['cores_busy']:.2f} | "
            f"{r['mean_score']:.4f} | "
            f"{r['speedup_vs_loop']:.2f} |"
            for r in rows
        ],
        *([] if met else ["", f"Bound: {bound}"]),
    ]
    record = {
        "benchmark": "P3 align throughput",
        "pairs": args.pairs,
        "repeats": args.repeats,
        "settings": SETTINGS.__dict__ | {"starts_per_pair": SETTINGS.starts_per_pair},
        "rows": rows,
        "targets": targets,
    }
    write_results("align_throughput", record, table)


if __name__ == "__main__":
    main()
