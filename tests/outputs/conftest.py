"""Virtual boards on pseudo-terminals / loopback TCP, real clients, and a clock the test moves."""

from __future__ import annotations

import pytest

from smallbms_bus.outputs import open_board
from smallbms_bus.sim.relay_boards import VirtualLcusBoard, VirtualModbusRelayBoard, VirtualModbusTcpModule

# Short timeouts: a lost board must fail fast in tests; nothing here waits on them when all is well.
FAST = {"timeout": 0.5, "retries": 0}


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rtu_board(tmp_path):
    with VirtualModbusRelayBoard(unit=7, directory=str(tmp_path)) as board:
        yield board


@pytest.fixture
def tcp_module():
    with VirtualModbusTcpModule(unit=1) as module:
        yield module


@pytest.fixture
def lcus_board(tmp_path):
    with VirtualLcusBoard(4, directory=str(tmp_path)) as board:
        yield board


@pytest.fixture
def rtu_client(rtu_board):
    board = open_board("modbus", transport="rtu", port=rtu_board.path, unit=7, **FAST)
    yield board
    board.close()
