"""The demo's tasks: one that always works, one that fails once, one that always fails."""

from __future__ import annotations

import os

from pydantic import BaseModel

import rabbitq

# RABBITQ_NAMESPACE, as `rabbitq consume` reads it: a test run gets queues of its own
app = rabbitq.App(namespace=os.environ.get("RABBITQ_NAMESPACE", "demo"))


class Greeting(BaseModel):
    name: str


class Flaky(BaseModel):
    n: int


@app.task("demo.greet", workload="demo")
async def greet(msg: Greeting) -> str:
    return f"hello {msg.name}"


@app.task("demo.flaky", workload="demo")
def flaky(msg: Flaky, ctx: rabbitq.TaskContext) -> None:
    # A sync handler (it runs in a thread): fails on its first attempt, works on the retry.
    if ctx.attempt == 1:
        raise ConnectionError(f"flaky #{msg.n}: upstream not ready (attempt {ctx.attempt})")


@app.task("demo.doomed", workload="demo")
async def doomed(msg: Greeting) -> None:
    raise RuntimeError(f"cannot greet {msg.name}: this task always fails")
