"""A virtual inverter/charger on the BMS-CAN bus that obeys 0x351 the way a Victron GX's DVCC does (docs/inverter.md).

Theory of operation
-------------------
`VirtualInverter` is the device model (no I/O): it keeps the last CVL/CCL/DCL/DVL it received and when. Its
characteristic I(V) (positive = into the bank) is what its charger and its loads do together, limited as DVCC
limits them:

- the charger gives its own maximum (`charge_a`, or a solar day's share of it) tapering to 0 at CVL (a CC/CV
  characteristic like the relay-switched charger of devices.py, but towards CVL);
- the loads draw `load_a`; the charger feeds them first;
- what goes into the bank is at most CCL, what comes out of it at most DCL; below DVL nothing more comes out;
- without a 0x351 for 3 s (LIMITS_TIMEOUT_S), and before the first, it neither charges nor discharges the bank.

`InverterPeer` is its CAN side: a thread on its own python-can bus (the inverter channel) that decodes 0x351
with the BMS-CAN DBC and sends the keep-alive 0x305 once a second (unless `keepalive` is cleared: the
"inverter silent" scenario). Times are read from the injected clock (the simulation's in the demo).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import can

from smallbms_bus.inverter.frames import load_dbc

LIMITS_TIMEOUT_S = 3.0  # a GX stops charging and discharging after 3 s without 0x351
KEEPALIVE_PERIOD_S = 1.0
CV_BAND_FRACTION = 0.0025  # full current at 0.25 % below CVL, none at it (as devices.Charger)
LIMITS_ID, KEEPALIVE_ID = 0x351, 0x305


@dataclass(frozen=True, slots=True)
class Limits:
    cvl: float
    ccl: float
    dcl: float
    dvl: float


@dataclass
class VirtualInverter:
    charge_a: float  # its own charger's maximum, A
    load_a: float = 0.0  # what its loads draw, A
    limits: Limits | None = None
    limits_at: float | None = None
    enabled: bool = True
    keepalive: bool = True  # sends 0x305 (cleared by the "inverter silent" scenario)

    def on_limits(self, limits: Limits, now: float) -> None:
        self.limits, self.limits_at = limits, now

    def obeying(self, now: float) -> Limits | None:
        """The limits in force, or None: none yet, or the last older than LIMITS_TIMEOUT_S (then: stop)."""
        if not self.enabled or self.limits is None or self.limits_at is None:
            return None
        return self.limits if now - self.limits_at <= LIMITS_TIMEOUT_S else None

    def stopped_by(self, now: float) -> str | None:
        if not self.enabled:
            return "switched off by the scenario"
        if self.limits is None:
            return "no 0x351 yet"
        return None if self.obeying(now) is not None else f"no 0x351 for {LIMITS_TIMEOUT_S:g} s"

    def state_text(self, now: float) -> str:
        """"obeys 0x351" or "stopped (why)": what the demo's and simulate's readouts say of it."""
        why = self.stopped_by(now)
        return "obeys 0x351" if why is None else f"stopped ({why})"

    def characteristic(self, now: float, charge_available: float | None = None,
                       load_a: float | None = None) -> Callable[[float], float]:
        """Bank current (positive = charging) as a function of the bank voltage, as DVCC limits it. The charger's
        available current and the loads' draw default to the inverter's own `charge_a` and `load_a`."""
        limits = self.obeying(now)
        if limits is None:
            return lambda volts: 0.0
        available = self.charge_a if charge_available is None else charge_available
        load = self.load_a if load_a is None else load_a
        band = CV_BAND_FRACTION * limits.cvl if limits.cvl > 0 else 1.0

        def current(volts: float) -> float:
            charger = available * min(1.0, max(0.0, (limits.cvl - volts) / band))
            net = charger - load
            if net >= 0:
                return min(net, limits.ccl)
            if volts <= limits.dvl:
                return 0.0
            return max(net, -limits.dcl)

        return current


class InverterPeer:
    """The virtual inverter's CAN side: reads 0x351, sends the keep-alive; one thread owns its bus."""

    def __init__(self, bus: can.BusABC, inverter: VirtualInverter, clock: Callable[[], float] = time.monotonic,
                 rate: float = 1.0) -> None:
        self.bus, self.inverter, self.clock, self.rate = bus, inverter, clock, rate
        self.message = load_dbc().get_message_by_frame_id(LIMITS_ID)
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="virtual-inverter", daemon=True)

    def start(self) -> InverterPeer:
        self.thread.start()
        return self

    def _run(self) -> None:
        next_keepalive = self.clock()
        while not self.stop.is_set():
            try:
                frame = self.bus.recv(min(0.05, KEEPALIVE_PERIOD_S / self.rate))
                if frame is not None and frame.arbitration_id == LIMITS_ID and len(frame.data) == 8:
                    v = self.message.decode(bytes(frame.data), decode_choices=False)
                    self.inverter.on_limits(Limits(v["ChargeVoltageLimit"], v["ChargeCurrentLimit"],
                                                   v["DischargeCurrentLimit"], v["DischargeVoltageLimit"]),
                                            self.clock())
                    self.received += 1
                now = self.clock()
                if self.inverter.keepalive and now >= next_keepalive:
                    self.bus.send(can.Message(arbitration_id=KEEPALIVE_ID, data=bytes(8), is_extended_id=False))
                    next_keepalive = now + KEEPALIVE_PERIOD_S
            except (can.CanError, OSError):  # the bus went away: the inverter stops by its own timeout
                self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)
        self.bus.shutdown()
