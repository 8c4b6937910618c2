"""Relay outputs: board backends behind a registry, and the controller that drives them (OUT-1..OUT-5).

base.py        `RelayBoard` (the interface every backend obeys) and `OutputError`
memory.py      in-process board for the demo and tests, with switchable faults
modbus.py      Modbus RTU (serial/RS-485) and Modbus TCP relay boards and I/O modules (pymodbus)
lcus.py        LCUS-1/2/4/8 CH340 USB serial relay boards (write-only)
gpiod.py       Linux GPIO character device through libgpiod v2 (optional extra `gpio`)
controller.py  `RelayController`: roles -> channels, read-back verification, re-assert, back-off, safe()

A backend is looked up by name, the way python-can maps interface names to bus classes:
`open_board("modbus", transport="tcp", host="10.0.0.5")`. Options are the backend class's keyword
arguments, type-checked against its constructor's annotations (they come from a TOML file: a string
where a number belongs must be a clear error, not a TypeError deep inside); an unknown, missing,
mistyped or out-of-range option is an `OptionError` (a ValueError) naming it and what is allowed.
Adding a board is one file plus one line in `BACKENDS`; its annotations are its option schema.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import types
import typing
from typing import Any

from smallbms_bus.outputs.base import OptionError, OutputError, RelayBoard

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


def may_have_inputs(backend: str) -> bool:
    """Whether a backend can read a remote on/off input with some options: the class says it has inputs, or it
    takes an `inputs` option (Modbus, GPIO). What the configured options give is checked by preflight."""
    cls = board_class(backend)
    return cls.has_inputs or "inputs" in inspect.signature(cls).parameters


def make_board(backend: str, /, **options: Any) -> RelayBoard:
    """Build a board from its backend name and options, without any I/O (the controller opens it).

    ValueError for an unknown backend; OptionError for an unknown, missing, mistyped or out-of-range option."""
    cls = board_class(backend)
    parameters = [p for p in inspect.signature(cls).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    allowed = [p.name for p in parameters]
    for name in sorted(set(options) - set(allowed)):
        raise OptionError(backend, name, options[name], f"not an option of the {backend} backend: allowed "
                          f"{', '.join(allowed)}")
    for p in parameters:
        if p.default is p.empty and p.name not in options:
            raise OptionError(backend, p.name, None, "a required option")
    hints = typing.get_type_hints(cls.__init__)
    for name, value in options.items():
        hint = hints.get(name, Any)
        if not _fits(value, hint):
            raise OptionError(backend, name, value, f"allowed {_kind(hint)}")
    return cls(**options)


def _fits(value: Any, hint: Any) -> bool:
    """Does a TOML value have the annotated type (bool is not an int here: `channels = true` is a mistake)?"""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(hint))
    if isinstance(origin, type) and issubclass(origin, collections.abc.Iterable) and origin is not str:
        item = (typing.get_args(hint) or (Any,))[0]
        return isinstance(value, list | tuple) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


_KINDS = {bool: ("true/false", "true/false values"), int: ("an integer", "integers"),
          float: ("a number", "numbers"), str: ("a string", "strings")}


def _kind(hint: Any, plural: bool = False) -> str:
    """What an annotation allows, in words for a config file's reader."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_kind(arg, plural) for arg in typing.get_args(hint) if arg is not type(None))
    if isinstance(origin, type) and issubclass(origin, collections.abc.Iterable) and origin is not str:
        return f"{'lists' if plural else 'a list'} of {_kind((typing.get_args(hint) or (Any,))[0], True)}"
    if hint in _KINDS:
        return _KINDS[hint][plural]
    return "values" if plural else "a value"


def open_board(backend: str, /, **options: Any) -> RelayBoard:
    """Build and open a board. ValueError for a bad backend or option, OutputError when it cannot be opened."""
    board = make_board(backend, **options)
    board.open()
    return board


__all__ = ["BACKENDS", "OptionError", "OutputError", "RelayBoard", "board_class", "make_board", "may_have_inputs",
           "open_board"]
