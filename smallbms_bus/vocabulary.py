"""Names every layer shares (config, bank, outputs, service, metrics, Modbus, demo), each defined once.

The values are contracts: config keys ([outputs] load_disconnect = 1), metric labels (state="learned",
reason="status_timeout") and Modbus enum texts use them as they are. `StrEnum` members compare equal to
their value, so a caller holding a plain string still matches.
"""

from __future__ import annotations

from enum import StrEnum


class BankPhase(StrEnum):
    """Where the bank is in discovery and learning (BANK-2, BANK-4); see smallbms_bus/bank.py."""

    WAITING = "waiting"
    DISCOVERING = "discovering"
    LEARNING = "learning"
    LEARNED = "learned"


class StaleReason(StrEnum):
    """Why a battery is not fresh (COM-1), the first failing condition in this order."""

    NO_STATUS = "no_status"
    STATUS_TIMEOUT = "status_timeout"
    ALIVE_STUCK = "alive_stuck"
    NO_INFO = "no_info"
    NO_TEMPS = "no_temps"
    TEMPS_TIMEOUT = "temps_timeout"
    NO_CELLS = "no_cells"
    CELLS_TIMEOUT = "cells_timeout"


# Output roles, in config and register order: the three relays the BMS switches, then the two LEDs.
RELAY_ROLES = ("load_disconnect", "charge_disconnect", "pre_alarm")
LED_ROLES = ("error_led", "status_led")
OUTPUT_ROLES = (*RELAY_ROLES, *LED_ROLES)
ROLE_LABELS = {"load_disconnect": "load", "charge_disconnect": "charge", "pre_alarm": "pre-alarm",
               "error_led": "error LED", "status_led": "status LED"}  # how people name them in one word
