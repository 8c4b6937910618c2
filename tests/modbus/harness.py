"""A real Modbus server (real TCP socket, real pymodbus client) in front of a BMS core driven by the rig.

The server runs on its own event loop in a thread, as in the service; everything that touches the core
(ticks, reading decisions) is marshalled onto that loop with `on_loop`, so the core is never used
from two threads. Writes go through the service's write path (smallbms_bus/commit.py) into a real
SQLite store in a temporary directory, committed on a store thread of their own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pymodbus.client import ModbusTcpClient

from smallbms_bus.commit import WritePath
from smallbms_bus.modbus.server import BmsAccess, ModbusOptions, ModbusServer
from smallbms_bus.store import PendingSave, Persister, Store
from tests.bms.rig import Rig

T = TypeVar("T")


class RunningServer:
    def __init__(self, rig: Rig, options: ModbusOptions | None = None, *, start: bool = True) -> None:
        self.rig = rig
        if start:
            rig.start()
        self.decisions = 0
        self.tmp = tempfile.TemporaryDirectory(prefix="smallbms-modbus-test-")
        self.store = Store.open(Path(self.tmp.name) / "state.db")
        self.persister = Persister(self.store)
        self.store_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self.writes = WritePath(rig.core, self.persister, self._save, self._decide, clock=lambda: rig.t,
                                wall=time.time)
        access = BmsAccess(core=rig.core, decision=lambda: rig.last, commit=self.writes.commit, clock=lambda: rig.t,
                           started=0.0)
        self.server = ModbusServer(options or ModbusOptions(port=0, tls_port=0), access)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="modbus-test-loop", daemon=True)
        self.thread.start()
        self.on_loop_async(self.server.start())
        self.port = self.server.bound[0][1]

    async def _save(self, save: PendingSave) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self.store_thread, self.persister.write, save)

    def _decide(self) -> None:
        self.decisions += 1
        self.rig.evaluate()

    def on_loop_async(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        async def call() -> T:
            return fn(*args)
        return self.on_loop_async(call())

    def tick(self, seconds: float = 0.1) -> None:
        # In chunks of 10 simulated seconds (100 ticks), each within on_loop's 10 s bound: a long run (600 s is
        # 6000 evaluations) must not hit that bound on a loaded machine. Same ticks, same dt, as one run.
        left = seconds
        while True:
            step = min(left, 10.0)
            self.on_loop(self.rig.run, step)
            left -= step
            if left <= 1e-9:
                return

    def client(self, **kwargs: Any) -> ModbusTcpClient:
        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=3, retries=0, **kwargs)
        assert client.connect(), "the test server did not accept a connection"
        return client

    def close(self) -> None:
        self.on_loop_async(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()
        self.store_thread.shutdown(wait=True)
        self.store.close()
        self.tmp.cleanup()


def signed(word: int) -> int:
    return word - 0x10000 if word & 0x8000 else word


def u32(words: list[int], at: int) -> int:
    return words[at] << 16 | words[at + 1]


def s32(words: list[int], at: int) -> int:
    value = u32(words, at)
    return value - (1 << 32) if value & 0x80000000 else value
