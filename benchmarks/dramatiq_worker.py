"""The Dramatiq consumer process: `dramatiq.Worker` with a thread per unit of concurrency.

Run by the runner as `python -m benchmarks.dramatiq_worker --mode drain --queue Q ...`, with
the probe protocol of `raw_worker.py` (`ready`, the first deliveries gated until SIGUSR1, one
JSON line). Configured as a Dramatiq user gets concurrency 64: one process, `worker_threads=64`
(what `dramatiq --processes 1 --threads 64` starts), in-process instead of through the CLI so
the process can speak the probe protocol. Dramatiq sets the prefetch itself from the threads:
twice the threads on the work queue (128 for 64 threads, so a thread finds the next message
waiting) and a thousand times on the delay queue it also consumes. The actor takes the body's
fields as keyword arguments, as Dramatiq actors do, and does nothing but the probe's
bookkeeping; Dramatiq acks after it returns.

Middleware: Dramatiq 2's defaults (AgeLimit, TimeLimit, ShutdownNotifications, Callbacks,
Pipelines, Retries), none removed: none of them needs an environment or a server, and each is
what a user pays. (Dramatiq 1 also had Prometheus in its defaults, which needs an environment
and starts an HTTP server; it is not in 2's.)

The handlers run on worker threads, so `ThreadProbe` gives them a lock and a thread-safe gate
around the shared `Probe`; the main thread waits for the result, answers SIGUSR1 and watches
for the runner's death.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import dramatiq
import pika  # type: ignore[import-untyped]  # no stubs; only its blocking connection
from dramatiq.brokers.rabbitmq import RabbitmqBroker

from benchmarks.probe import IDLE_POLL_SECONDS, Probe, worker_arguments

ACTOR_NAME = "job"
CONSUMING_TIMEOUT_SECONDS = 30.0
LOG_LEVEL = logging.WARNING


def new_broker(url: str, *, confirm_delivery: bool = False) -> RabbitmqBroker:
    """A broker with Dramatiq's default middleware (see the module docstring)."""
    return RabbitmqBroker(url=url, confirm_delivery=confirm_delivery)


def declare_actor(
    broker: RabbitmqBroker, queue_name: str, fn: Callable[..., None]
) -> dramatiq.Actor[..., None]:
    """The benchmark's actor on `queue_name`: the same name on the publishing and consuming side."""
    decorate = dramatiq.actor(broker=broker, actor_name=ACTOR_NAME, queue_name=queue_name)
    return decorate(fn)


def sender(id: int, sent_at: float, pad: str) -> None:
    """What the publishing side registers: it never runs there."""


class ThreadProbe:
    """The `Probe` for handlers on worker threads: its counters under a lock, a
    `threading.Event` gate and done, and SIGUSR1 handled in the main thread."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.lock = threading.Lock()
        self.gate = threading.Event()
        self.done = threading.Event()
        if not probe.gated:
            self.gate.set()

    def install(self) -> None:
        signal.signal(signal.SIGUSR1, self._go)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops its children itself

    def _go(self, *_: Any) -> None:
        self.probe.go_at = time.monotonic()
        self.probe.cpu_at_go = time.process_time()
        self.gate.set()

    def admit(self) -> None:
        """Called as a handler starts: the first ones wait for "go"."""
        with self.lock:
            probe = self.probe
            probe.started += 1
            if probe.started == 1:
                probe.first_at = time.monotonic()
            shut = not self.gate.is_set()
            if shut:
                probe.ready()
        if shut:
            self.gate.wait()

    def ready(self) -> None:
        with self.lock:
            self.probe.ready()

    def latency(self, sent_at: float, now: float) -> None:
        with self.lock:
            self.probe.latency(sent_at, now)

    def finished(self) -> None:
        with self.lock:
            self.probe.finished()
            if self.probe.handled == self.probe.expect:
                self.done.set()

    def idle(self) -> bool:
        """With expect 0: the gate is open, something ran, and nothing runs now."""
        with self.lock:
            probe = self.probe
            quiet = time.monotonic() - probe.last_at >= probe.idle_seconds
            if probe.handled and probe.started == probe.handled and quiet:
                probe.cpu_at_last = time.process_time()
                return True
        return False

    def wait(self) -> None:
        """Until done; exits if the runner died without stopping us."""
        parent = os.getppid()
        while not self.done.wait(IDLE_POLL_SECONDS):
            if os.getppid() != parent:
                os._exit(4)
            if not self.probe.expect and self.idle():
                self.done.set()


class ConnectionErrors(logging.Handler):
    """Counts Dramatiq's CRITICAL records: a consumer thread lost its connection and restarts."""

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def wait_consuming(url: str, queue_name: str) -> None:
    """Until the broker lists a consumer on the queue: Dramatiq's consumer threads subscribe
    on their own, after `Worker.start` returned."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        deadline = time.monotonic() + CONSUMING_TIMEOUT_SECONDS
        while not channel.queue_declare(queue_name, passive=True).method.consumer_count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no consumer on {queue_name!r} in {CONSUMING_TIMEOUT_SECONDS}s")
            connection.sleep(IDLE_POLL_SECONDS)
    finally:
        connection.close()


def main(args: Any) -> None:
    logging.basicConfig(level=LOG_LEVEL, stream=sys.stderr)
    errors = ConnectionErrors()
    logging.getLogger("dramatiq").addHandler(errors)
    gated = args.mode != "latency"
    probe = ThreadProbe(
        Probe(
            expect=args.expect,
            idle_seconds=args.idle,
            gated=gated,
            rss_at=tuple(int(x) for x in args.rss_at.split(",") if x),
        )
    )
    probe.install()
    broker = new_broker(args.url)

    def drain(id: int, sent_at: float, pad: str) -> None:
        probe.admit()
        probe.finished()

    def latency(id: int, sent_at: float, pad: str) -> None:
        now = time.time()
        probe.admit()
        probe.latency(sent_at, now)
        probe.finished()

    declare_actor(broker, args.queue, {"drain": drain, "latency": latency}[args.mode])
    worker = dramatiq.Worker(broker, worker_threads=args.prefetch)
    worker.start()
    if not gated:
        wait_consuming(args.url, args.queue)
        probe.ready()
    probe.wait()
    result = probe.probe.result(reconnects=errors.count)
    worker.stop()  # the worker threads finish and their acks are sent before it returns
    broker.close()
    Probe.emit(result)


if __name__ == "__main__":
    parser = worker_arguments(__doc__ or "")
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, required=True, help="the worker threads")
    main(parser.parse_args())
