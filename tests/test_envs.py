"""Per-rule conda environments, checked statically (no conda channel is reachable here):
they parse, their pins equal pyproject's, their variables agree with the config defaults,
every rule names one, and each holds every third-party module its rules' code imports."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import REPO

ENVS = REPO / "envs"
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
PYPROJECT_PINS = dict(
    line.split("==") for line in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
)
#: import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "absl": "absl-py"}


def env(name: str) -> dict:
    return yaml.safe_load((ENVS / f"{name}.yaml").read_text())


def pip_pins(name: str) -> dict[str, str]:
    """Distribution -> pinned version (extras dropped: ``jax[cuda12]`` pins ``jax``)."""
    pip = next(item["pip"] for item in env(name)["dependencies"] if isinstance(item, dict))
    return {re.sub(r"\[.*\]", "", line.split("==")[0]): line.split("==")[1] for line in pip}


def rule_envs() -> dict[str, tuple]:
    """Rule name -> (its envs: the one it names, or for a rule that can run on a GPU
    ``jax_env(stage, cpu_env)`` both its CPU env and jax-gpu; its script), from the rule files."""
    found = {}
    for path in (REPO / "workflow/rules").glob("*.smk"):
        for rule, body in re.findall(r"^rule (\w+):\n(.*?)(?=^rule |\Z)", path.read_text(), flags=re.S | re.M):
            match = re.search(r'conda:\n\s+"\.\./\.\./envs/([\w-]+)\.yaml"', body)
            either = re.search(r'conda:\n\s+jax_env\("\w+", "([\w-]+)"\)', body)
            envs = [match.group(1)] if match else [either.group(1), "jax-gpu"] if either else []
            script = re.search(r'script:\n\s+"\.\./\.\./scripts/(\w+)\.py"', body)
            found[rule] = (envs, script and script.group(1))
    return found


def executed_imports(tree: ast.AST):
    """Import statements that run when the module runs: function bodies are skipped (model
    functions import NumPyro lazily, by design, so that light stages never load it)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from executed_imports(node)


def imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # "from cmcflow.models import structure" may name a module: count both readings
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def third_party_imports(script: Path) -> set[str]:
    """Third-party top-level modules that a rule script loads when it runs.

    cmcflow modules are followed wherever they are imported (a function that imports
    one, like the model registry, does run); third-party imports count where they run
    when their module is imported, not inside function bodies.
    """
    seen, found, queue = set(), set(), [script]
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            for name in imported_names(node):
                module = REPO / "workflow" / Path(*name.split("."))
                if name.split(".")[0] == "cmcflow":
                    queue += [p for p in (module.with_suffix(".py"), module / "__init__.py") if p.exists()]
        for node in executed_imports(tree):
            for name in imported_names(node):
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("cmcflow", "__future__"):
                    found.add(top)
    return found


@pytest.mark.parametrize("name", ["light", "jax-devices", "jax-single", "jax-gpu"])
def test_env_pins_equal_pyproject(name):
    pins = pip_pins(name)
    assert pins, name
    assert {package: PYPROJECT_PINS.get(package) for package in pins} == pins
    assert "python=3.11" in env(name)["dependencies"]


def test_variables_agree_with_config_defaults():
    jax_defaults = SCHEMA["properties"]["jax"]["properties"]
    devices, x64 = jax_defaults["devices"]["default"], jax_defaults["precision"]["default"] != "float32"
    assert env("jax-devices")["variables"]["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={devices}"
    assert env("jax-single")["variables"]["XLA_FLAGS"] == "--xla_force_host_platform_device_count=1"
    for name in ("jax-devices", "jax-single"):
        variables = env(name)["variables"]
        assert variables["JAX_PLATFORMS"] == "cpu" and variables["JAX_ENABLE_X64"] == str(int(x64))
    gpu = env("jax-gpu")["variables"]
    assert gpu["JAX_PLATFORMS"] == "cuda" and gpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" and "XLA_FLAGS" not in gpu
    assert gpu["JAX_ENABLE_X64"] == str(int(x64))
    assert (
        "jax[cuda12]==" + PYPROJECT_PINS["jax"]
        in next(item for item in env("jax-gpu")["dependencies"] if isinstance(item, dict))["pip"]
    )
    for name in ("light", "jax-devices", "jax-single", "jax-gpu"):
        assert {env(name)["variables"][v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")} == {
            "1"
        }


def test_every_rule_with_a_script_names_an_env_that_holds_its_imports():
    rules = {rule: found for rule, found in rule_envs().items() if found[1]}
    assert len(rules) >= 9, rules
    on_gpu = {rule for rule, (envs, _) in rules.items() if "jax-gpu" in envs}
    assert on_gpu == {"sample", "sample_batch", "sample_fulldata", "align_reference", "align"}
    for rule, (envs, script) in rules.items():
        assert envs, f"rule {rule} has no conda: directive"
        needed = {
            DISTRIBUTIONS.get(module, module) for module in third_party_imports(REPO / "scripts" / f"{script}.py")
        }
        for env_name in envs:
            available = {package.lower() for package in pip_pins(env_name)}
            assert needed <= available, (rule, env_name, needed - available)
