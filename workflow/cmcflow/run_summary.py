"""What Snakemake prints when a run succeeds: for every analysis whose report the run wrote,
where the report is and the few facts to read first (the correction's verdict, whether the
shards agree, the second-order term where asked for, shards left out, notes on the data);
for a sweep, where its page is and up to which K the combination holds.

Runs in the Snakemake process itself (the workflow's ``onsuccess``), after the jobs: it
reads a few small JSON files and imports neither JAX nor Matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cmcflow.io import read_json
from cmcflow.screening import DISAGREEMENT_P_VALUE


def analysis_lines(
    report: str | os.PathLike,
    shards: dict,
    manifest: dict,
    importance: dict | None,
) -> list[str]:
    """The report's path, then one indented line per fact: ``shards`` (combine's
    ``shards.json``), ``manifest`` (the shard stage's), ``importance`` (the correction's
    record; ``None`` where it did not run)."""
    lines = [f"cmcflow: {report}"]
    if importance is None:
        lines.append("  how exact: not measured (correction off, or a rigid model); a K sweep measures it")
    else:
        lines.append(f"  how exact: {importance['verdict']}")
    if "disagreement" in shards:
        figures = shards["disagreement"]
        agree = "disagree more than their posteriors allow" if figures["p_value"] < DISAGREEMENT_P_VALUE else "agree"
        lines.append(
            f"  the shards {agree}: Q = {figures['statistic']:.1f} on {figures['degrees_of_freedom']} degrees of "
            f"freedom (p {figures['p_value']:.2g}"
            + (
                f", from Q's own spread under block weights: {figures['effective_degrees_of_freedom']:.1f} "
                "effective degrees of freedom)"
                if "effective_degrees_of_freedom" in figures
                else ")"
            )
        )
    term = shards.get("second_order")
    if term is not None and (term["applied"] or term.get("cause", "shards") == "shards"):  # not the settings
        lines.append(
            f"  second order: moved the combination by up to {term['max_abs_shift_sd']:.3f} sd ({term['largest']})"
            if term["applied"]
            else f"  second order: not applied: {term['reason']}"
        )
    excluded = [entry["shard"] for entry in shards["excluded"]]
    if excluded:
        failed = set(shards.get("failed", []))
        named = [f"{shard} (its sampling failed)" if shard in failed else str(shard) for shard in excluded]
        lines.append(f"  {len(excluded)} of {shards['num_shards']} shards left out: {', '.join(named)}")
    lines += [f"  data: {note}" for note in manifest.get("notes", [])]
    return lines


def sweep_lines(page: str | os.PathLike, comparison: dict) -> list[str]:
    """The sweep page's path, then the verdict of each K-stability series of its
    ``comparison`` record (none where K is not swept)."""
    lines = [f"cmcflow: {page} (the sweep's grid points side by side)"]
    for series in (comparison.get("stability") or {}).get("series", []):
        fixed = ", ".join(f"{key} = {value}" for key, value in series["fixed"].items())
        lines.append(
            f"  K-stability against {series['reference']}{f' ({fixed})' if fixed else ''}: {series['verdict']}"
        )
    return lines


def run_summary(
    analyses: Sequence[dict],
    sweeps: Sequence[tuple[str | os.PathLike, str | os.PathLike]],
    since: float,
) -> str:
    """The lines for every analysis whose report was written at or after ``since`` (a
    ``time.time()``): ``analyses``, one dict per analysis of paths ``report``, ``shards``,
    ``manifest`` and ``importance`` (``None`` where the correction does not run); then for
    every sweep of ``sweeps``, (page, comparison record), whose page was written since.
    Empty where the run wrote neither."""

    def written(path) -> bool:
        return Path(path).exists() and Path(path).stat().st_mtime >= since

    lines = []
    for paths in analyses:
        if not written(paths["report"]):
            continue
        importance = read_json(paths["importance"]) if paths["importance"] else None
        lines += analysis_lines(paths["report"], read_json(paths["shards"]), read_json(paths["manifest"]), importance)
    for page, comparison in sweeps:
        if written(page):
            lines += sweep_lines(page, read_json(comparison))
    return "\n".join(lines)
