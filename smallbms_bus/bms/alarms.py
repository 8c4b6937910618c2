"""Alarm and warning bits (BEHAVIOUR.md table, shared by Modbus, metrics and BMS_STATE) and states.

An alarm means the BMS took an action (an output went off); a warning informs only.
"""

from __future__ import annotations

from enum import Enum, IntEnum, IntFlag


class BmsAlarm(IntFlag):
    CELL_LOW_VOLTAGE = 1 << 0
    CELL_HIGH_VOLTAGE = 1 << 1
    LOW_TEMPERATURE_CHARGE = 1 << 2
    HIGH_TEMPERATURE_CHARGE = 1 << 3
    LOW_SOC = 1 << 4
    BATTERY_COMMS_LOST = 1 << 5
    BANK_CONFIGURATION = 1 << 6
    FIRMWARE_UPDATE_FAILED = 1 << 7
    RELAY_FAULT = 1 << 8
    BATTERY_FAULT = 1 << 9


class BmsWarning(IntFlag):
    PRE_ALARM = 1 << 0
    LOW_SOC_WARNING = 1 << 1
    CELL_IMBALANCE = 1 << 2
    SOC_UNKNOWN = 1 << 3
    FIRMWARE_UPDATE_IN_PROGRESS = 1 << 4
    HIGH_CHARGE_CURRENT = 1 << 5
    HIGH_DISCHARGE_CURRENT = 1 << 6
    NOT_FULLY_CHARGED_30_DAYS = 1 << 7
    DISCHARGE_TEMPERATURE = 1 << 8
    INVERTER_SILENT = 1 << 9  # BMS-CAN: no inverter keep-alive for [inverter] keepalive_timeout (docs/inverter.md)


def names(flags: IntFlag) -> list[str]:
    """Set members in bit order (IntFlag iteration order is by value)."""
    return [member.name for member in type(flags) if member in flags and member.name]


class AtdState(IntEnum):
    """Allowed to discharge as the manual's status page shows it (PRE-4)."""

    NO = 0
    YES = 1
    PRE_ALARM = 2


class Led(Enum):
    OFF = "off"
    BLINKING = "blinking"
    SOLID = "solid"


class BalancerStatus(Enum):
    UNKNOWN = "unknown"
    BALANCED = "balanced"
    IMBALANCED = "imbalanced"
    BALANCING = "balancing"


class BalancerReason(IntEnum):
    """Why the balancer status is `unknown`: BAL-1's conditions in the rule's order (Modbus `balancer_reason`,
    metric `smallbms_balancer_unknown_reason`, the readouts). NONE while the status is known."""

    NONE = 0
    SOC_UNKNOWN = 1
    NEVER_FULLY_CHARGED = 2  # "no full charge for more than 30 days" includes never
    NO_FULL_CHARGE_30_DAYS = 3
    BATTERY_JOINED = 4

    @property
    def text(self) -> str:
        return _BALANCER_REASON_TEXT[self]

    @property
    def label(self) -> str:
        return self.name.lower()


_BALANCER_REASON_TEXT = {
    BalancerReason.NONE: "", BalancerReason.SOC_UNKNOWN: "SoC unknown",
    BalancerReason.NEVER_FULLY_CHARGED: "never fully charged",
    BalancerReason.NO_FULL_CHARGE_30_DAYS: "no full charge for more than 30 days",
    BalancerReason.BATTERY_JOINED: "a battery joined since the last full charge"}


def balancer_text(status: BalancerStatus, reason: BalancerReason) -> str:
    """The balancer as every readout says it: "balanced", or "unknown (SoC unknown)"."""
    return f"{status.value} ({reason.text})" if reason is not BalancerReason.NONE else status.value


class BusState(IntEnum):
    """The battery link as the BMS reports it (Modbus block A `bus_state`, metrics, `smallbms-bus status`).

    Anything but UP is a comms loss (COM-2, COM-4); while the bank is still waiting for batteries it is
    reported, not alarmed (BANK-2)."""

    UP = 0
    NOT_OPEN = 1  # starting, or stopped
    OPEN_FAILED = 2  # the adapter or interface cannot be opened (missing, no permission, not taking commands)
    LOST = 3  # an I/O error on an open link (adapter unplugged, port gone)
    INTERFACE_DOWN = 4  # the SocketCAN interface is administratively down
    STALLED = 5  # the adapter is not taking frames: BMS_STATE unsent for 1 s (COM-5)

    @property
    def text(self) -> str:
        return _BUS_TEXT[self]


_BUS_TEXT = {BusState.UP: "up", BusState.NOT_OPEN: "not open", BusState.OPEN_FAILED: "cannot be opened",
             BusState.LOST: "lost (I/O error)", BusState.INTERFACE_DOWN: "interface down",
             BusState.STALLED: "not taking frames"}
