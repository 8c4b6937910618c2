"""The buses integration tests run on, chosen by SMALLBMS_TEST_BUS.

- ``virtual``: python-can's in-process virtual bus (runs everywhere);
- ``slcan``: SLCAN adapters on pseudo-terminals joined by `SlcanHub` (the real serial path);
- ``socketcan:vcan0``: the kernel's virtual CAN (skipped with the reason where the kernel has no CAN).

Unset, every test runs on all three. Set, only on the one named (the vcan VM run uses
``SMALLBMS_TEST_BUS=socketcan:vcan0``).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import can
import pytest

from smallbms_bus.link.bus import BusConfig, open_bus, socketcan_is_up
from smallbms_bus.sim.slcan_hub import SlcanHub

ALL = ("virtual", "slcan", "socketcan:vcan0")
NO_VCAN = ("no SocketCAN vcan0 on this kernel (CONFIG_CAN not set: `ip link add vcan0 type vcan` fails); "
           "the vcan suite runs natively where vcan0 exists, and here in a VM: bash tests/vcan/run-in-vm")


def selected() -> list:
    wanted = os.environ.get("SMALLBMS_TEST_BUS")
    names = [wanted] if wanted else list(ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise pytest.UsageError(f"SMALLBMS_TEST_BUS={wanted!r}: expected one of {', '.join(ALL)}")
    return [pytest.param(n, marks=pytest.mark.vcan, id=n) if n.startswith("socketcan") else pytest.param(n, id=n)
            for n in names]


@dataclass
class Transport:
    name: str
    battery_side: BusConfig  # where the virtual batteries (or a test's sender) attach
    bms_side: BusConfig  # where the link under test attaches
    hub: SlcanHub | None = None

    def open_battery_bus(self) -> can.BusABC:
        return open_bus(self.battery_side)


@contextmanager
def transport(name: str) -> Iterator[Transport]:
    if name == "virtual":
        channel = f"test-{uuid.uuid4().hex[:8]}"
        yield Transport(name, BusConfig("virtual", channel), BusConfig("virtual", channel))
    elif name == "slcan":
        quick = {"sleep_after_open": 0}
        with SlcanHub() as hub:
            yield Transport(name, BusConfig("slcan", hub.path("slcan0"), options=quick),
                            BusConfig("slcan", hub.path("slcan1"), options=quick), hub)
    else:
        channel = name.split(":", 1)[1]
        if not socketcan_is_up(channel):
            pytest.skip(NO_VCAN)
        yield Transport(name, BusConfig("socketcan", channel), BusConfig("socketcan", channel))
