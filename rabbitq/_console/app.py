"""The console's pages and actions (Starlette, server-rendered with Jinja2, no build step).

Every page reads the broker when it is asked for: the overview through `_status.read`, the
parking lot through `parking.browse` (nothing moved or reordered). An action is two steps, as
the CLI's `--dry-run` then the command: a POST shows exactly which tasks it will move, and the
confirmation moves exactly those (their ids travel with it), through `parking.replay` or
`parking.purge`, each replayed copy confirmed before its parked copy is acked.

Whatever a parked task carries is shown through Jinja2's autoescaping, under a Content Security
Policy that runs no inline script, so a payload holding `<script>` is text on the page.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jinja2
from prometheus_client import CollectorRegistry, Counter, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from rabbitq import _parking as parking
from rabbitq import _status as status
from rabbitq._cli_parking import _when as when
from rabbitq._cli_status import format_age
from rabbitq._connection import connect, scrub
from rabbitq._console import forms, guard
from rabbitq._errors import RabbitqError, UsageError
from rabbitq._management import Management
from rabbitq._topology import Topology, Workload

logger = logging.getLogger("rabbitq.console")

HERE = Path(__file__).parent
SHOWN_IN_PLAN = 500  # a confirmation lists this many tasks, and counts the rest
SECURITY_HEADERS = {
    # No inline script or style, nothing from elsewhere, never in a frame.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@dataclass
class Console:
    """What the pages need: where the broker is, the topology, and the guard's settings."""

    url: str
    topology: Topology
    management_url: str | None = None
    read_only: bool = False
    token: str | None = None
    tasks: dict[str, list[str]] = field(default_factory=dict)  # workload -> task names
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.actions = Counter(
            "rabbitq_console_actions",
            "Actions taken in the console, by action and workload.",
            ["action", "workload"],
            registry=self.registry,
        )
        self.moved = Counter(
            "rabbitq_console_tasks_moved",
            "Parked tasks the console's actions replayed or purged.",
            ["action", "workload"],
            registry=self.registry,
        )


def build(console: Console) -> Starlette:
    """The ASGI application of `console`."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    templates = Jinja2Templates(env=env)
    templates.env.globals.update(
        when=when,
        age=lambda since, now: "-" if since is None else format_age(max(0.0, now - since)),
        read_only=console.read_only,
        namespace=console.topology.namespace,
    )
    csrf = guard.csrf_token(console.secret)

    def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
        response: Response = templates.TemplateResponse(
            request, name, {"csrf": csrf, **context}, status_code=status_code
        )
        return response

    def workload_of(request: Request) -> Workload:
        name = request.path_params["workload"]
        if name not in console.topology.workloads:
            raise UsageError(f"no workload {name!r} in the topology")
        return console.topology.workloads[name]

    async def overview(request: Request) -> Response:
        workloads = list(console.topology.workloads.values())
        api = Management.from_urls(console.url, console.management_url)
        connection = await connect(console.url, "console")
        try:
            found = await status.read(connection, console.topology.namespace, workloads, api)
        finally:
            await connection.close()
        return render(request, "overview.html", status=found, now=time.time(), tasks=console.tasks)

    async def parked_tasks(request: Request) -> Response:
        workload = workload_of(request)
        params = dict(request.query_params)
        chosen = forms.selection(params)
        now = time.time()
        everything = await parking.browse(console.url, workload)
        found = parking.select(everything, chosen, now)
        return render(
            request,
            "workload.html",
            workload=workload,
            params=params,
            groups=parking.groups(found),
            page=forms.page(found, params.get("page")),
            parked=len(everything),
            query=lambda **changes: forms.filter_query(params, **changes),
            now=now,
        )

    async def parked_task(request: Request) -> Response:
        workload = workload_of(request)
        message_id = request.path_params["message_id"]
        chosen = parking.Filter(ids=frozenset({message_id}))
        found = parking.select(await parking.browse(console.url, workload), chosen)
        if not found:
            raise UsageError(f"no parked task {message_id!r} in {workload.parking_queue}")
        return render(request, "task.html", workload=workload, task=found[0], now=time.time())

    async def confirm(request: Request) -> Response:
        """The dry run: what the action will move, and a form that moves exactly that."""
        workload = workload_of(request)
        form = await _form(request)
        what, scope = forms.requested(form.get("do"))
        chosen = forms.selection(form, _ids(form) if scope == "selected" else ())
        if scope == "selected" and not chosen.ids:
            raise UsageError("no task selected: tick the tasks to act on")
        found = parking.select(await parking.browse(console.url, workload), chosen)
        return render(
            request,
            "confirm.html",
            workload=workload,
            action=what,
            tasks=found[:SHOWN_IN_PLAN],
            total=len(found),
            ids=" ".join(t.message_id for t in found),
        )

    async def act(request: Request) -> Response:
        workload = workload_of(request)
        what = forms.action(request.path_params["action"])
        form = await _form(request)
        ids = _ids(form)
        if not ids:
            raise UsageError("nothing to do: the confirmation named no task")
        chosen = parking.Filter(ids=frozenset(ids))
        console.actions.labels(what, workload.name).inc()
        try:
            if what == "replay":
                moved = await parking.replay(console.url, workload, chosen)
            else:
                moved = await parking.purge(console.url, workload, chosen)
        except RabbitqError as exc:
            # what moved before the failure is moved: the parking lot shows what is left
            logger.warning(
                "%s of %d parked tasks of %s failed, by %s: %s",
                what,
                len(ids),
                workload.name,
                _who(request, console),
                scrub(str(exc), console.url),
            )
            raise
        console.moved.labels(what, workload.name).inc(len(moved))
        logger.info(
            "%s %d of %d parked tasks of %s, by %s",
            "replayed" if what == "replay" else "purged",
            len(moved),
            len(ids),
            workload.name,
            _who(request, console),
        )
        return render(
            request,
            "result.html",
            workload=workload,
            action=what,
            moved=moved,
            missing=len(ids) - len(moved),
        )

    async def login(request: Request) -> Response:
        presented = request.query_params.get("token")
        if request.method == "POST":
            presented = (await _form(request)).get("token")
        if presented is None:
            return render(request, "login.html", status_code=401)
        if not guard.token_ok(console.token, presented):
            return render(request, "login.html", status_code=401, failed=True)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(guard.COOKIE, presented, httponly=True, samesite="strict", secure=False)
        return response

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(console.registry), media_type="text/plain; version=0.0.4")

    async def guard_requests(request: Request, call_next: RequestResponseEndpoint) -> Response:
        if not _public(request.url.path) and not guard.token_ok(
            console.token,
            guard.presented_token(
                request.headers.get("authorization"), request.cookies.get(guard.COOKIE)
            ),
        ):
            response: Response = render(request, "login.html", status_code=401)
        elif request.method == "POST" and request.url.path != "/login":
            response = await _checked_post(request, call_next)
        else:
            response = await _answer(request, call_next)
        response.headers.update(SECURITY_HEADERS)
        return response

    async def _checked_post(request: Request, call_next: RequestResponseEndpoint) -> Response:
        if console.read_only:
            return PlainTextResponse("error: this console is read-only\n", status_code=403)
        if not guard.same_origin(request.headers.get("origin"), request.headers.get("host")):
            return PlainTextResponse("error: the form came from another site\n", status_code=403)
        form = await _form(request)
        if not guard.csrf_ok(console.secret, form.get("csrf")):
            return PlainTextResponse(
                "error: the form is stale or not the console's; reload the page\n",
                status_code=403,
            )
        return await _answer(request, call_next)

    async def _answer(request: Request, call_next: RequestResponseEndpoint) -> Response:
        try:
            return await call_next(request)
        except RabbitqError as exc:
            code = 400 if isinstance(exc, UsageError) else 502
            text = scrub(str(exc), console.url)
            return render(request, "error.html", status_code=code, message=text)

    routes = [
        Route("/", overview),
        Route("/workloads/{workload}", parked_tasks),
        Route("/workloads/{workload}/tasks/{message_id:path}", parked_task),
        Route("/workloads/{workload}/confirm", confirm, methods=["POST"]),
        Route("/workloads/{workload}/{action}", act, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/metrics", metrics),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    return Starlette(
        routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard_requests)]
    )


def _public(path: str) -> bool:
    """The login page and its stylesheet and script (shipped in the package, no data in them):
    without them the login page a stranger gets would be unstyled."""
    return path == "/login" or path.startswith("/static/")


async def _form(request: Request) -> dict[str, Any]:
    """An urlencoded form, its last value per field and every `id` (read once, then kept)."""
    cached: dict[str, Any] | None = getattr(request.state, "form", None)
    if cached is None:
        body = (await request.body()).decode("utf-8", "replace")
        values = parse_qs(body, keep_blank_values=True)
        cached = {k: v[-1] for k, v in values.items()}
        cached["_ids"] = values.get("id", []) + " ".join(values.get("ids", [])).split()
        request.state.form = cached
    return cached


def _ids(form: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(form.get("_ids", [])))


def _who(request: Request, console: Console) -> str:
    client = request.client.host if request.client else "?"
    return f"{'the token holder' if console.token else 'a local user'} at {client}"
