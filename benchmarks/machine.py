"""What the numbers were measured on, for the header of the table and the JSON."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return platform.processor() or "?"


def _ram_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe(rabbitmq_version: str, loop: str, systems: dict[str, str]) -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "cpu": _cpu_model(),
        "ram_gib": round(_ram_gib(), 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "rabbitmq": rabbitmq_version,
        "aio_pika": _version("aio-pika"),
        "aiormq": _version("aiormq"),
        "pydantic": _version("pydantic"),
        "rabbitq": _version("rabbitq"),
        "uvloop": _version("uvloop"),
        "faststream": _version("faststream"),
        "dramatiq": _version("dramatiq"),
        "loop": loop,
        "systems": systems,
    }


def header(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cores']} cores ({info['cpu']}), {info['ram_gib']} GiB RAM, "
        f"Linux {info['kernel']}\n"
        f"software: Python {info['python']}, RabbitMQ {info['rabbitmq']}, "
        f"aio-pika {info['aio_pika']} (aiormq {info['aiormq']}), pydantic {info['pydantic']}, "
        f"rabbitq {info['rabbitq']}, uvloop {info['uvloop']}\n"
        f"broker: {info.get('broker', 'single node')}\n"
        f"every consumer and the runner on {info['loop']}; systems: "
        + ", ".join(info["systems"].values())
    )
