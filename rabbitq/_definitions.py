"""The declared topology as a RabbitMQ definitions document.

The broker imports it with `rabbitmqctl import_definitions FILE`, `POST /api/definitions`, or at
boot (`load_definitions = FILE` in rabbitmq.conf), so a broker can hold the topology before any
rabbitq process runs. An import creates what is missing and never changes an existing queue's
arguments: `rabbitq topology plan` still reports drift.
"""

from __future__ import annotations

from typing import Any

from rabbitq._topology import Topology


def definitions(topology: Topology, vhost: str) -> dict[str, Any]:
    """Exchanges, queues and bindings of `topology` in `vhost`; no users, vhosts or policies."""
    return {
        "exchanges": [
            {
                "name": x.name,
                "vhost": vhost,
                "type": x.type,
                "durable": x.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for x in topology.exchanges()
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": dict(q.arguments),
            }
            for q in topology.queues()
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": b.destination_type,
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in topology.bindings()
        ],
    }
