"""Counters of the Modbus server, read by the metrics collector (one writer: the event loop)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from smallbms_bus.modbus.codes import exception_label

FUNCTION_NAMES = {
    1: "read_coils", 2: "read_discrete_inputs", 3: "read_holding_registers", 4: "read_input_registers",
    5: "write_single_coil", 6: "write_single_register", 15: "write_multiple_coils",
    16: "write_multiple_registers", 22: "mask_write_register", 23: "read_write_multiple_registers",
}

def function_name(code: int) -> str:
    return FUNCTION_NAMES.get(code, f"function_{code}")


def outcome_name(exception_code: int | None) -> str:
    """"ok" for a normal answer, else the exception's Modbus name."""
    if exception_code is None:
        return "ok"
    return exception_label(exception_code)


@dataclass
class ModbusStats:
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)  # (function, outcome) -> count
    refused_writes: int = 0  # writes from a client not in allow_write_from / not authenticated (answered 01)
    connections_open: int = 0
    connections_total: int = 0  # accepted since start
    connections_refused: int = 0  # hung up on accept: sent nothing, and its address's share is full of such ones
    connections_evicted: int = 0  # the longest-idle, closed for a newcomer (modbus.max_connections[_per_address])
    connections_no_request_closed: int = 0  # no complete request within modbus.first_request_timeout
    connections_idle_closed: int = 0  # closed after modbus.idle_timeout
    connections_slow_closed: int = 0  # closed by the idle timeout while paused: the client did not read its answers
    connections_bad_frame_closed: int = 0  # closed because the stream was not Modbus/TCP (bad MBAP header)

    def count(self, function_code: int, exception_code: int | None) -> None:
        self.requests[(function_name(function_code), outcome_name(exception_code))] += 1
