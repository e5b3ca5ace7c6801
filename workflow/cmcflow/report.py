"""The report stage: one HTML page per analysis with what a scientist needs to judge a run."""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from cmcflow.io import read_json

#: Per-shard diagnostics shown in the report, with their column titles.
DIAGNOSTIC_COLUMNS = {
    "rows": "rows",
    "max_r_hat": "max R-hat",
    "min_ess_bulk": "min bulk ESS",
    "min_ess_tail": "min tail ESS",
    "divergences": "divergences",
    "min_bfmi": "min BFMI",
    "compile_seconds": "compile s",
    "sampling_seconds": "sampling s",
}


def shard_diagnostics_table(diagnostics_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """One row per shard (index: shard number) with the columns of ``DIAGNOSTIC_COLUMNS``."""
    records = [read_json(path) for path in diagnostics_paths]
    table = pd.DataFrame(
        [{column: record.get(column, np.nan) for column in DIAGNOSTIC_COLUMNS} for record in records],  # failed: NaN
        index=pd.Index([record["shard"] for record in records], name="shard"),
    )
    return table.rename(columns=DIAGNOSTIC_COLUMNS)


def stage_times(benchmark_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Wall seconds per stage from Snakemake ``benchmark:`` files (``<stage>.tsv`` or
    ``<stage>/shard-*.tsv``): jobs, total and slowest job, and peak memory."""
    rows = []
    for path in map(Path, benchmark_paths):
        stage = path.parent.name if path.name.startswith("shard-") else path.stem
        record = pd.read_csv(path, sep="\t").iloc[0]
        rows.append({"stage": stage, "seconds": float(record["s"]), "max_rss_mb": float(record["max_rss"])})
    frame = pd.DataFrame(rows)
    return frame.groupby("stage", sort=False).agg(
        jobs=("seconds", "size"),
        total_s=("seconds", "sum"),
        slowest_job_s=("seconds", "max"),
        peak_rss_mb=("max_rss_mb", "max"),
    )


def render_report(
    analysis: str,
    model: str,
    summary_path: str | os.PathLike,
    shards_path: str | os.PathLike,
    diagnostics_paths: Sequence[str | os.PathLike],
    features_info_paths: Sequence[str | os.PathLike],
    benchmark_paths: Sequence[str | os.PathLike],
) -> str:
    """The analysis report as a self-contained HTML page."""
    summary = pd.read_csv(summary_path, index_col="parameter")
    shards = read_json(shards_path)
    cache_hits = sum(bool(read_json(path)["cache_hit"]) for path in features_info_paths)
    excluded = shards["excluded"]
    sections = [
        f"<h1>cmcflow report: {html.escape(analysis)}</h1>",
        f"<p>Model <code>{html.escape(model)}</code>; {len(shards['used'])} shards combined by "
        f"<code>{html.escape(shards['method'])}</code> ({html.escape(shards['covariance'])}); "
        f"{len(excluded)} excluded.</p>",
        *([f"<p>Structure located by {html.escape(shards['location'])}.</p>"] if "location" in shards else []),
        *(
            ["<h2>Excluded shards</h2><ul>"]
            + [f"<li>shard {entry['shard']}: {html.escape(entry['reason'])}</li>" for entry in excluded]
            + ["</ul>"]
            if excluded
            else []
        ),
        "<h2>Combined posterior</h2>",
        summary.to_html(float_format="{:.4g}".format),
        "<h2>Shard diagnostics</h2>",
        "<p>Computed on each shard's own draws (never on combined draws). "
        "R-hat above 1.01, ESS below 400 or any divergence deserve a look.</p>",
        shard_diagnostics_table(diagnostics_paths).to_html(float_format="{:.4g}".format),
        "<h2>Time per stage</h2>",
        stage_times(benchmark_paths).to_html(float_format="{:.3g}".format),
        f"<p>Feature cache: {cache_hits} of {len(features_info_paths)} shards served from the cache.</p>",
    ]
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}" \
        "td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cmcflow: {html.escape(analysis)}</title>" \
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
