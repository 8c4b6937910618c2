"""Relay outputs: board backends behind a registry, and the controller that drives them (OUT-1..OUT-5).

base.py        `RelayBoard` (the interface every backend obeys) and `OutputError`
memory.py      in-process board for the demo and tests, with switchable faults
modbus.py      Modbus RTU (serial/RS-485) and Modbus TCP relay boards and I/O modules (pymodbus)
lcus.py        LCUS-1/2/4/8 CH340 USB serial relay boards (write-only)
gpiod.py       Linux GPIO character device through libgpiod v2 (optional extra `gpio`)
controller.py  `Outputs`: roles -> channels, read-back verification, re-assert, back-off, safe()

A backend is looked up by name, the way python-can maps interface names to bus classes:
`open_board("modbus", transport="tcp", host="10.0.0.5")`. Options are the backend class's keyword
arguments; an unknown backend or option is a `ValueError` that lists what is allowed. Adding a board
is one file plus one line in `BACKENDS`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from smallbms_bus.outputs.base import OutputError, RelayBoard

# name -> "module:Class", imported on use so a backend's dependencies load only when it is chosen.
BACKENDS: dict[str, str] = {
    "memory": "smallbms_bus.outputs.memory:MemoryBoard",
    "modbus": "smallbms_bus.outputs.modbus:ModbusBoard",
    "lcus": "smallbms_bus.outputs.lcus:LcusBoard",
    "gpiod": "smallbms_bus.outputs.gpiod:GpiodBoard",
}


def board_class(backend: str) -> type[RelayBoard]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown relay board backend {backend!r}: allowed {', '.join(BACKENDS)}")
    module, _, name = BACKENDS[backend].partition(":")
    return getattr(importlib.import_module(module), name)


def make_board(backend: str, **options: Any) -> RelayBoard:
    """Build a board from its backend name and options, without any I/O (the controller opens it)."""
    cls = board_class(backend)
    allowed = [p.name for p in inspect.signature(cls).parameters.values()
               if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"relay board backend {backend!r} has no option {', '.join(map(repr, unknown))}: "
                         f"allowed {', '.join(allowed)}")
    return cls(**options)


def open_board(backend: str, **options: Any) -> RelayBoard:
    """Build and open a board. ValueError for a bad backend or option, OutputError when it cannot be opened."""
    board = make_board(backend, **options)
    board.open()
    return board


__all__ = ["BACKENDS", "OutputError", "RelayBoard", "board_class", "make_board", "open_board"]
