"""rabbitq: a task system on RabbitMQ that never loses a task.

The public API is what `__all__` lists.
"""

from rabbitq._app import App, Task
from rabbitq._consume import Consumer
from rabbitq._errors import (
    ConfigError,
    ConnectionFailed,
    InvalidPayload,
    NotConfirmed,
    Park,
    PublishError,
    RabbitqError,
    Retry,
    TopologyDrift,
    TopologyError,
    TopologyInvalid,
    TopologyMissing,
    UnknownTask,
    Unroutable,
)
from rabbitq._handlers import Failure, TaskContext
from rabbitq._metrics import Metrics
from rabbitq._topology import Topology, Workload, load_topology, parse_topology

__all__ = [
    "App",
    "ConfigError",
    "ConnectionFailed",
    "Consumer",
    "Failure",
    "InvalidPayload",
    "Metrics",
    "NotConfirmed",
    "Park",
    "PublishError",
    "RabbitqError",
    "Retry",
    "Task",
    "TaskContext",
    "Topology",
    "TopologyDrift",
    "TopologyError",
    "TopologyInvalid",
    "TopologyMissing",
    "UnknownTask",
    "Unroutable",
    "Workload",
    "load_topology",
    "parse_topology",
]
