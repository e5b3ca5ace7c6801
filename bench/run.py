"""The benchmark suite (issue 6): run the benchmarks, then gather every target into
``bench/results/summary.md``.

Benchmarks are not tests: each measures what users pay for on this machine, repeats it
(median and min–max of >= 3 runs) and writes ``bench/results/<name>.json`` and ``.md``.
Run them on an otherwise idle machine; they take about 2 hours on 2 cores: P4 about 35
minutes (three repeats of 8 shards and a 5-minute full-data run), plus 19 minutes once for
its accuracy reference (full-data NUTS, 4 x 2,500 draws, kept beside its working
directory), the others about an hour.

    python bench/run.py                 # all of them
    python bench/run.py P1 P2           # some; the summary still lists every result present
    python bench/run.py --summary-only  # rewrite summary.md from the results present

| id | script | measures |
|---|---|---|
| P1 | sample_chains.py | NUTS chains parallel over 4 devices vs sequential vs vectorized |
| P2 | compile_cache.py | a sample job with a cold vs a warm compilation cache |
| P2 | shared_program.py | a sample job after another shard's: the program closed over the data vs taking them |
| P3 | align_throughput.py | batched shard_map alignment vs a per-pair loop |
| P4 | cmc_vs_full.py | CMC (K = 8) vs full-data NUTS: wall time and accuracy |
| I3 | importance_qmc.py | the correction's Monte Carlo error by proposal scheme, on P4's run |
| P5 | dry_run_scale.py, combine_scale.py | dry-run time with many shards; combine time and memory |
| P6 | rerun_jobs.py | jobs executed after a sampling-only config edit |
| I | importance_accuracy.py | importance correction vs full-data NUTS: k-hat, errors, an easy and two hard cases |
| R | real_data.py | three public data sets (K = 8) vs full-data NUTS; needs ``pip install -e '.[bench]'`` |
| S | second_order.py | combine's second-order term vs full-data NUTS on small shards of four model families |
| 13a | precision.py | float64 / float32 / mixed: a P4 shard's sampling time, and the statistical tests in each |
| 13b | roofline.py | the logistic gradient against the memory-bandwidth bound; NUTS against steps x gradient |
| 13b | fused_gradient.py | the fused likelihood against XLA: gradient vs the bound, a P4 shard's NUTS; needs ``g++`` |
| 13c | shards_per_job.py | several shards per sample job: CPU seconds and jobs; a 10,000-shard dry run |
| 13d | align_drugs.py | 256 pairs of drugs (RDKit) aligned in a fresh process, cold and warm cache; ``bench`` extra |

``structure_accuracy.py`` (issue 3's accuracy of the combined structure) needs finished
workflow runs and is run on its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, machine

BENCH = Path(__file__).resolve().parent
SCRIPTS = {
    "P1": ["sample_chains.py"],
    "P2": ["compile_cache.py", "shared_program.py"],
    "P3": ["align_throughput.py"],
    "P4": ["cmc_vs_full.py"],
    "I3": ["importance_qmc.py"],
    "P5": ["dry_run_scale.py", "combine_scale.py"],
    "P6": ["rerun_jobs.py"],
    "I": ["importance_accuracy.py"],
    "R": ["real_data.py"],
    "S": ["second_order.py"],
    "13a": ["precision.py"],
    "13b": ["roofline.py", "fused_gradient.py"],
    "13c": ["shards_per_job.py"],
    "13d": ["align_drugs.py"],
    "15": ["k_stability.py"],
}


def write_summary() -> str:
    """``summary.md``: every target of every result file present, with its figure."""
    rows, bounds = [], []
    for path in sorted(RESULTS.glob("*.json")):
        record = json.loads(path.read_text())
        if not isinstance(record, dict):  # structure_accuracy.json: a list of analyses, no targets
            continue
        for entry in record.get("targets", []):
            rows.append(
                (
                    entry["id"],
                    entry["measure"],
                    entry["figure"],
                    entry["target"],
                    "yes" if entry["met"] else "**no**",
                    f"[{path.stem}.md]({path.stem}.md)",
                    record.get("written", ""),
                )
            )
            if "bound" in entry:
                bounds.append(f"- **{entry['id']}** ({entry['measure']}): {entry['bound']}")
    facts = machine()
    lines = [
        "# Benchmarks: the issues' targets",
        "",
        f"Machine: {facts['cores']} cores, {facts['memory_gib']} GiB. Each figure is the median of >= 3 runs "
        f"unless its table says "
        "otherwise; the linked tables give min–max and the details. Regenerate with `python bench/run.py`.",
        "",
        "| id | measure | figure | target | met | table | measured |",
        "|---|---|---|---|---|---|---|",
        *[f"| {' | '.join(row)} |" for row in sorted(rows, key=lambda row: row[0])],
        *(
            ["", "## Missed targets: what bounds them (from the same measurements)", "", *sorted(bounds)]
            if bounds
            else []
        ),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ids", nargs="*", help=f"benchmarks to run, of {' '.join(SCRIPTS)} (default: all)")
    parser.add_argument("--summary-only", action="store_true")
    args = parser.parse_args()
    unknown = [identifier for identifier in args.ids if identifier not in SCRIPTS]
    if unknown:
        parser.error(f"unknown benchmark ids {unknown}; known: {' '.join(SCRIPTS)}")
    if not args.summary_only:
        for identifier in args.ids or list(SCRIPTS):
            for script in SCRIPTS[identifier]:
                started = time.perf_counter()
                print(f"== {identifier}: {script}", flush=True)
                subprocess.run([sys.executable, str(BENCH / script)], check=True)
                print(f"== {identifier}: {script} took {time.perf_counter() - started:.0f} s", flush=True)
    print(write_summary())


if __name__ == "__main__":
    main()
