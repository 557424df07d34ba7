"""The public API: what `rabbitq/__init__.py` re-exports is exactly what `__all__` lists."""

from __future__ import annotations

import types

import rabbitq


def _public_names() -> set[str]:
    # Importing rabbitq puts its submodules (rabbitq._app, rabbitq._errors, ...) in its namespace
    # too; those are reached as modules, not re-exported names.
    return {
        name
        for name, value in vars(rabbitq).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
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
        member = getattr(rabbitq, name)
        assert member.__module__.startswith("rabbitq."), (name, member.__module__)
