"""The consumer of one workload: connect, consume with prefetch = capacity, reconnect, drain.

Delivery guarantee: at-least-once. Each delivery goes to the `Settler` (`settle.py`), which
acks it only once its outcome is safe (done, confirmed into a tier, or parked). Handlers of a
lost connection are cancelled, so a redelivered copy does not run beside its original (sync
handlers in threads finish on their own); their deliveries were requeued by the broker.

The consumer never declares; it checks that its queues exist and stops if not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection
from prometheus_client import CollectorRegistry

from rabbitq import _permissions as permissions
from rabbitq._ack import Acker
from rabbitq._amqp import ClosedByBroker, ConsumeConnection, Delivery, open_consumer
from rabbitq._app import App
from rabbitq._connection import (
    client_name,
    connect,
    current_node,
    node_of,
    scrub,
    tls_for,
    tls_reason,
)
from rabbitq._declare import check_exists
from rabbitq._errors import ConfigError, ConnectionFailed, SessionLost, TopologyMissing
from rabbitq._metrics import Metrics
from rabbitq._publish import Publisher
from rabbitq._settle import Settler
from rabbitq._topology import Workload

logger = logging.getLogger("rabbitq.consume")

RECONNECT_MIN_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 10.0
# After it has consumed, how long a missing queue or exchange is retried before the consumer
# gives up: long enough for a cluster node that is stopping to answer "unavailable" instead.
MISSING_WAIT_SECONDS = 20.0
BURST_POLL_SECONDS = 0.2
LOOP_WATCH_SECONDS = 0.25
# A blocked loop sends no heartbeats; the broker drops the connection after about two missed
# intervals. Long before that, a pause this long is worth a warning.
LOOP_BLOCKED_SECONDS = 1.0


class Consumer:
    """Runs the handlers of one workload until stopped.

    Args:
        app: the tasks; its publisher is bound to this consumer's publishing connection.
        workload: the workload, derived from the topology.
        url: the broker (credentials are never logged).
        grace_seconds: on stop, how long running handlers may take to finish; the rest are
            returned to the queue.
        burst: stop by itself once the work queue and its tiers are empty and nothing runs.
        metrics: where outcomes, durations and latencies are counted; by default a registry of
            the consumer's own (`rabbitq consume --metrics-port` serves the CLI's).
    """

    def __init__(
        self,
        app: App,
        workload: Workload,
        url: str,
        *,
        grace_seconds: float = 30.0,
        burst: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        if app.namespace not in (None, workload.namespace):
            raise ConfigError(
                f"the app publishes to namespace {app.namespace!r} but the topology's is "
                f"{workload.namespace!r}; use one namespace"
            )
        self.app = app
        self.workload = workload
        self.url = url
        self.grace_seconds = grace_seconds
        self.burst = burst
        self.reconnects = 0
        #: settled deliveries by outcome (`parked:<reason>` for the parking lot), and
        #: `loop_blocked`
        self.counts: Counter[str] = Counter()
        self.connected = False
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._lost = asyncio.Event()
        self._lost_reason = ""
        self._established = False
        self._established_at = 0.0
        self._running: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=workload.capacity, thread_name_prefix=f"rabbitq-{workload.name}"
        )
        self.metrics = metrics if metrics is not None else Metrics(CollectorRegistry())
        self._metrics = self.metrics.workload(
            workload.name,
            sorted(name for name, t in app.tasks.items() if t.workload == workload.name),
            workload.capacity,
            lambda: len(self._running),
        )
        # the workload rides on every line as a field (text: workload=NAME; json: "workload")
        self._log = logging.LoggerAdapter(logger, {"workload": workload.name})
        self.publisher = Publisher(
            url, name=f"consumer-publisher {workload.name}", metrics=self.metrics.publishing()
        )
        self._settler = Settler(
            app,
            workload,
            self.publisher,
            self._metrics,
            self._executor,
            self._lose,
            url,
            self.counts,
        )

    @property
    def running(self) -> int:
        """Handlers running now."""
        return len(self._running)

    def health(self) -> tuple[bool, dict[str, Any]]:
        """For a liveness probe (`/healthz`): whether the broker connection is open."""
        return self.connected, {"workload": self.workload.name, "connected": self.connected}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """For a readiness probe (`/readyz`): whether it is consuming, and how busy."""
        ready, busy = self.ready.is_set(), {"running": self.running}
        busy["capacity"] = self.workload.capacity
        return ready, {"workload": self.workload.name, "consuming": ready, **busy}

    def stop(self) -> None:
        """Stop taking deliveries; running handlers get `grace_seconds` to finish."""
        self._stop.set()

    async def run(self) -> None:
        """Consume until `stop()` (or, in burst mode, until drained); reconnect on loss.

        Raises:
            ConnectionFailed: the broker cannot be reached at start.
            TopologyMissing: a queue or exchange is missing at start (run `rabbitq topology
                apply`). Once it has consumed, a missing object is retried for
                `MISSING_WAIT_SECONDS` first: on a cluster, a queue whose node is stopping
                answers as missing for a moment (then as unavailable, which is waited out).
            AccessRefused: the user may not consume from the work queue (no read permission).
        """
        delay = RECONNECT_MIN_SECONDS
        missing_since = 0.0
        watchdog = asyncio.create_task(self._watch_loop())
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    if await self._session():
                        return
                except (ConnectionFailed, SessionLost, TopologyMissing) as exc:
                    if not self._established and isinstance(exc, ConnectionFailed):
                        raise
                    if isinstance(exc, TopologyMissing):
                        now = time.monotonic()
                        missing_since = missing_since or now
                        if not self._established_at or now - missing_since > MISSING_WAIT_SECONDS:
                            raise
                    else:
                        missing_since = 0.0
                    if self._established_at >= started:  # it consumed: a new loss, not an outage
                        delay = RECONNECT_MIN_SECONDS
                    self.reconnects += 1
                    self._metrics.reconnects.inc()
                    self._log.warning("connection lost (%s); reconnecting in %.1fs", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), delay)
                    delay = min(delay * 2, RECONNECT_MAX_SECONDS)
        finally:
            watchdog.cancel()
            self.app.unbind_publisher(self.publisher)
            await self._settler.finish_replies()  # they go out on the publisher's connection
            await self.publisher.close()
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _watch_loop(self) -> None:
        """Say so when something blocks the event loop (an async handler doing blocking work)."""
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LOOP_WATCH_SECONDS)
            blocked = loop.time() - before - LOOP_WATCH_SECONDS
            if blocked >= LOOP_BLOCKED_SECONDS:
                self.counts["loop_blocked"] += 1
                self._metrics.loop_blocked.inc(blocked)
                self._log.warning(
                    "the event loop was blocked for %.1fs, so no heartbeat or ack went out; an "
                    "async handler is running blocking code (declare it as a plain def: sync "
                    "handlers run in threads). If this outlasts the heartbeat timeout the "
                    "broker drops the connection and every running task is redelivered",
                    blocked,
                )

    def _lose(self, reason: str) -> None:
        if not self._lost.is_set():
            self._lost_reason = reason
            self._lost.set()

    async def _session(self) -> bool:
        """One connection's life. True when done for good (stopped or drained)."""
        try:
            return await self._connected_session()
        except (aiormq.exceptions.AMQPError, ConnectionError, OSError, RuntimeError) as exc:
            # aio-pika reports a connection that died under a call as one of these
            raise SessionLost(f"{type(exc).__name__}: {exc}") from None

    async def _connected_session(self) -> bool:
        self._lost.clear()
        self._loop = asyncio.get_running_loop()
        # aio-pika for the checks (and burst's queue depths); the deliveries come on a
        # connection of rabbitq's own (`_amqp.py`)
        control = await connect(self.url, f"consumer-check {self.workload.name}")
        # The URL works: from now on an unreachable broker is an outage to wait out, not a
        # mistake to report by exiting.
        self._established = True
        # the acker needs the connection and the connection delivers to the acker's dispatch
        consuming = ConsumeConnection(lambda delivery: self._dispatch(acker, delivery), self._lose)
        acker = Acker(consuming, self.workload.capacity)
        try:
            await check_exists(control, self.workload)
            if self.burst:
                control.close_callbacks.add(
                    lambda _c, exc=None: self._lose(f"connection closed: {exc or 'by us'}")
                )
            else:
                await control.close()
            await self.publisher.start()
            await self.app.bind_publisher(self.publisher, self.workload.namespace)
            queue, capacity = self.workload.work_queue, self.workload.capacity
            # Prefetch is the capacity: every delivery runs at once, none waits in a buffer
            # where it would age toward consumer_timeout or jump ahead of a higher priority.
            try:
                name = client_name(f"consumer {self.workload.name}")
                # on the node the checks just reached (the broker's list may hold several)
                node = current_node(self.url)
                stripped, context = tls_for(node)
                await open_consumer(consuming, stripped, name, queue, capacity, context=context)
                self._metrics.on_node(node_of(node))
            except (OSError, TimeoutError, ClosedByBroker) as exc:
                # no read permission on the work queue: no reconnect would help
                refused = permissions.refusal(str(exc), "read", "consume from")
                if refused is not None:
                    raise refused from None
                reason = tls_reason(exc, node) or scrub(f"{type(exc).__name__}: {exc}", self.url)
                raise SessionLost(reason) from None
            self._set_connected(True)
            tiers = ", ".join(t.label for t in self.workload.tiers) or "none"
            self._log.info("consuming %s with capacity %d (tiers: %s)", queue, capacity, tiers)
            self._set_ready(True)
            self._established_at = time.monotonic()
            done = await self._wait(control)
            if self._lost.is_set() and not done:
                raise SessionLost(self._lost_reason)
            await self._drain(consuming, acker)
            return True
        finally:
            self._set_ready(False)
            # Handlers still running lose their deliveries with the connection (the broker
            # redelivers them): cancel them, so a copy does not run beside its original.
            for task in self._running:
                task.cancel()
            await consuming.close()
            if not control.is_closed:
                await control.close()
            self._set_connected(False)

    def _set_ready(self, ready: bool) -> None:
        (self.ready.set if ready else self.ready.clear)()
        self._metrics.ready.set(ready)

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self._metrics.connected.set(connected)

    async def _wait(self, connection: AbstractConnection) -> bool:
        """Until stopped, lost or (burst) drained; True if stopped or drained."""
        drained = asyncio.ensure_future(self._drained(connection) if self.burst else _never())
        waiters = {
            asyncio.ensure_future(self._stop.wait()),
            asyncio.ensure_future(self._lost.wait()),
            drained,
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        ok = drained.done() and not drained.cancelled() and not self._lost.is_set()
        return self._stop.is_set() or ok

    async def _drained(self, connection: AbstractConnection) -> None:
        """Returns once the work queue and tiers were empty, with nothing running, twice."""
        names = [self.workload.work_queue, *(t.queue for t in self.workload.tiers)]
        channel: AbstractChannel = await connection.channel(publisher_confirms=False)
        empty_checks = 0
        try:
            while empty_checks < 2:
                await asyncio.sleep(BURST_POLL_SECONDS)
                if self._running:
                    empty_checks = 0
                    continue
                counts = [
                    (await channel.declare_queue(n, passive=True)).declaration_result.message_count
                    for n in names
                ]
                empty_checks = empty_checks + 1 if not any(counts) else 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def _drain(self, consuming: ConsumeConnection, acker: Acker) -> None:
        """Stop deliveries, give running handlers the grace period, return the rest."""
        try:
            await consuming.cancel()
        except Exception:  # the connection may be closing already; the broker requeues then
            logger.debug("cancel of consumer %s failed", consuming.consumer_tag, exc_info=True)
        if self._running:
            grace, running = self.grace_seconds, len(self._running)
            self._log.info("stopping; waiting up to %gs for %d running tasks", grace, running)
            _, late = await asyncio.wait(set(self._running), timeout=self.grace_seconds)
            if late:
                self._log.warning(
                    "%d tasks did not finish within %gs; returning them to the queue",
                    len(late),
                    grace,
                )
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=5)
        # Acks still batched must be written before the connection closes, or finished tasks
        # would be redelivered.
        acker.flush()

    # One delivery ----------------------------------------------------------------------------

    def _dispatch(self, acker: Acker, delivery: Delivery) -> None:
        assert self._loop is not None
        if self._lost.is_set():
            return  # the session is ending: not run, and requeued when the connection closes
        task = self._loop.create_task(self._settle_one(acker, delivery))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _settle_one(self, acker: Acker, message: Delivery) -> None:
        try:
            await self._settler.handle(message, acker)
        except asyncio.CancelledError:
            # Stopping after the grace period, or the connection died: give the delivery back
            # if its connection still lives; otherwise the broker already requeued it.
            acker.settle(message, requeue=True)
            raise
        except Exception:
            logger.exception("unexpected error handling message; returning it to the queue")
            acker.settle(message, requeue=True)
            self._lose("unexpected error in the consume path")


async def _never() -> None:
    await asyncio.Event().wait()
