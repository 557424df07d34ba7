"""pyproject.toml says what setuptools expects today, so an install prints no deprecation."""

from __future__ import annotations

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_the_license_is_an_spdx_expression_not_a_table() -> None:
    # a `license = { text = ... }` table makes setuptools >= 77 warn on every build
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert project["license"] == "MIT"
    assert "License ::" not in " ".join(project.get("classifiers", []))
