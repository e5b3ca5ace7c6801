"""cmcflow on real schedulers: a single-node SLURM started on this machine
(scripts/start_slurm.sh), and the Torque-compatible PBS commands over it.

Needs root (to start the daemons, and to install slurm-wlm if it is missing); elsewhere
the scheduler runs are skipped with the reason. The dry runs need no scheduler at all.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, Workflow, correction_jobs, job_counts, tiny_config

pytestmark = pytest.mark.workflow

SLURM_PREFIX = Path(os.environ.get("CMCFLOW_SLURM_PREFIX", "/tmp/cmcflow-slurm"))
PROFILES = {
    "slurm": ["--profile", str(REPO / "profiles/slurm"), "--profile", str(REPO / "tests/profiles/slurm-ci")],
    "pbs": ["--profile", str(REPO / "profiles/pbs"), "--profile", str(REPO / "tests/profiles/pbs-ci")],
}


@pytest.fixture(scope="module")
def slurm():
    """A running single-node SLURM; if this fixture started it, stopped afterwards and its
    slurm.conf removed (left behind, it names a controller that is down, and every later
    Snakemake start waits 9 s on the SLURM plugin's ``scontrol show config``)."""
    if os.geteuid() != 0:
        pytest.skip("starting SLURM needs root" + ("" if shutil.which("sbatch") else "; sbatch is not installed"))
    already_running = (SLURM_PREFIX / "pids").exists()
    started = subprocess.run(
        ["bash", str(REPO / "scripts/start_slurm.sh")], capture_output=True, text=True, timeout=600
    )
    assert started.returncode == 0, started.stdout + started.stderr
    yield
    if not already_running:
        subprocess.run(["bash", str(REPO / "scripts/stop_slurm.sh"), "--purge"], timeout=120)


#: Commands of SLURM (slurm-client) and of PBS/Torque that a machine without a scheduler lacks.
SCHEDULER_COMMANDS = {
    "sbatch",
    "srun",
    "salloc",
    "squeue",
    "sacct",
    "sacctmgr",
    "sinfo",
    "scontrol",
    "scancel",
    "sattach",
    "sbcast",
    "sdiag",
    "sprio",
    "sreport",
    "sshare",
    "sstat",
    "strigger",
    "sview",
    "qsub",
    "qstat",
    "qdel",
    "qalter",
    "qhold",
    "qrls",
    "pbsnodes",
    "generate_pbs_nodefile",
}


def path_without_scheduler(directory: Path) -> str:
    """PATH of the Python environment plus every system command except the scheduler's."""
    directory.mkdir()
    for system_dir in ("/usr/local/bin", "/usr/bin", "/bin"):
        for command in Path(system_dir).iterdir():
            link = directory / command.name
            if command.name not in SCHEDULER_COMMANDS and not link.exists():
                link.symlink_to(command)
    return f"{Path(sys.executable).parent}:{directory}"


def test_dry_runs_need_no_scheduler(tmp_path):
    """With no SLURM or PBS command on PATH, both profiles list every job."""
    bare_path = path_without_scheduler(tmp_path / "bin")
    workflow = Workflow(tmp_path, tiny_config())
    for name, profile in PROFILES.items():
        for command in ("sbatch", "qsub", "squeue", "qstat"):
            assert shutil.which(command, path=bare_path) is None
        result = workflow.run("--dry-run", *profile, path=bare_path, timeout=120)
        assert "sample" in result.stdout and "total" in result.stdout, (name, result.stdout)


def scheduled_run(tmp_path: Path, profile: str) -> Workflow:
    workflow = Workflow(tmp_path, tiny_config())
    workflow.run(*PROFILES[profile], timeout=900)
    results = tmp_path / "results/tiny"
    for name in ("combined/summary.csv", "report/report.html", "samples/shard-0001.nc"):
        assert (results / name).is_file(), name
    return workflow


def test_tiny_workflow_through_slurm(slurm, tmp_path):
    scheduled_run(tmp_path, "slurm")
    # the 2 jobs of each per-shard rule went as one job array: logs <array id>_<task id>.log
    for rule in ("sample", "reweight"):
        array_logs = [path.name for path in (tmp_path / "logs/slurm" / f"rule_{rule}").glob("*.log")]
        assert len(array_logs) == 2 and all(re.fullmatch(r"\d+_\d+\.log", name) for name in array_logs), array_logs
        assert len({name.split("_")[0] for name in array_logs}) == 1, (rule, array_logs)
    # every cluster rule went through sbatch: its SLURM log is kept in the profile's logdir
    for rule in ("sample", "combine", "reweight", "correct"):
        assert list((tmp_path / "logs/slurm" / f"rule_{rule}").rglob("*.log")), rule
    # light rules are local: they never reach the scheduler
    for rule in ("featurize", "preflight"):
        assert not (tmp_path / "logs/slurm" / f"rule_{rule}").exists(), rule


def test_tiny_workflow_through_pbs_torque(slurm, tmp_path):
    scheduled_run(tmp_path, "pbs")
    jobs = list((tmp_path / ".snakemake/cmcflow-pbs/jobs").iterdir())
    assert len(jobs) == 6  # two sample jobs, combine, two reweight jobs and correct
    assert all(record.read_text().split()[1] == "torque" for record in jobs)
    logs = sorted(path.name for path in (tmp_path / "logs/pbs").iterdir())
    assert sum(name.startswith("smk-sample") for name in logs) == 2


def site_profiles(config_home: Path, slurm_site: dict) -> dict[str, str]:
    """Our SLURM and PBS profiles installed as the user's own site profiles ``slurm`` and
    ``pbs`` (``$XDG_CONFIG_HOME/snakemake/<name>``), the SLURM one with ``slurm_site``
    added as a site would; returns the environment that points Snakemake there."""
    for name in ("slurm", "pbs"):
        shutil.copytree(REPO / "profiles" / name, config_home / "snakemake" / name)
    site_config = config_home / "snakemake/slurm/config.yaml"
    site_config.write_text(site_config.read_text() + yaml.safe_dump(slurm_site))
    return {"XDG_CONFIG_HOME": str(config_home)}


def test_profiles_work_as_users_type_them(tmp_path):
    """`--profile profiles/slurm`, `--executor slurm --jobs N` and `--profile slurm` (ours installed
    as the user's site profile) plan the same jobs under the workflow profile
    (profiles/default), and the workflow profile leaves the site's own resources alone."""
    site = {
        "default-resources": {"slurm_account": "'site_account'"},
        "set-resources": {"sample": {"slurm_partition": "'long'"}},
    }
    (tmp_path / "run").mkdir()
    workflow = Workflow(tmp_path / "run", tiny_config(), env=site_profiles(tmp_path / "config", site))
    bare_path = path_without_scheduler(tmp_path / "bin")
    expected = {"simulate": 1, "shard": 1, "featurize": 2, "preflight": 1, "sample": 2, "combine": 1, "report": 1}
    expected["all"] = 1
    expected |= correction_jobs(2)
    for invocation in (
        ["--profile", str(REPO / "profiles/slurm")],
        ["--executor", "slurm", "--jobs", "10"],
        ["--profile", "slurm"],
        ["--profile", "pbs"],
    ):
        result = workflow.run("--dry-run", *invocation, path=bare_path, timeout=120)
        assert "workflow specific profile profiles/default" in result.stderr, (invocation, result.stderr)
        assert job_counts(result.stdout) == expected, (invocation, result.stdout)
        if invocation == ["--profile", "slurm"]:
            sample_resources = [
                line for line in result.stdout.splitlines() if "resources:" in line and "mem_mb=" in line
            ]
            assert sum("slurm_partition=long" in line for line in sample_resources) == 2, result.stdout
            assert all("slurm_account=site_account" in line for line in sample_resources), result.stdout


def recording_stand_in(directory: Path, command: str) -> Path:
    """A ``command`` (sbatch, qsub) that records its arguments in ``<command>-calls.txt``
    and refuses the job, as a scheduler without GPUs would; returns the record's path."""
    directory.mkdir(exist_ok=True)
    calls = directory.parent / f"{command}-calls.txt"
    script = directory / command
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "{command}: error: no GPU here" >&2\nexit 1\n')
    script.chmod(0o755)
    return calls


def gpu_config() -> dict:
    return tiny_config(platform={"sample": "gpu"})


def test_a_gpu_analysis_asks_slurm_for_one_gpu_per_sample_job(slurm, tmp_path):
    """``platform: {sample: gpu}``: the sample jobs' sbatch line asks for one GPU; this
    machine has none, so sbatch is a stand-in that records the line and refuses."""
    calls = recording_stand_in(tmp_path / "fake", "sbatch")
    workflow = Workflow(tmp_path, gpu_config())
    path = f"{tmp_path / 'fake'}:{os.environ['PATH']}"
    result = workflow.run(*PROFILES["slurm"], "--retries", "0", path=path, check=False, timeout=300)
    assert result.returncode != 0
    (line,) = calls.read_text().splitlines()  # the two sample jobs: one job array
    assert "--gpus=1" in line and "--array=1-2" in line, line


def test_a_gpu_analysis_asks_pbs_for_one_gpu_per_sample_job(tmp_path):
    """The same through profiles/pbs (both flavours' lines: tests/test_pbs.py): qsub is a
    recording stand-in, so no scheduler is needed."""
    calls = recording_stand_in(tmp_path / "fake", "qsub")
    workflow = Workflow(tmp_path, gpu_config())
    path = f"{tmp_path / 'fake'}:{os.environ['PATH']}"
    result = workflow.run(*PROFILES["pbs"], "--retries", "0", path=path, check=False, timeout=300)
    assert result.returncode != 0
    lines = calls.read_text().splitlines()
    # ppn: the test overlay's set-threads (tests/profiles/pbs-ci)
    assert len(lines) == 2 and all(re.search(r" -l nodes=1:ppn=\d+:gpus=1,mem=", line) for line in lines), lines


def test_dry_runs_show_which_jobs_ask_for_a_gpu(tmp_path):
    bare_path = path_without_scheduler(tmp_path / "bin")
    result = Workflow(tmp_path, gpu_config()).run("--dry-run", *PROFILES["slurm"], path=bare_path, timeout=120)
    resources = {}
    for block in result.stdout.split("rule ")[1:]:
        rule = block.split(":", 1)[0]
        line = next((line for line in block.splitlines() if "resources:" in line), "")
        resources.setdefault(rule, set()).add("gpu=1" in line)
    assert resources["sample"] == {True}
    assert resources["combine"] == {False} and resources["reweight"] == {False}
