"""Reading the console's query strings and forms into the parking lot's selections, and paging:
pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import urlencode

from rabbitq._errors import UsageError
from rabbitq._parking import Filter
from rabbitq._topology import parse_duration

T = TypeVar("T")

PAGE_SIZE = 50
FILTER_FIELDS = ("task", "reason", "error", "since", "group")
ACTIONS = ("replay", "purge")
SCOPES = ("selected", "matching")  # the ticked tasks, or every task the filter matches


def selection(params: Mapping[str, str], ids: Sequence[str] = ()) -> Filter:
    """The filter fields of a query or form (empty ones select everything), and chosen ids."""

    def field(name: str) -> str | None:
        value = params.get(name, "").strip()
        return value or None

    since = field("since")
    try:
        within = None if since is None else parse_duration(since)
    except ValueError as exc:
        raise UsageError(f"since {since!r}: {exc}") from None
    return Filter(
        task=field("task"),
        reason=field("reason"),
        error_type=field("error"),
        parked_within=within,
        group=field("group"),
        ids=frozenset(i for i in ids if i),
    )


def filter_query(params: Mapping[str, str], **changes: str | int) -> str:
    """The query string of the current filter, with `changes` (a page, a group) applied."""
    kept: dict[str, str | int] = {k: params[k] for k in FILTER_FIELDS if params.get(k)}
    kept |= changes
    return urlencode({k: v for k, v in kept.items() if v not in ("", None)})


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    number: int  # from 1
    pages: int
    total: int

    @property
    def has_previous(self) -> bool:
        return self.number > 1

    @property
    def has_next(self) -> bool:
        return self.number < self.pages


def page(items: Sequence[T], number: str | int | None, size: int = PAGE_SIZE) -> Page[T]:
    """Page `number` (clamped to the pages there are) of `items`."""
    pages = max(1, -(-len(items) // size))
    try:
        n = int(number or 1)
    except ValueError:
        n = 1
    n = min(max(1, n), pages)
    return Page(list(items[(n - 1) * size : n * size]), n, pages, len(items))


def action(value: str | None) -> str:
    if value not in ACTIONS:
        raise UsageError(f"action must be one of {', '.join(ACTIONS)}")
    return value


def requested(value: str | None) -> tuple[str, str]:
    """A form button's `do` value, e.g. `replay-selected`: the action and its scope."""
    what, _, scope = (value or "").partition("-")
    if scope not in SCOPES:
        raise UsageError(f"do {value!r} must be an action and a scope, e.g. replay-selected")
    return action(what), scope
