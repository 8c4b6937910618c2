"""`smallbms-bus events`: the event log of a running service, read from its web JSON API (docs/api.md).

GET /api/v1/events?since=T&limit=N on the service's `[web]` host and port (from `--config`,
`--web-host`/`--web-port`, or `--url`), printed oldest first like a log, or as the API's JSON. The
event log is not on Modbus, so this is the one installer command that needs the web API: when the
configuration turns it off (`[web] port = 0`) the command says so and exits 1. Whatever the other end
does, one line on stderr and exit 1; a bad argument exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any, TextIO

from smallbms_bus.config import ConfigError, load_config

DEFAULT_WEB = ("127.0.0.1", 8080)
SPANS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class WebError(Exception):
    """What went wrong, as the one line the command prints."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("events", help="print the event log of a running service (over its web API)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--since", default=None, metavar="T",
                        help="only events at or after T: Unix seconds, a local date/time (2026-12-01 or "
                             "'2026-12-01 14:30'), or an age (90s, 30m, 2h, 7d)")
    parser.add_argument("-n", "--limit", type=int, default=100, metavar="N",
                        help="at most the N newest events (1-10000, default 100)")
    parser.add_argument("--json", action="store_true", help="the API's JSON as it came (newest first)")
    parser.add_argument("--config", help="take the web API's host and port from this configuration's [web]")
    parser.add_argument("--web-host", default=None, help=f"the service's address (default {DEFAULT_WEB[0]})")
    parser.add_argument("--web-port", type=int, default=None, help=f"its [web] port (default {DEFAULT_WEB[1]})")
    parser.add_argument("--url", default=None, help="the API's base URL instead, e.g. https://bms.local:8443")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)")
    return parser


def since_seconds(text: str, now: float) -> float:
    """--since as Unix seconds; ValueError naming what is accepted."""
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if match := re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", text):
        return now - float(match.group(1)) * SPANS[match.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()  # naive: local time, as an installer reads a clock
    except ValueError:
        raise ValueError(f"--since {text!r}: give Unix seconds, a date/time like '2026-12-01 14:30', "
                         "or an age like 30m, 2h, 7d") from None


def base_url(args: argparse.Namespace) -> str:
    """The API's base URL; ValueError for a bad argument or config (exit 2), WebError for a web API that is off."""
    if args.url:
        parsed = urllib.parse.urlsplit(args.url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--url {args.url!r}: give http://HOST:PORT or https://HOST:PORT")
        return args.url.rstrip("/")
    host, port, scheme = DEFAULT_WEB[0], DEFAULT_WEB[1], "http"
    if args.config:
        try:
            web = load_config(args.config).sections.get("web")
        except ConfigError as error:
            raise ValueError(str(error)) from None
        if web is not None:
            if not web["port"]:
                raise WebError(f"{args.config}: web.port = 0: this service serves no web API, and the event log "
                               "is only there (set [web] port, e.g. 8080, and restart it)")
            listen = web["host"]
            host = "127.0.0.1" if listen in ("0.0.0.0", "") else "::1" if listen == "::" else listen
            port = web["port"]
            scheme = "https" if web.get("tls_cert") else "http"
    if args.web_port is not None and not 1 <= args.web_port <= 65535:
        raise ValueError(f"--web-port {args.web_port}: allowed 1..65535")
    host, port = args.web_host or host, args.web_port or port
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def fetch(url: str, timeout: float) -> Any:
    """GET url as JSON, or WebError saying what the other end did."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:  # http(s) only: checked in base_url
            body = answer.read()
    except urllib.error.HTTPError as error:
        raise WebError(f"{url}: HTTP {error.code}: {_error_text(error.read())}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        if isinstance(reason, ConnectionRefusedError):
            raise WebError(f"no web API at {url.split('/api/')[0]} (connection refused: is smallbms-bus running "
                           "with [web] port set? see --config/--web-port)") from None
        why = getattr(reason, "strerror", None) or reason
        raise WebError(f"no web API at {url.split('/api/')[0]}: {why}") from None
    except (TimeoutError, OSError) as error:
        raise WebError(f"{url}: no answer within {timeout:g} s ({error})") from None
    try:
        return json.loads(body)
    except ValueError:
        raise WebError(f"{url}: the answer is not JSON (another server on that port?)") from None


def _error_text(body: bytes) -> str:
    try:
        return " ".join(str(json.loads(body)["error"]).split())
    except (ValueError, KeyError, TypeError):
        text = " ".join(body[:300].decode("utf-8", "replace").split())  # one line, whatever the server sent
        return text[:200] or "no reason given"


def format_event(event: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(float(event["time"])).strftime("%Y-%m-%d %H:%M:%S")
    value = event.get("value")
    reason = event.get("reason")
    text = f"{when}  {event.get('kind', ''):<8} {event.get('name', '')}"
    text += f" -> {value}" if value not in (None, "") else ""
    return text + (f": {reason}" if reason else "")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        if not 1 <= args.limit <= 10000:
            raise ValueError(f"-n {args.limit}: allowed 1..10000")
        if not (math.isfinite(args.timeout) and 0 < args.timeout <= 3600):
            raise ValueError(f"--timeout {args.timeout}: allowed seconds, more than 0 up to 3600")
        query = {"limit": str(args.limit)}
        if args.since is not None:
            query["since"] = f"{since_seconds(args.since, time.time()):.0f}"
        base = base_url(args)
    except ValueError as error:
        print(f"events: {error}", file=sys.stderr)
        return 2
    except WebError as error:
        print(f"events: {error}", file=sys.stderr)
        return 1
    try:
        answer = fetch(f"{base}/api/v1/events?{urllib.parse.urlencode(query)}", args.timeout)
        events = answer["events"]
    except WebError as error:
        print(f"events: {error}", file=sys.stderr)
        return 1
    except (KeyError, TypeError):
        print(f"events: {base}: the answer has no event list (another server on that port?)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=1, ensure_ascii=False), file=out)
        return 0
    for event in reversed(events):  # the API sends the newest first; a log reads oldest first
        print(format_event(event), file=out)
    if not events:
        print("no events" + (" since then" if args.since else ""), file=out)
    return 0
