"""The commissioning web server: aiohttp on the service's own event loop (docs/api.md).

`build_app` makes the aiohttp Application with every route (the page, its static files, the JSON API and the
stream), so another route can be added before it is served. `WebServer` runs it: a port that cannot be bound
is logged and retried every RETRY_BIND_S, never a reason to stop protecting the bank (like Modbus and metrics).

The stream (GET /api/v1/stream, server-sent events) is fed by one `Broadcaster`: at most every STREAM_PERIOD_S
real seconds it turns the newest decision into JSON once, whatever the number of clients, and hands it to each
client's slot of one (latest wins), so a slow phone gets the newest readout, never a backlog, and a hundred
open pages cost one encoding per period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from smallbms_bus.connections import RETRY_BIND_S, keep_binding
from smallbms_bus.web.api import PREFIX, Access, Api, error_response, json_errors
from smallbms_bus.web.status import status_json

log = logging.getLogger(__name__)

STREAM_PERIOD_S = 0.5  # at most 2 status events a second per client
KEEPALIVE_S = 15.0  # a comment line when nothing changed, so proxies and phones keep the connection
MAX_STREAMS = 32  # open event streams; a newcomer beyond it is answered 503
MAX_BODY = 64 * 1024  # a write's body is a few bytes
API_KEY: web.AppKey[Any] = web.AppKey("api", object)
BROADCASTER_KEY: web.AppKey[Any] = web.AppKey("broadcaster", object)


@dataclass(frozen=True)
class WebOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    password: str | None = None
    allow_write_from: tuple[str, ...] = ("127.0.0.1/32", "::1/128")
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_config(cls, web_section: dict[str, Any]) -> WebOptions:
        return cls(**{k: web_section[k] for k in ("host", "port", "password", "allow_write_from", "tls_cert",
                                                  "tls_key")})


class Broadcaster:
    """The newest status to every stream client, encoded once per period (see the module's docstring)."""

    def __init__(self, service: Any, period: float = STREAM_PERIOD_S) -> None:
        self.service, self.period = service, period
        self.clients: set[asyncio.Queue[str]] = set()
        self.encoded = 0  # statuses encoded (one per period with clients and a new decision)
        self._last: Any = None
        self._task: asyncio.Task[None] | None = None

    def latest(self) -> str | None:
        decision = self.service.decision
        return None if decision is None else json.dumps(status_json(decision), separators=(",", ":"))

    def subscribe(self) -> asyncio.Queue[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=1)
        self.clients.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str]) -> None:
        self.clients.discard(queue)

    async def _run(self) -> None:
        while self.clients:
            await asyncio.sleep(self.period)  # real seconds: the page is watched by a person
            decision = self.service.decision
            if decision is None or decision is self._last:
                continue
            self._last = decision
            data = self.latest()
            self.encoded += 1
            for queue in self.clients:
                if queue.full():  # latest wins
                    queue.get_nowait()
                queue.put_nowait(data)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Pages:
    """The page and its files (package data: smallbms_bus/web/static), and the stream."""

    def __init__(self, broadcaster: Broadcaster, closing: asyncio.Event) -> None:
        self.broadcaster, self.closing = broadcaster, closing
        self.static = resources.files("smallbms_bus.web") / "static"

    async def index(self, request: web.Request) -> web.StreamResponse:
        return await self.file(request, "index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        return await self.file(request, request.match_info["file"])

    async def file(self, request: web.Request, name: str) -> web.StreamResponse:
        kinds = {".html": "text/html", ".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
        kind = next((v for k, v in kinds.items() if name.endswith(k)), None)
        entry = self.static / name
        if kind is None or "/" in name or not entry.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=entry.read_bytes(), content_type=kind, charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def stream(self, request: web.Request) -> web.StreamResponse:
        b = self.broadcaster
        if len(b.clients) >= MAX_STREAMS:
            return error_response(503, f"too many open streams ({MAX_STREAMS}): close a page, or poll "
                                  f"{PREFIX}/status")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)
        queue = b.subscribe()
        try:
            first = b.latest()
            if first is not None:
                await response.write(f"event: status\ndata: {first}\n\n".encode())
            closing = asyncio.ensure_future(self.closing.wait())
            try:
                while not self.closing.is_set():
                    got = asyncio.ensure_future(queue.get())
                    done, _ = await asyncio.wait({got, closing}, timeout=KEEPALIVE_S,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if got in done:
                        await response.write(f"event: status\ndata: {got.result()}\n\n".encode())
                    else:
                        got.cancel()
                        if not self.closing.is_set():
                            await response.write(b": keep-alive\n\n")
            finally:
                closing.cancel()
        except (ConnectionResetError, asyncio.CancelledError):
            pass  # the page was closed
        finally:
            b.unsubscribe(queue)
        return response


def build_app(service: Any, options: WebOptions, closing: asyncio.Event | None = None) -> web.Application:
    """The Application with the page, the API and the stream; add routes before serving it."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
    api = Api(service, Access(options.password, options.allow_write_from))
    broadcaster = Broadcaster(service)
    pages = Pages(broadcaster, closing or asyncio.Event())
    app[API_KEY], app[BROADCASTER_KEY] = api, broadcaster
    app.add_routes([*api.routes(), web.get(f"{PREFIX}/stream", pages.stream), web.get("/", pages.index),
                    web.get("/static/{file}", pages.asset)])

    async def stop_broadcasting(_: web.Application) -> None:
        await broadcaster.close()

    app.on_cleanup.append(stop_broadcasting)
    return app


class WebServer:
    """Serves `build_app` on [web] host:port (TLS when tls_cert is set) until `close`."""

    def __init__(self, service: Any, options: WebOptions) -> None:
        self.service, self.options = service, options
        self.closing = asyncio.Event()
        self.app = build_app(service, options, self.closing)
        self._runner: web.AppRunner | None = None
        self._retry: asyncio.Task[None] | None = None
        self.bound = False

    @property
    def url(self) -> str:
        scheme = "https" if self.options.tls_cert else "http"
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"{scheme}://{host}:{self.options.port}/"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        try:
            await self._bind()
        except OSError as error:
            log.error("web: cannot serve the page on %s:%s (%s): is another service or demo using the port? "
                      "Retrying every %.0f s; choose another with [web] port (demo: --web-port)",
                      self.options.host, self.options.port, error.strerror or error, RETRY_BIND_S)
            self._retry = asyncio.get_running_loop().create_task(keep_binding(self._bind, "web"))

    async def _bind(self) -> None:
        assert self._runner is not None
        context = None
        if self.options.tls_cert:
            from smallbms_bus.modbus.tls import tls_context

            context = tls_context(self.options.tls_cert, self.options.tls_key, None, section="web")
        site = web.TCPSite(self._runner, self.options.host, self.options.port, ssl_context=context)
        await site.start()
        self.bound = True
        log.info("web: the commissioning page is on %s (writes %s)", self.url,
                 "with the password" if self.options.password else "off: no [web] password")

    async def close(self) -> None:
        self.closing.set()  # the streams end
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        if self._runner is not None:
            await self._runner.cleanup()
