"""An in-process relay board: for the demo, for tests, and for running the service without hardware.

Its state is plain data (`relays`, `inputs`: channel -> bool) that a test or the demo reads and sets.
Faults are switches, so the controller's fault path is testable without timing games:

- `fail_open`   open() raises (a board that is not there);
- `fail_writes` write() raises (a board that stopped answering);
- `broken`      channels whose writes raise (a coil the board refuses), the others keep working;
- `fail_reads`  read() and read_input() raise;
- `stuck`       channels whose relay ignores writes (a welded contact): read-back then disagrees.
"""

from __future__ import annotations

from collections.abc import Iterable

from smallbms_bus.outputs.base import OptionError, OutputError, RelayBoard


class MemoryBoard(RelayBoard):
    backend = "memory"
    can_read_back = True
    has_inputs = True

    def __init__(self, channels: int = 8, inputs: int = 8, *, stuck: Iterable[int] = (), broken: Iterable[int] = (),
                 fail_open: bool = False, fail_writes: bool = False, fail_reads: bool = False,
                 name: str = "memory") -> None:
        for option, value, low in (("channels", channels, 1), ("inputs", inputs, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 64:
                raise OptionError("memory", option, value, f"allowed {low}..64")
        self.channels = channels
        self.input_channels = inputs
        self.name = name
        self.relays: dict[int, bool] = dict.fromkeys(range(1, channels + 1), False)
        self.inputs: dict[int, bool] = dict.fromkeys(range(1, inputs + 1), False)
        self.stuck: set[int] = set(stuck)
        self.broken: set[int] = set(broken)
        self.fail_open = fail_open
        self.fail_writes = fail_writes
        self.fail_reads = fail_reads
        self.writes = 0
        self.opens = 0

    def describe(self) -> str:
        return self.name

    def set_input(self, channel: int, value: bool) -> None:
        self.inputs[channel] = bool(value)

    def _open_device(self) -> None:
        if self.fail_open:
            raise OutputError(self.describe(), "open failed (fail_open is set)")
        self.opens += 1

    def _close_device(self) -> None:
        pass

    def _write(self, channel: int, on: bool) -> None:
        if self.fail_writes or channel in self.broken:
            raise OutputError(self.describe(), f"write {'on' if on else 'off'} failed (fail_writes/broken is set)",
                              channel)
        self.writes += 1
        if channel not in self.stuck:
            self.relays[channel] = on

    def _read(self, channel: int) -> bool:
        if self.fail_reads:
            raise OutputError(self.describe(), "read-back failed (fail_reads is set)", channel)
        return self.relays[channel]

    def _read_input(self, channel: int) -> bool:
        if self.fail_reads:
            raise OutputError(self.describe(), "input read failed (fail_reads is set)", channel)
        return self.inputs[channel]
