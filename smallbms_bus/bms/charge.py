"""Charge control for inverters and chargers (CHG-1..7 in docs/behaviour.md): the values of BMS-CAN 0x351.

This module is the contract between the core (which computes the limits), the BMS-CAN link (which sends
them), the register maps (GX 305-308, SunSpec 802, native registers) and metrics. The rules themselves
land here too (issue 15); until then every Decision carries `NO_CHARGE_LIMITS`, the fail-safe of CHG-6.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ChargeState(IntEnum):
    """CHG-1. Wire codes (registers, metrics) are the values: keep them stable."""

    ABSORPTION = 0
    FLOAT = 1


@dataclass(frozen=True, slots=True)
class ChargeLimits:
    """What the BMS allows a charger/inverter right now. Volts and amperes, bank level; never negative."""

    cvl: float  # charge voltage limit, V (CHG-1, CHG-2, CHG-5)
    ccl: float  # charge current limit, A (CHG-3, CHG-6, CHG-7)
    dcl: float  # discharge current limit, A, positive (CHG-4, CHG-6, CHG-7)
    dvl: float  # discharge voltage limit, V (CHG-5): 2.80 V x cells in series
    state: ChargeState  # CHG-1
    known: bool  # False until the bank is known: nothing to compute from, every limit is 0 (CHG-6)


# CHG-6: the BMS cannot prove the bank is fine and does not even know its size: allow nothing.
NO_CHARGE_LIMITS = ChargeLimits(cvl=0.0, ccl=0.0, dcl=0.0, dvl=0.0, state=ChargeState.ABSORPTION, known=False)
