"""The `rabbitq` command: topology show|plan|apply|export|permissions, consume, parking,
status, check, publish.

stdout carries results only; logs and errors go to stderr. An expected failure prints one
`error: ...` line and exits non-zero (`--debug` adds the traceback). Exit codes: 0 success,
1 the operation failed, 2 usage error, 3 the topology drifted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import typer

from rabbitq import _ladder as ladder
from rabbitq._app import App
from rabbitq._connection import DEFAULT_URL, connect, nodes, scrub
from rabbitq._errors import CheckFailed, ConfigError, RabbitqError, TopologyInvalid, UsageError
from rabbitq._topology import Topology, load_topology

T = TypeVar("T")

EPILOG = "Exit codes: 0 success, 1 failure, 2 usage error, 3 topology drift."

cli = typer.Typer(
    name="rabbitq",
    help="rabbitq: a task system on RabbitMQ that never loses a task.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
topology_cli = typer.Typer(
    help="Declare and inspect the topology.", epilog=EPILOG, no_args_is_help=True
)
cli.add_typer(topology_cli, name="topology")

URL = typer.Option(
    DEFAULT_URL,
    "--url",
    envvar="RABBITQ_URL",
    help="Broker URL; for a cluster, its nodes comma-separated (amqp://u:p@n1,n2,n3).",
)
TOPOLOGY = typer.Option(
    Path("topology"),
    "--topology",
    "-t",
    envvar="RABBITQ_TOPOLOGY",
    help="Directory (or file) of topology *.toml files.",
)
NAMESPACE = typer.Option(
    None,
    "--namespace",
    envvar="RABBITQ_NAMESPACE",
    help="Override the namespace the topology files declare.",
)
MANAGEMENT_URL = typer.Option(
    None,
    "--management-url",
    envvar="RABBITQ_MANAGEMENT_URL",
    help="The management API, if not at the broker's host on port 15672 (the --url's user).",
)
VHOST = typer.Option(
    None, "--vhost", help="The vhost the objects go to (default: the --url's, or /)."
)


JSON = typer.Option(False, "--json", help="Print one JSON document.")
DEBUG = typer.Option(False, "--debug", help="Show tracebacks of errors.")

logger = logging.getLogger("rabbitq.cli")
LOG_LEVELS = ("debug", "info", "warning", "error")


@contextlib.contextmanager
def _errors(url: str, as_json: bool = False, debug: bool = False) -> Iterator[None]:
    """Turn an expected failure into one line on stderr and an exit code."""
    try:
        yield
    except RabbitqError as exc:
        if debug:
            import traceback

            typer.echo(scrub("".join(traceback.format_exception(exc)), url), err=True)
        text = scrub(str(exc), url)
        if as_json:
            facts = {k: v if isinstance(v, list) else str(v) for k, v in exc.facts().items()}
            typer.echo(json.dumps({"error": text, "type": type(exc).__name__, **facts}), err=True)
        else:
            typer.echo(f"error: {text}", err=True)
        raise typer.Exit(exc.exit_code) from None


def _run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where it is installed (it is, on Linux and macOS): about 10-15% more drain."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _setup_logging(
    level: str, libraries: int = logging.WARNING, fmt: str = "text", url: str = ""
) -> None:
    from rabbitq import _logs as logs

    for option, value, allowed in (
        ("--log-level", level.lower(), LOG_LEVELS),
        ("--log-format", fmt, logs.FORMATS),
    ):
        if value not in allowed:
            raise UsageError(f"{option} {value!r} must be one of {', '.join(allowed)}")
    logs.setup(level, fmt, (url,), libraries)


@topology_cli.command("show")
def topology_show(
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    as_json: bool = JSON,
    debug: bool = DEBUG,
) -> None:
    """Print the derived exchanges, queues with their arguments, bindings, and each task's flow.

    Example: rabbitq topology show --json
    """
    _setup_logging("warning", libraries=logging.CRITICAL)
    with _errors("", as_json, debug):
        topo = load_topology(topology, namespace)
        data = topo.to_dict()
        if as_json:
            typer.echo(json.dumps(data, indent=2))
            return
        # the ladder's 29 exchanges, 28 queues and 56 bindings are summed up in its own section
        in_ladder = {e.name for e in topo.exchanges() if e.type == "topic"}
        typer.echo(f"namespace {topo.namespace}")
        typer.echo("exchanges:")
        for e in data["exchanges"]:
            if e["name"] not in in_ladder:
                typer.echo(f"  {e['name']} ({e['type']}, durable)")
        typer.echo("queues:")
        for q in data["queues"]:
            if q["role"] != "delay":
                args = " ".join(f"{k}={v}" for k, v in q["arguments"].items())
                typer.echo(f"  {q['name']} [{q['role']}] {args}")
        typer.echo("bindings:")
        for b in data["bindings"]:
            if b["exchange"] not in in_ladder:
                typer.echo(f"  {b['exchange']} --{b['routing_key']}--> {b['queue']}")
        for line in ladder_lines(topo):
            typer.echo(line)
        typer.echo("flow:")
        for name, w in data["workloads"].items():
            typer.echo(f"  {name} (capacity {w['capacity']}, {w['max_attempts']} attempts):")
            for step in w["flow"].split(" | "):
                typer.echo(f"    {step}")


def ladder_lines(topo: Topology) -> list[str]:
    """The delay ladder as `topology show` prints it: what it is, not its 113 objects."""
    summary = topo.ladder_summary()
    if summary is None:
        return ["delays: none (delays = false): tasks cannot be published with a delay"]
    first = topo.ladder_queues()[0].arguments
    lines = [
        f"delays (publish with delay= or at=, up to {summary['max_delay']}; shared by every "
        "workload):",
        f"  {summary['first']} .. {summary['last']}: {summary['levels']} quorum queues, level i "
        f"holds a task 2^i s ({ladder.format_seconds(1)} .. "
        f"{ladder.format_seconds(summary['longest_level_seconds'])}), then dead-letters it one "
        "level down (at-least-once)",
        f"  a task waits in the levels of its delay's set bits (13s: 8s, 4s, 1s), then "
        f"{summary['due_exchange']} routes it to its work queue:",
    ]
    lines += [
        f"    {b.exchange} --{b.routing_key}--> {b.queue}"
        for b in topo.ladder_bindings()
        if b.exchange == summary["due_exchange"]
    ]
    # every level has these; its TTL and dead-letter exchange are its own (said above)
    shared = {
        k: v for k, v in first.items() if k not in ("x-message-ttl", "x-dead-letter-exchange")
    }
    lines.append("  arguments: " + " ".join(f"{k}={v}" for k, v in shared.items()))
    return lines


def _plan_or_apply(
    apply: bool,
    topology: Path,
    namespace: str | None,
    url: str,
    management_url: str | None,
    as_json: bool,
    debug: bool,
) -> None:
    from rabbitq import _declare as declare
    from rabbitq._management import Management, ManagementUnavailable

    _setup_logging("warning", libraries=logging.CRITICAL)
    with _errors(url, as_json, debug):
        topo = load_topology(topology, namespace)
        api = Management.from_urls(url, management_url)

        async def run() -> list[declare.PlanItem]:
            connection = await connect(url, "cli")
            try:
                items = await (declare.apply if apply else declare.plan)(connection, topo)
            finally:
                await connection.close()
            try:
                nodes_ = await api.nodes()
            except ManagementUnavailable:  # a user tagged `management`, not `monitoring`
                nodes_ = None
            if nodes_ is not None:
                running = sum(1 for n in nodes_ if n.get("running", True))
                for note in declare.short_of_replicas(topo, running):
                    typer.echo(f"note: {note}", err=True)
            try:
                return await declare.reconcile_listed(api, topo, items)
            except ManagementUnavailable as exc:
                typer.echo(f"note: objects no longer declared were not looked for: {exc}", err=True)
                return items

        items = _run(run())
        if as_json:
            typer.echo(json.dumps([dataclasses.asdict(i) for i in items], indent=2))
        else:
            for i in items:
                typer.echo(f"{i.action:9} {i.kind} {i.name}{_detail(i)}")
            if any(i.action == "extra" for i in items):
                typer.echo(
                    "extra: no longer declared; rabbitq never deletes, remove them once empty"
                    " (rabbitmqctl delete_queue NAME)",
                    err=True,
                )
        declare.raise_on_drift(items)  # after a plan: apply stops before it declares anything


def _detail(item: Any) -> str:
    if item.action == "drift":
        return f": {item.argument} declared {item.declared}, found {item.found}"
    if item.action == "extra" and item.found:
        return f" ({item.found})"
    return ""


def _topology_command(apply: bool, doc: str) -> None:
    """`topology plan` and `topology apply`: one signature, two commands."""

    def command(
        topology: Path = TOPOLOGY,
        namespace: str | None = NAMESPACE,
        url: str = URL,
        management_url: str | None = MANAGEMENT_URL,
        as_json: bool = JSON,
        debug: bool = DEBUG,
    ) -> None:
        _plan_or_apply(apply, topology, namespace, url, management_url, as_json, debug)

    command.__doc__ = doc
    topology_cli.command("apply" if apply else "plan")(command)


_topology_command(
    False,
    """Show what `apply` would create, and any drift, without changing anything (exit 3 on drift).

    Example: rabbitq topology plan
    """,
)
_topology_command(
    True,
    """Declare every exchange, queue and binding, durable and idempotent; never deletes.

    Stops with exit code 3, touching nothing, if a queue exists with other arguments.

    Example: rabbitq topology apply --topology topology/
    """,
)


@topology_cli.command("export")
def topology_export(
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    vhost: str | None = VHOST,
    url: str = URL,
    debug: bool = DEBUG,
) -> None:
    """Print the topology as a RabbitMQ definitions JSON document.

    Import it with 'rabbitmqctl import_definitions FILE' or at broker boot (load_definitions in
    rabbitmq.conf). An import creates what is missing and never changes an existing queue.

    Example: rabbitq topology export --vhost prod > rabbitq-definitions.json
    """
    from rabbitq._definitions import definitions

    _setup_logging("warning", libraries=logging.CRITICAL)
    with _errors("", debug=debug):
        topo = load_topology(topology, namespace)
        typer.echo(json.dumps(definitions(topo, _vhost(vhost, url)), indent=2))


def _vhost(vhost: str | None, url: str) -> str:
    """`--vhost`, else the `--url`'s vhost, else `/`."""
    from urllib.parse import unquote, urlsplit

    if vhost is not None:
        return vhost
    path = urlsplit(nodes(url)[0]).path
    return unquote(path[1:]) if path not in ("", "/") else "/"


@topology_cli.command("permissions")
def topology_permissions(
    roles: list[str] = typer.Option(
        [],
        "--role",
        help="deployer, worker, publisher or operator (repeat it; default: all four).",
    ),
    user: str | None = typer.Option(
        None,
        "--user",
        help="The user to grant (default: NAMESPACE-ROLE); with several roles, their union.",
    ),
    workloads: list[str] = typer.Option(
        [],
        "--workload",
        help="Limit the worker and operator to this workload (repeat it; default: all).",
    ),
    vhost: str | None = VHOST,
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    url: str = URL,
    as_json: bool = JSON,
    debug: bool = DEBUG,
) -> None:
    """Print the rabbitmqctl set_permissions line of each role: only what its work needs.

    deployer: topology apply, plan and check (configure, write and read on the namespace's
    exchanges and queues). worker: consume (read its work queue, write where it forwards).
    publisher: publish and call (write on the tasks exchange and the delay ladder). operator:
    the parking commands, the console and status (read the parking lots, write to replay).
    None of them may configure anything but the deployer. Prints only; run the lines to grant.

    Example: rabbitq topology permissions --role worker --workload emails --user emails-worker
    """
    from rabbitq import _permissions as permissions

    _setup_logging("warning", libraries=logging.CRITICAL)
    with _errors("", as_json, debug):
        topo = load_topology(topology, namespace)
        target = _vhost(vhost, url)
        grants = [permissions.grant(topo, role, workloads) for role in roles or permissions.ROLES]
        if user is not None:  # one user, one set of permissions per vhost: the union
            lines = [(permissions.merge(grants), user)]
        else:
            lines = [(g, permissions.default_user(topo.namespace, g.role)) for g in grants]
        if as_json:
            out = [
                {"role": g.role, "user": u, "vhost": target, "purpose": g.purpose}
                | dict(zip(("configure", "write", "read"), g.patterns, strict=True))
                for g, u in lines
            ]
            typer.echo(json.dumps(out, indent=2))
            return
        for g, u in lines:
            typer.echo(f"# {g.role}: {g.purpose}")
            typer.echo(permissions.command(g, u, target))


def load_app(spec: str) -> App:
    """The App at `module:attribute`."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--app {spec!r} must look like 'package.module:app'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # whatever the user's module raised while it was imported
        raise ConfigError(
            f"--app {spec!r}: cannot import {module_name!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not hasattr(module, attr):
        raise ConfigError(f"--app {spec!r}: module {module_name!r} has no attribute {attr!r}")
    app = getattr(module, attr)
    if not isinstance(app, App):
        raise ConfigError(
            f"--app {spec!r}: {attr!r} is not a rabbitq.App (got {type(app).__name__})"
        )
    return app


@cli.command("consume")
def consume(
    workload: str = typer.Argument(..., help="The workload to run, as named in the topology."),
    app_spec: str = typer.Option(
        ..., "--app", envvar="RABBITQ_APP", help="Where the App is: 'package.module:app'."
    ),
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    url: str = URL,
    grace: float = typer.Option(
        30.0,
        "--grace",
        help="Seconds running tasks get to finish on SIGTERM/SIGINT; the rest return to the queue.",
    ),
    burst: bool = typer.Option(
        False,
        "--burst",
        help="Exit once the work queue and its tiers are empty (batch jobs, tests).",
    ),
    log_level: str = typer.Option(
        "info",
        "--log-level",
        envvar="RABBITQ_LOG_LEVEL",
        help="debug (adds a line per succeeded task), info, warning or error.",
    ),
    log_format: str = typer.Option(
        "text",
        "--log-format",
        envvar="RABBITQ_LOG_FORMAT",
        help="text, or json: one JSON object per line.",
    ),
    metrics_port: int | None = typer.Option(
        None,
        "--metrics-port",
        envvar="RABBITQ_METRICS_PORT",
        help="Serve /metrics, /healthz and /readyz on this port (all interfaces).",
    ),
    as_json: bool = typer.Option(
        False, "--json", help="On exit, print the outcome counts as one JSON document on stdout."
    ),
    debug: bool = DEBUG,
) -> None:
    """Run the handlers of one workload until SIGTERM/SIGINT (a second signal exits at once).

    Example: rabbitq consume emails --app myapp.tasks:app --metrics-port 9100
    """
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    from rabbitq import _serve as serve
    from rabbitq._consume import Consumer
    from rabbitq._metrics import Metrics

    with _errors(url, debug=debug):
        _setup_logging(log_level, fmt=log_format, url=url)
        topo = load_topology(topology, namespace)
        try:
            spec = topo.workload(workload)
        except TopologyInvalid as exc:  # the WORKLOAD argument is wrong, not the files
            raise UsageError(str(exc)) from exc
        app = load_app(app_spec)
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        metrics = Metrics(registry)

        async def main() -> Consumer:
            consumer = Consumer(app, spec, url, grace_seconds=grace, burst=burst, metrics=metrics)
            server = None
            if metrics_port is not None:
                server = await serve.start(
                    metrics_port, registry, healthy=consumer.health, ready=consumer.readiness
                )
                logger.info("serving /metrics, /healthz and /readyz on port %d", metrics_port)
            loop = asyncio.get_running_loop()
            signals = {"count": 0}

            def on_signal(signum: int) -> None:
                signals["count"] += 1
                if signals["count"] > 1:
                    # Unacked deliveries return to the queue when the socket closes.
                    logger.warning("second signal: exiting now; unfinished tasks are requeued")
                    os._exit(1)
                logger.info("%s: stopping (grace %gs)", signal.Signals(signum).name, grace)
                consumer.stop()

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, on_signal, sig)
            try:
                await consumer.run()
            finally:
                if server is not None:
                    server.close()
            return consumer

        consumer = _run(main())
        summary = ", ".join(f"{k} {v}" for k, v in sorted(consumer.counts.items())) or "no tasks"
        logger.info("workload %s stopped: %s", workload, summary)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "workload": workload,
                        "reconnects": consumer.reconnects,
                        "outcomes": dict(sorted(consumer.counts.items())),
                    }
                )
            )
        if any(t.name.startswith("rabbitq-") and not t.daemon for t in threading.enumerate()):
            # A sync handler still runs past the grace; its delivery is already back in the
            # queue. Python would wait for the thread at exit, so leave without waiting.
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


@cli.command("check")
def check(
    app_spec: str | None = typer.Option(
        None,
        "--app",
        envvar="RABBITQ_APP",
        help="The App ('package.module:app'), to compare its task timeouts with the broker's.",
    ),
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    url: str = URL,
    management_url: str | None = MANAGEMENT_URL,
    as_json: bool = JSON,
    debug: bool = DEBUG,
) -> None:
    """Check the broker-side facts that bite in production, each with what to do.

    consumer_timeout against the longest task timeout, quorum delivery limits against
    max_redeliveries, every queue and binding as declared (dead-letter arguments included),
    policies that expire, cap or delete rabbitq's queues, memory and disk alarms, and the
    broker version. Needs the management API for policies, limits and alarms; reads the
    node-wide consumer_timeout with rabbitmqctl where it can reach the node. Exit 3 if any
    check fails, 0 if all pass (warnings included).

    Example: rabbitq check --app myapp.tasks:app
    """
    from rabbitq import _check
    from rabbitq._management import Management

    _setup_logging("warning", libraries=logging.CRITICAL)
    with _errors(url, as_json, debug):
        topo = load_topology(topology, namespace)
        app = load_app(app_spec) if app_spec else None
        api = Management.from_urls(url, management_url)
        findings = _check.judge(topo, _run(_check.gather(url, api, topo, app)))
        if as_json:
            typer.echo(json.dumps(_check.to_json(findings), indent=2))
        else:
            for f in findings:
                typer.echo(f"{f.status.upper():4} {f.check:16} {f.subject}: {f.message}")
        failed = [f for f in findings if f.status == "fail"]
        if failed:
            raise CheckFailed(len(failed), failed[0].check, failed[0].subject)


@cli.command("console")
def console(
    port: int = typer.Option(8800, "--port", help="Port to listen on."),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on; beyond loopback it needs --token."
    ),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="RABBITQ_CONSOLE_TOKEN",
        help="Asked of every request (a login form sets it as a cookie).",
    ),
    read_only: bool = typer.Option(False, "--read-only", help="Show; never replay or purge."),
    app_spec: str | None = typer.Option(
        None, "--app", envvar="RABBITQ_APP", help="The App, to show each workload's tasks."
    ),
    topology: Path = TOPOLOGY,
    namespace: str | None = NAMESPACE,
    url: str = URL,
    management_url: str | None = MANAGEMENT_URL,
    debug: bool = DEBUG,
) -> None:
    """Serve the web console: every workload, and the parking lot to browse, replay and purge.

    Needs the console extra: pip install 'rabbitq[console]'. Replays and purges are the CLI's
    (each replayed copy confirmed before its parked copy is removed); each asks to confirm.

    Example: RABBITQ_CONSOLE_TOKEN=s3cret rabbitq console --host 0.0.0.0 --port 8800
    """
    _setup_logging("info", url=url)
    with _errors(url, debug=debug):
        try:
            import uvicorn

            from rabbitq._console import guard
            from rabbitq._console.app import Console, build
        except ImportError as exc:
            raise ConfigError(
                f"the console needs its extra: pip install 'rabbitq[console]' ({exc.name} is "
                "missing)"
            ) from None
        guard.check_binding(host, token)
        topo = load_topology(topology, namespace)
        tasks: dict[str, list[str]] = {}
        if app_spec:
            for name, task in sorted(load_app(app_spec).tasks.items()):
                tasks.setdefault(task.workload, []).append(name)
        web = build(Console(url, topo, management_url, read_only, token, tasks))
        logger.info(
            "console on http://%s:%d/%s%s",
            f"[{host}]" if ":" in host else host,
            port,
            " (token required)" if token else "",
            " read-only" if read_only else "",
        )
        config = uvicorn.Config(
            web, host=host, port=port, access_log=False, log_level="warning", lifespan="off"
        )
        server = uvicorn.Server(config)
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(server.serve())


def _register_parking() -> None:
    from rabbitq._cli_parking import register

    options = {"topology": TOPOLOGY, "namespace": NAMESPACE, "url": URL}
    register(cli, options | {"json": JSON, "debug": DEBUG}, _run, _errors)


def _register_status() -> None:
    from rabbitq._cli_status import register

    options = {"topology": TOPOLOGY, "namespace": NAMESPACE, "url": URL}
    options |= {"management_url": MANAGEMENT_URL, "json": JSON, "debug": DEBUG}
    register(cli, options, _run, _errors)


_register_parking()
_register_status()


def _register_publish() -> None:
    from rabbitq._cli_publish import register

    options = {"topology": TOPOLOGY, "namespace": NAMESPACE, "url": URL, "debug": DEBUG}
    register(
        cli, options, _run, _errors, load_app, lambda: _setup_logging("warning", logging.CRITICAL)
    )


_register_publish()


def main() -> None:
    """Console-script entry point."""
    cli()
