"""Log lines: text for people, one JSON object per line for machines; never a password.

Outcome lines carry their facts as fields (`extra=`): workload, task, message id, attempt,
duration, and for failures the error, the tier or the park reason. The text format appends
them as `key=value`; the JSON format makes them keys. A parked task's traceback travels in
the `traceback` field, so it is printed once, under its line.

Both formatters scrub the broker URL's password from everything they write, including what
a library quoted back in an exception.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from rabbitq._connection import scrub

FORMATS = ("text", "json")
# In this order on a text line.
FIELDS = "workload task message_id attempt outcome reason duration_seconds tier error".split()
TRACEBACK = "traceback"


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return json.dumps(text) if (" " in text or '"' in text or not text) else text


class _Scrubbing(logging.Formatter):
    def __init__(self, urls: tuple[str, ...] = (), fmt: str | None = None) -> None:
        super().__init__(fmt)
        self.urls = tuple(u for u in urls if u)

    def scrub(self, text: str) -> str:
        for url in self.urls:
            text = scrub(text, url)
        return text


class TextFormatter(_Scrubbing):
    """`time LEVEL logger: message key=value ...`, then a traceback if there is one."""

    def __init__(self, urls: tuple[str, ...] = ()) -> None:
        super().__init__(urls, "%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = record.__dict__
        extra = " ".join(
            f"{key}={_text_value(fields[key])}" for key in FIELDS if fields.get(key) is not None
        )
        if extra:
            line = f"{line} {extra}"
        tb = fields.get(TRACEBACK)
        if tb:
            line = f"{line}\n{tb.rstrip()}"
        return line

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(super().format(record))


class JsonFormatter(_Scrubbing):
    """One JSON object per line: time, level, logger, message, the fields, any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update((key, fields[key]) for key in FIELDS if fields.get(key) is not None)
        tb = fields.get(TRACEBACK)
        if tb:
            data[TRACEBACK] = tb
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return self.scrub(json.dumps(data, default=str))


def setup(
    level: str = "info",
    fmt: str = "text",
    urls: tuple[str, ...] = (),
    libraries: int = logging.WARNING,
    stream: TextIO | None = None,
) -> None:
    """Send every log line to stderr (or `stream`) in `fmt`, masking the passwords of `urls`."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(urls) if fmt == "json" else TextFormatter(urls))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aio-pika and aiormq narrate every failed connect and reconnect; rabbitq's own lines say
    # what matters (and a one-shot command's failure is its one `error:` line).
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(libraries, root.level))
