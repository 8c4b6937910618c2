"""A running service with its web page on a free port, and a real HTTP client (aiohttp) for the tests."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import aiohttp

from tests.ports import free_port
from tests.test_service import Running

PASSWORD = "correct horse battery"


def web_section(port: int, password: str | None = PASSWORD, allow: str = '["127.0.0.1/32", "127.0.0.3/32"]') -> str:
    secret = "" if password is None else f'password = "{password}"\n'
    return f'[web]\nhost = "127.0.0.1"\nport = {port}\n{secret}allow_write_from = {allow}\n'


class WebRunning(Running):
    """`Running` with [web] (and Modbus) on free ports; `batteries=False` leaves the bus silent (nothing learned)."""

    def __init__(self, tmp_path: Any, *, password: str | None = PASSWORD, batteries: bool = True, **kwargs: Any):
        self.web_port, self.modbus_port = free_port(), free_port()
        extra = web_section(self.web_port, password) + f'[modbus]\nhost = "127.0.0.1"\nport = {self.modbus_port}\n'
        super().__init__(tmp_path, extra=extra + kwargs.pop("extra", ""), **kwargs)
        self.batteries = batteries
        self.url = f"http://127.0.0.1:{self.web_port}"

    def __enter__(self) -> WebRunning:
        if self.batteries:
            super().__enter__()
            return self

        def serve() -> None:
            asyncio.set_event_loop(self.loop)
            self.result.append(self.loop.run_until_complete(self.service.run(self.stop)))

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        return self

    def wait_web(self, timeout: float = 10.0) -> None:
        self.wait_for(lambda: self.service.web is not None and self.service.web.bound, timeout, "the web page bound")


def request(method: str, url: str, body: Any = None, *, password: str | None = None, source: str | None = None,
            raw: bytes | None = None) -> tuple[int, Any]:
    """One HTTP request from `source` (a loopback address of our choosing); (status, decoded JSON)."""

    async def go() -> tuple[int, Any]:
        connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
        headers = {} if password is None else {"Authorization": f"Bearer {password}"}
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        async with aiohttp.ClientSession(connector=connector) as session, session.request(
                method, url, data=data, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as answer:
            return answer.status, await answer.json(content_type=None)

    return asyncio.run(go())
