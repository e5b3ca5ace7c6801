"""PBS submit/status logic: the exact qsub lines of both flavours, and status parsing of
recorded qstat output (PBS Pro JSON; Torque text) for every state, with qstat failing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "profiles/pbs"))  # the helper travels with the PBS profile
import pbs_jobs as pbs  # noqa: E402


def test_pbspro_qsub_line():
    properties = {
        "rule": "sample",
        "threads": 4,
        "resources": {"mem_mb": 2500, "runtime": 90, "pbs_extra": "-q workq -A proj"},
    }
    assert pbs.qsub_command("pbspro", "/w/job.sh", properties, "/w/logs") == [
        "qsub",
        "-N",
        "smk-sample",
        "-l",
        "select=1:ncpus=4:mem=2500mb",
        "-l",
        "walltime=01:30:00",
        "-j",
        "oe",
        "-o",
        "/w/logs/smk-sample.log",
        "-q",
        "workq",
        "-A",
        "proj",
        "/w/job.sh",
    ]


def test_torque_qsub_line():
    properties = {"rule": "combine", "threads": 1, "resources": {"mem_mb": 1000, "runtime": 7.5}}
    assert pbs.qsub_command("torque", "/w/job.sh", properties, "/w/logs") == [
        "qsub",
        "-N",
        "smk-combine",
        "-l",
        "nodes=1:ppn=1,mem=1000mb,walltime=00:07:30",
        "-j",
        "oe",
        "-o",
        "/w/logs/smk-combine-%j.log",
        "/w/job.sh",
    ]


@pytest.mark.parametrize(
    ("flavour", "resources"),
    [
        ("pbspro", ["-l", "select=1:ncpus=1:mem=3000mb:ngpus=1", "-l", "walltime=02:00:00"]),
        ("torque", ["-l", "nodes=1:ppn=1:gpus=1,mem=3000mb,walltime=02:00:00"]),
    ],
)
def test_a_gpu_job_asks_for_one_gpu(flavour, resources):
    """A sample job of an analysis with ``platform: gpu`` (one thread, resource gpu=1)."""
    properties = {"rule": "sample", "threads": 1, "resources": {"mem_mb": 3000, "runtime": 120, "gpu": 1}}
    command = pbs.qsub_command(flavour, "/w/job.sh", properties, "/w/logs")
    assert command[3 : 3 + len(resources)] == resources


def pbspro_document(state: str, exit_status: int | None = None, job_id: str = "42.server") -> str:
    job = {"job_state": state, "Job_Name": "smk-sample"}
    if exit_status is not None:
        job["Exit_status"] = exit_status
    return json.dumps({"timestamp": 1, "pbs_version": "2022.1", "Jobs": {job_id: job}})


@pytest.mark.parametrize(
    "state,exit_status,expected",
    [
        ("Q", None, "running"),
        ("R", None, "running"),
        ("E", None, "running"),
        ("H", None, "running"),
        ("F", 0, "success"),
        ("F", 1, "failed"),
        ("F", 271, "failed"),
        ("X", 0, "success"),
    ],
)
def test_pbspro_states(state, exit_status, expected):
    assert pbs.pbspro_status(pbspro_document(state, exit_status), "42.server") == expected
    assert pbs.pbspro_status(pbspro_document(state, exit_status), "42") == expected  # short id


TORQUE = """Job Id: 17.head
    Job_Name = smk-sample
    job_state = {state}
{extra}    Resource_List.nodes = 1:ppn=2
"""


@pytest.mark.parametrize(
    "state,extra,expected",
    [
        ("Q", "", "running"),
        ("R", "", "running"),
        ("C", "    exit_status = 0\n", "success"),
        ("C", "    exit_status = 3\n", "failed"),
        ("C", "", None),
    ],
)
def test_torque_states(state, extra, expected):
    assert pbs.torque_status(TORQUE.format(state=state, extra=extra)) == expected


class FakeQstat:
    """Stands in for subprocess.run: a recorded qstat answer (or failure)."""

    def __init__(self, returncode=0, stdout="", stderr="", raises=None):
        self.result = subprocess.CompletedProcess([], returncode, stdout, stderr)
        self.raises = raises
        self.calls = []

    def __call__(self, command, **kwargs):
        self.calls.append(command)
        if self.raises:
            raise self.raises
        return self.result


@pytest.fixture
def submitted(tmp_path):
    """A job '42.server' recorded as submitted with the PBS Pro flavour (no exit file yet)."""
    pbs.record_job(tmp_path, "42.server", "token42", "pbspro")
    pbs.record_job(tmp_path, "17.head", "token17", "torque")
    return tmp_path


@pytest.mark.parametrize(
    "qstat,expected",
    [
        (FakeQstat(stdout=pbspro_document("R")), "running"),
        (FakeQstat(stdout=pbspro_document("F", 0)), "success"),
        (FakeQstat(stdout=pbspro_document("F", 2)), "failed"),
        (FakeQstat(returncode=153, stderr="qstat: Unknown Job Id 42.server"), "failed"),
        (FakeQstat(returncode=1, stderr="qstat: cannot connect to server pbs (errno=111)"), "running"),
        (FakeQstat(raises=subprocess.TimeoutExpired("qstat", 30)), "running"),
        (FakeQstat(raises=FileNotFoundError("qstat")), "running"),
        (FakeQstat(stdout="not json"), "running"),
    ],
    ids=["R", "F0", "F2", "unknown", "server down", "timeout", "no qstat", "garbled"],
)
def test_pbspro_job_status(submitted, qstat, expected):
    assert pbs.job_status("42.server", submitted, run=qstat) == expected
    assert qstat.calls == [["qstat", "-x", "-f", "-F", "json", "42.server"]]


def test_exit_code_file_decides_before_qstat(submitted):
    (submitted / "token42.exit").write_text("0\n")
    qstat = FakeQstat(returncode=1)
    assert pbs.job_status("42.server", submitted, run=qstat) == "success" and qstat.calls == []
    (submitted / "token17.exit").write_text("1\n")
    assert pbs.job_status("17.head", submitted, run=qstat) == "failed"


def test_torque_complete_without_exit_status_waits_for_exit_file(submitted):
    qstat = FakeQstat(stdout=TORQUE.format(state="C", extra=""))
    assert pbs.job_status("17.head", submitted, run=qstat) == "running"
    assert qstat.calls == [["qstat", "-f", "17.head"]]


def test_job_not_submitted_here_is_failed(tmp_path):
    assert pbs.job_status("99", tmp_path, run=FakeQstat()) == "failed"


def test_wrapper_records_the_exit_code(tmp_path):
    jobscript = tmp_path / "job.sh"
    jobscript.write_text("#!/bin/bash\n# properties = {}\nexit 3\n")
    wrapper, token = pbs.wrap_jobscript(str(jobscript), tmp_path / "state")
    assert subprocess.run(["bash", str(wrapper)]).returncode == 3
    assert pbs.exit_code(tmp_path / "state", token) == 3
