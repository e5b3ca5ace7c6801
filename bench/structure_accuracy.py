"""Issue 3 target — CMC on a rigid model against full-data NUTS and the crystal structure.

Reads a finished ``structure`` analysis that also ran the ``fulldata`` target, e.g. the
demo's ubiquitin (76 Cα atoms, 34,000 distances, K = 8):

    snakemake --profile profiles/local all fulldata
    python bench/structure_accuracy.py results/ubiquitin_demo

Full-data draws are put into one frame the same way as shard draws (generalised
Procrustes, reflection allowed). Reported: RMSD of the combined and full-data posterior
means to the true structure (after Kabsch superposition), and the per-atom posterior sd
(sqrt of the per-coordinate variance, averaged over x, y, z) of each, with their ratio.
Targets: RMSD ratio ≤ 1.15, mean per-atom sd ratio within 0.9–1.1.
Writes bench/results/structure_accuracy.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cmcflow.jaxenv import configure_jax

configure_jax(devices=4, enable_x64=True, compilation_cache_dir=None)

import arviz as az  # noqa: E402
import numpy as np  # noqa: E402

from cmcflow.align import align_kabsch  # noqa: E402
from cmcflow.align_draws import align_to_reference, generalised_procrustes, rmsd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def per_atom_sd(draws: np.ndarray) -> np.ndarray:
    """``(S, N, 3)`` aligned draws -> ``(N,)`` sqrt(mean over x, y, z of the variance)."""
    return np.sqrt(draws.var(axis=0).mean(axis=-1))


def main(analysis_dir: Path) -> None:
    truth = np.asarray(json.loads((analysis_dir / "input/truth.json").read_text())["coords"])
    combined = az.from_netcdf(analysis_dir / "combined/posterior.nc").posterior["coords"].values
    combined = combined.reshape(-1, *truth.shape)
    full = az.from_netcdf(analysis_dir / "fulldata/posterior.nc").posterior["coords"].values.reshape(-1, *truth.shape)
    full_reference, _ = generalised_procrustes(full, allow_reflection=True)
    full = align_to_reference(full, full_reference, "kabsch", allow_reflection=True, overlay=None).points
    ones = np.ones((1, len(truth)), dtype=bool)

    def error(mean):
        return float(rmsd(align_kabsch(truth[None], mean[None], ones, allow_reflection=True).points[0], truth))

    record = {
        "analysis": str(analysis_dir),
        "combined_mean_rmsd": error(combined.mean(axis=0)),
        "fulldata_mean_rmsd": error(full.mean(axis=0)),
        "combined_sd_per_atom": float(per_atom_sd(combined).mean()),
        "fulldata_sd_per_atom": float(per_atom_sd(full).mean()),
        "sd_ratio_per_atom_range": [float(x) for x in np.percentile(per_atom_sd(combined) / per_atom_sd(full), [5, 50, 95])],
        "shards": json.loads((analysis_dir / "combined/shards.json").read_text()),
    }
    record["rmsd_ratio"] = record["combined_mean_rmsd"] / record["fulldata_mean_rmsd"]
    record["sd_ratio"] = record["combined_sd_per_atom"] / record["fulldata_sd_per_atom"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structure_accuracy.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Structure accuracy: {analysis_dir.name} ({record['shards']['covariance']})", "",
        "| | mean RMSD to truth (Å) | per-atom sd (Å) |", "|---|---|---|",
        f"| CMC ({len(record['shards']['used'])} shards) | {record['combined_mean_rmsd']:.3f} | {record['combined_sd_per_atom']:.3f} |",
        f"| full-data NUTS | {record['fulldata_mean_rmsd']:.3f} | {record['fulldata_sd_per_atom']:.3f} |",
        f"| ratio (target ≤ 1.15; 0.9–1.1) | {record['rmsd_ratio']:.3f} | {record['sd_ratio']:.3f} |", "",
        "Per-atom sd ratio, 5/50/95th percentile over atoms: "
        + ", ".join(f"{x:.2f}" for x in record["sd_ratio_per_atom_range"]),
    ]
    (RESULTS / "structure_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
