"""JAX hygiene: environment before import, and an exact device count or a loud failure."""

from __future__ import annotations

import subprocess
import sys

import jax

from cmcflow.jaxenv import chain_layout, require_devices, xla_flags_with_devices


def test_this_process_has_four_devices():
    assert len(jax.devices()) == 4


def test_device_flag_is_replaced_not_duplicated():
    flags = xla_flags_with_devices("--xla_cpu_foo=1 --xla_force_host_platform_device_count=2", 4)
    assert flags == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=4"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PATH": ""})


def test_configure_after_jax_import_fails_loudly():
    result = run_python("import jax\nfrom cmcflow.jaxenv import configure_jax\nconfigure_jax(4, 'float64', None)")
    assert result.returncode != 0
    assert "jax was imported before" in result.stderr


def test_wrong_device_count_fails_loudly():
    result = run_python(
        "from cmcflow.jaxenv import configure_jax\nconfigure_jax(3, 'float64', None)\n"
        "from cmcflow.jaxenv import require_devices\nrequire_devices(4)"
    )
    assert result.returncode != 0
    assert "this job needs 4 JAX devices but JAX sees 3" in result.stderr


def test_nodes_of_different_cpu_types_never_share_compiled_programs(tmp_path):
    """The persistent compilation cache is split by CPU signature (model and instruction-set
    flags): two faked CPU types get two directories, the same type one."""
    from cmcflow.jaxenv import host_cache_dir

    skylake = "processor\t: 0\nmodel name\t: Intel Xeon Gold 6130\nflags\t\t: fpu sse2 avx2 avx512f\n\nprocessor\t: 1\n"
    zen = "processor\t: 0\nmodel name\t: AMD EPYC 7742\nflags\t\t: fpu sse2 avx2\n"
    shared = str(tmp_path / "jax")
    first, second = host_cache_dir(shared, skylake), host_cache_dir(shared, zen)
    assert first != second and first.startswith(shared) and second.startswith(shared)
    assert host_cache_dir(shared, skylake) == first
    assert host_cache_dir(shared, skylake.replace("avx512f", "")) != first  # same model, other features


def test_float32_precision_turns_x64_off_and_stores_data_in_float32():
    result = run_python(
        "from cmcflow.jaxenv import configure_jax\nconfigure_jax(1, 'float32', None)\n"
        "import numpy as np, jax.numpy as jnp\nfrom cmcflow.transforms import model_kwargs\n"
        "kwargs = model_kwargs({'X': np.ones((2, 2)), 'i': np.arange(2)}, {'prior_sd': 1.0})\n"
        "print(jnp.zeros(1).dtype, kwargs['X'].dtype, kwargs['i'].dtype)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["float32", "float32", "int32"]


def test_an_unknown_precision_is_refused_before_jax_is_imported():
    result = run_python("from cmcflow.jaxenv import configure_jax\nconfigure_jax(1, 'float16', None)")
    assert result.returncode != 0
    assert "jax.precision must be one of float64, float32, mixed, not 'float16'" in result.stderr


def test_chains_run_one_per_virtual_cpu_device_or_all_on_the_one_gpu():
    assert chain_layout("cpu", 4) == (4, "parallel")
    assert chain_layout("gpu", 4) == (1, "vectorized")


def test_a_gpu_job_that_sees_no_gpu_fails_loudly():
    """The CPU devices of this process stand in for what a GPU job would see on a node
    without one."""
    try:
        require_devices(1, "gpu", found=jax.devices())
    except RuntimeError as error:
        assert "this job runs on a GPU (platform: gpu) but JAX sees [CpuDevice" in str(error)
        assert "envs/jax-gpu.yaml" in str(error)
    else:
        raise AssertionError("no error")
    result = run_python("from cmcflow.jaxenv import configure_jax\nconfigure_jax(1, 'mixed', None, platform='gpu')")
    assert result.returncode != 0
    assert "RuntimeError: this job runs on a GPU (platform: gpu) but JAX found none (" in result.stderr, result.stderr


def test_gpu_programs_have_a_cache_of_their_own(tmp_path):
    from cmcflow.jaxenv import host_cache_dir

    shared = str(tmp_path / "jax")
    assert host_cache_dir(shared, "", platform="gpu") != host_cache_dir(shared, "")
