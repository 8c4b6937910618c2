"""What every benchmark script shares: pinning to a core, a free port, and its JSON result file."""

from __future__ import annotations

import json
import os
import platform
import socket
import sys
from typing import Any


def pin(core_index: int = 0) -> None:
    """Run this process on one core (the first by default; -1 = the last), where the OS allows it."""
    if hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[core_index] if -len(cores) <= core_index < len(cores) else cores[-1]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_json(path: str | None, results: Any, **extra: Any) -> None:
    """The script's results for benchmarks/run (which collects every script's file into results.json)."""
    if path:
        with open(path, "w") as f:
            json.dump({"python": sys.version, "machine": platform.machine(), **extra, "results": results}, f,
                      indent=2)
