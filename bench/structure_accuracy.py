"""Issue 3 target — CMC on a rigid model against full-data NUTS and the crystal structure.

Reads finished ``structure`` analyses that also ran the ``fulldata`` target, e.g. the
demo's ubiquitin (76 Cα atoms, 34,000 distances, K = 8):

    snakemake --profile profiles/local all fulldata
    python bench/structure_accuracy.py results/ubiquitin_demo [more analysis dirs …]

For each analysis the shards' aligned draws are combined twice, with the combined structure
located by coordinate consensus and by distance consensus (``combine.point_location``),
exactly as the combine stage does; the analysis' own ``combined/posterior.nc`` is checked
to equal the variant its config chose. Full-data draws are put into one frame the same way
as shard draws (generalised Procrustes, reflection allowed). Reported: RMSD of the combined
and full-data posterior means to the true structure (after Kabsch superposition), and the
per-atom posterior sd (sqrt of the per-coordinate variance, averaged over x, y, z) of each,
with their ratios. Targets: RMSD ratio ≤ 1.15, mean per-atom sd ratio within 0.9–1.1.
Writes bench/results/structure_accuracy.json and .md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cmcflow.jaxenv import configure_jax

configure_jax(devices=4, precision="float64", compilation_cache_dir=None)

import arviz as az  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from cmcflow.align import align_to_reference, generalised_procrustes  # noqa: E402
from cmcflow.combine import combine_draws  # noqa: E402
from cmcflow.featurize import load_features  # noqa: E402
from cmcflow.locate import distance_moments, locate_by_distances  # noqa: E402
from cmcflow.models import get_model  # noqa: E402
from cmcflow.superposition import align_kabsch, rmsd  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SITE = "coords"


def per_atom_sd(draws: np.ndarray) -> np.ndarray:
    """``(S, N, 3)`` aligned draws -> ``(N,)`` sqrt(mean over x, y, z of the variance)."""
    return np.sqrt(draws.var(axis=0).mean(axis=-1))


def combined_variants(analysis_dir: Path) -> dict[str, np.ndarray]:
    """``{location: (S, N, 3)}`` combined draws of the analysis' aligned shards."""
    spec = get_model("structure")
    paths = sorted((analysis_dir / "aligned").glob("shard-*.nc"))
    subposteriors = []
    for path in paths:
        group = az.from_netcdf(path).unconstrained_posterior
        subposteriors.append({name: group[name].values.reshape(-1, *group[name].shape[2:]) for name in group.data_vars})
    coordinates = combine_draws(subposteriors, "consensus", jax.random.PRNGKey(0), point_site=SITE)[SITE]
    features = sorted((analysis_dir / "features").glob("shard-*.npz"))
    pairs = np.unique(np.concatenate([spec.observed_pairs(load_features(path)) for path in features]), axis=0)
    distances, _ = locate_by_distances(
        coordinates, [distance_moments(sub[SITE], pairs) for sub in subposteriors], pairs
    )
    return {"coordinates": coordinates, "distances": distances}


def measure(analysis_dir: Path) -> list[dict]:
    truth = np.asarray(json.loads((analysis_dir / "input/truth.json").read_text())["coords"])
    manifest = json.loads((analysis_dir / "shards/manifest.json").read_text())
    split = f"stratified by {', '.join(manifest['stratified_by'])}" if manifest.get("stratified_by") else "random"
    full = az.from_netcdf(analysis_dir / "fulldata/posterior.nc").posterior[SITE].values.reshape(-1, *truth.shape)
    full_reference, _ = generalised_procrustes(full, allow_reflection=True)
    full = align_to_reference(full, full_reference, "kabsch", allow_reflection=True, overlay=None).points
    ones = np.ones((1, len(truth)), dtype=bool)

    def error(mean):
        return float(rmsd(align_kabsch(truth[None], mean[None], ones, allow_reflection=True).points[0], truth))

    workflow = az.from_netcdf(analysis_dir / "combined/posterior.nc").posterior
    chosen = "distances" if workflow.attrs.get("location", "").startswith("distance") else "coordinates"
    records = []
    for location, combined in combined_variants(analysis_dir).items():
        if location == chosen:
            np.testing.assert_allclose(combined, workflow[SITE].values.reshape(combined.shape), atol=1e-8)
        record = {
            "analysis": str(analysis_dir),
            "noise_scale": json.loads((analysis_dir / "input/truth.json").read_text())["noise_scale"],
            "num_shards": manifest["num_shards"],
            "split": split,
            "location": location,
            "combined_mean_rmsd": error(combined.mean(axis=0)),
            "fulldata_mean_rmsd": error(full.mean(axis=0)),
            "combined_sd_per_atom": float(per_atom_sd(combined).mean()),
            "fulldata_sd_per_atom": float(per_atom_sd(full).mean()),
            "sd_ratio_per_atom_percentiles_5_50_95": [
                float(x) for x in np.percentile(per_atom_sd(combined) / per_atom_sd(full), [5, 50, 95])
            ],
        }
        record["rmsd_ratio"] = record["combined_mean_rmsd"] / record["fulldata_mean_rmsd"]
        record["sd_ratio"] = record["combined_sd_per_atom"] / record["fulldata_sd_per_atom"]
        records.append(record)
    return records


def main(analysis_dirs: list[Path]) -> None:
    records = [record for analysis_dir in analysis_dirs for record in measure(analysis_dir)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "structure_accuracy.json").write_text(json.dumps(records, indent=2) + "\n")
    lines = [
        "# Structure accuracy: CMC against full-data NUTS (ubiquitin, 76 Cα atoms, 34,000 distances)",
        "",
        "Per-point 3×3 covariance blocks; targets: RMSD ratio ≤ 1.15, sd ratio 0.9–1.1.",
        "",
        "| noise scale (Å) | K | split | location | CMC mean RMSD (Å) | full-data RMSD (Å) | ratio | CMC sd (Å) "
        "| full sd (Å) | sd ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r['noise_scale']} | {r['num_shards']} | {r['split']} | {r['location']} | "
            f"{r['combined_mean_rmsd']:.3f} "
            f"| {r['fulldata_mean_rmsd']:.3f} | {r['rmsd_ratio']:.3f} | {r['combined_sd_per_atom']:.3f} "
            f"| {r['fulldata_sd_per_atom']:.3f} | {r['sd_ratio']:.3f} |"
        )
    (RESULTS / "structure_accuracy.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
