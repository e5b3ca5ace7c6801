"""JAX hygiene: environment before import, and an exact device count or a loud failure."""

from __future__ import annotations

import subprocess
import sys

import jax

from cmcflow.jaxenv import xla_flags_with_devices


def test_this_process_has_four_devices():
    assert len(jax.devices()) == 4


def test_device_flag_is_replaced_not_duplicated():
    flags = xla_flags_with_devices("--xla_cpu_foo=1 --xla_force_host_platform_device_count=2", 4)
    assert flags == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})


def test_configure_after_jax_import_fails_loudly():
    result = run_python("import jax\nfrom cmcflow.jaxenv import configure_jax\nconfigure_jax(4, True, None)")
    assert result.returncode != 0
    assert "jax was imported before" in result.stderr


def test_wrong_device_count_fails_loudly():
    result = run_python(
        "from cmcflow.jaxenv import configure_jax\nconfigure_jax(3, True, None)\n"
        "from cmcflow.jaxenv import require_device_count\nrequire_device_count(4)"
    )
    assert result.returncode != 0
    assert "this job needs 4 JAX devices but JAX sees 3" in result.stderr
