"""P3 — alignment throughput: the batched shard_map overlay over 1, 2 and 4 devices against
a straightforward per-pair loop with early stopping, at equal or better mean score.

Molecules: contiguous fragments of 20, 30, 40, 50 or 60 Cα atoms of ubiquitin (real
protein geometry; five sizes, so the per-size baseline compiles five programs),
each paired with a randomly rotated, translated, noisy (0.3 Å) copy of itself; one in
four copies is mirrored (reflection allowed). The batched path pads every pair to 60
points with masks. The baseline runs the same optimiser (same starts, per-start L-BFGS,
a pair stops as soon as its best score settles) pair by pair, each at its own size, on
one device with no padding (one compilation per size, done before timing); its scores
equal the batched path's, so the comparison is at equal mean score by construction.

Usage: python bench/align_throughput.py [--pairs 256] [--repeats 3]
Writes bench/results/align_throughput.json and .md. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from cmcflow.jaxenv import configure_jax

configure_jax(devices=4, enable_x64=True, compilation_cache_dir=None)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cmcflow.align import MIRROR, OverlaySettings, align_overlay, overlay_batch, quaternion_matrix, spread_rotations  # noqa: E402
from cmcflow.models.structure import read_structure  # noqa: E402

SETTINGS = OverlaySettings(iterations=100, spread_starts=8, allow_reflection=True, use_correspondence=False)
SIZES = (20, 30, 40, 50, 60)
RESULTS = Path(__file__).resolve().parent / "results"


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


def run_loop(ref, fit, mask, function):
    """Every pair on its own, at its own size (no padding), through ``function``."""
    scores = []
    for b in range(len(ref)):
        size = int(mask[b].sum())
        weights = jnp.ones((1, size))
        _, _, score = function(jnp.asarray(ref[b : b + 1, :size]), jnp.asarray(fit[b : b + 1, :size]), weights, weights)
        scores.append(float(score[0]))
    return np.asarray(scores)


def timed(call, repeats):
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ref, fit, mask = make_pairs(args.pairs)
    rows = []
    for devices in (1, 2, 4):
        align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=devices)  # compile
        seconds, result = timed(lambda: align_overlay(ref, fit, mask, mask, settings=SETTINGS, devices=devices), args.repeats)
        rows.append({"path": f"shard_map, {devices} device(s)", "seconds": seconds, "mean_score": float(result.scores.mean())})
        print(rows[-1], flush=True)

    spread = jnp.asarray(spread_rotations(SETTINGS.spread_starts))
    loop = jax.jit(functools.partial(overlay_batch, spread=spread, settings=SETTINGS))
    run_loop(ref, fit, mask, loop)  # compile every size
    print("per-pair loop compiled", flush=True)
    seconds, scores = timed(lambda: run_loop(ref, fit, mask, loop), args.repeats)
    rows.append({"path": "per-pair loop, early stopping", "seconds": seconds, "mean_score": float(scores.mean())})
    for row in rows:
        row["median_seconds"] = statistics.median(row["seconds"])
        row["pairs_per_second"] = args.pairs / row["median_seconds"]
        row["spread_seconds"] = max(row["seconds"]) - min(row["seconds"])
    baseline = rows[-1]["pairs_per_second"]
    for row in rows:
        row["speedup_vs_loop"] = row["pairs_per_second"] / baseline
    record = {
        "benchmark": "P3 align throughput",
        "machine": {"cores": os.cpu_count(), "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                    "python": sys.version.split()[0], "platform": platform.platform(), "jax": jax.__version__},
        "pairs": args.pairs, "repeats": args.repeats, "settings": SETTINGS.__dict__ | {"starts_per_pair": SETTINGS.starts_per_pair},
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "align_throughput.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# P3 align throughput ({args.pairs} pairs of 20–60 atoms, {SETTINGS.starts_per_pair} starts/pair, "
        f"{record['machine']['cores']} cores, median of {args.repeats})", "",
        "| path | pairs/s | median s | spread s | mean score | × loop |", "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['path']} | {r['pairs_per_second']:.1f} | {r['median_seconds']:.2f} | {r['spread_seconds']:.2f} | "
        f"{r['mean_score']:.4f} | {r['speedup_vs_loop']:.2f} |" for r in rows
    ]
    (RESULTS / "align_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
