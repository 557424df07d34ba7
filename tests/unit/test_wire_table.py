"""README's wire-format table says what `_wire` writes and reads: checked, not trusted."""

from __future__ import annotations

import re
from pathlib import Path

from rabbitq import _wire
from rabbitq._wire import Outgoing, new_task_headers

README = Path(__file__).resolve().parents[2] / "README.md"


def _table() -> dict[str, str]:
    section = README.read_text().split("## Wire format", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.+?) \| (.+?) \|$", section, flags=re.M)
    return {what.strip(): value for what, value in rows if what not in ("what", "---")}


def test_every_header_in_the_table_is_one_the_wire_module_knows() -> None:
    headers = {value for name, value in vars(_wire).items() if name.startswith("HEADER_")}
    named = [re.fullmatch(r"header `([\w-]+)`", what) for what in _table()]
    assert {m.group(1) for m in named if m} <= headers


def test_the_headers_and_properties_of_a_new_task_are_all_in_the_table() -> None:
    table = _table()
    written = new_task_headers(deadline=2_000_000_000.0, published_at=1_700_000_000.0)
    assert {f"header `{h}`" for h in written} <= table.keys()
    properties = Outgoing("x", "w", b"{}", "m-1", written, task="t", priority=1).amqp_properties()
    set_properties = {
        k for k in properties.attributes() if k != "headers" and getattr(properties, k)
    }
    listed = {re.sub(r"`", "", what) for what in table if what.startswith("`")}
    assert {p.replace("message_type", "type") for p in set_properties} <= listed
