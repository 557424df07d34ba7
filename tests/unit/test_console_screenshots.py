"""docs/console.md's screenshots are of the current pages: the templates and the stylesheet each
PNG shows are, byte for byte, the ones scripts/console_screenshots.py took it of (its manifest,
docs/console/screenshots.json, records their sha256)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "console"
TEMPLATES = ROOT / "rabbitq" / "_console" / "templates"
REGENERATE = "run `python scripts/console_screenshots.py` (it needs RabbitMQ and chromium)"
# Pages with no screenshot, and why.
UNSHOWN = {
    "login.html": "a password field and a button",
    "error.html": "one line of text",
}


def manifest() -> dict[str, dict[str, str]]:
    data: dict[str, Any] = json.loads((SHOTS / "screenshots.json").read_text())
    shots: dict[str, dict[str, str]] = data["screenshots"]
    return shots


@pytest.mark.parametrize(
    ("png", "source"),
    [(png, source) for png, sources in manifest().items() for source in sorted(sources)],
)
def test_each_screenshot_is_of_the_pages_source_as_it_is_now(png: str, source: str) -> None:
    """The file a screenshot shows has the sha256 it had when the screenshot was taken."""
    path = ROOT / source
    assert path.is_file(), f"{png} shows {source}, which is gone; {REGENERATE}"
    now = hashlib.sha256(path.read_bytes()).hexdigest()
    assert now == manifest()[png][source], (
        f"{source} changed since docs/console/{png} was taken; {REGENERATE}"
    )


def test_every_screenshot_is_a_png_of_the_window_size_in_the_docs() -> None:
    """Each PNG of the manifest exists, is 1280x860, and docs/console.md shows it."""
    text = (ROOT / "docs" / "console.md").read_text()
    shown = set(re.findall(r"\]\(console/([\w-]+\.png)\)", text))
    assert shown == set(manifest()), f"docs/console.md shows {sorted(shown)}"
    for png in manifest():
        data = (SHOTS / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{png} is not a PNG; {REGENERATE}"
        assert struct.unpack(">II", data[16:24]) == (1280, 860), png


def test_every_page_template_has_a_screenshot() -> None:
    """A new page gets its screenshot (or a reason in UNSHOWN)."""
    pictured = {Path(s).name for sources in manifest().values() for s in sources}
    pages = {p.name for p in TEMPLATES.glob("*.html")}
    missing = pages - pictured - set(UNSHOWN)
    assert not missing, (
        f"no screenshot shows {sorted(missing)}; add it to the script, then {REGENERATE}"
    )
