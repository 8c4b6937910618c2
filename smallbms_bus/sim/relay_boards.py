"""Virtual relay boards on pseudo-terminals and loopback TCP, for tests and for commissioning.

- `VirtualModbusRelayBoard`: an 8-channel Modbus RTU relay board (coils + discrete inputs) on a serial
  port. A pymodbus `ModbusSerialServer` runs in its own thread and event loop on one pseudo-terminal;
  a second pseudo-terminal, behind a stable symlink, is the port a program opens, and a small relay
  thread carries bytes between the two. That indirection is what makes `unplug()` (the program's port
  disappears: its I/O fails, like a USB RS-485 adapter pulled out) and `replug()` (a new pseudo-terminal
  behind the same path) possible while the server keeps its own port.
- `VirtualModbusTcpModule`: the same device as a Modbus TCP I/O module on 127.0.0.1 (port 0 = a free port).
- `VirtualLcusBoard`: an LCUS-1/2/4/8 USB relay board: parses `A0 ch state sum` frames; frames with a
  bad sum are counted and ignored, as the real board ignores them.

Channels are 1-based as printed on the boards: relay n is coil n-1, input n is discrete input n-1.
Faults to inject: `stuck` channels whose coil ignores writes (a welded relay), `set_relay()` to flip
a relay by hand, `reboot()` (every relay released), `unplug()` / `replug()`. Unplugging the Modbus
board pulls its USB RS-485 adapter (the board keeps its relays); unplugging the LCUS board pulls the
board itself, and being USB-powered its relays drop out.

pymodbus 3.16 datastore: a `SimDevice` with four separate blocks (coils, discrete inputs, holding and
input registers; `SimData` is 0-based, and with separate blocks a coil address is a bit address). The
device's `action` hook runs for every request; it is the single source of truth here: it copies the
board's state into the block before a read, and on a write it updates the state and rewrites the
values to be stored, so a stuck coil keeps its value.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import tempfile
import threading
import tty
from collections.abc import Callable
from pathlib import Path

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from smallbms_bus.outputs.lcus import LCUS_START

COIL_FUNCTIONS = (1, 5, 15)  # read coils, write single coil, write multiple coils
INPUT_FUNCTIONS = (2,)  # read discrete inputs


# -- plumbing: pseudo-terminals behind symlinks, served by one selector thread ---------------------
class _Reactor:
    """One thread that calls `callback(data)` for whatever arrives on registered file descriptors."""

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, fd: int, callback: Callable[[bytes], None]) -> None:
        with self._lock:
            self._selector.register(fd, selectors.EVENT_READ, callback)
        os.write(self._wake_w, b"x")

    def remove(self, fd: int) -> None:
        with self._lock:
            self._selector.unregister(fd)
        os.write(self._wake_w, b"x")

    def _run(self) -> None:
        while not self._stop:
            events = self._selector.select(timeout=0.5)
            for key, _ in events:
                if key.data is None:
                    os.read(self._wake_r, 4096)
                    continue
                try:
                    data = os.read(key.fd, 65536)
                except OSError:  # the far side is closed (nobody has the port open) or the fd went away
                    continue
                if data:
                    key.data(data)

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=2)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._selector.close()


class _PtyPort:
    """A pseudo-terminal whose slave a program opens (through `link` when given); its master is ours."""

    def __init__(self, reactor: _Reactor, on_data: Callable[[bytes], None], link: Path | None = None) -> None:
        self._reactor = reactor
        self._on_data = on_data
        self.link = link
        self.master = self.slave = -1
        self.plug()

    @property
    def plugged(self) -> bool:
        return self.master >= 0

    @property
    def path(self) -> str:
        return str(self.link) if self.link is not None else os.ttyname(self.slave)

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo or CR/LF translation even before a program configures the port
        os.set_blocking(master, False)
        if self.link is not None:
            tmp = self.link.with_suffix(".new")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(os.ttyname(slave))
            tmp.replace(self.link)  # atomic: the path never points nowhere while replugging
        self.master, self.slave = master, slave  # we keep the slave open so a program's close is no hang-up
        self._reactor.add(master, self._on_data)

    def unplug(self) -> None:
        """Close the pseudo-terminal: a program that has it open gets I/O errors, the path disappears."""
        if not self.plugged:
            return
        self._reactor.remove(self.master)
        if self.link is not None:
            self.link.unlink(missing_ok=True)
        os.close(self.master)
        os.close(self.slave)
        self.master = self.slave = -1

    def send(self, data: bytes) -> bool:
        if not self.plugged:
            return False
        try:
            os.write(self.master, data)
        except OSError:  # buffer full or nobody listening: lost, as on a wire
            return False
        return True


def _bits_to_registers(bits: list[bool]) -> list[int]:
    """Bit 0 first, 16 per register (pymodbus SimUtils.bitsToRegisters' order)."""
    padded = bits + [False] * (-len(bits) % 16)
    return [sum(1 << i for i, bit in enumerate(padded[start:start + 16]) if bit) for start in range(0, len(padded), 16)]


# -- Modbus -------------------------------------------------------------------------------------
class _VirtualModbusDevice:
    """The device both Modbus boards share: coils, discrete inputs, the action hook, a server thread."""

    def __init__(self, unit: int, coils: int, inputs: int) -> None:
        self.unit = unit
        self.coil_count = coils
        self.input_count = inputs
        self._lock = threading.Lock()
        self._relays = [False] * coils
        self._inputs = [False] * inputs
        self.stuck: set[int] = set()  # channels whose coil ignores writes
        self.requests = 0
        self.writes = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # -- the board's state, as a test or a commissioning script sees it
    @property
    def relays(self) -> dict[int, bool]:
        with self._lock:
            return {n: state for n, state in enumerate(self._relays, 1)}

    @property
    def inputs(self) -> dict[int, bool]:
        with self._lock:
            return {n: state for n, state in enumerate(self._inputs, 1)}

    def set_input(self, channel: int, value: bool) -> None:
        with self._lock:
            self._inputs[channel - 1] = bool(value)

    def set_relay(self, channel: int, value: bool) -> None:
        """Flip a relay behind the controller's back (a hand switch, a glitch)."""
        with self._lock:
            self._relays[channel - 1] = bool(value)

    def reboot(self) -> None:
        """The board lost power and came back: every relay released."""
        with self._lock:
            self._relays = [False] * self.coil_count

    # -- pymodbus
    def _device(self) -> SimDevice:
        def bits(count: int) -> list[SimData]:
            return [SimData(0, values=[False] * (count + (-count % 16)), datatype=DataType.BITS)]

        registers = [SimData(0, datatype=DataType.REGISTERS)]  # unused, but each block must exist
        return SimDevice(id=self.unit, simdata=(bits(self.coil_count), bits(max(self.input_count, 1)),
                                                registers, list(registers)), action=self._action)

    async def _action(self, function_code: int, start_address: int, address: int, count: int,
                      registers: list[int], set_values: list[int] | list[bool] | None) -> ExcCodes | None:
        """Runs in the server's loop before pymodbus touches the block. `count` is in registers, not bits."""
        with self._lock:
            self.requests += 1
            if function_code in COIL_FUNCTIONS:
                state, size = self._relays, self.coil_count
            elif function_code in INPUT_FUNCTIONS:
                state, size = self._inputs, self.input_count
            else:
                return ExcCodes.ILLEGAL_FUNCTION
            if address >= size or (set_values is not None and address + len(set_values) > size):
                return ExcCodes.ILLEGAL_ADDRESS
            if set_values is not None:
                self.writes += 1
                for i, value in enumerate(set_values):
                    channel = address + i + 1
                    if channel in self.stuck:
                        set_values[i] = state[channel - 1]  # pymodbus stores what the hook leaves here
                    else:
                        state[channel - 1] = bool(value)
            for i, register in enumerate(_bits_to_registers(state)):
                registers[i] = register
        return None

    def _start(self, name: str) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError(f"{name}: the Modbus server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"{name}: the Modbus server did not start: {self._error}") from self._error

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            server = self._make_server(self._device())
            await server.serve_forever(background=True)
            self._listening(server)
        except Exception as exc:  # reported to the constructor's thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await server.shutdown()

    def _make_server(self, device: SimDevice) -> ModbusSerialServer | ModbusTcpServer:
        raise NotImplementedError

    def _listening(self, server: ModbusSerialServer | ModbusTcpServer) -> None:
        """Called in the server loop once it listens (the TCP module reads its port here)."""

    def _stop_server(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=5)


class VirtualModbusRelayBoard(_VirtualModbusDevice):
    """A Modbus RTU relay board on a pseudo-terminal; open `path` with any Modbus RTU client."""

    def __init__(self, unit: int = 1, *, coils: int = 8, inputs: int = 8, baudrate: int = 9600,
                 directory: str | None = None, name: str = "modbus0") -> None:
        super().__init__(unit, coils, inputs)
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="relay-boards-"))
        self.baudrate = baudrate
        self._reactor = _Reactor(f"{name}-wire")
        # The server's own port (no symlink: nobody else opens it) and the program's, behind `path`.
        self._board_side = _PtyPort(self._reactor, self._to_program)
        self._program_side = _PtyPort(self._reactor, self._board_side.send, self.directory / name)
        self._start(f"{name}-server")

    @property
    def path(self) -> str:
        return str(self._program_side.link)

    def _to_program(self, data: bytes) -> None:
        self._program_side.send(data)

    def _make_server(self, device: SimDevice) -> ModbusSerialServer:
        return ModbusSerialServer(device, port=os.ttyname(self._board_side.slave), baudrate=self.baudrate)

    def unplug(self) -> None:
        self._program_side.unplug()

    def replug(self) -> None:
        self._program_side.plug()

    def close(self) -> None:
        self._stop_server()
        self._program_side.unplug()
        self._board_side.unplug()
        self._reactor.close()
        if self._own_directory:
            self.directory.rmdir()

    def __enter__(self) -> VirtualModbusRelayBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class VirtualModbusTcpModule(_VirtualModbusDevice):
    """A Modbus TCP I/O module on 127.0.0.1; `port` is the bound port (port=0 picks a free one)."""

    def __init__(self, unit: int = 1, *, coils: int = 8, inputs: int = 8, host: str = "127.0.0.1",
                 port: int = 0, name: str = "modbus-tcp") -> None:
        super().__init__(unit, coils, inputs)
        self.host = host
        self.port = port
        self._start(name)

    def _make_server(self, device: SimDevice) -> ModbusTcpServer:
        return ModbusTcpServer(device, address=(self.host, self.port))

    def _listening(self, server: ModbusSerialServer | ModbusTcpServer) -> None:
        self.port = server.transport.sockets[0].getsockname()[1]  # asyncio.Server of the listener

    def close(self) -> None:
        self._stop_server()

    def __enter__(self) -> VirtualModbusTcpModule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- LCUS ---------------------------------------------------------------------------------------
class VirtualLcusBoard:
    """An LCUS-1/2/4/8 USB relay board on a pseudo-terminal behind `path`."""

    def __init__(self, channels: int = 8, *, directory: str | None = None, name: str = "lcus0") -> None:
        self.channels = channels
        self._own_directory = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="relay-boards-"))
        self.frames = 0  # valid frames applied
        self.bad_frames = 0  # start byte seen, wrong sum: ignored
        self.ignored = 0  # valid sum but a channel or state the board does not have
        self._relays = [False] * channels
        self._buffer = bytearray()
        self._changed = threading.Condition()
        self._reactor = _Reactor(f"{name}-board")
        self._port = _PtyPort(self._reactor, self._receive, self.directory / name)

    @property
    def path(self) -> str:
        return str(self._port.link)

    @property
    def relays(self) -> dict[int, bool]:
        with self._changed:
            return {n: state for n, state in enumerate(self._relays, 1)}

    def _receive(self, data: bytes) -> None:
        buf = self._buffer
        with self._changed:
            buf.extend(data)
            while len(buf) >= 4:
                if buf[0] != LCUS_START:
                    del buf[0]  # resynchronise on the next start byte
                    continue
                channel, state, total = buf[1], buf[2], buf[3]
                if total != (LCUS_START + channel + state) & 0xFF:
                    self.bad_frames += 1
                    del buf[0]
                    continue
                del buf[:4]
                if 1 <= channel <= self.channels and state in (0, 1):
                    self._relays[channel - 1] = bool(state)
                    self.frames += 1
                else:
                    self.ignored += 1
            self._changed.notify_all()

    def wait_frames(self, count: int, timeout: float = 2.0) -> bool:
        """Block until `count` frames (good, bad or ignored) have been parsed in total."""
        with self._changed:
            return self._changed.wait_for(lambda: self.frames + self.bad_frames + self.ignored >= count, timeout)

    def unplug(self) -> None:
        """Pull the USB plug: the port disappears and, the board being USB-powered, every relay drops out."""
        self._port.unplug()
        with self._changed:
            self._relays = [False] * self.channels
            self._buffer.clear()

    def replug(self) -> None:
        self._port.plug()

    def close(self) -> None:
        self._port.unplug()
        self._reactor.close()
        if self._own_directory:
            self.directory.rmdir()

    def __enter__(self) -> VirtualLcusBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
