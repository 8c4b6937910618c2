"""Malformed configurations for the fuzz of `check-config` and `run` (tests/test_config_fuzz.py).

A case is the bytes of a config file, the key its error must name, and optionally files to create
first. Cases are built from SCHEMA and from each relay backend's constructor, so a key or option
added later is fuzzed without editing this file.
"""

from __future__ import annotations

import datetime
import inspect
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smallbms_bus.config import SCHEMA
from smallbms_bus.outputs import BACKENDS, board_class

DATETIME = datetime.datetime(1979, 5, 27, 7, 32)
TABLE = {"a": 1}
NO_KEY_TAKES = (TABLE, DATETIME, [TABLE])  # a nested table, a date, a list of tables: wrong for every key
HUGE = 10**30
LONG = "x" * 100_000


@dataclass
class Case:
    name: str
    content: bytes
    key: str  # what the error line must name
    setup: Callable[[Path], None] | None = field(default=None, repr=False)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are TOML's (no DEL in the tests)
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def render(sections: dict[str, dict[str, Any]]) -> bytes:
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in table.items()]
    return ("\n".join(lines) + "\n").encode()


def base(d: Path) -> dict[str, dict[str, Any]]:
    """A config `run` accepts on any machine: virtual bus, memory board, no listeners, a store in `d`."""
    return {"bus": {"interface": "virtual", "channel": f"fuzz-{d.name}"}, "modbus": {"port": 0},
            "metrics": {"port": 0}, "store": {"path": str(d / "state.db")}, "outputs": {"backend": "memory"}}


def with_(d: Path, **changes: dict[str, Any]) -> bytes:
    sections = base(d)
    for name, table in changes.items():
        sections.setdefault(name, {}).update(table)
    return render(sections)


def _wrong_values(section: str, key: str, n: int) -> list[Any]:
    """Values no check of this key may accept: other types, out of any range, and one of NO_KEY_TAKES
    (the n-th: each is tried on a third of the keys, which keeps the run short)."""
    default = SCHEMA[section][key].default
    common: list[Any] = [NO_KEY_TAKES[n % len(NO_KEY_TAKES)]]
    if isinstance(default, bool):
        return [*common, "true", 1]
    if isinstance(default, int):
        return [*common, "5", True, 1.5, HUGE]
    if isinstance(default, float):
        return [*common, "5", True, math.nan, 1e300]
    if (section, key) == ("mqtt", "discovery_prefix"):  # "" is valid there: no Home Assistant discovery
        return [*common, 5, True, ["x"], "homeassistant/#"]
    if isinstance(default, str):  # "" is wrong where the default is not empty ("" = off for [inverter])
        return [*common, 5, True, ["x"], *([""] if default else [])]
    if isinstance(default, list):
        return [*common, "127.0.0.1", ["not-an-address"], [5]]
    if isinstance(default, dict):
        return ["x", 5, [1], True]
    if key == "line":
        return [*common, -1, True, 1.5]
    return [*common, 5, ["x"]]  # optional paths: dbc, tls_*


def schema_cases(d: Path) -> list[Case]:
    cases = []
    keys = [(section, key) for section, table in SCHEMA.items() for key in table]
    for n, (section, key) in enumerate(keys):
        for value in _wrong_values(section, key, n):
            name = f"{section}.{key}={toml_value(value)[:30]}"
            cases.append(Case(name, with_(d, **{section: {key: value}}), f"{section}.{key}"))
    for section, key, value in (("bus", "interface", "bogus"), ("bus", "interface", LONG),
                                ("outputs", "backend", "usb-magic"), ("outputs", "backend", LONG),
                                ("remote", "source", "radio"), ("remote", "bias", "up"), ("log", "level", "chatty"),
                                ("store", "path", LONG), ("store", "path", "nul\u0000byte")):
        cases.append(Case(f"{section}.{key}={value[:20]!r}", with_(d, **{section: {key: value}}), f"{section}.{key}"))
    return cases


def structure_cases(d: Path) -> list[Case]:
    good = with_(d)
    rng = random.Random(12)

    def without(section: str, key: str) -> bytes:
        sections = base(d)
        del sections[section][key]
        return render(sections)

    cases = [
        Case("unknown section", good + b"[canbus]\nchannel = 'can0'\n", "[canbus]"),
        Case("section as scalar", b"log = 3\n" + good, "log"),
        Case("section as array of tables", b"[[bus]]\ninterface = 'virtual'\n", "bus"),
        Case("unknown key", with_(d, bus={"bitrat": 500000}), "bus.bitrat"),
        Case("unknown key with a newline", with_(d, bus={"a\nb": 1}), "bus.'a\\nb'"),
        Case("unknown key 10 kB long", with_(d, bus={"k" * 10_000: 1}), "bus.'kkkk"),
        Case("nested table header for a scalar", without("modbus", "port") + b"[modbus.port]\nx = 1\n", "modbus.port"),
        Case("array of tables for a scalar", without("store", "path") + b"[[store.path]]\nx = 1\n", "store.path"),
        Case("table header for allow_write_from", good + b"[modbus.allow_write_from]\nx = 1\n",
             "modbus.allow_write_from"),
        Case("non-UTF-8: latin-1", good + "[log]\nlevel = 'INFO' # café\n".encode("latin-1"), "(file)"),
        Case("non-UTF-8: lone 0xff", b"\xff" + good, "(file)"),
        Case("non-UTF-8: UTF-16", good.decode().encode("utf-16"), "(file)"),
        Case("non-UTF-8: cut multibyte at the end", good + "# é".encode()[:-1], "(file)"),
        Case("NUL byte", good + b"\x00\n", "(file)"),
        Case("unterminated string", good + b'[log]\nlevel = "INF', "(file)"),
        Case("unterminated array", good + b"[modbus]\nallow_write_from = [\"127.0.0.1\"", "(file)"),
        Case("unterminated header", good + b"[log", "(file)"),
        Case("duplicate key", good + b"[log]\nlevel = 'INFO'\nlevel = 'DEBUG'\n", "(file)"),
        Case("integer of 5000 digits", good + b"[log]\nlevel = " + b"9" * 5000 + b"\n", "(file)"),
        Case("arrays nested 100000 deep", good + b"[log]\nlevel = " + b"[" * 100_000 + b"]" * 100_000 + b"\n",
             "(file)"),
        Case("2 MB file", good + b"# " + b"x" * 2_000_000 + b"\n", "(file)"),
        Case("empty-named section", good + b'[""]\n', "['']"),
    ]
    cases += [Case(f"binary garbage {n} bytes", rng.randbytes(n), "(file)") for n in (1, 7, 100, 4096, 65536)]
    cases += [Case(f"binary garbage after a good config {n}", good + rng.randbytes(n), "(file)") for n in (3, 300)]
    return cases


def _good_options(backend: str) -> dict[str, Any]:
    return {"memory": {}, "lcus": {"port": "/dev/ttyUSB0", "channels": 4},
            "modbus": {"transport": "tcp", "host": "127.0.0.1"}, "gpiod": {"lines": [17, 27, 22]}}[backend]


def option_cases(d: Path) -> list[Case]:
    """Every option of every backend with values no option takes, plus each backend's own likely mistakes."""
    def case(backend: str, options: dict[str, Any], key: str, remove: tuple[str, ...] = ()) -> Case:
        merged = {k: v for k, v in {**_good_options(backend), **options}.items() if k not in remove}
        sections = base(d)
        sections["outputs"] = {"backend": backend}
        sections["outputs.options"] = merged
        return Case(f"{backend} {options or remove}"[:60], render(sections), key)

    cases = []
    n = 0
    for backend in BACKENDS:
        for parameter in inspect.signature(board_class(backend)).parameters:
            value = NO_KEY_TAKES[n % len(NO_KEY_TAKES)]
            cases.append(case(backend, {parameter: value}, f"outputs.options.{parameter}"))
            n += 1
        cases.append(case(backend, {"backend": backend}, "outputs.options.backend"))  # make_board's own argument
        cases.append(case(backend, {"bogus": 1}, "outputs.options.bogus"))
    for backend, options, option in (
            ("memory", {"stuck": 3}, "stuck"), ("memory", {"channels": "8"}, "channels"),
            ("memory", {"channels": 65}, "channels"), ("memory", {"fail_open": 1}, "fail_open"),
            ("memory", {"name": 5}, "name"), ("memory", {"inputs": -1}, "inputs"),
            ("lcus", {"channels": 3}, "channels"), ("lcus", {"channels": True}, "channels"),
            ("lcus", {"timeout": "1"}, "timeout"), ("lcus", {"timeout": math.inf}, "timeout"),
            ("lcus", {"port": 5}, "port"), ("lcus", {"port": ""}, "port"),
            ("modbus", {"port": 1.5}, "port"), ("modbus", {"port": 70000}, "port"), ("modbus", {"unit": "1"}, "unit"),
            ("modbus", {"timeout": True}, "timeout"), ("modbus", {"timeout": math.nan}, "timeout"),
            ("modbus", {"transport": "udp"}, "transport"), ("modbus", {"transport": 1}, "transport"),
            ("modbus", {"retries": 11}, "retries"), ("modbus", {"channels": 0}, "channels"),
            ("modbus", {"transport": "rtu", "host": None, "port": "/dev/ttyUSB0", "parity": "X"}, "parity"),
            ("gpiod", {"lines": 17}, "lines"), ("gpiod", {"lines": []}, "lines"), ("gpiod", {"lines": [17, 17]},
                                                                                   "lines"),
            ("gpiod", {"active_low": "yes"}, "active_low"), ("gpiod", {"active_low": [True]}, "active_low"),
            ("gpiod", {"chip": 5}, "chip"), ("gpiod", {"chip": ""}, "chip"), ("gpiod", {"input_bias": 1},
                                                                               "input_bias"),
            ("gpiod", {"inputs": [17]}, "inputs")):
        cases.append(case(backend, {k: v for k, v in options.items() if v is not None}, f"outputs.options.{option}",
                          remove=tuple(k for k, v in options.items() if v is None)))
    for backend, remove, option in (("lcus", ("port",), "port"), ("modbus", ("host",), "host"),
                                    ("modbus", ("transport", "host"), "port"), ("gpiod", ("lines",), "lines")):
        cases.append(case(backend, {}, f"outputs.options.{option}", remove))
    return cases
