"""Configuration file (TOML): schema, defaults and validation.

Theory of operation
-------------------
Every key is declared once in SCHEMA with its type, default, allowed values and a one-line help.
`load_config(path)` reads the file (UTF-8, at most 1 MiB), parses it, rejects unknown sections and
keys (a typo must not silently fall back to a default on a BMS), checks every value and the values
against each other, and returns a frozen `Config`. Any problem raises `ConfigError` naming the key,
the bad value and what is allowed, in one line. What needs more than the file (the relay backend's
options, the store path, the DBC, the TLS files) is checked by `smallbms_bus.preflight`, which
`check-config` and `run` both call: the CLI turns any ConfigError into exit status 2 before anything
is opened.

BMS settings (charged voltage, tail current, ...) are not configuration: they are written over
Modbus, validated by `smallbms_bus.bms.settings` and persisted in the store.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smallbms_bus.bank import COMM_TIMEOUT_RANGE, DEFAULT_COMM_TIMEOUT
from smallbms_bus.outputs import BACKENDS, may_have_inputs
from smallbms_bus.vocabulary import OUTPUT_ROLES

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few kB; anything near this is the wrong file
SHOWN = 80  # characters of a bad value shown in an error (a 100 kB string stays one readable line)


class _NotSet:
    """The value of a required key or option that is absent (TOML has no null)."""

    def __repr__(self) -> str:
        return "(not set)"


NOT_SET: Any = _NotSet()


def shown(value: Any) -> str:
    """A value as an error line shows it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 20]}... ({len(text)} characters)"


def key_name(key: str) -> str:
    """A TOML key as an error line names it (a quoted key may hold anything, newlines included)."""
    return key if key.isprintable() and key.strip() == key and 0 < len(key) <= 64 else shown(key)


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str, source: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key} = {shown(value)} is not allowed: {allowed}")
        self.key, self.value, self.allowed, self.source = key, value, allowed, source

    def at(self, source: str) -> ConfigError:
        """The same error naming the file it is in."""
        return self if self.source else ConfigError(self.key, self.value, self.allowed, source)


@dataclass(frozen=True, slots=True)
class Key:
    default: Any
    check: Callable[[str, Any], Any]  # returns the normalised value or raises ConfigError
    help: str


def _number(lo: float, hi: float, *, integer: bool = False) -> Callable[[str, Any], Any]:
    kind = "an integer" if integer else "a number"

    def check(key: str, value: Any) -> Any:
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or (isinstance(value, float) and not math.isfinite(value)):
            raise ConfigError(key, value, f"{kind} in {lo:g}..{hi:g}")
        if not lo <= value <= hi:
            raise ConfigError(key, value, f"{kind} in {lo:g}..{hi:g}")
        return value

    return check


def _text(*choices: str, empty: bool = False) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if not isinstance(value, str) or (not empty and not value):
            raise ConfigError(key, value, "one of " + ", ".join(choices) if choices else "a non-empty string")
        if choices and value not in choices:
            raise ConfigError(key, value, "one of " + ", ".join(choices))
        return value

    return check


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def _optional(inner: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """TOML has no null: an optional key is simply absent; "" also means "not set" for paths."""

    def check(key: str, value: Any) -> Any:
        return None if value == "" else inner(key, value)

    return check


def _gpio_line(key: str, value: Any) -> int | str | None:
    if value == "" or value is None:
        return None
    if (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or (isinstance(value, str) and value):
        return value
    raise ConfigError(key, value, 'a line offset (17) or a line name ("GPIO17")')


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(key, value, "a table of backend options")
    return dict(value)


def _networks(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(key, value, 'a list of addresses or networks, e.g. ["127.0.0.1", "10.0.0.0/24"] '
                          "([] = nobody may write)")
    out = []
    for item in value:
        try:
            if not isinstance(item, str):  # ip_network(1) would be 0.0.0.1: a number here is a mistake
                raise TypeError(item)
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except (TypeError, ValueError):
            raise ConfigError(key, item, "an IPv4/IPv6 address or network, e.g. 192.168.1.0/24") from None
    return tuple(out)


def _password(key: str, value: Any) -> str:
    if not isinstance(value, str) or not 8 <= len(value) <= 256 or not value.isprintable():
        raise ConfigError(key, "(hidden)" if isinstance(value, str) else value,
                          "8 to 256 printable characters (absent = the page and API are read-only)")
    return value


def _channel(key: str, value: Any) -> int | None:
    if value == 0 and type(value) is int:  # not 0.0 nor false: those are mistakes, not "not mapped"
        return None  # 0 = not mapped
    return _number(1, 64, integer=True)(key, value)


def _can_interface(key: str, value: Any) -> str:
    import can  # python-can's own list of interfaces (a typo must not pass until the first open)

    names = sorted(can.interfaces.VALID_INTERFACES)
    if value == "" or (isinstance(value, str) and value in names):
        return value
    raise ConfigError(key, value, '"" (off) or a python-can interface: ' + ", ".join(names))


def _bitrate(key: str, value: Any) -> int:
    if type(value) is int and value in (250_000, 500_000):
        return value
    raise ConfigError(key, value, "250000 or 500000")


def _keepalive_timeout(key: str, value: Any) -> float:
    if value == 0 and not isinstance(value, bool):
        return 0.0
    return float(_number(2.0, 3600.0)(key, value))


_MQTT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _mqtt_name(key: str, value: Any) -> str:
    """A site or client id: a topic level and a Home Assistant object id at once (no "/", "+", "#", spaces)."""
    if not isinstance(value, str) or not _MQTT_NAME.fullmatch(value):
        raise ConfigError(key, value, "1..64 letters, digits, _ or - (it is a topic level and an id)")
    return value


def _topic(key: str, value: Any) -> str:
    if (not isinstance(value, str) or not value or len(value) > 200 or any(c in value for c in "+#\0")
            or value.startswith("/") or value.endswith("/") or "//" in value):
        raise ConfigError(key, value, 'a topic such as "smallbms/home": no + or #, no leading, trailing or '
                          "double /")
    return value


def _topic_or_empty(key: str, value: Any) -> str:
    return value if value == "" else _topic(key, value)


SCHEMA: dict[str, dict[str, Key]] = {
    "bus": {
        "interface": Key("socketcan", _text(), "python-can interface: socketcan, slcan, virtual, ..."),
        "channel": Key("can0", _text(), "can0, vcan0, /dev/ttyACM0, ..."),
        "bitrate": Key(500_000, _number(10_000, 1_000_000, integer=True), "bit/s (PROTOCOL.md: 500000)"),
        "dbc": Key(None, _optional(_text()), "path of another DBC; default: the one shipped with the package"),
        "slcan_wait": Key(False, _flag, "slcan: keep python-can's 2 s pause after opening (boards that reset)"),
    },
    "bms": {
        "comm_timeout": Key(DEFAULT_COMM_TIMEOUT, _number(*COMM_TIMEOUT_RANGE), "s without fresh data = comms lost"),
        "discovery_window": Key(10.0, _number(1.0, 60.0), "s after the first frame to learn the bank"),
    },
    "modbus": {
        "host": Key("127.0.0.1", _text(), "address to listen on (0.0.0.0 or :: for every interface)"),
        "port": Key(502, _number(0, 65535, integer=True), "TCP port, 0 = no plain Modbus TCP (TLS only, or none)"),
        "unit": Key(1, _number(1, 247, integer=True), "unit id of the native map and SunSpec"),
        "gx_unit": Key(225, _number(0, 247, integer=True), "unit id of the Victron-GX-compatible map, 0 = off"),
        "allow_write_from": Key(["127.0.0.1/32", "::1/128"], _networks, "clients allowed to write"),
        "tls_cert": Key(None, _optional(_text()), "PEM certificate: serve Modbus/TCP Security (TLS)"),
        "tls_key": Key(None, _optional(_text()), "PEM private key of tls_cert"),
        "tls_client_ca": Key(None, _optional(_text()), "CA whose client certificates may write"),
        "tls_port": Key(802, _number(1, 65535, integer=True), "TCP port of Modbus/TCP Security (when tls_cert is set)"),
        "max_connections": Key(32, _number(1, 1000, integer=True), "concurrent clients"),
        "idle_timeout": Key(300.0, _number(1.0, 86400.0), "s before an idle connection is closed"),
        "max_connections_per_address": Key(8, _number(1, 1000, integer=True), "connections one client address may "
                                           "hold; its newcomer evicts its own longest-idle one"),
        "first_request_timeout": Key(10.0, _number(1.0, 3600.0), "s a new connection has to send its first request"),
    },
    "metrics": {
        "host": Key("127.0.0.1", _text(), "address of the Prometheus /metrics endpoint"),
        "port": Key(9108, _number(0, 65535, integer=True), "TCP port, 0 = no metrics endpoint"),
        "max_connections": Key(16, _number(1, 1000, integer=True), "concurrent HTTP connections; when full the "
                               "longest-idle is evicted"),
        "max_connections_per_address": Key(4, _number(1, 1000, integer=True), "HTTP connections one client address "
                                           "may hold"),
        "first_request_timeout": Key(10.0, _number(1.0, 3600.0), "s a new connection has to send its request"),
        "idle_timeout": Key(60.0, _number(1.0, 86400.0), "s before an idle keep-alive connection is closed"),
    },
    "web": {  # the commissioning page and its JSON API (smallbms_bus/web, docs/api.md)
        "host": Key("127.0.0.1", _text(), "address of the web page and API (0.0.0.0 or :: for every interface)"),
        "port": Key(8080, _number(0, 65535, integer=True), "TCP port of the web page and API, 0 = off"),
        "password": Key(None, _optional(_password), "password for writes (Authorization: Bearer); absent = read-only"),
        "allow_write_from": Key(["127.0.0.1/32", "::1/128"], _networks, "clients allowed to write (with the password)"),
        "tls_cert": Key(None, _optional(_text()), "PEM certificate: serve HTTPS"),
        "tls_key": Key(None, _optional(_text()), "PEM private key of tls_cert"),
    },
    "outputs": {
        "backend": Key("memory", _text(*BACKENDS), "relay board kind"),
        "options": Key({}, _table, "backend options (port, unit, host, chip, ...): docs/outputs.md"),
        **{role: Key(default, _channel, f"board channel of {role.replace('_', ' ')} (0 = not mapped)")
           for role, default in zip(OUTPUT_ROLES, (1, 2, 3, 0, 0), strict=True)},
        "reassert_every": Key(5.0, _number(0.5, 3600.0), "s between re-asserting every output (OUT-5)"),
        "blink_leds": Key(False, _flag, "toggle LED outputs at 1 Hz when blinking (solid-state/GPIO only)"),
    },
    "remote": {
        "source": Key("none", _text("none", "board", "gpio"), "remote on/off input (REM-1); none = always on"),
        "channel": Key(0, _number(0, 64, integer=True), "source board: the relay board's input (1..64)"),
        "chip": Key("/dev/gpiochip0", _text(), "source gpio: the GPIO chip's device"),
        "line": Key(None, _gpio_line, "source gpio: the line, an offset (17) or a name (\"GPIO17\")"),
        "bias": Key("as_is", _text("as_is", "pull_up", "pull_down", "disabled"), "source gpio: the line's bias"),
        "inverted": Key(False, _flag, "true when the input reads 1 for 'off'"),
    },
    "store": {
        "path": Key("/var/lib/smallbms-bus/state.db", _text(), "SQLite state file"),
        "persist_interval": Key(60.0, _number(5.0, 3600.0), "s between counter writes (flash wear)"),
    },
    "log": {
        "level": Key("INFO", _text(*LOG_LEVELS), "log level on stderr"),
    },
    # BMS-CAN to an inverter/charger (docs/inverter.md); off while interface is ""
    "inverter": {
        "interface": Key("", _can_interface, 'python-can interface of the inverter bus: socketcan, slcan, virtual, '
                         '...; "" = off'),
        "channel": Key("", _text(empty=True), "can1, /dev/ttyACM1, ..."),
        "bitrate": Key(500_000, _bitrate, "bit/s: 500000 or 250000"),
        "profile": Key("victron", _text("victron", "pylontech"), "frame set: victron or pylontech (adds 0x359, 0x35C)"),
        "period": Key(1.0, _number(0.2, 2.0), "s between frame sets (0x351 at least every 1 s)"),
        "keepalive_timeout": Key(0.0, _keepalive_timeout, "s without an inverter keep-alive (0x305/0x307) before "
                                 "warning INVERTER_SILENT; 0 = none required"),
    },
    # MQTT and Home Assistant discovery (docs/mqtt.md): off while `host` is not set.
    "mqtt": {
        "host": Key(None, _optional(_text()), "broker address; not set = no MQTT"),
        "port": Key(1883, _number(1, 65535, integer=True), "broker TCP port (8883 is the usual TLS port)"),
        "tls": Key(False, _flag, "connect with TLS (the system's CAs unless tls_ca is set)"),
        "tls_ca": Key(None, _optional(_text()), "PEM CA that signs the broker's certificate (implies tls)"),
        "tls_cert": Key(None, _optional(_text()), "PEM client certificate, for brokers that require one"),
        "tls_key": Key(None, _optional(_text()), "unencrypted PEM private key of tls_cert"),
        "username": Key(None, _optional(_text()), "broker user name"),
        "password": Key(None, _optional(_text()), "broker password (keep the file chmod 600)"),
        "client_id": Key(None, _optional(_mqtt_name), "MQTT client id; default smallbms-<site>"),
        "site": Key(None, _optional(_mqtt_name), "this installation's name in topics and Home Assistant; "
                    "default: the host name"),
        "topic_prefix": Key(None, _optional(_topic), "default smallbms/<site>"),
        "discovery_prefix": Key("homeassistant", _topic_or_empty, "Home Assistant discovery prefix; \"\" = none"),
        "commands": Key(False, _flag, "accept settings, mode and commands over MQTT"),
        "publish_period": Key(2.0, _number(0.2, 3600.0), "s between state publications (only changes are sent)"),
    },
}


@dataclass(frozen=True)
class Config:
    sections: dict[str, dict[str, Any]]
    source: str = "<defaults>"

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    def output_channels(self) -> dict[str, int]:
        return {role: ch for role in OUTPUT_ROLES if (ch := self.sections["outputs"][role]) is not None}


def defaults() -> Config:
    """Every default, normalised by its own check (so a default is exactly what the same value in a file gives)."""
    return Config({name: {k: None if key.default is None else key.check(f"{name}.{k}", key.default)
                          for k, key in keys.items()} for name, keys in SCHEMA.items()})


def parse_config(text: str, source: str = "<text>") -> Config:
    try:
        raw = tomllib.loads(text)
    except (ValueError, RecursionError) as error:  # TOMLDecodeError; an integer of 5000 digits; [[[[...]]]]
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise ConfigError("(file)", "not TOML", f"valid TOML: {reason}", source) from None
    sections = defaults().sections
    for name, table in raw.items():
        if name not in SCHEMA:
            raise ConfigError(f"[{key_name(name)}]", table if not isinstance(table, dict) else "section",
                              "one of the sections " + ", ".join(f"[{s}]" for s in SCHEMA), source)
        if not isinstance(table, dict):
            raise ConfigError(name, table, f"a [{name}] table", source)
        for key, value in table.items():
            spec = SCHEMA[name].get(key)
            if spec is None:
                raise ConfigError(f"{name}.{key_name(key)}", value,
                                  f"one of the keys of [{name}]: " + ", ".join(SCHEMA[name]), source)
            try:
                sections[name][key] = spec.check(f"{name}.{key}", value)
            except ConfigError as error:
                raise error.at(source) from None
    _cross_check(sections, source)
    return Config(sections, source)


def _cross_check(s: dict[str, dict[str, Any]], source: str) -> None:
    outputs = s["outputs"]
    used: dict[int, str] = {}
    for role in OUTPUT_ROLES:
        channel = outputs[role]
        if channel is None:
            continue
        if channel in used:
            raise ConfigError(f"outputs.{role}", channel, f"a channel not already used by outputs.{used[channel]}",
                              source)
        used[channel] = role
    for role in ("load_disconnect", "charge_disconnect"):
        if outputs[role] is None:
            raise ConfigError(f"outputs.{role}", 0, "a board channel: the BMS cannot protect the bank without it",
                              source)
    remote = s["remote"]
    if remote["source"] == "board" and remote["channel"] == 0:
        raise ConfigError("remote.channel", 0, "the relay board's input of the remote on/off (1..64)", source)
    if remote["source"] == "board" and not may_have_inputs(outputs["backend"]):  # the registry knows (LCUS has none)
        raise ConfigError("remote.source", "board",
                          f"gpio or none: {outputs['backend'].upper()} relay boards have no inputs", source)
    if remote["source"] == "gpio" and remote["line"] is None:
        raise ConfigError("remote.line", NOT_SET,
                          'the GPIO line of the remote on/off: an offset (17) or a name ("GPIO17")', source)
    modbus = s["modbus"]
    if (modbus["tls_cert"] is None) != (modbus["tls_key"] is None):
        raise ConfigError("modbus.tls_key" if modbus["tls_key"] is None else "modbus.tls_cert", NOT_SET,
                          "set together with the other: TLS needs both a certificate and its key", source)
    _check_inverter(s, source)
    web = s["web"]
    if (web["tls_cert"] is None) != (web["tls_key"] is None):
        raise ConfigError("web.tls_key" if web["tls_key"] is None else "web.tls_cert", NOT_SET,
                          "set together with the other: TLS needs both a certificate and its key", source)
    taken = {"metrics.port": s["metrics"]["port"], "modbus.port": modbus["port"],
             **({"modbus.tls_port": modbus["tls_port"]} if modbus["tls_cert"] is not None else {})}
    for key, port in taken.items():  # the page would retry a port the service itself holds, forever
        if web["port"] and port == web["port"]:
            raise ConfigError("web.port", web["port"], f"a port other than {key} ({port})", source)
    mqtt = s["mqtt"]
    if mqtt["tls_key"] is not None and mqtt["tls_cert"] is None:
        raise ConfigError("mqtt.tls_cert", NOT_SET, "set with mqtt.tls_key: the key is of a client certificate", source)
    if mqtt["password"] is not None and mqtt["username"] is None:
        raise ConfigError("mqtt.username", NOT_SET, "set with mqtt.password: a password needs its user name", source)
    if modbus["gx_unit"] == modbus["unit"]:
        raise ConfigError("modbus.gx_unit", modbus["gx_unit"], f"a unit id other than modbus.unit ({modbus['unit']})",
                          source)


def _check_inverter(s: dict[str, dict[str, Any]], source: str) -> None:
    inverter = s["inverter"]
    if inverter["interface"] and not inverter["channel"]:
        raise ConfigError("inverter.channel", "", f"the channel of inverter.interface {inverter['interface']} "
                          "(e.g. can1, /dev/ttyACM1)", source)
    if inverter["interface"] and (inverter["interface"], inverter["channel"]) == (s["bus"]["interface"],
                                                                                 s["bus"]["channel"]):
        raise ConfigError("inverter.channel", inverter["channel"], "a channel other than the battery bus's "
                          "(BMS-CAN is a separate bus)", source)


def load_config(path: str | Path) -> Config:
    """The file's configuration (schema and cross-checks only: `preflight.load` is what check-config and run use)."""
    p = Path(path)
    try:
        with p.open("rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise ConfigError("(file)", str(p), f"a readable file ({error.strerror})") from None
    except ValueError:  # a NUL in the path
        raise ConfigError("(file)", str(p), "a file path") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError("(file)", f"more than {MAX_CONFIG_BYTES} bytes", "a configuration file (a few kB): is "
                          "this the right file?", str(p))
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is not an error
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConfigError("(file)", f"byte 0x{data[error.start]:02x} at line {line}, column {column}",
                          "UTF-8 text (TOML files are UTF-8: save the file as UTF-8)", str(p)) from None
    return parse_config(text, str(p))
