"""What `run` checks before it opens any device, and all that `check-config` checks: one function.

Theory of operation
-------------------
`load(path)` = `config.load_config` (the file: UTF-8, TOML, every key's type and range, the keys
against each other) + `check(config)`, everything else that can be known without opening a device:

- bus: the interface is one python-can has; an SLCAN bit rate is one the protocol can set; a
  SocketCAN channel is a possible interface name; a `bus.dbc` reads, parses, and encodes BMS_STATE
  and decodes a battery's status frame (what the service sends and reads).
- outputs: the backend's options against its constructor (the registry, `outputs.make_board`:
  unknown, missing, mistyped, out of range); every role's channel exists on that board; a remote
  on/off on the board is one of its inputs; the gpiod module is installed when GPIO is used.
- remote gpio: not a line the gpiod relay outputs already use.
- store.path: not a directory or a device, under directories, and readable and writable (the file,
  or the directory it will be created in) by the user running the command.
- modbus TLS: the certificate, key and client CA load (`modbus.tls.tls_context`, the server's own).
- mqtt TLS: the broker's CA and the client certificate and key load (`mqtt.client.tls_check`).

Nothing is opened, created or written. Every failure is a `ConfigError` naming the key, the bad
value and what is allowed; the CLI prints it in one line and exits 2, for `check-config` and `run`
alike. What only opening can tell (a bus adapter unplugged, a board not answering, a corrupt store)
is a fault `run` reports and recovers from, or a store error, not a configuration error.

Permissions are those of the user running the command: under systemd, ExecStartPre runs
check-config as the service's own user, so it sees what `run` will see.
"""

from __future__ import annotations

import importlib.util
import os
import re
import stat
from pathlib import Path
from typing import Any

from smallbms_bus.config import NOT_SET, Config, ConfigError, load_config

# Linux dev_valid_name(): 1..15 bytes (IFNAMSIZ 16 with the NUL), not "." or "..", no "/", ":" or whitespace
_IFNAME = re.compile(r"[^/:\s]{1,15}")


def load(path: str | Path) -> Config:
    """The configuration in `path`, checked as `run` checks it before opening anything; ConfigError otherwise."""
    config = load_config(path)
    try:
        check(config)
    except ConfigError as error:
        raise error.at(config.source) from None
    return config


def check(config: Config) -> None:
    """Everything about `config` that can be checked without opening a device (module docstring)."""
    _check_bus(config["bus"])
    _check_outputs(config)
    _check_store(config["store"]["path"])
    modbus = config["modbus"]
    if modbus["tls_cert"] is not None:
        from smallbms_bus.modbus.tls import tls_context

        tls_context(modbus["tls_cert"], modbus["tls_key"], modbus["tls_client_ca"])
    web = config["web"]
    if web["tls_cert"] is not None:  # the same checks and messages as Modbus's, naming web.tls_*
        from smallbms_bus.modbus.tls import tls_context

        tls_context(web["tls_cert"], web["tls_key"], None, section="web")
    if config["mqtt"]["host"] is not None:
        from smallbms_bus.mqtt.client import tls_check

        tls_check(config["mqtt"])


# -- bus ------------------------------------------------------------------------------------------------------

def _check_bus(bus: dict[str, Any]) -> None:
    import can.interfaces

    interface, channel = bus["interface"], bus["channel"]
    if interface not in can.interfaces.VALID_INTERFACES:
        raise ConfigError("bus.interface", interface, "an interface of python-can: socketcan (can0), slcan (a USB "
                          "serial adapter), virtual (tests); installed: " + ", ".join(sorted(
                              can.interfaces.VALID_INTERFACES)))
    if interface == "slcan":
        from can.interfaces.slcan import slcanBus

        rates = sorted(getattr(slcanBus, "_BITRATES", {}))  # python-can's table of the S0..S8 commands
        if rates and bus["bitrate"] not in rates:
            raise ConfigError("bus.bitrate", bus["bitrate"], "a bit rate SLCAN adapters can set: "
                              + ", ".join(map(str, rates)) + " (Lithium NG batteries: 500000)")
    if interface == "socketcan" and (not _IFNAME.fullmatch(channel) or channel in (".", "..")
                                     or len(channel.encode()) > 15):
        raise ConfigError("bus.channel", channel, "a network interface name such as can0 or vcan0 (1..15 "
                          "characters, no '/', ':' or spaces; a serial SLCAN adapter is interface = \"slcan\")")
    if bus["dbc"] is not None:  # the shipped DBC is checked when the package is built and tested
        _check_dbc(bus["dbc"])


def _check_dbc(path: str) -> None:
    from smallbms_bus.link.codec import FrameDecoder, FrameEncoder, load_dbc
    from smallbms_bus.reports import BatteryStatus, BmsState

    _file("bus.dbc", path, "a DBC file")
    try:
        db = load_dbc(path)
    except Exception as error:  # cantools raises whatever its parsers raise on a file that is not a DBC
        raise ConfigError("bus.dbc", path, f"a DBC file (it does not parse: {_first_line(error)})") from None
    try:
        encoder = FrameEncoder(db)
        encoder.bms_state(BmsState(allowed_to_charge=False, allowed_to_discharge=False, pre_alarm=False,
                                   mode_on=True, remote_on=True, firmware_update=False, state_of_charge=None,
                                   alarms=0, warnings=0, battery_count=0, alive_counter=0))
        status = BatteryStatus(node=1, voltage=13.2, current=0.0, temperature=20.0, cell_high_voltage=False,
                               cell_low_voltage=False, cell_low_pre_alarm=False, balancing=False,
                               cell_imbalance=False, hardware_fault=False, firmware_updating=False, alive_counter=0)
        decoded = FrameDecoder(db).decode(encoder.status(status))
    except Exception as error:  # a missing message or signal: KeyError, ValueError, cantools' EncodeError
        raise ConfigError("bus.dbc", path, "a DBC with the frames of the Lithium NG protocol (BMS_STATE, "
                          f"BAT_STATUS_01 ...): {_first_line(error)}") from None
    if decoded != status:
        raise ConfigError("bus.dbc", path, "a DBC with the frames of the Lithium NG protocol: BAT_STATUS_01 "
                          "does not decode to what was encoded")


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _file(key: str, path: str, what: str) -> None:
    """`path` is a regular file this user can read."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise ConfigError(key, path, f"{what} ({error.strerror})") from None
    except ValueError:  # a NUL in the path
        raise ConfigError(key, path, f"{what} path") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(key, path, f"{what} (this is a {_kind(info.st_mode)})")
    if not os.access(path, os.R_OK):
        raise ConfigError(key, path, f"{what} readable by this user (uid {os.getuid()})")


def _kind(mode: int) -> str:
    return "directory" if stat.S_ISDIR(mode) else "device, socket or pipe"


# -- outputs --------------------------------------------------------------------------------------------------

def _check_outputs(config: Config) -> None:
    from smallbms_bus.outputs import make_board
    from smallbms_bus.outputs.base import OptionError
    from smallbms_bus.outputs.gpiod import INSTALL_HINT

    out, remote = config["outputs"], config["remote"]
    try:
        board = make_board(out["backend"], **out["options"])
    except OptionError as error:  # a required option that is absent arrives as its default, None
        raise ConfigError(f"outputs.options.{error.option}", NOT_SET if error.value is None else error.value,
                          error.allowed.removeprefix("allowed ")) from None
    for role, channel in config.output_channels().items():
        if channel > board.channels:
            raise ConfigError(f"outputs.{role}", channel, f"a channel of the relay board: {board.describe()} has "
                              f"channels 1..{board.channels}")
    if remote["source"] == "board":
        if not board.has_inputs:
            raise ConfigError("remote.source", "board", f"gpio or none: {board.describe()} has no inputs")
        if remote["channel"] > board.input_channels:
            raise ConfigError("remote.channel", remote["channel"], f"an input of the relay board: "
                              f"{board.describe()} has inputs 1..{board.input_channels}")
    if remote["source"] == "gpio" and out["backend"] == "gpiod":
        same_chip = Path(out["options"].get("chip", "/dev/gpiochip0")).name == Path(remote["chip"]).name
        used = [*out["options"].get("lines", ()), *out["options"].get("inputs", ())]
        if same_chip and remote["line"] in used:
            raise ConfigError("remote.line", remote["line"], "a GPIO line the relay outputs do not use "
                              "(outputs.options lines and inputs)")
    missing = importlib.util.find_spec("gpiod") is None
    if missing and out["backend"] == "gpiod":
        raise ConfigError("outputs.backend", "gpiod", f"a backend whose module is installed: {INSTALL_HINT}")
    if missing and remote["source"] == "gpio":
        raise ConfigError("remote.source", "gpio", f"a source whose module is installed: {INSTALL_HINT}")


# -- store ----------------------------------------------------------------------------------------------------

def _check_store(text: str) -> None:
    """The store's file, or the directory it will be created in, is usable by this user (nothing is created)."""
    key, path = "store.path", Path(text)
    uid = os.getuid()
    for candidate in (path, *path.parents):  # the path itself, else its nearest existing ancestor
        try:
            info = os.stat(candidate)
            break
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as error:  # a name too long, a loop of symbolic links, a directory we may not search
            raise ConfigError(key, text, f"a path to the SQLite state file ({error.strerror})") from None
        except ValueError:  # a NUL in the path
            raise ConfigError(key, text, "a path to the SQLite state file") from None
    else:  # a relative path in a directory that vanished
        raise ConfigError(key, text, "a path to the SQLite state file (no part of it exists)")
    if candidate == path:
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(key, text, f"the state file's path, not a directory: e.g. {path / 'state.db'}")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(key, text, f"a regular file for the SQLite state (this is a {_kind(info.st_mode)})")
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(key, text, f"a file this user (uid {uid}) can read and write")
        directory = path.parent
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ConfigError(key, text, f"a file in a directory this user (uid {uid}) can write: SQLite keeps its "
                              f"journal next to it, and {directory} is not writable")
        return
    if not stat.S_ISDIR(info.st_mode):
        what = "file" if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)
        raise ConfigError(key, text, f"a path under directories: {candidate} is a {what}")
    if not os.access(candidate, os.W_OK | os.X_OK):
        todo = f"make {candidate}" if candidate == path.parent else f"create {path.parent},"
        raise ConfigError(key, text, f"a path this user (uid {uid}) can create the state file at: {candidate} is "
                          f"not writable ({todo} writable by the service's user)")
