"""The sweep report stage: one page per swept analysis that puts its grid points side by side
(each parameter's combined mean and 90% interval per point, the distances between points in
posterior sd) and, where the shard count K is swept, the K-stability check
(:mod:`cmcflow.compare`). JAX-free."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: cluster nodes have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cmcflow.compare import (  # noqa: E402
    common_frame,
    distance_matrix,
    in_frame,
    k_stability,
    read_summary,
    shift,
    verdict,
)
from cmcflow.io import read_json  # noqa: E402
from cmcflow.report import html_page, image_tag, key_parameters, png  # noqa: E402
from cmcflow.screening import DISAGREEMENT_P_VALUE  # noqa: E402

#: The swept key whose K-stability is checked.
SHARD_COUNT = "shard.num_shards"
#: The normal quantile of a 90% central interval (where a summary has no 5% and 95%).
Z90 = 1.6449


def point_label(name: str) -> str:
    """``logistic_demo/num_shards=8`` -> ``num_shards=8``."""
    return name.split("/", 1)[1]


def long_summary(points: Sequence[Mapping], summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """One row per (grid point, parameter): the point's swept values, then mean, sd, 5%, 95%
    as combine wrote them."""
    frames = []
    for point in points:
        frame = summaries[point["name"]].reset_index()
        for key, value in reversed(list(point["values"].items())):
            frame.insert(0, key, value)
        frame.insert(0, "point", point["name"])
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def stability_series(
    points: Sequence[Mapping],
    summaries: Mapping[str, pd.DataFrame],
    records: Mapping[str, Mapping],
    fulldata: Mapping[str, pd.DataFrame],
    thresholds: Mapping,
    point_site: str | None,
    allow_reflection: bool,
) -> list[dict]:
    """The K-stability check per series of grid points that agree on every swept key but
    K, against the series' full-data run (K = 1) where one ran, else its smallest K. Each
    row also counts the shards its combination left out (from ``records``, combine's
    shards.json by point name): a combination of fewer shards is a posterior of fewer rows,
    and moves for that reason; and gives the p-value of the kept shards' disagreement
    (:func:`~cmcflow.screening.disagreement_test`): shards that disagree with each other, a
    different signal from the drift, which is a bias all shards share."""
    excluded = {name: len(record["excluded"]) for name, record in records.items()}
    series: dict[tuple, list[Mapping]] = {}
    for point in points:
        fixed = tuple((key, value) for key, value in point["values"].items() if key != SHARD_COUNT)
        series.setdefault(fixed, []).append(point)
    frame = (point_site, allow_reflection)
    results = []
    for fixed, members in series.items():
        if members[0]["fulldata"]:
            reference = (1, "full data", fulldata[members[0]["fulldata"]])
        else:
            first = min(members, key=lambda point: point["values"][SHARD_COUNT])
            reference = (first["values"][SHARD_COUNT], point_label(first["name"]), summaries[first["name"]])
        framed = [
            (point["values"][SHARD_COUNT], point["name"], in_frame(summaries[point["name"]], reference[2], *frame))
            for point in members
        ]
        rows, stable_up_to = k_stability(
            framed,
            (*reference[:2], in_frame(reference[2], reference[2], *frame)),
            thresholds["max_mean_shift"],
            thresholds["max_sd_change"],
        )
        for row in rows:
            row["excluded_shards"] = excluded[row["point"]]
            row["disagreement_p"] = records[row["point"]].get("disagreement", {}).get("p_value")
        reference_excluded = 0 if members[0]["fulldata"] else excluded[first["name"]]
        results.append(
            {
                "fixed": dict(fixed),
                "reference_excluded_shards": reference_excluded,
                "reference": reference[1],
                "reference_num_shards": reference[0],
                "rows": rows,
                "stable_up_to": stable_up_to,
                "verdict": verdict(stable_up_to, rows, reference[1], reference_excluded),
            }
        )
    return results


#: Parameters the intervals figure shows.
FIGURE_PARAMETERS = 6


def moving_parameters(framed: Mapping[str, pd.DataFrame], limit: int = FIGURE_PARAMETERS) -> list[str]:
    """The parameters to show: scalar sites first (:func:`cmcflow.report.key_parameters`
    orders by site size), then those whose means differ most between the posteriors, in sd
    (max − min of the means over the mean sd), up to ``limit``."""
    first = next(iter(framed.values()))
    scalars = [label for label in key_parameters(list(first.index), limit) if "[" not in label]
    means = pd.DataFrame({name: frame["mean"] for name, frame in framed.items()})
    sds = pd.DataFrame({name: frame["sd"] for name, frame in framed.items()}).mean(axis=1)
    spread = ((means.max(axis=1) - means.min(axis=1)) / sds).drop(index=scalars)
    return scalars + list(spread.sort_values(ascending=False).index[: limit - len(scalars)])


def intervals_figure(framed: Mapping[str, pd.DataFrame], labels: Mapping[str, str]) -> bytes:
    """The mean and 90% interval (5% to 95%, or mean ± 1.645 sd where the summary has none)
    of the parameters :func:`moving_parameters` picks, per grid point (and full-data run),
    one panel per parameter."""
    keys = moving_parameters(framed)
    names = list(framed)
    figure, axes = plt.subplots(
        1, len(keys), figsize=(2.6 * len(keys), 0.8 + 0.3 * max(len(names), 3)), sharey=True, squeeze=False
    )
    for axis, key in zip(axes[0], keys):
        for row, name in enumerate(names):
            entry = framed[name].loc[key]
            low, high = entry["5%"], entry["95%"]
            if np.isnan(low) or np.isnan(high):
                low, high = entry["mean"] - Z90 * entry["sd"], entry["mean"] + Z90 * entry["sd"]
            colour = "0.4" if labels[name].startswith("full data") else "C0"
            axis.plot([low, high], [row, row], color=colour, lw=2)
            axis.plot(entry["mean"], row, "o", color=colour, ms=4)
        axis.set_title(key, fontsize=9)
        axis.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(names)), [labels[name] for name in names], fontsize=7)
    axes[0][0].invert_yaxis()
    figure.suptitle(
        "Combined posterior per grid point: mean and 90% interval (the parameters that moved most)", fontsize=10, y=1.06
    )
    return png(figure)


def stability_figure(series: Sequence[Mapping], thresholds: Mapping) -> bytes:
    """Largest mean shift (reference sd) and largest sd change against K, per series, with
    the thresholds of the verdict."""
    figure, (shifts, changes) = plt.subplots(1, 2, figsize=(9, 3.2))
    for entry in series:
        label = ", ".join(f"{key}={value}" for key, value in entry["fixed"].items()) or None
        ks = [row["num_shards"] for row in entry["rows"]]
        shifts.plot(ks, [row["max_mean_shift"] for row in entry["rows"]], "o-", label=label)
        changes.plot(ks, [row["max_sd_change"] for row in entry["rows"]], "o-", label=label)
    for axis, limit, title in (
        (shifts, thresholds["max_mean_shift"], "largest |mean shift| (reference sd)"),
        (changes, thresholds["max_sd_change"], "largest |sd ratio − 1|"),
    ):
        axis.axhline(limit, color="#b42318", ls="--", lw=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("shards K")
        axis.set_title(title, fontsize=9)
    if any(entry["fixed"] for entry in series):
        shifts.legend(fontsize=7)
    return png(figure)


def render_sweep_report(
    sweep: str,
    model: str,
    keys: Sequence[str],
    points: Sequence[Mapping],
    thresholds: Mapping,
    point_site: str | None = None,
    allow_reflection: bool = True,
) -> tuple[str, bytes, pd.DataFrame, dict]:
    """The sweep's HTML page, its intervals figure (PNG), the long summary table and the
    comparison record (distances, shifts against full data, K-stability).

    ``points``: per grid point in grid order, ``{"name", "values": {key: value},
    "summary": combined summary.csv, "shards": combine's shards.json, "fulldata": the
    full-data run's summary.csv or None}``.
    """
    summaries = {point["name"]: read_summary(point["summary"]) for point in points}
    records = {point["name"]: read_json(point["shards"]) for point in points}
    fulldata = {point["fulldata"]: read_summary(point["fulldata"]) for point in points if point["fulldata"]}
    first = summaries[points[0]["name"]]
    framed = common_frame(summaries, first, point_site, allow_reflection)
    labels = {point["name"]: point_label(point["name"]) for point in points}
    full_names = [f"full data ({index + 1})" if len(fulldata) > 1 else "full data" for index in range(len(fulldata))]
    framed_full = common_frame(dict(zip(full_names, fulldata.values())), first, point_site, allow_reflection)
    figure_png = intervals_figure({**framed, **framed_full}, {**labels, **{name: name for name in framed_full}})
    distances = distance_matrix(framed).rename(index=labels, columns=labels)
    frame = (point_site, allow_reflection)
    against_full = {}
    for point in points:
        if point["fulldata"]:
            reference = fulldata[point["fulldata"]]
            against_full[point["name"]] = shift(
                in_frame(summaries[point["name"]], reference, *frame), in_frame(reference, reference, *frame)
            )
    series = (
        stability_series(points, summaries, records, fulldata, thresholds, point_site, allow_reflection)
        if SHARD_COUNT in keys
        else []
    )
    record = {
        "sweep": sweep,
        "keys": list(keys),
        "points": [
            {
                "name": point["name"],
                "values": point["values"],
                "excluded_shards": len(records[point["name"]]["excluded"]),
                "disagreement": records[point["name"]].get("disagreement"),
            }
            for point in points
        ],
        "distances": distances.to_dict(),
        "against_fulldata": against_full,
        "stability": {"thresholds": dict(thresholds), "series": series} if series else None,
    }
    sections = [
        f"<h1>cmcflow sweep: {html.escape(sweep)}</h1>",
        f"<p>Model <code>{html.escape(model)}</code>; {len(points)} grid points over "
        + ", ".join(f"<code>{html.escape(key)}</code>" for key in keys)
        + ". Each point's own report is in <code>results/&lt;point&gt;/report/report.html</code>.</p>",
        *(
            [
                "<p>Point clouds are compared in one frame: each point's mean cloud moved onto "
                "the reference's by the best rigid motion, each point's sd made isotropic.</p>"
            ]
            if point_site
            else []
        ),
    ]
    if series:
        sections += ["<h2>K-stability</h2>", stability_section(series, thresholds)]
        sections.append(image_tag(stability_figure(series, thresholds), "mean shift and sd change against K"))
    sections += [
        "<h2>Combined posterior per grid point</h2>",
        image_tag(figure_png, "mean and 90% interval per grid point"),
        "<h2>Distance between grid points</h2>",
        "<p>Largest |difference of means| over all parameters, in posterior sd "
        "(sqrt of the mean of the two variances).</p>",
        distances.to_html(float_format="{:.3g}".format),
    ]
    sections += [
        "<h2>The shards' disagreement per grid point</h2>",
        "<p>The kept shards' disagreement Q against (K' − 1)·D and its p-value, as each point's report "
        f"gives it; below {DISAGREEMENT_P_VALUE:g} its shards disagree more than their posteriors allow. "
        "Points that differ only in <code>shard.seed</code> split the same rows another way: a Q high at "
        "every seed is the model's (misfit), one point's alone is that split's chance.</p>",
        disagreement_table(record["points"], labels).to_html(float_format="{:.3g}".format, na_rep="–"),
    ]
    if against_full:
        table = pd.DataFrame(against_full).T.rename(index=labels)
        sections += [
            "<h2>Against full-data NUTS</h2>",
            "<p>Largest mean shift in full-data sd and sd ratios, per grid point.</p>",
            table.to_html(float_format="{:.3g}".format),
        ]
    return html_page(f"sweep {sweep}", sections), figure_png, long_summary(points, summaries), record


def disagreement_table(points: Sequence[Mapping], labels: Mapping[str, str]) -> pd.DataFrame:
    """One row per grid point: shards excluded, the kept shards' Q, its degrees of freedom
    and p-value (``None``: fewer than two shards kept, or a record from before combine
    measured it)."""
    rows = {}
    for point in points:
        disagreement = point["disagreement"] or {}
        rows[labels[point["name"]]] = {
            "shards excluded": point["excluded_shards"],
            "Q": disagreement.get("statistic"),
            "(K' − 1)·D": disagreement.get("degrees_of_freedom"),
            "p": disagreement.get("p_value"),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def stability_section(series: Sequence[Mapping], thresholds: Mapping) -> str:
    """The verdict of each series and its table."""
    parts = [
        f"<p>A K is stable when, against the reference, no parameter's combined mean moved by "
        f"more than {thresholds['max_mean_shift']:g} reference sd and no sd changed by more than "
        f"{thresholds['max_sd_change']:.0%}. Consensus Monte Carlo is exact while every shard's "
        "posterior is Gaussian; a drift as K grows shows where the shards became too small. "
        "<code>disagreement_p</code>: the p-value of the kept shards' disagreement Q (each point's report); "
        f"below {DISAGREEMENT_P_VALUE:g} they disagree with each other more than their posteriors allow. The two "
        "are different signals: shards too small for a Gaussian posterior all lean the same way, which moves the "
        "combination while they still agree.</p>"
    ]
    for entry in series:
        fixed = ", ".join(f"{key}={value}" for key, value in entry["fixed"].items())
        title = f" ({html.escape(fixed)})" if fixed else ""
        table = pd.DataFrame(entry["rows"]).drop(columns="point").set_index("num_shards")
        parts += [
            f"<p><b>{html.escape(entry['verdict'])}</b>{title}; reference: {html.escape(entry['reference'])}.</p>",
            table.to_html(float_format="{:.3g}".format),
        ]
    return "".join(parts)
