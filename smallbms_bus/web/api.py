"""The JSON API under /api/v1 (docs/api.md): what the commissioning page and the CLI's `history` and `events` use.

Reads are open to whoever reaches the port. A write needs three things, checked in this order: the client's
address is in `[web] allow_write_from` (else 403), a password is configured (else 403: the page is read-only),
and the request carries it as `Authorization: Bearer <password>` (else 401; failed attempts are rate-limited
per address, 429). The write then goes through `Service.commit` (smallbms_bus/commit.py) exactly as a Modbus
write does: validated, applied, acknowledged only once on disk, and logged in the event log with who
("web 10.0.0.5") and what (old -> new). A refusal made here (address, password) is logged as a refused event
too, through the same bounded path.

Setting names are the register map's (docs/registers.md): "discharge_floor", "charged_voltage", ...; the
voltages that the core keeps per 12.8 V unit are shown and written for the whole bank, as over Modbus.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from smallbms_bus.bms.settings import SPEC_BY_NAME
from smallbms_bus.commit import Change, Committed
from smallbms_bus.modbus.writes import (
    BUSY,
    COMMAND_CODES,
    ILLEGAL_VALUE,
    PER_UNIT_TARGETS,
    SETTING_TARGETS,
    STORE_FAILED,
    WriteRefused,
    WriteValue,
)
from smallbms_bus.web.status import history_json, status_json

PREFIX = "/api/v1"
NOT_ALLOWED = 1  # the refusal code of commit.note_refusal's "not_allowed" (Modbus exception 01)
AUTH_FAILURES = 5  # failed password attempts one address may make per AUTH_WINDOW_S; then 429 until it ends
AUTH_WINDOW_S = 60.0
AUTH_TRACKED = 1024  # addresses remembered (oldest windows forgotten first): a flood cannot grow the table
EVENTS_DEFAULT, EVENTS_MAX = 100, 10_000
HTTP_OF_REFUSAL = {ILLEGAL_VALUE: 400, BUSY: 409, STORE_FAILED: 503}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def peer_address(request: web.Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(request.remote or "")
    except ValueError:  # a Unix socket: no address
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped or ip


class Access:
    """Who may write: the address list, the password and the failed-attempt limiter."""

    def __init__(self, password: str | None, allow_write_from: tuple[str, ...],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.password = password
        self.networks = tuple(ipaddress.ip_network(n) for n in allow_write_from)
        self.clock = clock
        self._failures: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)

    def may_write_from(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip.version == n.version and ip in n for n in self.networks)

    def check(self, request: web.Request) -> None:
        """Raises ApiError 403, 429 or 401; returns when the request may write."""
        ip = peer_address(request)
        if not self.may_write_from(ip):
            raise ApiError(403, f"writes are not allowed from {ip or 'this client'} ([web] allow_write_from)")
        if self.password is None:
            raise ApiError(403, "the page is read-only: no [web] password is configured")
        key, now = str(ip), self.clock()
        start, failures = self._failures.get(key, (now, 0))
        if now - start >= AUTH_WINDOW_S:
            start, failures = now, 0
        if failures >= AUTH_FAILURES:
            wait = math.ceil(AUTH_WINDOW_S - (now - start))
            raise ApiError(429, f"too many wrong passwords from {ip}: try again in {wait} s",
                           {"Retry-After": str(wait)})
        given = request.headers.get("Authorization", "")
        scheme, _, secret = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(secret.strip().encode(), self.password.encode()):
            return
        if len(self._failures) >= AUTH_TRACKED and key not in self._failures:
            oldest = min(self._failures, key=lambda k: self._failures[k][0])
            del self._failures[oldest]
        self._failures[key] = (start, failures + 1)
        raise ApiError(401, "wrong password" if given else "a password is needed to write (Authorization: Bearer)",
                       {"WWW-Authenticate": 'Bearer realm="smallbms-bus"'})


def _number(body: dict[str, Any], key: str) -> float:
    value = body.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f'the body must be {{"{key}": a number}}, got {json.dumps(value)[:80]}')
    return float(value)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class Api:
    """The views; `service` is the running Service (core, decision, commit, writes, read_events)."""

    def __init__(self, service: Any, access: Access) -> None:
        self.service, self.access = service, access

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get(f"{PREFIX}/status", self.status),
            web.get(f"{PREFIX}/settings", self.settings),
            web.get(f"{PREFIX}/settings/{{name}}", self.setting),
            web.put(f"{PREFIX}/settings/{{name}}", self.put_setting),
            web.post(f"{PREFIX}/mode", self.mode),
            web.post(f"{PREFIX}/commands/{{command}}", self.command),
            web.post(f"{PREFIX}/soc", self.soc),
            web.get(f"{PREFIX}/history", self.history),
            web.get(f"{PREFIX}/events", self.events),
            web.get(f"{PREFIX}/access", self.access_view),
        ]

    # -- reads --------------------------------------------------------------------------------------------
    def _decision(self) -> Any:
        decision = self.service.decision
        if decision is None:
            raise ApiError(503, "starting: the BMS has not decided yet")
        return decision

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status_json(self._decision()))

    async def history(self, request: web.Request) -> web.Response:
        decision = self._decision()
        return web.json_response(history_json(decision.history, decision.wall))

    async def events(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            since = float(query["since"]) if "since" in query else None
            limit = int(query.get("limit", EVENTS_DEFAULT))
        except ValueError:
            raise ApiError(400, "since is unix seconds and limit a whole number") from None
        if since is not None and not math.isfinite(since):
            raise ApiError(400, "since is unix seconds")
        if not 1 <= limit <= EVENTS_MAX:
            raise ApiError(400, f"limit is 1..{EVENTS_MAX}")
        rows = await self.service.read_events(limit, since)
        return web.json_response({"events": [
            {"id": e["id"], "time": e["wall"], "name": e["name"], "kind": e["kind"], "value": e["value"],
             "reason": e["reason"]} for e in rows]})

    def setting_json(self, name: str) -> dict[str, Any]:
        spec = SPEC_BY_NAME[SETTING_TARGETS[name]]
        value = getattr(self.service.core.settings, spec.name)
        scale: float | None = 1.0
        if name in PER_UNIT_TARGETS:  # the core keeps it per 12.8 V unit; clients see the bank's volts
            scale = self.service.core.bank.topology().series_units or None
        digits = max(0, -math.floor(math.log10(spec.resolution) + 1e-9))

        def shown(v: float) -> float | None:
            return None if scale is None else round(v * scale, digits)

        out = {"name": name, "value": shown(value), "unit": spec.unit, "default": shown(spec.default),
               "min": shown(spec.minimum), "max": shown(spec.maximum), "step": spec.resolution,
               "label": spec.label, "description": spec.description}
        if spec.choices:
            out["choices"] = list(spec.choices)
        if name in PER_UNIT_TARGETS:
            out["per_unit_value"] = value
            out["units_in_series"] = scale
            if scale is None:
                out["note"] = "the bank is not learned yet: its units in series (and so its volts) are unknown"
        return out

    async def settings(self, request: web.Request) -> web.Response:
        return web.json_response({"settings": [self.setting_json(name) for name in SETTING_TARGETS]})

    async def setting(self, request: web.Request) -> web.Response:
        return web.json_response(self.setting_json(self._setting_name(request)))

    async def access_view(self, request: web.Request) -> web.Response:
        """What this client may do; with a password, whether it is right (a wrong one answers 401 and counts)."""
        ip = peer_address(request)
        out = {"address": str(ip), "password_set": self.access.password is not None,
               "write_allowed_from_here": self.access.may_write_from(ip), "authenticated": False}
        if "Authorization" in request.headers:
            self._check(request, "login")
            out["authenticated"] = True
        return web.json_response(out)

    # -- writes -------------------------------------------------------------------------------------------
    def _setting_name(self, request: web.Request) -> str:
        name = request.match_info["name"]
        if name not in SETTING_TARGETS:
            raise ApiError(404, f"no setting {name[:60]!r}: one of " + ", ".join(SETTING_TARGETS))
        return name

    def _check(self, request: web.Request, what: str) -> None:
        try:
            self.access.check(request)
        except ApiError as error:
            self.service.writes.note_refusal(f"web {peer_address(request)}", what,
                                             WriteRefused(NOT_ALLOWED, str(error)))
            raise

    async def _commit(self, request: web.Request, what: str,
                      writes: Callable[[], Awaitable[tuple[tuple[str, str, WriteValue], ...]]]) -> Committed:
        self._check(request, what)  # before the body: a client without the password learns nothing more
        source = f"web {peer_address(request)}"
        try:
            planned = await writes()
        except ApiError as error:  # a bad body or value: refused like a Modbus write out of range, and logged
            self.service.writes.note_refusal(source, what, WriteRefused(ILLEGAL_VALUE, str(error)))
            raise
        change = Change(planned, source=source, reason="web write")
        try:
            return await self.service.commit(change)
        except WriteRefused as refused:
            status = HTTP_OF_REFUSAL.get(refused.code, 400)
            if refused.code == BUSY and self.service.writes_closed:
                status = 503
            raise ApiError(status, str(refused)) from None

    async def put_setting(self, request: web.Request) -> web.Response:
        name = self._setting_name(request)

        async def writes() -> tuple[tuple[str, str, WriteValue], ...]:
            value = _number(await _body(request), "value")
            spec = self.setting_json(name)
            if spec["min"] is not None and not spec["min"] <= value <= spec["max"]:  # the range before cross-checks
                raise ApiError(400, f"{name} = {value:g} is not allowed: {spec['min']:g}..{spec['max']:g} "
                               f"{spec['unit']}".rstrip())
            return ((name, name, value),)

        done = await self._commit(request, name, writes)
        return web.json_response({"done": list(done.steps), "setting": self.setting_json(name)})

    async def mode(self, request: web.Request) -> web.Response:
        async def writes() -> tuple[tuple[str, str, WriteValue], ...]:
            mode = (await _body(request)).get("mode")
            if mode not in ("on", "off"):
                raise ApiError(400, f'mode is "on" or "off", got {json.dumps(mode)[:80]}')
            return (("mode", "mode", 1.0 if mode == "on" else 0.0),)

        done = await self._commit(request, "mode", writes)
        return web.json_response({"done": list(done.steps), "mode": "on" if self.service.core.mode_on else "off"})

    async def command(self, request: web.Request) -> web.Response:
        command = request.match_info["command"]
        if command not in COMMAND_CODES:
            raise ApiError(404, f"no command {command[:60]!r}: one of " + ", ".join(COMMAND_CODES))

        async def writes() -> tuple[tuple[str, str, WriteValue], ...]:
            return (("command", "command", float(COMMAND_CODES[command])),)

        done = await self._commit(request, f"command {command}", writes)
        return web.json_response({"done": list(done.steps)})

    async def soc(self, request: web.Request) -> web.Response:
        async def writes() -> tuple[tuple[str, str, WriteValue], ...]:
            soc = _number(await _body(request), "soc")
            if not 0 <= soc <= 100:
                raise ApiError(400, f"soc = {soc:g} is not allowed: 0..100 %")
            return (("set_soc", "set_soc", round(soc, 1)),)

        done = await self._commit(request, "set_soc", writes)
        return web.json_response({"done": list(done.steps)})


@web.middleware
async def json_errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    """Every API error is {"error": "why"} with its status; aiohttp's own (404, 405, 413) too."""
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(error.status, str(error), error.headers)
    except web.HTTPException as error:
        if not request.path.startswith(PREFIX) or error.status < 400:
            raise
        headers = {k: v for k, v in error.headers.items() if k.lower() not in ("content-type", "content-length")}
        return error_response(error.status, error.reason, headers)
