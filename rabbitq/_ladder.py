"""Delays of any length held in the broker: the binary delay ladder of a namespace.

A task that should run later waits in queues with one fixed TTL each, never in a consumer's
memory. Level i is a quorum queue `NS.delay.II` whose `x-message-ttl` is 2^i seconds; 28 levels
reach 2^28 - 1 seconds (8 years 186 days). The routing key carries the delay in binary, most
significant bit first, then the workload::

    delay 13 s = 0b1101  ->  "0.0.(…).0.1.1.0.1.emails"  (28 digits, then the workload)

Each level has a topic exchange of the same name. It routes a key whose digit for that level is
1 into the level's queue, and one whose digit is 0 on to the next lower level's exchange
(level 0's: the `NS.delay.due` exchange). A level's queue dead-letters expired tasks, with their
routing key, to the next lower level's exchange; `NS.delay.due` routes `#.W` to the work queue
of workload W. A task enters at the exchange of its highest set bit and waits in exactly the
levels whose bits are set: 13 s is 8 s, then 4 s, then 1 s. Every queue holds one TTL, so
expiry at its head is in arrival order: no head-of-line blocking, whatever the mix of delays.

Why quorum levels with at-least-once dead-lettering (`x-overflow: reject-publish`): a classic
queue dead-letters at-most-once, so a task could vanish between two levels while the broker
stops (NServiceBus' first ladder, on classic queues, lost delayed messages). The key is at most
28 * 2 + 63 bytes, far under AMQP's 255 (kombu#2556 grew its key past it). Delays are whole
seconds: a delay is rounded to the nearest second, and one under half a second is no delay.
TTLs are wall-clock: after an outage every overdue task is released at once.

Pure: names, arguments, routes and paths; `_topology` declares them with the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

LEVELS = 28
MAX_DELAY_SECONDS = 2**LEVELS - 1
# A delay that rounds to zero seconds is no delay: the task is published to run now.
WHOLE_SECOND = 0.5


@dataclass(frozen=True, slots=True)
class Route:
    """Where a delayed task is published: the exchange of its highest level, and its key."""

    delay_seconds: int
    exchange: str
    routing_key: str


def level_name(namespace: str, level: int) -> str:
    """The exchange and the queue of one level: `NS.delay.00` to `NS.delay.27`."""
    return f"{namespace}.delay.{level:02d}"


def due_exchange(namespace: str) -> str:
    """Where a task goes once its delay is over: a topic exchange routing `#.W` to W's work."""
    return f"{namespace}.delay.due"


def level_seconds(level: int) -> int:
    return 1 << level


def digits(delay_seconds: int) -> str:
    """The delay as the key's 28 dotted binary digits, most significant first."""
    return ".".join(format(delay_seconds, f"0{LEVELS}b"))


def whole_seconds(delay_seconds: float) -> int:
    """The ladder's delay for a wanted one: rounded to the nearest second, 0 for no delay.

    Raises:
        ValueError: negative, or past `MAX_DELAY_SECONDS`.
    """
    if delay_seconds < 0:
        raise ValueError(f"a delay cannot be negative, got {delay_seconds}s")
    whole = int(delay_seconds + WHOLE_SECOND)
    if whole > MAX_DELAY_SECONDS:
        raise ValueError(
            f"a delay of {delay_seconds:.0f}s is past the ladder's longest, "
            f"{MAX_DELAY_SECONDS}s ({format_seconds(MAX_DELAY_SECONDS)})"
        )
    return whole


def route(namespace: str, workload: str, delay_seconds: int) -> Route:
    """Where to publish a task of `workload` delayed by `delay_seconds` (1 or more, whole)."""
    if not 1 <= delay_seconds <= MAX_DELAY_SECONDS:
        raise ValueError(f"a ladder delay is 1 to {MAX_DELAY_SECONDS}s, got {delay_seconds}")
    top = delay_seconds.bit_length() - 1
    return Route(delay_seconds, level_name(namespace, top), f"{digits(delay_seconds)}.{workload}")


def path(delay_seconds: int) -> list[int]:
    """The levels a delayed task waits in, in order (highest first)."""
    return [level for level in reversed(range(LEVELS)) if delay_seconds >> level & 1]


def level_patterns(level: int) -> tuple[str, str]:
    """The topic patterns of a level's exchange: digit 1 (into its queue), digit 0 (on down)."""
    skip = "*." * (LEVELS - 1 - level)  # the digits of the higher levels come first
    return f"{skip}1.#", f"{skip}0.#"


def due_pattern(workload: str) -> str:
    return f"#.{workload}"


def lower(namespace: str, level: int) -> str:
    """The exchange below `level`: where its expired tasks and its 0-digit keys go."""
    return due_exchange(namespace) if level == 0 else level_name(namespace, level - 1)


def format_seconds(seconds: int) -> str:
    """A ladder duration in its two largest units, as an operator reads it: 1s, 17m4s, 4y93d."""
    units = (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    parts: list[str] = []
    rest = seconds
    for unit, size in units:
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
        if len(parts) == 2:
            break
    return "".join(parts) or "0s"
