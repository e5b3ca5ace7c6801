"""A sample job that fails: recorded, then the run fails at combine naming it (default), or
combine goes on without it (``combine.on_failed_shard: skip``); never silently dropped."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, Workflow, correction_jobs, tiny_config

from cmcflow.checkpoint import SavedRun
from cmcflow.runs import read_run

pytestmark = pytest.mark.workflow

#: The logistic model, plus a ``flag`` column; a shard holding a flagged row fails in NUTS
#: set-up (its init_values hook raises), as a real numerical failure would.
FLAKY_MODEL = """
import dataclasses

import numpy as np

from cmcflow.models import Role
from cmcflow.models.logistic import SPEC as LOGISTIC
from cmcflow.models.rows import pad_rows


def flaky_model(flag, **features_and_options):
    LOGISTIC.numpyro_model(**features_and_options)


def featurize(columns, pad_to, facts):
    features = LOGISTIC.featurize(columns, pad_to, facts)
    features["flag"] = pad_rows(columns["flag"], pad_to)
    return features


def init_values(features, options, num_chains, rng):
    if features["flag"].max() > 0:
        raise RuntimeError("injected failure")
    return {"intercept": rng.normal(scale=0.1, size=num_chains), "beta": rng.normal(scale=0.1, size=(num_chains, 3))}


FLAKY = dataclasses.replace(
    LOGISTIC, name="flaky", numpyro_model=flaky_model, featurize=featurize,
    roles=LOGISTIC.roles + (Role("flag", "real", default="flag"),), init_values=init_values,
)
"""


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    """The workflow, the shard holding the flagged row, and the result of its first run."""
    workdir = tmp_path_factory.mktemp("flaky")
    (workdir / "flaky_model.py").write_text(FLAKY_MODEL)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(3000, 3))
    table = pd.DataFrame(X, columns=["x0", "x1", "x2"])
    table["y"] = (rng.random(3000) < 1 / (1 + np.exp(-X @ [0.5, -0.5, 0.2]))).astype(int)
    table["flag"] = 0.0
    table.loc[1234, "flag"] = 1.0
    table.to_csv(workdir / "data.csv", index=False)
    config = tiny_config(
        model="flaky_model:FLAKY",
        input={"path": "data.csv"},
        columns={"features": ["x0", "x1", "x2"], "label": "y"},
        shard={"num_shards": 3, "seed": 0},
    )
    workflow = Workflow(workdir, config, env={"PYTHONPATH": str(workdir)})
    result = workflow.run(check=False)
    shards_dir = workdir / "results/tiny/shards"
    failing = next(k for k in range(3) if pd.read_parquet(shards_dir / f"shard-{k:04d}.parquet")["row"].eq(1234).any())
    return workflow, failing, result


def test_by_default_a_failed_shard_fails_the_run_naming_it(flaky):
    workflow, failing, result = flaky
    assert result.returncode != 0
    message = (
        f"1 of 3 sample jobs failed: shard {failing}: failed: RuntimeError: injected failure. Once the cause is "
        f"fixed, `snakemake --forcerun results/tiny/samples/shard-{failing:04d}.nc` samples them again; or set "
        "combine.on_failed_shard: skip to combine the others"
    )
    assert message in (workflow.workdir / "results/tiny/logs/combine.log").read_text()
    assert message in result.stderr
    assert result.stderr.count("Error in rule combine") == 1  # not retried: a retry cannot help
    assert not (workflow.workdir / "results/tiny/combined").exists()
    record = json.loads((workflow.workdir / f"results/tiny/samples/shard-{failing:04d}.diagnostics.json").read_text())
    assert record == {"failed": True, "shard": failing, "error": "RuntimeError: injected failure"}


def test_skip_combines_the_others_and_lists_the_failed_shard(flaky):
    workflow, failing, _ = flaky
    config = json.loads(json.dumps(workflow.config))
    config["analyses"]["tiny"]["combine"] = {"on_failed_shard": "skip"}
    # no sampling again
    assert workflow.planned_jobs(config=config) == {"combine": 1, **correction_jobs(3), "report": 1, "all": 1}
    result = workflow.run(config=config)
    assert f"  1 of 3 shards left out: {failing} (its sampling failed)" in result.stderr  # the run's last lines
    shards = json.loads((workflow.workdir / "results/tiny/combined/shards.json").read_text())
    assert shards["used"] == [k for k in range(3) if k != failing]
    assert shards["excluded"] == [{"shard": failing, "reason": "failed: RuntimeError: injected failure"}]
    assert shards["prior_power"] == pytest.approx(2 / 3)
    report = (workflow.workdir / "results/tiny/report/report.html").read_text()
    assert f"shard {failing}: failed: RuntimeError: injected failure" in report


def test_only_errors_that_may_not_recur_fail_the_sample_job():
    """Out of memory (Python's or XLA's) and I/O errors fail the job, so the profile's retries
    resubmit it with more memory and time; the model's own errors are recorded."""
    from cmcflow.runs import is_transient

    assert is_transient(MemoryError())
    assert is_transient(OSError(28, "No space left on device"))
    assert is_transient(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.0GiB"))
    assert not is_transient(ValueError("Normal distribution got invalid scale parameter"))
    assert not is_transient(RuntimeError("injected failure"))


JOB_BODY = """
import atexit, sys
sys.path.insert(0, {workflow!r})
from cmcflow.script import open_log, reported_errors
open_log({log!r})
atexit.register(lambda: print("atexit ran", file=sys.stderr))
with reported_errors():
    import logging
    import jax.numpy as jnp
    logging.getLogger("cmcflow.test").info("last line %s", float(jnp.ones(3).sum()))
    print("output written")
    {ending}
raise SystemExit("not reached: reported_errors ends the job")
"""


@pytest.mark.parametrize("ending", ["pass", "from cmcflow.errors import InputError; raise InputError('bad row 3')"])
def test_a_job_ends_at_once_with_its_log_and_output_flushed(tmp_path, ending):
    """A finished job skips the interpreter's teardown (exit_finished): status 0, its log,
    its stdout and the atexit handlers all complete; a user error still exits 1 with its line."""
    log = tmp_path / "job.log"
    body = JOB_BODY.format(workflow=str(REPO / "workflow"), log=str(log), ending=ending)
    done = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, timeout=120)
    if ending == "pass":
        assert (done.returncode, done.stdout) == (0, "output written\n"), done.stderr
        assert "last line 3.0" in log.read_text() and log.read_text().endswith("atexit ran\n")
    else:
        assert done.returncode == 1 and "cmcflow: error: bad row 3" in done.stderr
        assert "cmcflow: error: bad row 3" in log.read_text()


def test_runtime_grows_with_the_retry_attempt_like_memory():
    from cmcflow.resources import runtime_minutes, sample_mem_mb

    runtime = runtime_minutes(120)
    assert [runtime(None, attempt) for attempt in (1, 2, 3)] == [120, 240, 360]
    assert sample_mem_mb(1.0, 2) == 2 * sample_mem_mb(1.0, 1)


def test_a_batch_job_keeps_the_draws_of_one_job_per_shard_and_records_its_failed_shard(flaky):
    """``sample.shards_per_job``: 2 over 3 shards plans 2 featurize and 2 sample jobs
    (shards 0-1, shard 2); 3 runs all of them in one job each, one process: each shard's
    files in the batch's directory, the features and draws identical to those of one job
    per shard, and the failing shard recorded as failed without losing the shards beside it."""
    workflow, failing, _ = flaky
    config = json.loads(json.dumps(workflow.config))
    config["results_dir"] = "batched"
    config["analyses"]["tiny"]["sample"]["shards_per_job"] = 2
    planned = workflow.planned_jobs(config=config)
    assert (planned["featurize_batch"], planned["sample_batch"]) == (2, 2) and "featurize" not in planned
    config["analyses"]["tiny"]["sample"]["shards_per_job"] = 3
    planned = workflow.planned_jobs(config=config)
    assert (planned["featurize_batch"], planned["sample_batch"]) == (1, 1)
    result = workflow.run(config=config, check=False)
    assert result.returncode != 0  # the failed shard stops the run at combine, as with one job per shard
    assert "`snakemake --forcerun batched/tiny/samples/batch-0000` samples them again" in result.stderr
    for shard in range(3):
        features = f"features/{{}}shard-{shard:04d}.npz"
        assert (workflow.workdir / "batched/tiny" / features.format("batch-0000/")).read_bytes() == (
            workflow.workdir / "results/tiny" / features.format("")
        ).read_bytes()
        batched = workflow.workdir / f"batched/tiny/samples/batch-0000/shard-{shard:04d}"
        alone = workflow.workdir / f"results/tiny/samples/shard-{shard:04d}"
        if shard == failing:
            record = json.loads(batched.with_suffix(".diagnostics.json").read_text())
            assert record == {"failed": True, "shard": failing, "error": "RuntimeError: injected failure"}
            continue
        for site in ("intercept", "beta"):
            np.testing.assert_array_equal(
                read_run(batched.with_suffix(".nc")).posterior[site].values,
                read_run(alone.with_suffix(".nc")).posterior[site].values,
            )
    # going on without the failed shard: reweight, correct and report read the batches' files
    config["analyses"]["tiny"]["combine"] = {"on_failed_shard": "skip"}
    assert workflow.planned_jobs(config=config) == {"combine": 1, **correction_jobs(3), "report": 1, "all": 1}
    workflow.run(config=config)
    assert json.loads((workflow.workdir / "batched/tiny/corrected/importance.json").read_text())["reliable"]


def test_a_sample_job_killed_mid_sampling_resumes_from_its_checkpoint(tmp_path):
    """``sample.checkpoint_every``: SIGKILL the whole run once a checkpoint holds draws; the
    rerun goes on from the checkpoint (it says so, and records how many draws it read) and
    writes exactly the draws of a run that was never interrupted and kept no checkpoint."""
    target = "results/tiny/samples/shard-0000.nc"
    sample = {"num_warmup": 150, "num_samples": 1500, "checkpoint_every": 100}
    killed = Workflow(tmp_path / "killed", tiny_config(sample=sample))
    killed.workdir.mkdir()
    command, env = killed.command(target)
    process = subprocess.Popen(
        command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    checkpoint = killed.workdir / "results/tiny/checkpoints/shard-0000.pkl"
    deadline = time.monotonic() + 300
    saved = None
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists():
            saved = pickle.loads(checkpoint.read_bytes())
            if saved.draws >= 200:
                break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert isinstance(saved, SavedRun) and 200 <= saved.draws < 1500, "the run ended before a checkpoint with draws"
    assert not (killed.workdir / target).exists()

    killed.run("--unlock")
    killed.run(target)
    log = (killed.workdir / "results/tiny/logs/sample/shard-0000.log").read_text()
    assert "resuming from" in log
    resumed = read_run(killed.workdir / target)
    assert resumed.posterior.attrs["resumed_draws"] >= saved.draws
    assert not checkpoint.exists()

    sample["checkpoint_every"] = 0
    uninterrupted = Workflow(tmp_path / "uninterrupted", tiny_config(sample=sample))
    uninterrupted.workdir.mkdir()
    uninterrupted.run(target)
    reference = read_run(uninterrupted.workdir / target)
    assert reference.posterior.attrs["resumed_draws"] == 0
    for group in ("posterior", "unconstrained_posterior"):
        for name, values in reference[group].data_vars.items():
            np.testing.assert_array_equal(resumed[group][name].values, values.values, err_msg=f"{group}.{name}")
