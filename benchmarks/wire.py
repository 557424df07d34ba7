"""What the benchmark puts on the wire: a ~100-byte task body and rabbitq's task properties.

Stdlib only. The raw aio-pika baseline imports this module, and its memory and import time are
part of what it measures, so it must not pull in rabbitq or pydantic. The property and header
names repeat rabbitq's documented wire format (README, "Wire format"); if they drift, rabbitq
parks the pre-published tasks and the run fails its counts, so the smoke test catches it.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

# rabbitq's wire format, as a producer in any language would write it.
TASK_TYPE_PREFIX = "bench."
HEADER_ATTEMPT = "rabbitq-attempt"
CONTENT_TYPE = "application/json"
PERSISTENT = 2

BODY_BYTES = 100
_SKELETON = {"id": 0, "sent_at": 0.0, "pad": ""}


def pad_for(task_id: int, sent_at: float) -> str:
    """Padding that brings the JSON body to about BODY_BYTES."""
    used = len(json.dumps({**_SKELETON, "id": task_id, "sent_at": sent_at}, separators=(",", ":")))
    return "x" * max(0, BODY_BYTES - used)


def body(task_id: int, sent_at: float = 0.0) -> bytes:
    """The JSON body of one task: what the rabbitq handler's `Job` model reads."""
    data = {"id": task_id, "sent_at": sent_at, "pad": pad_for(task_id, sent_at)}
    return json.dumps(data, separators=(",", ":")).encode()


def sent_at_of(raw: bytes) -> float:
    """The publish wall-clock time carried in a body (AMQP timestamps are whole seconds)."""
    value = json.loads(raw)["sent_at"]
    assert isinstance(value, float | int)
    return float(value)


def task_properties(workload: str, attempt: int = 1) -> dict[str, Any]:
    """aio-pika `Message` keyword arguments for a rabbitq task of `workload`.

    Used for every pre-published message, in the raw queues too, so raw and rabbitq consumers
    decode the same frames and the difference is only what each does with them.
    """
    return {
        "content_type": CONTENT_TYPE,
        "delivery_mode": PERSISTENT,
        "message_id": uuid.uuid4().hex,
        "timestamp": int(time.time()),
        "type": f"{TASK_TYPE_PREFIX}{workload}",
        "headers": {HEADER_ATTEMPT: attempt},
    }
