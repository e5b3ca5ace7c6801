"""13d — alignment of real molecules without the cold-compile tax: 256 pairs of approved
drugs, end to end in a fresh process, with an empty and with a warm persistent
compilation cache.

Molecules: the approved drugs of ``DRUGS`` (SMILES), one conformer each by RDKit's ETKDG
(v3, fixed seed) then MMFF, heavy atoms only. Pairs: 256 of two different molecules,
drawn with a fixed seed, no reflection, 4 devices, Gaussian-overlay alignment
(``align_overlay``) with the align stage's default starts. Each measurement is a fresh
Python process (``--child``) that imports cmcflow and JAX, aligns the 256 pairs and
reports its wall seconds from before the imports (then aligns them again, to time the
compiled programs alone): with an empty compilation cache
directory (cold) and then with the one that run filled (warm); the same for the start set
of round 1 (``PREVIOUS_STARTS``), so that the two compare on one host. The score to hold is
the mean Tanimoto of a 50-start run (``REFERENCE_STARTS``, in the start-set comparison).

The start sets (``START_SETS``: principal-axes orders and spread rotations) are compared in
one process per pair set (the bench's and a second one, drawn with another seed): each
set's mean score and its compiled seconds (median of 3 calls after the first); the
default is the cheapest set within 0.001 of the 50-start score on both.

Usage: python bench/align_drugs.py [--repeats 3]
Needs RDKit (the ``bench`` extra). Writes bench/results/align_drugs.json and .md. Run on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()

#: Approved drugs (name: SMILES), 9 to 42 heavy atoms.
DRUGS = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "ibuprofen": "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
    "paracetamol": "CC(=O)Nc1ccc(O)cc1",
    "caffeine": "Cn1cnc2c1c(=O)n(C)c(=O)n2C",
    "naproxen": "COc1ccc2cc(ccc2c1)C(C)C(=O)O",
    "diclofenac": "OC(=O)Cc1ccccc1Nc1c(Cl)cccc1Cl",
    "metformin": "CN(C)C(=N)NC(=N)N",
    "warfarin": "CC(=O)CC(c1ccccc1)c1c(O)c2ccccc2oc1=O",
    "atorvastatin": "CC(C)c1c(C(=O)Nc2ccccc2)c(-c2ccccc2)c(-c2ccc(F)cc2)n1CCC(O)CC(O)CC(=O)O",
    "imatinib": "Cc1ccc(NC(=O)c2ccc(CN3CCN(C)CC3)cc2)cc1Nc1nccc(-c2cccnc2)n1",
    "sildenafil": "CCCc1nn(C)c2c(=O)[nH]c(-c3cc(S(=O)(=O)N4CCN(C)CC4)ccc3OCC)nc12",
    "omeprazole": "COc1ccc2[nH]c(S(=O)Cc3ncc(C)c(OC)c3C)nc2c1",
    "diazepam": "CN1C(=O)CN=C(c2ccccc2)c2cc(Cl)ccc21",
    "fluoxetine": "CNCCC(Oc1ccc(cc1)C(F)(F)F)c1ccccc1",
    "ciprofloxacin": "OC(=O)c1cn(C2CC2)c2cc(N3CCNCC3)c(F)cc2c1=O",
    "propranolol": "CC(C)NCC(O)COc1cccc2ccccc12",
    "atenolol": "CC(C)NCC(O)COc1ccc(CC(N)=O)cc1",
    "metoprolol": "COCCc1ccc(OCC(O)CNC(C)C)cc1",
    "furosemide": "NS(=O)(=O)c1cc(C(=O)O)c(NCc2ccco2)cc1Cl",
    "hydrochlorothiazide": "NS(=O)(=O)c1cc2c(cc1Cl)NCNS2(=O)=O",
    "celecoxib": "Cc1ccc(-c2cc(C(F)(F)F)nn2-c2ccc(S(N)(=O)=O)cc2)cc1",
    "indomethacin": "COc1ccc2c(c1)c(CC(=O)O)c(C)n2C(=O)c1ccc(Cl)cc1",
    "nifedipine": "COC(=O)C1=C(C)NC(C)=C(C(=O)OC)C1c1ccccc1[N+](=O)[O-]",
    "tamoxifen": "CCC(=C(c1ccccc1)c1ccc(OCCN(C)C)cc1)c1ccccc1",
    "lidocaine": "CCN(CC)CC(=O)Nc1c(C)cccc1C",
    "salbutamol": "CC(C)(C)NCC(O)c1ccc(O)c(CO)c1",
    "cetirizine": "OC(=O)COCCN1CCN(CC1)C(c1ccccc1)c1ccc(Cl)cc1",
    "loratadine": "CCOC(=O)N1CCC(=C2c3ccc(Cl)cc3CCc3cccnc23)CC1",
    "amlodipine": "CCOC(=O)C1=C(COCCN)NC(C)=C(C(=O)OC)C1c1ccccc1Cl",
    "clopidogrel": "COC(=O)C(c1ccccc1Cl)N1CCc2sccc2C1",
    "losartan": "CCCCc1nc(Cl)c(CO)n1Cc1ccc(-c2ccccc2-c2nnn[nH]2)cc1",
    "verapamil": "COc1ccc(CCN(C)CCCC(C#N)(C(C)C)c2ccc(OC)c(OC)c2)cc1OC",
    "morphine": "CN1CC[C@]23c4c5ccc(O)c4O[C@H]2[C@@H](O)C=C[C@H]3[C@H]1C5",
    "ketoprofen": "CC(C(=O)O)c1cccc(c1)C(=O)c1ccccc1",
    "sertraline": "CN[C@H]1CC[C@@H](c2ccc(Cl)c(Cl)c2)c2ccccc21",
    "simvastatin": "CCC(C)(C)C(=O)O[C@H]1C[C@@H](C)C=C2C=C[C@H](C)[C@H](CC[C@@H]3C[C@@H](O)CC(=O)O3)[C@@H]21",
}
PAIRS = 256
COLD_TARGET, WARM_TARGET = 10.0, 4.0  # seconds, issue 13 (d)
#: Start sets (principal-axes orders, spread rotations): the 50-start reference (1 + 4 + 45)
#: and round 1's default (1 + 4 + 8 = 13 starts).
REFERENCE_STARTS, PREVIOUS_STARTS = ("matched", 45), ("matched", 8)
START_SETS = (PREVIOUS_STARTS, ("cyclic", 0), ("cyclic", 4), ("all", 0), REFERENCE_STARTS)
PAIR_SEEDS = (0, 1)  # the bench's pairs, and a second draw to check the start sets on
SCORE_TOLERANCE = 1e-3


def conformers() -> dict:
    """Name -> heavy-atom coordinates (atoms, 3) in Å of one ETKDG + MMFF conformer per drug."""
    import numpy as np
    from rdkit import Chem
    from rdkit.Chem import AllChem

    coordinates = {}
    for name, smiles in DRUGS.items():
        molecule = Chem.AddHs(Chem.MolFromSmiles(smiles))
        parameters = AllChem.ETKDGv3()
        parameters.randomSeed = 7
        if AllChem.EmbedMolecule(molecule, parameters) != 0:
            raise RuntimeError(f"RDKit could not embed {name}")
        AllChem.MMFFOptimizeMolecule(molecule)
        molecule = Chem.RemoveHs(molecule)
        coordinates[name] = np.asarray(molecule.GetConformer().GetPositions())
    return coordinates


def make_pairs(molecules: dict, count: int, seed: int = 0):
    """``count`` pairs of two different molecules, padded to the largest with masks."""
    import numpy as np

    names = sorted(molecules)
    width = max(len(points) for points in molecules.values())
    rng = np.random.default_rng(seed)
    ref, fit = np.zeros((count, width, 3)), np.zeros((count, width, 3))
    ref_mask, fit_mask = np.zeros((count, width), bool), np.zeros((count, width), bool)
    for b in range(count):
        i, j = rng.choice(len(names), size=2, replace=False)
        a, c = molecules[names[i]], molecules[names[j]]
        ref[b, : len(a)], ref_mask[b, : len(a)] = a, True
        fit[b, : len(c)], fit_mask[b, : len(c)] = c, True
    return {"ref": ref, "fit": fit, "ref_mask": ref_mask, "fit_mask": fit_mask}


def overlay_settings(starts: tuple[str, int] | None):
    """The bench's overlay settings: the align stage's defaults, or the start set ``starts``
    (axis orders, spread rotations)."""
    from cmcflow.config import schema_default
    from cmcflow.overlay import OverlaySettings

    orders, spread_starts = starts or (schema_default("align", "axis_orders"), schema_default("align", "spread_starts"))
    return OverlaySettings(
        iterations=schema_default("align", "iterations"),
        axis_orders=orders,
        spread_starts=spread_starts,
        allow_reflection=False,
        use_correspondence=False,
    )


def child(pairs_path: str, cache: str | None, starts: tuple[str, int] | None) -> None:
    """In a fresh process: import, align every pair, print the facts as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))
    from cmcflow.jaxenv import COMPILE_CLOCK, configure_jax

    configure_jax(devices=4, precision="float64", compilation_cache_dir=cache)
    import numpy as np

    from cmcflow.overlay import align_overlay

    settings = overlay_settings(starts)
    imported = time.perf_counter()
    with np.load(pairs_path) as data:
        pairs = {name: data[name] for name in data.files}
    result = align_overlay(pairs["ref"], pairs["fit"], pairs["ref_mask"], pairs["fit_mask"], settings=settings)
    done = time.perf_counter()
    align_overlay(pairs["ref"], pairs["fit"], pairs["ref_mask"], pairs["fit_mask"], settings=settings)
    facts = {
        "seconds": done - STARTED,
        "import_seconds": imported - STARTED,
        "align_seconds": done - imported,
        "compiled_align_seconds": time.perf_counter() - done,
        "compile_seconds": COMPILE_CLOCK.seconds,
        "persistent_cache_hits": COMPILE_CLOCK.persistent_cache_hits,
        "starts_per_pair": settings.starts_per_pair,
        "mean_score": float(np.mean(result.scores)),
    }
    print(json.dumps(facts))


def compare_child(pairs_path: str) -> None:
    """In a fresh process: every start set of ``START_SETS`` on the pairs, its mean score
    and compiled seconds (median of 3 calls after a first that compiles), as JSON."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workflow"))
    from cmcflow.jaxenv import configure_jax

    configure_jax(devices=4, precision="float64", compilation_cache_dir=None)
    import statistics

    import numpy as np

    from cmcflow.overlay import align_overlay

    with np.load(pairs_path) as data:
        pairs = [data[name] for name in ("ref", "fit", "ref_mask", "fit_mask")]
    rows = []
    for starts in START_SETS:
        settings = overlay_settings(starts)
        result = align_overlay(*pairs, settings=settings)
        seconds = []
        for _ in range(3):
            started = time.perf_counter()
            align_overlay(*pairs, settings=settings)
            seconds.append(time.perf_counter() - started)
        rows.append(
            {
                "axis_orders": starts[0],
                "spread_starts": starts[1],
                "starts_per_pair": settings.starts_per_pair,
                "compiled_seconds": statistics.median(seconds),
                "mean_score": float(np.mean(result.scores)),
            }
        )
    print(json.dumps(rows))


def fresh_process(pairs_path: Path, cache: Path | None, starts: tuple[str, int] | None = None) -> dict:
    command = [sys.executable, __file__, "--child", str(pairs_path), "--cache", str(cache) if cache else "none"]
    if starts is not None:
        command += ["--starts", f"{starts[0]}:{starts[1]}"]
    started = time.perf_counter()
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    facts = json.loads(output.strip().splitlines()[-1])
    return facts | {"process_seconds": time.perf_counter() - started}


def compare_start_sets(pairs_path: Path) -> list[dict]:
    command = [sys.executable, __file__, "--compare", str(pairs_path)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def cheapest_holding_score(start_sets: dict) -> tuple[str, int]:
    """The start set of fewest starts whose mean score is within ``SCORE_TOLERANCE`` of the
    50-start reference's on every pair set (``{seed: rows of compare_child}``)."""
    references = [rows_of_seed[START_SETS.index(REFERENCE_STARTS)] for rows_of_seed in start_sets.values()]
    holding = []
    for index, starts in enumerate(START_SETS):
        rows = [rows_of_seed[index] for rows_of_seed in start_sets.values()]
        if all(row["mean_score"] >= ref["mean_score"] - SCORE_TOLERANCE for row, ref in zip(rows, references)):
            holding.append((rows[0]["starts_per_pair"], starts))
    return min(holding)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child")
    parser.add_argument("--cache")
    parser.add_argument("--starts", help="axis orders and spread starts, e.g. matched:8 (default: the schema's)")
    parser.add_argument("--compare", help="(internal) compare the start sets on these pairs")
    args = parser.parse_args()
    if args.child:
        starts = None if args.starts is None else (args.starts.split(":")[0], int(args.starts.split(":")[1]))
        child(args.child, None if args.cache == "none" else args.cache, starts)
        return
    if args.compare:
        compare_child(args.compare)
        return

    import numpy as np
    from common import cell, machine, schema_default, spread, target, write_results
    from roofline import copy_bandwidth

    bandwidth = copy_bandwidth(1)
    molecules = conformers()
    sizes = sorted(len(points) for points in molecules.values())
    kinds = {"": None, ", round 1 starts": PREVIOUS_STARTS}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {seed: Path(scratch) / f"pairs-{seed}.npz" for seed in PAIR_SEEDS}
        for seed, path in paths.items():
            np.savez(path, **make_pairs(molecules, PAIRS, seed))
        pairs_path = paths[PAIR_SEEDS[0]]
        runs = {f"{cache}{label}": [] for label in kinds for cache in ("cold", "warm")}
        for repeat in range(args.repeats):
            for index, (label, starts) in enumerate(kinds.items()):
                cache = Path(scratch) / f"cache-{repeat}-{index}"
                runs[f"cold{label}"].append(fresh_process(pairs_path, cache, starts))
                runs[f"warm{label}"].append(fresh_process(pairs_path, cache, starts))
                print(repeat, label, runs[f"cold{label}"][-1], runs[f"warm{label}"][-1], flush=True)
        start_sets = {seed: compare_start_sets(path) for seed, path in paths.items()}
        print("start sets", start_sets, flush=True)

    summary = {
        kind: {
            key: spread([run[key] for run in kind_runs])
            for key in (
                "seconds",
                "import_seconds",
                "align_seconds",
                "compile_seconds",
                "compiled_align_seconds",
                "process_seconds",
            )
        }
        | {"mean_score": kind_runs[0]["mean_score"], "starts_per_pair": kind_runs[0]["starts_per_pair"]}
        for kind, kind_runs in runs.items()
    }
    reference = start_sets[PAIR_SEEDS[0]][START_SETS.index(REFERENCE_STARTS)]  # on the timed pairs
    score_held = summary["cold"]["mean_score"] >= reference["mean_score"] - SCORE_TOLERANCE
    cold, warm = summary["cold"]["seconds"]["median"], summary["warm"]["seconds"]["median"]
    previous = summary["warm, round 1 starts"]

    def first_call_rest(kind: str, *, less_compiling: bool) -> float:
        """Median seconds of the first call beyond aligning with compiled programs (and
        beyond compiling, with ``less_compiling``)."""
        medians = {key: value["median"] for key, value in summary[kind].items() if isinstance(value, dict)}
        rest = medians["align_seconds"] - medians["compiled_align_seconds"]
        return rest - medians["compile_seconds"] if less_compiling else rest

    default = (schema_default("align", "axis_orders"), schema_default("align", "spread_starts"))
    chosen = cheapest_holding_score(start_sets)
    starts = summary["cold"]["starts_per_pair"]
    targets = [
        target(
            "13d",
            f"{PAIRS} drug pairs end to end in a fresh process, empty compilation cache",
            f"{cold:.1f} s",
            f"<= {COLD_TARGET:.0f} s",
            cold <= COLD_TARGET,
            f"compiling {summary['cold']['compile_seconds']['median']:.1f} s of it; aligning once compiled "
            f"{summary['cold']['compiled_align_seconds']['median']:.1f} s ({starts} BFGS starts per pair); the rest "
            f"of the first call (tracing the program once and storing it, dispatch) "
            f"{first_call_rest('cold', less_compiling=True):.1f} s; "
            f"round 1's 13 starts took {summary['cold, round 1 starts']['seconds']['median']:.1f} s on this host",
        ),
        target(
            "13d",
            f"{PAIRS} drug pairs end to end in a fresh process, warm compilation cache",
            f"{warm:.1f} s",
            f"<= {WARM_TARGET:.0f} s",
            warm <= WARM_TARGET,
            f"imports {summary['warm']['import_seconds']['median']:.1f} s; aligning with compiled programs "
            f"{summary['warm']['compiled_align_seconds']['median']:.1f} s ({starts} BFGS starts per pair, 4 "
            f"virtual devices on {machine()['cores']} cores: the work grows with the starts, "
            f"{previous['compiled_align_seconds']['median']:.1f} s for round 1's 13, whose score is lower); the first "
            f"call {first_call_rest('warm', less_compiling=False):.1f} s longer than one with compiled programs (it "
            f"loads the stored program and its compiled code: {summary['warm']['compile_seconds']['median']:.1f} s "
            "by JAX's compile clock)"
            f"; this host copies {bandwidth / 1e9:.0f} GB/s on one thread",
        ),
        target(
            "13d",
            f"mean Tanimoto, the default {starts} starts vs 50 starts",
            f"{summary['cold']['mean_score']:.4f} vs {reference['mean_score']:.4f}",
            f">= the 50-start score (within {SCORE_TOLERANCE})",
            score_held,
            f"the score is the starts': 50 starts cost {reference['compiled_seconds']:.1f} s once compiled "
            f"against {summary['cold']['compiled_align_seconds']['median']:.1f} s for {starts}",
        ),
        target(
            "13d",
            "default start set: the fewest starts within 0.001 of the 50-start score on both pair sets",
            f"{default[0]} + {default[1]} spread"
            + ("" if default == chosen else f" (measured: {chosen[0]} + {chosen[1]})"),
            "the default",
            default == chosen,
        ),
    ]
    seeds = list(start_sets)
    table = [
        f"# 13d align {PAIRS} pairs of {len(molecules)} approved drugs ({sizes[0]}–{sizes[-1]} heavy atoms), "
        f"fresh process, median (min–max) of {args.repeats}",
        "",
        f"This host copies {bandwidth / 1e9:.0f} GB/s on one thread (bench/roofline.py's STREAM-style copy): compare "
        "seconds across hosts with care; the rows below share one host.",
        "",
        "| start set, cache | starts per pair | end to end s | imports s | align s | of which compiling s "
        "| again, compiled s | process s | mean score |",
        "|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {'default' if ',' not in kind else 'round 1 (matched + 8)'}, {kind.split(',')[0]} | "
            f"{s['starts_per_pair']} | {cell(s['seconds'])} | {cell(s['import_seconds'])} | "
            f"{cell(s['align_seconds'])} | {cell(s['compile_seconds'])} | {cell(s['compiled_align_seconds'])} | "
            f"{cell(s['process_seconds'])} | {s['mean_score']:.4f} |"
            for kind, s in summary.items()
        ],
        "",
        "## Start sets: principal-axes orders and spread rotations (one process per pair set, compiled "
        "seconds: median of 3 calls)",
        "",
        "| axis orders | spread | starts per pair | "
        + " | ".join(f"pairs seed {seed}: score | compiled s" for seed in seeds)
        + " |",
        "|---|---|---|" + "---|---|" * len(seeds),
        *[
            f"| {row['axis_orders']} | {row['spread_starts']} | {row['starts_per_pair']} | "
            + " | ".join(
                f"{start_sets[seed][index]['mean_score']:.4f} | {start_sets[seed][index]['compiled_seconds']:.2f}"
                for seed in seeds
            )
            + " |"
            for index, row in enumerate(start_sets[seeds[0]])
        ],
        "",
        f"Fewest starts within {SCORE_TOLERANCE} of the 50-start score on both: {chosen[0]} + {chosen[1]} spread "
        f"(the schema's default: {default[0]} + {default[1]}).",
    ]
    record = {
        "benchmark": "13d align drugs",
        "pairs": PAIRS,
        "molecules": {name: len(points) for name, points in molecules.items()},
        "copy_bandwidth_bytes_per_s": bandwidth,
        "runs": runs,
        "summary": summary,
        "start_sets": {str(seed): rows for seed, rows in start_sets.items()},
        "targets": targets,
    }
    write_results("align_drugs", record, table)


if __name__ == "__main__":
    main()
