"""Signals as a stop request: SIGINT and SIGTERM end a command cleanly instead of with a traceback; the service's
own handlers on its event loop."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from types import FrameType


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` (only the main thread may install handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def loop_signal_handlers(loop: asyncio.AbstractEventLoop,
                         handlers: dict[int, Callable[[], object]]) -> Iterator[None]:
    """The service's handlers on its event loop while the block runs (none outside the main thread: tests)."""
    for sig, handler in handlers.items():
        with suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, handler)
    try:
        yield
    finally:
        for sig in handlers:
            with suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
