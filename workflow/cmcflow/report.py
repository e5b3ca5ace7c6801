"""The report stage: one HTML page per analysis with what a scientist needs to judge a run."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: cluster nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cmcflow.io import read_json
from cmcflow.screening import DISAGREEMENT_P_VALUE, TREE_DEPTH_WARNING

#: Per-shard diagnostics shown in the report, with their column titles.
DIAGNOSTIC_COLUMNS = {
    "rows": "rows",
    "max_r_hat": "max R-hat",
    "min_ess_bulk": "min bulk ESS",
    "min_ess_tail": "min tail ESS",
    "divergences": "divergences",
    "min_bfmi": "min BFMI",
    "tree_depth_saturation": "at max tree depth",
    "tracing_seconds": "tracing s",
    "compile_seconds": "compile s",
    "sampling_seconds": "sampling s",
}


def shard_diagnostics_table(records: Sequence[dict]) -> pd.DataFrame:
    """One row per shard's diagnostics record (index: shard number) with the columns of
    ``DIAGNOSTIC_COLUMNS``."""
    table = pd.DataFrame(
        [{column: record.get(column, np.nan) for column in DIAGNOSTIC_COLUMNS} for record in records],  # failed: NaN
        index=pd.Index([record["shard"] for record in records], name="shard"),
    )
    return table.rename(columns=DIAGNOSTIC_COLUMNS)


#: How many parameters the shard figure shows (those of the smallest sites first).
KEY_PARAMETERS = 6


def site_of(label: str) -> str:
    """``beta[2]`` -> ``beta``."""
    return label.split("[", 1)[0]


def key_parameters(labels: Sequence[str], limit: int = KEY_PARAMETERS) -> list[str]:
    """Up to ``limit`` parameters, those of the sites with fewest elements first (scalars
    such as a noise scale before the coordinates of a structure), in summary order."""
    sizes = pd.Series([site_of(label) for label in labels]).value_counts()
    order = sorted(range(len(labels)), key=lambda index: (sizes[site_of(labels[index])], index))
    return [labels[index] for index in order[:limit]]


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def shards_figure(summary: pd.DataFrame, moments: pd.DataFrame, shards: dict) -> bytes:
    """Per-shard vs combined marginals of the key parameters (shard mean ± sd; the combined
    mean ± sd shaded; excluded shards in red) and the shards' heterogeneity (max |z| over
    all parameters against the combination of the kept shards, with the exclusion limit)."""
    keys = key_parameters(list(summary.index))
    excluded = {entry["shard"] for entry in shards["excluded"]}
    shard_ids = sorted(moments["shard"].unique())
    columns = len(keys) + 1
    figure, axes = plt.subplots(1, columns, figsize=(2.6 * columns, 0.6 + 0.28 * max(len(shard_ids), 4)), sharey=True)
    for axis, key in zip(axes, keys):
        rows = moments[moments["parameter"] == key].set_index("shard").reindex(shard_ids)
        colours = ["tab:red" if shard in excluded else "tab:blue" for shard in shard_ids]
        axis.errorbar(rows["mean"], shard_ids, xerr=rows["sd"], fmt="none", ecolor=colours, elinewidth=1.5)
        axis.scatter(rows["mean"], shard_ids, c=colours, s=12, zorder=3)
        mean, sd = summary.loc[key, "mean"], summary.loc[key, "sd"]
        axis.axvspan(mean - sd, mean + sd, color="tab:orange", alpha=0.35, lw=0)
        axis.axvline(mean, color="tab:orange", lw=1.5)
        axis.set_title(key, fontsize=9)
        axis.tick_params(labelsize=8)
    heterogeneity = axes[-1]
    scores = {int(shard): value for shard, value in shards.get("max_abs_z", {}).items()}
    heterogeneity.barh(
        shard_ids,
        [scores.get(shard, np.nan) for shard in shard_ids],
        color=["tab:red" if shard in excluded else "tab:blue" for shard in shard_ids],
    )
    if "max_outlier_z" in shards:
        heterogeneity.axvline(shards["max_outlier_z"], color="k", ls="--", lw=1)
    heterogeneity.set_title("max |z| over parameters", fontsize=9)
    heterogeneity.tick_params(labelsize=8)
    axes[0].set_ylabel("shard")
    axes[0].invert_yaxis()
    figure.suptitle(
        "Shards (blue: kept, red: excluded; mean ± sd) against the combined posterior (orange)", fontsize=10, y=1.06
    )
    return png(figure)


def posterior_figure(
    summary: pd.DataFrame,
    point_site: str | None,
    moments: pd.DataFrame | None = None,
    corrected: pd.DataFrame | None = None,
    importance: dict | None = None,
) -> bytes:
    """The combined posterior. For a structure: its mean Cα trace coloured by each point's sd
    (sqrt of the mean per-coordinate variance, Å). Otherwise :func:`standardised_figure`."""
    if point_site is None:
        return standardised_figure(summary, moments, corrected, importance)
    rows = summary[[site_of(label) == point_site for label in summary.index]]
    mean = rows["mean"].to_numpy().reshape(-1, 3)
    sd = np.sqrt((rows["sd"].to_numpy().reshape(-1, 3) ** 2).mean(axis=1))
    figure = plt.figure(figsize=(6.5, 5.5))
    axis = figure.add_subplot(projection="3d")
    axis.plot(*mean.T, color="0.6", lw=1)
    points = axis.scatter(*mean.T, c=sd, cmap="viridis", s=25, depthshade=False)
    figure.colorbar(points, ax=axis, shrink=0.7, label="posterior sd per point (Å)")
    axis.set_title(f"Combined structure: posterior mean of {point_site} ({len(mean)} points)", fontsize=10)
    for setter in (axis.set_xlabel, axis.set_ylabel, axis.set_zlabel):
        setter("Å", fontsize=8)
    return png(figure)


#: Parameters the standardised posterior figure shows at most (the first ones in the summary).
FIGURE_PARAMETERS = 40
#: k̂ zones of Pareto-smoothed importance sampling (Vehtari et al.): good, acceptable, unreliable.
KHAT_ZONES = ((-0.5, 0.5, "#1a7f37"), (0.5, 0.7, "#d4a72c"), (0.7, 1.5, "#b42318"))


def standardised_figure(
    summary: pd.DataFrame,
    moments: pd.DataFrame | None,
    corrected: pd.DataFrame | None,
    importance: dict | None,
) -> bytes:
    """Each parameter on its own scale: x = (value − combined mean) / combined sd, so every
    row is readable whatever the parameters' magnitudes. Per row: the combined 5–95%
    interval (orange), the corrected posterior's mean and interval where the importance
    correction ran (green), and every shard's mean (grey); the labels give the combined
    mean ± sd in the parameter's units. With a correction, a second panel places its k̂
    among the zones of Pareto-smoothed importance sampling."""
    shown = summary.iloc[:FIGURE_PARAMETERS]
    centre, scale = shown["mean"], shown["sd"].where(shown["sd"] > 0, 1.0)
    panels = 2 if importance is not None else 1
    figure, axes = plt.subplots(
        1,
        panels,
        figsize=(7.5 if panels == 2 else 6.5, 0.9 + 0.28 * len(shown)),
        gridspec_kw={"width_ratios": [4, 1][:panels]},
        squeeze=False,
    )
    axis = axes[0, 0]
    positions = np.arange(len(shown))
    if moments is not None:
        for position, label in zip(positions, shown.index):
            means = moments.loc[moments["parameter"] == label, "mean"].to_numpy()
            axis.scatter((means - centre[label]) / scale[label], np.full(len(means), position), color="0.6", s=6)
    axis.hlines(positions, (shown["5%"] - centre) / scale, (shown["95%"] - centre) / scale, color="tab:orange", lw=3)
    axis.scatter(np.zeros(len(shown)), positions, color="k", s=12, zorder=3)
    if corrected is not None:
        fixed = corrected.reindex(shown.index)
        offset = positions + 0.3
        axis.hlines(offset, (fixed["5%"] - centre) / scale, (fixed["95%"] - centre) / scale, color="tab:green", lw=2)
        axis.scatter((fixed["mean"] - centre) / scale, offset, color="tab:green", s=10, zorder=3)
    axis.axvline(0, color="0.8", lw=0.8, zorder=0)
    labels = [f"{label}  {centre[label]:.4g} ± {shown['sd'][label]:.2g}" for label in shown.index]
    axis.set_yticks(positions, labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("(value − combined mean) / combined sd", fontsize=8)
    legend = "orange: combined 5–95%; grey: shard means" + ("; green: corrected" if corrected is not None else "")
    axis.set_title(f"Combined posterior, each parameter in its own sd\n{legend}", fontsize=9)
    axis.tick_params(axis="x", labelsize=8)
    if importance is not None:
        gauge = axes[0, 1]
        for low, high, colour in KHAT_ZONES:
            gauge.axvspan(low, high, color=colour, alpha=0.25, lw=0)
        khat = float(importance["khat"])
        gauge.axvline(np.clip(khat, -0.5, 1.5), color="k", lw=2)
        gauge.set_xlim(-0.5, 1.5)
        gauge.set_yticks([])
        gauge.set_xticks([0, 0.7])
        gauge.tick_params(axis="x", labelsize=8)
        gauge.set_title(
            f"importance weights\nk̂ = {khat:.2f}, ESS {importance['effective_sample_size']:.0f}", fontsize=9
        )
    return png(figure)


def image_tag(data: bytes, alt: str) -> str:
    source = f"data:image/png;base64,{base64.b64encode(data).decode()}"
    return f"<img alt='{html.escape(alt)}' style='max-width:100%' src='{source}'>"


def stage_times(benchmark_paths: Sequence[str | os.PathLike]) -> pd.DataFrame:
    """Wall seconds per stage from Snakemake ``benchmark:`` files (``<stage>.tsv``, or one per
    job: ``<stage>/shard-*.tsv``, ``<stage>/batch-*.tsv``): jobs, total and slowest job, and
    peak memory."""
    rows = []
    for path in map(Path, benchmark_paths):
        stage = path.parent.name if path.name.startswith(("shard-", "batch-")) else path.stem
        record = pd.read_csv(path, sep="\t").iloc[0]
        rows.append({"stage": stage, "seconds": float(record["s"]), "max_rss_mb": float(record["max_rss"])})
    frame = pd.DataFrame(rows)
    return frame.groupby("stage", sort=False).agg(
        jobs=("seconds", "size"),
        total_s=("seconds", "sum"),
        slowest_job_s=("seconds", "max"),
        peak_rss_mb=("max_rss_mb", "max"),
    )


def tree_depth_advice(diagnostics: Sequence[dict]) -> str:
    """A paragraph for shards whose NUTS trajectories often reached the largest tree (more
    than ``TREE_DEPTH_WARNING`` of iterations), with what to do; empty if none did."""
    saturated = {
        record["shard"]: record["tree_depth_saturation"]
        for record in diagnostics
        if record.get("tree_depth_saturation", 0.0) > TREE_DEPTH_WARNING
    }
    if not saturated:
        return ""
    low, high = min(saturated.values()), max(saturated.values())
    shares = f"{low:.0%}" if f"{low:.0%}" == f"{high:.0%}" else f"{low:.0%}–{high:.0%}"
    return (
        f"<p><b>NUTS reached its largest tree (<code>sample.max_tree_depth</code>) on "
        f"{shares} of iterations in {len(saturated)} of {len(diagnostics)} shards</b> "
        f"(shards {', '.join(map(str, sorted(saturated)))}). Their trajectories were cut short: sampling was slow "
        "and each draw moved less far than NUTS wanted. Strongly correlated or very differently scaled parameters "
        "cause this; <code>sample.dense_mass: true</code> adapts a full mass matrix that removes both (raising "
        "<code>sample.max_tree_depth</code> only buys longer, slower trajectories).</p>"
    )


def data_notes_section(notes: Sequence[str]) -> str:
    """ "What the data cannot tell": the shard stage's notes on the table's columns
    (:func:`cmcflow.table.design_notes`); empty if there are none."""
    if not notes:
        return ""
    return (
        "<h2>What the data cannot tell</h2><p>The shard stage found (notes, not errors):</p><ul>"
        + "".join(f"<li>{html.escape(note)}</li>" for note in notes)
        + "</ul><p>A feature that never varies beside the model's intercept, or features that are linear "
        "combinations of each other (and of the intercept, where the model has one), leave a direction of the "
        "coefficients that the data do not inform: its posterior is the prior's, and NUTS slows along it. Drop "
        "the column, or one of the dependent ones, from <code>columns.features</code> unless you mean it.</p>"
    )


def exactness_section(importance: dict | None) -> str:
    """ "How exact is this result?": the importance correction's verdict, k̂, effective
    sample size, and how far the combination's means were from the corrected ones."""
    if importance is None:
        return (
            "<h2>How exact is this result?</h2><p>Not measured: the importance correction is off "
            "(<code>correct.enabled</code>) or, for rigid models, not available. A sweep measures it instead: "
            "<code>sweep: {shard.num_shards: [...], fulldata: true}</code> runs your K beside smaller ones and "
            "full-data NUTS, and its page says up to which K the combination stays close to the full "
            'data (README, "Which K can I trust?"). The shards\' disagreement (below) sees misfit, not the bias of '
            "shards too small for a Gaussian posterior.</p>"
        )
    shifts = pd.Series(importance["combined_shift_sd"]).abs().sort_values(ascending=False)
    worst = ", ".join(f"{html.escape(name)} {value:.2f}" for name, value in shifts.iloc[:5].items())
    colour = "#1a7f37" if importance["reliable"] else "#b42318"
    return (
        "<h2>How exact is this result?</h2>"
        f"<p style='color:{colour}'><b>{html.escape(importance['verdict'])}.</b></p>"
        f"<p>{importance['proposal_draws']} draws from {proposal_source(importance)}, weighted against the exact "
        f"posterior of the rows of {len(importance['target_shards'])} shards "
        "(every shard whose sampling did not fail; Pareto-smoothed importance sampling): "
        f"effective sample size {importance['effective_sample_size']:.0f}. The combination's means were up to "
        f"{importance['largest_combined_shift_sd']:.2f} posterior sd from the corrected ones (largest: {worst})"
        + (
            "; the corrected posterior is in <code>corrected/</code>.</p>"
            if importance["reliable"]
            else "; neither the combination nor the correction can be trusted here.</p>"
        )
        + screened_out_sentence(importance["screened_out"])
    )


def proposal_source(importance: dict) -> str:
    """Where the correction's proposal draws came from, in words."""
    kind = html.escape(importance["proposal"])
    if importance["proposal_components"] == 1:
        return f"the kept shards' {kind} product"
    return (
        f"a {kind} mixture: half from the kept shards' product and half from every shard's, the screened-out "
        "ones too (the exact posterior holds their rows)"
    )


def screened_out_sentence(screened_out: list[int]) -> str:
    """Why the exact posterior may sit away from the combination: shards left out of it."""
    if not screened_out:
        return ""
    return (
        f"<p>Shards {', '.join(map(str, screened_out))} were screened out of the combination but their rows are "
        "in the exact posterior: where they disagree with the other shards (influential rows, a different "
        "subpopulation), the combination answers for less than all your data, and k̂ says whether the "
        "correction could make up for it.</p>"
    )


def disagreement_sentence(shards: dict) -> str:
    """How far the kept shards' means disagree (Cochran's Q against χ²), and what a
    disagreement beyond their posteriors' spread means."""
    if "disagreement" not in shards:
        return ""
    figures = shards["disagreement"]
    measured = (
        f"The kept shards' means disagree by Q = {figures['statistic']:.1f}, the sum over shards of each mean's "
        f"squared distance from the combined mean in that shard's own precision: {figures['degrees_of_freedom']} "
        f"is expected where one model describes every shard's rows ({disagreement_reference(figures)}, p = "
        f"{figures['p_value']:.2g})"
    )
    if figures["p_value"] >= DISAGREEMENT_P_VALUE:
        return f"<p>{measured}.</p>"
    return (
        f"<p style='color:#b42318'><b>{measured}: more than their posteriors allow.</b> The model may not describe "
        "every shard's rows alike (misfit, a subpopulation in some shards), and the Gaussian combination can then "
        "be biased. The importance correction measures by how much (<code>correct.enabled</code>); the per-shard "
        "marginals below show which parameters disagree.</p>"
    )


def second_order_sentence(shards: dict) -> str:
    """Whether ``combine.second_order`` moved the combination, and by how much."""
    if "second_order" not in shards:
        return ""
    term = shards["second_order"]
    if not term["applied"]:
        reason = html.escape(term["reason"])
        return f"<p>The second-order term (<code>combine.second_order</code>) was not applied: {reason}.</p>"
    return (
        f"<p>The second-order term (<code>combine.second_order</code>: the shards' disagreement and skew through the "
        f"model's third derivatives) moved the combination by up to {term['max_abs_shift_sd']:.3f} posterior sd "
        f"({html.escape(term['largest'])}, unconstrained): to second order, how far the Gaussian product alone sits "
        "from the full posterior's mean.</p>"
    )


def disagreement_reference(figures: dict) -> str:
    """The distribution Q's p-value is taken from (:func:`cmcflow.screening.disagreement_test`)."""
    if "effective_degrees_of_freedom" not in figures:
        return f"χ²; approximate: {figures['approximate']}" if "approximate" in figures else "χ²"
    return (
        f"χ² scaled to Q's own spread, on {figures['effective_degrees_of_freedom']:.1f} effective degrees of "
        "freedom: the weights are blocks of parameters, which leave out the correlations between blocks"
    )


def shrinkage_sentence(shards: dict) -> str:
    """One line on how far each shard's covariance was shrunk toward the shared shape."""
    weights = np.array(list(shards["shrinkage_intensity"].values()))
    return (
        f"<p>Each shard's covariance shrunk toward the shape all kept shards share "
        f"(<code>covariance_shrinkage: {html.escape(str(shards['covariance_shrinkage']))}</code>): "
        f"intensity λ {weights.min():.2f}–{weights.max():.2f}, median {np.median(weights):.2f} "
        "(0: the shard's own sample covariance; 1: the shared shape at the shard's scale).</p>"
    )


def render_report(
    analysis: str,
    model: str,
    summary_path: str | os.PathLike,
    shards_path: str | os.PathLike,
    moments_path: str | os.PathLike,
    diagnostics_paths: Sequence[str | os.PathLike],
    features_info_paths: Sequence[str | os.PathLike],
    benchmark_paths: Sequence[str | os.PathLike],
    manifest_path: str | os.PathLike,
    point_site: str | None = None,
    importance_path: str | os.PathLike | None = None,
    corrected_summary_path: str | os.PathLike | None = None,
) -> tuple[str, bytes, bytes]:
    """The analysis report as a self-contained HTML page, and its two figures (PNG): the
    shards against the combination, and the combined posterior (with the corrected one and
    k̂ where the importance correction ran: ``importance_path``, ``corrected_summary_path``).
    ``manifest_path``: the shard stage's manifest, whose notes on the table it shows."""
    summary = pd.read_csv(summary_path, index_col="parameter")
    shards = read_json(shards_path)
    moments = pd.read_csv(moments_path)
    importance = read_json(importance_path) if importance_path else None
    corrected = pd.read_csv(corrected_summary_path, index_col="parameter") if corrected_summary_path else None
    shards_png = shards_figure(summary, moments, shards)
    posterior_png = posterior_figure(summary, point_site, moments, corrected, importance)
    diagnostics = [read_json(path) for path in diagnostics_paths]
    cache_hits = sum(bool(read_json(path)["cache_hit"]) for path in features_info_paths)
    excluded = shards["excluded"]
    sections = [
        f"<h1>cmcflow report: {html.escape(analysis)}</h1>",
        f"<p>Model <code>{html.escape(model)}</code>; {len(shards['used'])} shards combined by "
        f"<code>{html.escape(shards['method'])}</code> ({html.escape(shards['covariance'])}); "
        f"{len(excluded)} excluded.</p>",
        *([f"<p>Structure located by {html.escape(shards['location'])}.</p>"] if "location" in shards else []),
        *([shrinkage_sentence(shards)] if "shrinkage_intensity" in shards else []),
        *(
            ["<h2>Excluded shards</h2><ul>"]
            + [f"<li>shard {entry['shard']}: {html.escape(entry['reason'])}</li>" for entry in excluded]
            + ["</ul>"]
            if excluded
            else []
        ),
        data_notes_section(read_json(manifest_path).get("notes", [])),
        exactness_section(importance),
        "<h2>Shards and their combination</h2>",
        disagreement_sentence(shards),
        second_order_sentence(shards),
        image_tag(shards_png, "per-shard against combined marginals; shard heterogeneity"),
        "<h2>Combined posterior</h2>",
        image_tag(posterior_png, "combined posterior"),
        summary.to_html(float_format="{:.4g}".format),
        "<h2>Shard diagnostics</h2>",
        "<p>Computed on each shard's own draws (never on combined draws). "
        "R-hat above 1.01, ESS below 400 or any divergence deserve a look.</p>",
        tree_depth_advice(diagnostics),
        shard_diagnostics_table(diagnostics).to_html(float_format="{:.4g}".format),
        "<h2>Time per stage</h2>",
        stage_times(benchmark_paths).to_html(float_format="{:.3g}".format),
        f"<p>Feature cache: {cache_hits} of {len(features_info_paths)} shards served from the cache.</p>",
    ]
    return html_page(analysis, sections), shards_png, posterior_png


def html_page(title: str, sections: Sequence[str]) -> str:
    """A self-contained HTML page of cmcflow's style holding ``sections``."""
    style = (
        "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
        "td,th{padding:2px 8px;text-align:right;border-bottom:1px solid #ddd}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>cmcflow: {html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(sections)}</body></html>\n"
    )
