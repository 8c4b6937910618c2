"""Virtual Lithium NG batteries, a charger and a load, scenarios, and the frames they put on a bus.

battery.py    one battery: LFP cells, heat, balancer, the battery's own flags and faults
bank.py       bank shapes (`2s2p-12v100`), batteries in series strings and parallel strings
devices.py    a CC/CV (optionally solar) charger and a constant-current load, switched by relays and/or BMS_STATE
scenarios.py  named scenarios: starting point + timed actions, with what a BMS should see, when
runner.py     the frame scheduler, the `Simulator` (pure, clock-injected) and its loop on any clock
clock.py      `SimClock`: the demo's one simulation clock for the service and the simulator, with a governor
wiring.py     `RelayReader`: the relays of a Modbus TCP module, for `simulate --relay-board`
cli.py        the `simulate` sub-command

Everything but `Simulator.run`, `RelayReader`, `SimClock`'s real clock and the CLI is pure: time moves
only when the caller says so.
"""

from smallbms_bus.sim.bank import PRESETS, BankShape, VirtualBank
from smallbms_bus.sim.battery import VirtualBattery, ocv
from smallbms_bus.sim.devices import Charger, Devices, Load, SolarProfile
from smallbms_bus.sim.runner import FrameScheduler, RunStats, Simulator
from smallbms_bus.sim.scenarios import SCENARIOS, Scenario, get_scenario

__all__ = [
    "PRESETS",
    "SCENARIOS",
    "BankShape",
    "Charger",
    "Devices",
    "FrameScheduler",
    "Load",
    "RunStats",
    "Scenario",
    "Simulator",
    "SolarProfile",
    "VirtualBank",
    "VirtualBattery",
    "get_scenario",
    "ocv",
]
