"""The public API: what `rabbitq/__init__.py` re-exports is exactly what `__all__` lists."""

from __future__ import annotations

import re
import types
from pathlib import Path

import rabbitq

README = Path(__file__).resolve().parents[2] / "README.md"


def _public_names() -> set[str]:
    # Importing rabbitq puts its submodules (rabbitq._app, rabbitq._errors, ...) in its namespace
    # too; those are reached as modules, not re-exported names.
    return {
        name
        for name, value in vars(rabbitq).items()
        if (not name.startswith("_") or name == "__version__")
        and not isinstance(value, types.ModuleType)
    }


def test_all_is_sorted() -> None:
    """`rabbitq.__all__` is sorted and has no duplicates."""
    assert rabbitq.__all__ == sorted(set(rabbitq.__all__))


def test_all_lists_every_public_name() -> None:
    """Every public name in `rabbitq/__init__.py` is in `__all__`, and nothing else is."""
    assert set(rabbitq.__all__) == _public_names()


def test_every_exported_member_belongs_to_rabbitq() -> None:
    """Each name in `__all__` is defined in a rabbitq module (no re-exported third-party API)."""
    for name in rabbitq.__all__:
        if name == "__version__":
            continue
        member = getattr(rabbitq, name)
        assert member.__module__.startswith("rabbitq."), (name, member.__module__)


def test_the_api_section_of_readme_lists_exactly_all() -> None:
    """README's "Public API" section names every exported name, and no other."""
    section = README.read_text().split("## Public API", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`rabbitq\.([A-Za-z]\w*|__version__)`", section)) == set(rabbitq.__all__)


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    assert rabbitq.__version__ == version("rabbitq")
