"""Modbus relay boards and I/O modules: RTU over a serial port (RS-485) or Modbus TCP.

Theory of operation
-------------------
Relays are coils: `write_coil` switches one, `read_coils` reads it back (the board's own coil state,
so a board that rebooted or a coil that ignores writes shows up as a mismatch). The remote on/off is a
discrete input (`read_discrete_inputs`). Channel n is coil `coil_offset + n - 1` and input
`input_offset + n - 1`: most 8-channel boards number coils from 0, some from 1 (set the offset).

pymodbus 3.16's synchronous clients do the framing; every request either returns a response or
raises after `timeout` x (1 + `retries`). A Modbus exception response (`isError()`), a timeout, a
lost connection or a serial error all become one `OutputError` naming the board, channel, coil and
what happened. pymodbus 3.16 API used: `ModbusSerialClient(port, framer=FramerType.RTU, baudrate=...)`,
`ModbusTcpClient(host, port=...)`, `write_coil(address, value, device_id=unit)`,
`read_coils(address, count=1, device_id=unit).bits`, `read_discrete_inputs(...)` (`count` and
`device_id` are keyword-only; `slave=` is gone).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from pymodbus import FramerType, ModbusException
from pymodbus.client import ModbusSerialClient, ModbusTcpClient
from pymodbus.pdu import ModbusPDU

from smallbms_bus.modbus.codes import exception_text
from smallbms_bus.outputs.base import OptionError, OutputError, RelayBoard


def _integer(option: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise OptionError("modbus", option, value, f"allowed an integer {low}..{high}")
    return value


class ModbusBoard(RelayBoard):
    backend = "modbus"
    can_read_back = True

    def __init__(self, transport: str = "rtu", *, port: str | int | None = None, host: str | None = None,
                 baudrate: int = 9600, parity: str = "N", stopbits: int = 1, bytesize: int = 8, unit: int = 1,
                 channels: int = 8, inputs: int = 8, coil_offset: int = 0, input_offset: int = 0,
                 timeout: float = 0.5, retries: int = 1) -> None:
        if transport not in ("rtu", "tcp"):
            raise OptionError("modbus", "transport", transport, "allowed 'rtu' (serial) or 'tcp'")
        if transport == "rtu":
            if not isinstance(port, str) or not port:
                raise OptionError("modbus", "port", port, "transport 'rtu' needs the serial port path, "
                                  'e.g. port = "/dev/ttyUSB0"')
            if host is not None:
                raise OptionError("modbus", "host", host, "only for transport 'tcp'")
            if parity not in ("N", "E", "O"):
                raise OptionError("modbus", "parity", parity, "allowed 'N', 'E' or 'O'")
            _integer("baudrate", baudrate, 300, 1_000_000)
            _integer("stopbits", stopbits, 1, 2)
            _integer("bytesize", bytesize, 7, 8)
            _integer("unit", unit, 1, 247)  # 0 is broadcast on a serial line: nobody answers
        else:
            if not isinstance(host, str) or not host:
                raise OptionError("modbus", "host", host, "transport 'tcp' needs the module's address")
            port = 502 if port is None else _integer("port", port, 1, 65535)
            _integer("unit", unit, 0, 255)  # TCP modules often ignore the unit id or want 0 or 255
        self.channels = _integer("channels", channels, 1, 256)
        self.input_channels = _integer("inputs", inputs, 0, 256)
        self.has_inputs = inputs > 0
        self.coil_offset = _integer("coil_offset", coil_offset, 0, 65536 - channels)
        self.input_offset = _integer("input_offset", input_offset, 0, 65536 - max(inputs, 1))
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 30:
            raise OptionError("modbus", "timeout", timeout, "allowed seconds, more than 0 up to 30")
        _integer("retries", retries, 0, 10)
        self.transport, self.port, self.host, self.unit = transport, port, host, unit
        self.timeout, self.retries = float(timeout), retries
        self.serial = {"baudrate": baudrate, "parity": parity, "stopbits": stopbits, "bytesize": bytesize}
        self._client: ModbusSerialClient | ModbusTcpClient | None = None

    def describe(self) -> str:
        where = self.port if self.transport == "rtu" else f"{self.host}:{self.port}"
        return f"modbus {self.transport} {where} unit {self.unit}"

    def _open_device(self) -> None:
        if self.transport == "rtu":
            assert isinstance(self.port, str)
            client: ModbusSerialClient | ModbusTcpClient = ModbusSerialClient(
                self.port, framer=FramerType.RTU, timeout=self.timeout, retries=self.retries, **self.serial)
        else:
            assert self.host is not None and isinstance(self.port, int)
            client = ModbusTcpClient(self.host, port=self.port, timeout=self.timeout, retries=self.retries)
        # pymodbus logs the cause and returns False; say what we can see from here.
        if not client.connect():
            client.close()
            if self.transport == "rtu" and not os.path.exists(str(self.port)):
                raise OutputError(self.describe(), "cannot open: the serial port does not exist (unplugged?)")
            raise OutputError(self.describe(), "cannot connect (port busy, not permitted or host unreachable)")
        self._client = client

    def _close_device(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _request(self, channel: int, what: str, call: Callable[[ModbusSerialClient | ModbusTcpClient], ModbusPDU],
                 ) -> ModbusPDU:
        client = self._client
        if client is None:
            raise OutputError(self.describe(), f"{what}: board is not open", channel)
        try:
            response = call(client)
        except (ModbusException, OSError) as exc:  # timeout after retries, lost connection, serial error
            raise OutputError(self.describe(), f"{what}: {exc}", channel) from exc
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise OutputError(self.describe(), f"{what}: Modbus exception {code:02d} "
                              f"({exception_text(code)})", channel)
        return response

    def _write(self, channel: int, on: bool) -> None:
        coil = self.coil_offset + channel - 1
        self._request(channel, f"write coil {coil} {'on' if on else 'off'}",
                      lambda c: c.write_coil(coil, on, device_id=self.unit))

    def _bit(self, channel: int, what: str, call: Callable[[ModbusSerialClient | ModbusTcpClient], ModbusPDU],
             ) -> bool:
        response = self._request(channel, what, call)
        bits = getattr(response, "bits", None)
        if not bits:
            raise OutputError(self.describe(), f"{what}: response carries no bits", channel)
        return bool(bits[0])

    def _read(self, channel: int) -> bool:
        coil = self.coil_offset + channel - 1
        return self._bit(channel, f"read coil {coil}", lambda c: c.read_coils(coil, count=1, device_id=self.unit))

    def _read_input(self, channel: int) -> bool:
        address = self.input_offset + channel - 1
        return self._bit(channel, f"read discrete input {address}",
                         lambda c: c.read_discrete_inputs(address, count=1, device_id=self.unit))
