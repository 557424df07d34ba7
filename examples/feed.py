"""A steady, mixed stream of the demo's tasks, forever: the `feeder` of docker-compose.yml.

Mostly `demo.greet` (succeeds), some `demo.flaky` (fails once, succeeds on its retry) and now
and then a `demo.doomed` (fails every attempt, then is parked), so every panel of the Grafana
dashboard has something to show. It publishes through the public App API, each task confirmed
by the broker, and serves its own publish metrics (kind `task`) on `--metrics-port`.

    python -m examples.feed --rate 10 --metrics-port 9101

Runs until SIGTERM or SIGINT. The demo workload's topology must exist (`rabbitq topology apply`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import signal
import time

from prometheus_client import CollectorRegistry, start_http_server

from examples.demo_app import Flaky, Greeting, app, doomed, flaky, greet
from rabbitq import Metrics, RabbitqError
from rabbitq._connection import DEFAULT_URL, mask_url

logger = logging.getLogger("examples.feed")

FLAKY_SHARE = 0.15
DOOMED_SHARE = 0.005
BROKER_AWAY_SECONDS = 5.0


async def publish_one(n: int, rng: random.Random) -> None:
    """Publish task number `n`: greet, flaky or doomed, at random in the shares above."""
    roll = rng.random()
    if roll < DOOMED_SHARE:
        await doomed.publish(Greeting(name=f"nobody {n}"))
    elif roll < DOOMED_SHARE + FLAKY_SHARE:
        await flaky.publish(Flaky(n=n))
    else:
        await greet.publish(Greeting(name=f"guest {n}"), priority=n % 3)


async def feed(rate: float, stop: asyncio.Event, seed: int | None = None) -> int:
    """Publish `rate` tasks a second until `stop` is set; the number published."""
    rng = random.Random(seed)
    interval = 1.0 / rate
    next_at = time.monotonic()
    n = 0
    while not stop.is_set():
        try:
            await publish_one(n, rng)
        except RabbitqError as exc:
            # the broker is away or refused it: say so and try again shortly
            logger.warning("publish failed (%s); retrying in %.0fs", exc, BROKER_AWAY_SECONDS)
            next_at = time.monotonic() + BROKER_AWAY_SECONDS
        else:
            n += 1
            if n % 1000 == 0:
                logger.info("published %d tasks", n)
        # a fixed schedule, so the rate holds however long each confirm takes
        next_at = max(next_at + interval, time.monotonic())
        try:
            await asyncio.wait_for(stop.wait(), timeout=next_at - time.monotonic())
        except TimeoutError:
            pass
    return n


async def main_async(rate: float, url: str, namespace: str | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # As PID 1 in a container, a process that installs no handler ignores SIGTERM.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app.url = url
    if namespace is not None:
        app.namespace = namespace
    logger.info(
        "publishing %.1f demo tasks a second to namespace %s at %s",
        rate,
        app.namespace,
        mask_url(url),
    )
    try:
        n = await feed(rate, stop)
    finally:
        await app.close()
    logger.info("stopped after %d tasks", n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=10.0, help="tasks a second (default 10)")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve the publish metrics on this port (default: none)",
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("RABBITQ_URL", DEFAULT_URL),
        help="broker URL (default: $RABBITQ_URL, then guest on localhost)",
    )
    parser.add_argument(
        "--namespace", default=None, help=f"publish into this namespace (default {app.namespace!r})"
    )
    args = parser.parse_args()
    if args.rate <= 0:
        parser.error("--rate must be positive")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.metrics_port is not None:
        registry = CollectorRegistry()
        app.metrics = Metrics(registry)
        start_http_server(args.metrics_port, registry=registry)
    asyncio.run(main_async(args.rate, args.url, args.namespace))


if __name__ == "__main__":
    main()
