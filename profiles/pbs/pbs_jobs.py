"""PBS for Snakemake's cluster-generic executor: submit, status and the two PBS flavours.

Submission turns a job's ``threads``, ``resources.mem_mb``, ``resources.runtime``
(minutes) and ``resources.gpu`` (GPUs; 0 or absent: none) into a qsub request:

- PBS Pro / OpenPBS: ``-l select=1:ncpus=N:mem=Mmb[:ngpus=G] -l walltime=HH:MM:SS``
- Torque:            ``-l nodes=1:ppn=N[:gpus=G],mem=Mmb,walltime=HH:MM:SS``

The flavour is the string resource ``pbs_flavour`` (set in the profile's
``default-resources``); extra qsub arguments (queue, account) the string resource
``pbs_extra``. Every job runs inside a small wrapper that writes its exit code to a file, because some
PBS front-ends (Torque wrappers over SLURM, or a job that has left PBS Pro's history)
report no exit status. Status (``running``, ``success`` or ``failed``, as cluster-generic
expects): the exit-code file if present; else ``qstat`` (``-x -f -F json`` for PBS Pro,
``-f`` for Torque); a failing or timed-out ``qstat`` answers ``running``, never ``failed``,
so one flaky scheduler call cannot fail a run. Standard library only, so that whichever
``python3`` the submit host finds can run it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

FLAVOURS = ("pbspro", "torque")
#: Where wrappers, exit codes and job-id -> token records live (relative to the workdir).
STATE_DIR = Path(".snakemake/cmcflow-pbs")
QSTAT_TIMEOUT_S = 30
RUNNING, SUCCESS, FAILED = "running", "success", "failed"


def walltime(minutes: float) -> str:
    seconds = int(round(minutes * 60))
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def resource_request(flavour: str, threads: int, mem_mb: int, runtime_min: float, gpus: int = 0) -> list[str]:
    """qsub ``-l`` arguments for one node with ``threads`` cores, ``gpus`` GPUs, ``mem_mb``
    MB, ``runtime_min`` minutes."""
    if flavour == "pbspro":
        gpu = f":ngpus={gpus}" if gpus else ""
        return ["-l", f"select=1:ncpus={threads}:mem={mem_mb}mb{gpu}", "-l", f"walltime={walltime(runtime_min)}"]
    if flavour == "torque":
        gpu = f":gpus={gpus}" if gpus else ""
        return ["-l", f"nodes=1:ppn={threads}{gpu},mem={mem_mb}mb,walltime={walltime(runtime_min)}"]
    raise ValueError(f"unknown PBS flavour {flavour!r}; choose one of {FLAVOURS}")


def read_job_properties(jobscript: str) -> dict:
    """The job properties Snakemake writes into a cluster jobscript (``# properties = {…}``)."""
    match = re.search(r"^# properties = (.*)$", Path(jobscript).read_text(), flags=re.M)
    if match is None:
        raise ValueError(f"{jobscript} has no '# properties = ' line")
    return json.loads(match.group(1))


def qsub_command(flavour: str, script: str, properties: dict, log_dir: str) -> list[str]:
    """The qsub command line for a job with Snakemake job ``properties``."""
    resources = properties.get("resources", {})
    extra = shlex.split(str(resources.get("pbs_extra", "")))
    name = f"smk-{properties.get('rule', 'group')}"
    log = f"{log_dir}/{name}-%j.log" if flavour == "torque" else f"{log_dir}/{name}.log"
    return [
        "qsub",
        "-N",
        name,
        *resource_request(
            flavour,
            int(properties.get("threads", 1)),
            int(resources["mem_mb"]),
            float(resources["runtime"]),
            int(resources.get("gpu", 0)),
        ),
        "-j",
        "oe",
        "-o",
        log,
        *extra,
        script,
    ]


def wrap_jobscript(jobscript: str, state_dir: Path) -> tuple[Path, str]:
    """A wrapper that runs ``jobscript`` and writes its exit code to ``<token>.exit``."""
    token = uuid.uuid4().hex
    state_dir.mkdir(parents=True, exist_ok=True)
    exit_file = shlex.quote(str((state_dir / f"{token}.exit").resolve()))
    wrapper = state_dir / f"{token}.sh"
    wrapper.write_text(
        "#!/bin/bash\n"
        f"bash {shlex.quote(os.path.abspath(jobscript))}\n"
        "code=$?\n"
        f"echo $code > {exit_file}.tmp && mv {exit_file}.tmp {exit_file}\n"
        "exit $code\n"
    )
    wrapper.chmod(0o755)
    return wrapper.resolve(), token


def record_job(state_dir: Path, job_id: str, token: str, flavour: str) -> None:
    (state_dir / "jobs").mkdir(parents=True, exist_ok=True)
    (state_dir / "jobs" / job_id).write_text(f"{token} {flavour}\n")


def recorded_job(state_dir: Path, job_id: str) -> tuple[str, str] | None:
    """``(token, flavour)`` recorded at submission, or ``None`` for a job not submitted here."""
    try:
        token, flavour = (state_dir / "jobs" / job_id).read_text().split()
    except (FileNotFoundError, ValueError):
        return None
    return token, flavour


def exit_code(state_dir: Path, token: str) -> int | None:
    """The job's exit code, or ``None`` if it has not written one (yet)."""
    try:
        return int((state_dir / f"{token}.exit").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def pbspro_status(document: str, job_id: str) -> str | None:
    """Status from ``qstat -x -f -F json <id>``; ``None`` if the job is not in it."""
    jobs = json.loads(document).get("Jobs", {})
    job = jobs.get(job_id) or next(
        (value for key, value in jobs.items() if key.split(".")[0] == job_id.split(".")[0]), None
    )
    if job is None:
        return None
    if job.get("job_state") in ("F", "X"):  # finished; X: finished array subjob
        return SUCCESS if int(job.get("Exit_status", 1)) == 0 else FAILED
    return RUNNING


def torque_status(document: str) -> str | None:
    """Status from ``qstat -f <id>``; ``None`` when the job is complete but no exit status
    is printed (the exit-code file decides then)."""
    state = re.search(r"^\s*job_state\s*=\s*(\w)", document, flags=re.M)
    if state is None:
        return None
    if state.group(1) != "C":
        return RUNNING
    exit_status = re.search(r"^\s*exit_status\s*=\s*(-?\d+)", document, flags=re.M | re.I)
    if exit_status is None:
        return None
    return SUCCESS if int(exit_status.group(1)) == 0 else FAILED


def unknown_job(stderr: str) -> bool:
    return bool(re.search(r"unknown job|invalid job id|does not exist|job has finished", stderr, flags=re.I))


def job_status(job_id: str, state_dir: Path = STATE_DIR, run=subprocess.run) -> str:
    """``running``, ``success`` or ``failed`` for a job submitted by :func:`submit`."""
    record = recorded_job(state_dir, job_id)
    if record is None:
        return FAILED  # not submitted by this workflow's submit command
    token, flavour = record
    code = exit_code(state_dir, token)
    if code is not None:
        return SUCCESS if code == 0 else FAILED
    command = ["qstat", "-x", "-f", "-F", "json", job_id] if flavour == "pbspro" else ["qstat", "-f", job_id]
    try:
        result = run(command, capture_output=True, text=True, timeout=QSTAT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return RUNNING
    if result.returncode != 0:
        # a job the scheduler no longer knows and that left no exit code cannot have succeeded
        return FAILED if unknown_job(result.stderr) else RUNNING
    try:
        status = pbspro_status(result.stdout, job_id) if flavour == "pbspro" else torque_status(result.stdout)
    except (json.JSONDecodeError, ValueError, AttributeError):
        return RUNNING
    if status is None:
        # complete without an exit status: the exit-code file is about to appear
        return RUNNING if flavour == "torque" else FAILED
    return status


def submit(jobscript: str, state_dir: Path = STATE_DIR, run=subprocess.run) -> str:
    """Submit ``jobscript``; return the job id that qsub printed."""
    properties = read_job_properties(jobscript)
    flavour = str(properties.get("resources", {}).get("pbs_flavour", "pbspro"))
    if flavour not in FLAVOURS:
        sys.exit(f"unknown pbs_flavour {flavour!r}; choose one of {FLAVOURS}")
    wrapper, token = wrap_jobscript(jobscript, state_dir)
    log_dir = Path("logs/pbs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    command = qsub_command(flavour, str(wrapper), properties, str(log_dir))
    result = run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"qsub failed ({result.returncode}): {' '.join(map(shlex.quote, command))}\n{result.stderr}")
    job_id = result.stdout.strip().splitlines()[0]
    record_job(state_dir, job_id, token, flavour)
    return job_id


def main(argv: list[str]) -> None:
    """``pbs_jobs.py submit JOBSCRIPT`` | ``pbs_jobs.py status JOBID``."""
    action, argument = argv
    if action == "submit":
        print(submit(argument))
    elif action == "status":
        print(job_status(argument))
    else:
        sys.exit(f"unknown action {action!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
