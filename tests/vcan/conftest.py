"""Fixtures of the vcan suite: the fork server (one per session) and scenario rigs (see rig.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from smallbms_bus.link.bus import socketcan_is_up
from tests.transports import NO_VCAN
from tests.vcan.forkserver import ForkServer
from tests.vcan.rig import CHANNEL, Rig


@pytest.fixture(scope="session")
def forks() -> Iterator[ForkServer]:
    if not socketcan_is_up(CHANNEL):
        pytest.skip(NO_VCAN)
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture
def rig(tmp_path, forks) -> Iterator[Callable[..., Rig]]:
    """rig(scenario, bank, speed, **options): the service, then the simulator, forked from the warm server."""
    rigs: list[Rig] = []

    def start(scenario: str, bank: str, speed: float, **options: Any) -> Rig:
        rigs.append(Rig(tmp_path, scenario, bank, speed, forks=forks, **options))
        return rigs[-1]

    yield start
    for r in rigs:
        r.close()
