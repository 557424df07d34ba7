"""rabbitq: a task system on RabbitMQ that never loses a task.

The public API is what `__all__` lists; the modules behind it are private.
"""

from rabbitq._app import App, Task
from rabbitq._consume import Consumer
from rabbitq._errors import (
    AccessRefused,
    CallError,
    CallLost,
    CallTimeout,
    ConfigError,
    ConnectionFailed,
    HandlerTimeout,
    NotConfirmed,
    Park,
    ParkReason,
    Poison,
    PublishError,
    PublishRefused,
    RabbitqError,
    ReplyInvalid,
    Retry,
    TaskError,
    TaskFailed,
    TopologyDrift,
    TopologyError,
    TopologyInvalid,
    TopologyMissing,
    Unroutable,
)
from rabbitq._handlers import Failure, TaskContext
from rabbitq._metrics import Metrics
from rabbitq._topology import Topology, Workload, load_topology, parse_topology
from rabbitq._wire import Outgoing

__version__ = "0.1.0"

__all__ = [
    "AccessRefused",
    "App",
    "CallError",
    "CallLost",
    "CallTimeout",
    "ConfigError",
    "ConnectionFailed",
    "Consumer",
    "Failure",
    "HandlerTimeout",
    "Metrics",
    "NotConfirmed",
    "Outgoing",
    "Park",
    "ParkReason",
    "Poison",
    "PublishError",
    "PublishRefused",
    "RabbitqError",
    "ReplyInvalid",
    "Retry",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "Topology",
    "TopologyDrift",
    "TopologyError",
    "TopologyInvalid",
    "TopologyMissing",
    "Unroutable",
    "Workload",
    "__version__",
    "load_topology",
    "parse_topology",
]
