"""The documentation states the defaults the code has: config/README.md's tables and
README.md's sentences against the config schema (the one place for defaults), and the
built-in models' documented hyperparameters against their specs."""

from __future__ import annotations

import re

import pytest
import yaml
from conftest import REPO

from cmcflow.config import schema
from cmcflow.models import get_model


def schema_node(root: dict, key: str) -> dict:
    """The schema node of a dotted key (``combine.screen.max_r_hat``) under ``root``."""
    node = root
    for part in key.split("."):
        node = node["properties"][part]
    return node


def documented_defaults() -> list[tuple[str, str, object]]:
    """(section, key, default) for every row of config/README.md's tables whose default
    column is code: ``| `a`, `b` | `1`, `2` | … |`` documents two keys."""
    rows, section = [], None
    for line in (REPO / "config/README.md").read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or cells[0] in ("key", "---"):
            continue
        keys, defaults = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        if defaults:
            assert len(keys) == len(defaults), line
            rows += [(section, key, yaml.safe_load(default)) for key, default in zip(keys, defaults)]
    return rows


def schema_defaults(node: dict, prefix: str = "") -> dict[str, object]:
    """Every leaf setting with a default under ``node``: dotted key -> default."""
    found = {}
    for name, child in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        if "properties" in child:
            found |= schema_defaults(child, f"{key}.")
        elif "default" in child:
            found[key] = child["default"]
    return found


SECTIONS = {"Top level": lambda: schema(), "One analysis": lambda: schema()["$defs"]["analysis"]}


def test_config_readme_defaults_equal_the_schema():
    rows = documented_defaults()
    assert len(rows) > 20
    for section, key, default in rows:
        assert schema_node(SECTIONS[section](), key).get("default") == default, (section, key, default)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_config_readme_documents_every_default(section):
    documented = {key for row_section, key, _ in documented_defaults() if row_section == section}
    assert set(schema_defaults(SECTIONS[section]())) <= documented


def test_readme_defaults_equal_the_schema():
    """Sentences such as "`combine.method` is `consensus` (the default" or
    "`combine.covariance_shrinkage: auto` (the default)"."""
    text = " ".join((REPO / "README.md").read_text().split())
    claims = re.findall(r"`([a-z_.]+)` is `([^`]+)` \(the default", text)
    claims += re.findall(r"`([a-z_.]+): ([^`]+)` \(the default", text)
    assert len(claims) >= 2, claims
    analysis = schema()["$defs"]["analysis"]
    for key, value in claims:
        assert schema_node(analysis, key)["default"] == yaml.safe_load(value), (key, value)


def test_readme_model_hyperparameters_equal_the_specs():
    """Each built-in model's bullet under "Built-in models:" names its options as `name`=value."""
    text = (REPO / "README.md").read_text().split("Built-in models", 1)[1].split("\n\n", 1)[0]
    bullets = re.findall(r"^- `([a-z_]+)`:(.*?)(?=^- |\Z)", text, flags=re.M | re.S)
    assert [name for name, _ in bullets] == [
        "linear", "logistic", "poisson", "negative_binomial", "linear_gaussian", "structure"
    ]  # fmt: skip
    for name, bullet in bullets:
        documented = {option: float(value) for option, value in re.findall(r"`([a-z_]+)`=([0-9.]+)", bullet)}
        assert documented == get_model(name).options, name
