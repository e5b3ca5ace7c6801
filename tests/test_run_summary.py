"""What a finished run prints: each report it wrote, and the facts to read first."""

from __future__ import annotations

import json
import os
import time

from cmcflow.run_summary import analysis_lines, run_summary

SHARDS = {
    "num_shards": 8,
    "excluded": [],
    "disagreement": {"statistic": 465.2, "degrees_of_freedom": 182, "p_value": 1.3e-26},
}
IMPORTANCE = {"verdict": "k̂ = 0.75 ≥ 0.7: the combination is unreliable here — use fewer, larger shards"}


def test_the_lines_name_the_verdict_the_disagreement_exclusions_and_notes():
    shards = SHARDS | {
        "excluded": [{"shard": 2, "reason": "failed: …"}, {"shard": 5, "reason": "outlier"}],
        "failed": [2],
    }
    manifest = {"notes": ["column 'one' (features) is 1 in every row"]}
    assert analysis_lines("results/a/report/report.html", shards, manifest, IMPORTANCE) == [
        "cmcflow: results/a/report/report.html",
        f"  how exact: {IMPORTANCE['verdict']}",
        "  the shards disagree more than their posteriors allow: Q = 465.2 on 182 degrees of freedom (p 1.3e-26)",
        "  2 of 8 shards left out: 2 (its sampling failed), 5",
        "  data: column 'one' (features) is 1 in every row",
    ]
    quiet = SHARDS | {"disagreement": {"statistic": 68.8, "degrees_of_freedom": 77, "p_value": 0.74}}
    lines = analysis_lines("r.html", quiet, {}, None)
    assert lines[1].startswith("  how exact: not measured")
    assert lines[2] == "  the shards agree: Q = 68.8 on 77 degrees of freedom (p 0.74)"
    assert len(lines) == 3
    moved = {"applied": True, "max_abs_shift_sd": 2.888, "largest": "sigma"}
    assert analysis_lines("r.html", quiet | {"second_order": moved}, {}, None)[3] == (
        "  second order: moved the combination by up to 2.888 sd (sigma)"
    )
    refused = {"applied": False, "reason": "shard 3's expansion ratio ρ = 0.81 exceeds 0.5: …", "cause": "shards"}
    assert analysis_lines("r.html", quiet | {"second_order": refused}, {}, None)[3] == (
        "  second order: not applied: shard 3's expansion ratio ρ = 0.81 exceeds 0.5: …"
    )
    # on by default: where the settings rule it out (a rigid model, draw weights), no line
    ruled_out = {"applied": False, "reason": "not for rigid models (…)", "cause": "settings"}
    assert analysis_lines("r.html", quiet | {"second_order": ruled_out}, {}, None) == lines
    blocks = {"statistic": 1468.7, "degrees_of_freedom": 1603, "p_value": 0.62, "effective_degrees_of_freedom": 131.4}
    assert analysis_lines("r.html", SHARDS | {"disagreement": blocks}, {}, None)[2] == (
        "  the shards agree: Q = 1468.7 on 1603 degrees of freedom (p 0.62, from Q's own spread under block "
        "weights: 131.4 effective degrees of freedom)"
    )


def test_only_what_the_run_wrote_is_summarised(tmp_path):
    def analysis(name):
        (tmp_path / name).mkdir()
        for file, record in (("shards.json", SHARDS), ("manifest.json", {}), ("importance.json", IMPORTANCE)):
            (tmp_path / name / file).write_text(json.dumps(record))
        (tmp_path / name / "report.html").write_text("<html></html>")
        return {
            key: str(tmp_path / name / f"{key}.{'html' if key == 'report' else 'json'}")
            for key in ("report", "shards", "manifest", "importance")
        }

    old, new = analysis("old"), analysis("new")
    since = time.time()
    os.utime(old["report"], (since - 60, since - 60))
    page, comparison = tmp_path / "sweep.html", tmp_path / "comparison.json"
    page.write_text("<html></html>")
    verdict = "stable up to K = 8, the largest K swept"
    stability = {"series": [{"fixed": {"prior_sd": 1.0}, "reference": "full data", "verdict": verdict}]}
    comparison.write_text(json.dumps({"stability": stability}))
    sweeps = [(page, comparison), (tmp_path / "missing.html", comparison)]
    summary = run_summary([old, new], sweeps, since - 1).splitlines()
    assert summary[0] == f"cmcflow: {new['report']}"
    assert summary[-2:] == [
        f"cmcflow: {page} (the sweep's grid points side by side)",
        f"  K-stability against full data (prior_sd = 1.0): {verdict}",
    ]
    assert not any(old["report"] in line for line in summary)
    assert run_summary([old], [], since - 1) == ""
