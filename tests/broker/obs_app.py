"""The App that tests/broker/test_prometheus.py runs as `rabbitq consume obs --metrics-port ...`.

It has no namespace: `rabbitq consume` takes the test's from the topology. `ok` succeeds,
`flaky` fails its first attempt and succeeds on the retry, `doomed` fails every attempt (so it
is parked as retries_exhausted). `idle` belongs to a workload that no consumer runs.
"""

from __future__ import annotations

from pydantic import BaseModel

import rabbitq
from rabbitq import TaskContext

WORKLOAD = "obs"
IDLE_WORKLOAD = "idle"

app = rabbitq.App()


class Item(BaseModel):
    n: int


@app.task("ok", workload=WORKLOAD)
async def ok(item: Item) -> None:
    return None


@app.task("flaky", workload=WORKLOAD)
def flaky(item: Item, ctx: TaskContext) -> None:
    if ctx.attempt == 1:
        raise ConnectionError(f"flaky #{item.n}: fails its first attempt")


@app.task("doomed", workload=WORKLOAD)
async def doomed(item: Item) -> None:
    raise RuntimeError(f"doomed #{item.n}: fails every attempt")


@app.task("idle", workload=IDLE_WORKLOAD)
async def idle(item: Item) -> None:
    return None
