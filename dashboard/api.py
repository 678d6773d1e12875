"""The HTTP application: the JSON API, the stream, ``/metrics``, the page.

Built with FastAPI (routes, input validation and the OpenAPI description at
``/openapi.json`` from the same declarations). Reads never block the event loop: database
queries, the LLM probe and ``/metrics`` are plain ``def`` routes, which FastAPI runs on its
worker threads; the stream is ``async`` and only awaits its queue.

Input errors answer HTTP 400 ``{"error": reason}``; a recording that cannot answer, 503 with
the reason; live endpoints never depend on the database.

Writes (the self-healing switch, the breaker reset, an acknowledgement) publish on
``P/H/healer/set``. They are refused from another origin (``Origin`` / ``Sec-Fetch-Site``),
and need ``Authorization: Bearer <token>`` whenever a token is set, which it must be when the
dashboard listens on anything but loopback. Bound to loopback, a request must also name a
loopback host (``Host`` header), so a web page on another name cannot read it through DNS
rebinding.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from dashboard import views
from dashboard.history import MAX_POINTS, SERIES_METRICS, History, HistoryUnavailable
from dashboard.live import LiveModel
from dashboard.llm import LlmProbe
from dashboard.metrics import exposition, registry_for
from dashboard.stream import Broadcaster, sse
from gpuheal import __version__
from gpuheal.models import (
    HOST_PATTERN,
    ActionName,
    ActionStatus,
    ConditionKind,
    HealerSet,
    Phase,
    Severity,
)
from gpuheal.timespec import parse_duration
from gpuheal.topics import Topics

STATIC = FilePath(__file__).parent / "static"
HEARTBEAT_S = 15.0
"""A comment line on an idle stream this often (seconds), so proxies and browsers keep it."""
RECONNECT_MS = 2000
MAX_SINCE_S = 3650 * 86_400.0
SINCE_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,6})?[smhdw]$"
SINCE_HELP = "a duration back from now: a number and s, m, h, d or w (30s, 15m, 1h, 2d)"
SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self' "
     "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
     "base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
)

HostPath = Annotated[str, Path(pattern=HOST_PATTERN, max_length=128,
                               description="host name ([A-Za-z0-9_-]+)")]
IndexPath = Annotated[int, Path(ge=0, le=65535, description="GPU index")]
HostQuery = Annotated[str | None, Query(pattern=HOST_PATTERN, max_length=128,
                                        description="host name ([A-Za-z0-9_-]+)")]
GpuQuery = Annotated[int | None, Query(ge=0, le=65535, description="GPU index")]
SinceQuery = Annotated[str | None, Query(pattern=SINCE_PATTERN, description=SINCE_HELP)]
LimitQuery = Annotated[int, Query(ge=1, le=1000, description="rows per page (1-1000)")]
OffsetQuery = Annotated[int, Query(ge=0, le=1_000_000_000, description="rows to skip")]
EventIdQuery = Annotated[str | None, Query(min_length=1, max_length=64)]

bearer = HTTPBearer(auto_error=False, description="GPUHEAL_DASHBOARD_TOKEN (writes only)")


class EnabledBody(BaseModel):
    """Turn self-healing on or off."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool


class AckBody(BaseModel):
    """A person takes over a condition the healer cannot heal."""

    model_config = ConfigDict(extra="forbid", strict=True)
    event_id: str = Field(min_length=1, max_length=64)


class WriteFailed(Exception):
    """A command could not be handed to the broker; the message says why."""


@dataclass
class AppContext:
    """What the routes work with."""

    live: LiveModel
    history: History
    llm: LlmProbe
    broadcaster: Broadcaster
    topics: Topics
    host_name: str
    publish: Callable[[str, bytes], None]
    """Publish a command (QoS 1) and wait for the broker; raises :class:`WriteFailed`."""
    token: str | None = None
    loopback: bool = True


def parse_since(text: str | None) -> float | None:
    """Seconds in ``30s``/``15m``/``1h``/``2d``/``1w`` (None: no bound); ValueError if bad."""
    if text is None:
        return None
    if not re.fullmatch(SINCE_PATTERN, text):
        raise ValueError(f"since must be {SINCE_HELP}")
    seconds = parse_duration(text)
    if not 0 < seconds <= MAX_SINCE_S:
        raise ValueError("since must be more than 0 and at most 3650d")
    return seconds


def is_loopback(bind: str) -> bool:
    """Whether ``bind`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``."""
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host name of a ``Host`` header (``[::1]:9100`` → ``::1``)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _error(status: int, reason: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status, headers=headers)


def _validation_reason(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    name = loc[-1] if loc else "request"
    if name == "host" and len(loc) == 2:
        return (f"host must match [A-Za-z0-9_-]+ (at most 128 characters), got "
                f"{first.get('input')!r}")
    if name == "since":
        return f"since must be {SINCE_HELP}, got {first.get('input')!r}"
    where = {"path": "path parameter ", "query": "query parameter ", "body": "body "}.get(
        loc[0] if loc else "", "")
    field = ".".join(loc[1:]) if len(loc) > 1 else name
    return f"{where}{field}: {first.get('msg')}"


class SecurityMiddleware:
    """Security headers on every answer; bound to loopback, only loopback ``Host`` names."""

    def __init__(self, app: Callable[..., Awaitable[None]], loopback: bool) -> None:
        self.app = app
        self.loopback = loopback

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.loopback:
            host = dict(scope.get("headers") or ()).get(b"host")
            if host is not None and not is_loopback(_host_of(host.decode("latin-1"))):
                refused = _error(403, f"this dashboard listens on loopback only; Host "
                                 f"{host.decode('latin-1')!r} is not a loopback name")
                await refused(scope, receive, send)
                return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS:
                    if key not in headers:
                        headers[key] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


def authorize(request: Request,
              credentials: Annotated[HTTPAuthorizationCredentials | None,
                                     Depends(bearer)]) -> None:
    """The guard of every write: same origin, and the token when one is set."""
    ctx: AppContext = request.app.state.ctx
    origin = request.headers.get("origin")
    if origin is not None and origin != "null" and \
            urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, f"a write from another origin ({origin}) is refused")
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise HTTPException(403, f"a write from another site ({site}) is refused")
    if ctx.token is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), ctx.token.encode()):
        raise HTTPException(401, "this write needs Authorization: Bearer <token> "
                            "(GPUHEAL_DASHBOARD_TOKEN)", headers={"WWW-Authenticate": "Bearer"})


Authorized = Annotated[None, Depends(authorize)]


def build_app(ctx: AppContext) -> FastAPI:
    """The application for one dashboard."""
    app = FastAPI(
        title="gpuheal dashboard",
        version=__version__,
        description="The original /api/gpu and /api/services/ai, the recorded history, the "
                    "live stream and the healer's switches of gpuheal. Writes need "
                    "`Authorization: Bearer <GPUHEAL_DASHBOARD_TOKEN>` when a token is set.",
        docs_url=None, redoc_url=None, openapi_url="/openapi.json",
    )
    app.state.ctx = ctx
    app.add_middleware(SecurityMiddleware, loopback=ctx.loopback)
    registry = registry_for(ctx.live)

    @app.exception_handler(RequestValidationError)
    async def _bad_input(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_reason(exc))

    @app.exception_handler(HistoryUnavailable)
    async def _no_history(_request: Request, exc: HistoryUnavailable) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(WriteFailed)
    async def _write_failed(_request: Request, exc: WriteFailed) -> JSONResponse:
        return _error(503, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    def since_seconds(since: str | None) -> float | None:
        try:
            return parse_since(since)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None


    # --- the original API -------------------------------------------------------------------
    @app.get("/api/gpu", tags=["original"],
             summary="This host's first GPU (the original shape), and every GPU")
    def api_gpu(host: HostQuery = None) -> dict[str, Any]:
        """``{"available": true, "gpu": {...}, "gpus": [...], "broker_connected"}``; ``gpu``
        is ``host``'s (default: the dashboard's host) first GPU, else the first known.
        ``{"error": "GPU stats not available", "available": false}`` when none is known."""
        return views.api_gpu(ctx.live.states(), host or ctx.host_name,
                             ctx.live.broker_connected)

    @app.get("/api/gpu/{host}/{index}", tags=["original"], summary="One GPU")
    def api_one_gpu(host: HostPath, index: IndexPath) -> dict[str, Any]:
        return views.api_one_gpu(ctx.live.state(host, index), ctx.live.broker_connected)

    @app.get("/api/services/ai", tags=["original"],
             summary="The LLM service and its GPU (the original dashboard backend's shape)")
    def api_services_ai(host: HostQuery = None) -> dict[str, Any]:
        """``llm.status`` from Ollama's ``/api/ps`` at the healer's ``ollama_url``:
        ``online`` (it answered; ``llm.models`` lists what is loaded), ``error`` (something
        answered, not as Ollama does), ``unknown`` (nothing answered); ``llm.error`` says
        why."""
        gpu = views.first_gpu(ctx.live.states(), host or ctx.host_name)
        llm = ctx.llm.status()
        return views.services_ai(gpu, llm.status, llm.models, llm.error)

    # --- live ---------------------------------------------------------------------------------
    @app.get("/api/overview", tags=["live"],
             summary="Everything the page starts from: GPUs, hosts, recent events and actions")
    def api_overview() -> dict[str, Any]:
        return ctx.live.overview()

    @app.get("/api/stream", tags=["live"], response_class=StreamingResponse,
             summary="Server-sent events: overview, then state, event, action, healer, "
                     "status, cleared and health as they arrive",
             responses={200: {"content": {"text/event-stream": {}}},
                        503: {"description": "too many stream clients"}})
    async def api_stream() -> Response:
        client = ctx.broadcaster.add()
        if client is None:
            return _error(503, f"too many stream clients ({ctx.broadcaster.max_clients})")
        try:
            overview = await run_in_threadpool(ctx.live.overview)
        except BaseException:
            ctx.broadcaster.remove(client)
            raise

        async def events() -> Any:
            try:
                yield f"retry: {RECONNECT_MS}\n" + sse("overview", overview)
                while True:
                    try:
                        text = await asyncio.wait_for(client.queue.get(), HEARTBEAT_S)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    if text is None:
                        if client.dropped:
                            yield sse("dropped", {"reason": "fell behind"})
                        return
                    yield text
            finally:
                ctx.broadcaster.remove(client)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    # --- recorded -----------------------------------------------------------------------------
    @app.get("/api/events", tags=["recorded"], summary="Recorded events, newest first",
             responses={503: {"description": "the recording cannot answer (reason given)"}})
    def api_events(host: HostQuery = None, gpu: GpuQuery = None,
                   kind: ConditionKind | None = None, severity: Severity | None = None,
                   phase: Phase | None = None, event_id: EventIdQuery = None,
                   since: SinceQuery = None, limit: LimitQuery = 100,
                   offset: OffsetQuery = 0) -> dict[str, Any]:
        filters = {"host": host, "gpu": gpu, "kind": kind, "severity": severity,
                   "phase": phase, "event_id": event_id}
        return ctx.history.events(filters, since_seconds(since), limit, offset).as_json()

    @app.get("/api/actions", tags=["recorded"], summary="Recorded action messages, newest "
             "first", responses={503: {"description": "the recording cannot answer"}})
    def api_actions(host: HostQuery = None, gpu: GpuQuery = None,
                    action: ActionName | None = None, status: ActionStatus | None = None,
                    event_id: EventIdQuery = None, since: SinceQuery = None,
                    limit: LimitQuery = 100, offset: OffsetQuery = 0) -> dict[str, Any]:
        filters = {"host": host, "gpu": gpu, "action": action, "status": status,
                   "event_id": event_id}
        return ctx.history.actions(filters, since_seconds(since), limit, offset).as_json()

    @app.get("/api/history/{host}/{index}", tags=["recorded"],
             summary="One GPU's readings, downsampled to at most 1000 points per series",
             responses={503: {"description": "the recording cannot answer"}})
    def api_history(host: HostPath, index: IndexPath,
                    since: Annotated[str, Query(pattern=SINCE_PATTERN,
                                                description=SINCE_HELP)] = "1h",
                    points: Annotated[int, Query(ge=1, le=MAX_POINTS)] = MAX_POINTS,
                    metrics: Annotated[str | None, Query(
                        max_length=200, description="comma-separated subset of "
                        + ", ".join(SERIES_METRICS))] = None) -> dict[str, Any]:
        """The last ``since`` of the GPU's recorded time, ending at its newest sample (its
        source clock: a sped-up simulation or a replay charts its own hour). ``series.ts``
        holds each bucket's middle (UNIX seconds); a bucket without a reading is null."""
        chosen = SERIES_METRICS
        if metrics:
            chosen = tuple(m.strip() for m in metrics.split(",") if m.strip())
            unknown = [m for m in chosen if m not in SERIES_METRICS]
            if unknown or not chosen:
                raise HTTPException(400, f"metrics: unknown {unknown[0] if unknown else ''!r};"
                                    f" known: {', '.join(SERIES_METRICS)}")
        seconds = since_seconds(since)
        assert seconds is not None
        return ctx.history.series(host, index, seconds, points, chosen)

    # --- the healer's switches ----------------------------------------------------------------
    def command(host: str, message: HealerSet) -> dict[str, Any]:
        topic = ctx.topics.healer_set(host)
        payload = message.model_dump_json(exclude_none=True)
        ctx.publish(topic, payload.encode())
        return {"published": True, "topic": topic, "payload": message.model_dump(
            mode="json", exclude_none=True)}

    write_responses: dict[int | str, dict[str, Any]] = {
        401: {"description": "a token is required"},
        403: {"description": "from another origin"},
        503: {"description": "not connected to the broker, or it did not acknowledge"}}

    @app.post("/api/healer/{host}/enabled", tags=["healer"], status_code=202,
              summary="Turn self-healing on or off", responses=write_responses)
    def api_enabled(host: HostPath, body: EnabledBody, _auth: Authorized) -> dict[str, Any]:
        return command(host, HealerSet(enabled=body.enabled))

    @app.post("/api/healer/{host}/reset-breaker", tags=["healer"], status_code=202,
              summary="Close the healer's circuit breaker", responses=write_responses)
    def api_reset_breaker(host: HostPath, _auth: Authorized) -> dict[str, Any]:
        return command(host, HealerSet(reset_breaker=True))

    @app.post("/api/healer/{host}/ack", tags=["healer"], status_code=202,
              summary="Acknowledge a condition that needs a person", responses=write_responses)
    def api_ack(host: HostPath, body: AckBody, _auth: Authorized) -> dict[str, Any]:
        return command(host, HealerSet(ack=body.event_id))

    # --- Prometheus, the page -----------------------------------------------------------------
    @app.get("/metrics", tags=["metrics"], response_class=Response,
             summary="Prometheus exposition (text format)",
             responses={200: {"content": {"text/plain": {}}}})
    def metrics() -> Response:
        return Response(exposition(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
