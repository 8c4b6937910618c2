"""The BMS-CAN bus to inverters and chargers (docs/inverter.md), transcribed once: dbc/bms_can.dbc is generated
from these tables by `python -m smallbms_bus.dbc.generate` (which also keeps dbc/lithium_ng.dbc in sync).

The frame encoder (smallbms_bus/inverter/frames.py) and the virtual inverter (smallbms_bus/sim/inverter.py)
read the generated DBC, never these tables. Ranges are the wire's (u16/s16 at the documented scale): the
encoder saturates a value outside them instead of letting it wrap (docs/inverter.md).
"""

from __future__ import annotations

from pathlib import Path

from cantools.database.can import Database, Message, Node
from smallbms_bus.dbc.generate import Sig, _signal

DBC_PATH = Path(__file__).with_name("bms_can.dbc")
BMS_NODE = "BMS"
INVERTER_NODE = "INVERTER"
PERIOD_MS = 1000  # the default [inverter] period

# 0x35A: two bits per item (INVERTER_CAN.md): 0b01 active, 0b10 ok, 0b00 not supported.
FLAG_CHOICES = {0: "NotSupported", 1: "Active", 2: "Ok", 3: "Invalid"}
# The items of 0x35A in wire order: (byte 0..3, bit 0/2/4/6); the warning is the same position 4 bytes later.
ALARM_ITEMS = (
    "General", "HighVoltage", "LowVoltage", "HighTemperature",
    "LowTemperature", "HighChargeTemperature", "LowChargeTemperature", "HighDischargeCurrent",
    "HighChargeCurrent", "Contactor", "ShortCircuit", "BmsInternal",
    "CellImbalance",
)
SYSTEM_ONLINE_BIT = 7 * 8 + 2  # byte 7, bits 2-3


def _u16(name: str, start: int, scale: float = 1, unit: str | None = None, comment: str | None = None) -> Sig:
    return Sig(name, start, 16, scale=scale, minimum=0, maximum=round(0xFFFF * scale, 3), unit=unit, comment=comment)


def _s16(name: str, start: int, scale: float, unit: str | None = None, comment: str | None = None,
         minimum: float | None = None) -> Sig:
    lo = round(-0x8000 * scale, 3) if minimum is None else minimum
    return Sig(name, start, 16, signed=True, scale=scale, minimum=lo, maximum=round(0x7FFF * scale, 3), unit=unit,
               comment=comment)


def _ascii(name: str, what: str) -> Sig:
    return Sig(name, 0, 64, comment=f"{what}: 8 ASCII characters, byte 0 = first character, space padded")


def _flags() -> list[Sig]:
    out = []
    for i, item in enumerate(ALARM_ITEMS):
        out.append(Sig(f"Alarm{item}", 2 * i, 2, choices=FLAG_CHOICES))
        out.append(Sig(f"Warning{item}", 32 + 2 * i, 2, choices=FLAG_CHOICES))
    out.append(Sig("SystemOnline", SYSTEM_ONLINE_BIT, 2, choices=FLAG_CHOICES,
                   comment="Active = the BMS has started and decides from fresh data (docs/inverter.md)"))
    return out


# (id, name, DLC, sender, comment, signals); every frame has the period PERIOD_MS by default.
FRAMES: list[tuple[int, str, int, str, str, list[Sig]]] = [
    (0x351, "CHARGE_LIMITS", 8, BMS_NODE, "what the inverter may do (CHG); receivers stop after 3 s without it", [
        _u16("ChargeVoltageLimit", 0, 0.1, "V", "CVL"),
        _s16("ChargeCurrentLimit", 16, 0.1, "A", "CCL, >= 0", minimum=0),
        _s16("DischargeCurrentLimit", 32, 0.1, "A", "DCL, sent positive", minimum=0),
        _u16("DischargeVoltageLimit", 48, 0.1, "V", "DVL")]),
    (0x355, "SOC_SOH", 8, BMS_NODE, "state of charge and health", [
        _u16("StateOfCharge", 0, 1, "%", "0 while the SoC is unknown (docs/inverter.md)"),
        _u16("StateOfHealth", 16, 1, "%", "100: not measured"),
        _u16("StateOfChargeHighRes", 32, 0.01, "%")]),
    (0x356, "BANK_MEASUREMENTS", 8, BMS_NODE, "bank voltage, current and temperature", [
        _s16("BankVoltage", 0, 0.01, "V"),
        _s16("BankCurrent", 16, 0.1, "A", "positive = charging"),
        _s16("BankTemperature", 32, 0.1, "degC",
             "highest cell temperature while charging, lowest otherwise")]),
    (0x35A, "ALARMS_WARNINGS", 8, BMS_NODE, "alarms (bytes 0-3) and warnings (bytes 4-7), 2 bits each", _flags()),
    (0x35E, "MANUFACTURER", 8, BMS_NODE, "manufacturer name", [_ascii("ManufacturerName", "SMALLBMS")]),
    (0x35F, "BATTERY_INFO", 8, BMS_NODE, "chemistry, firmware, capacity", [
        Sig("Chemistry", 0, 16, comment='ASCII "LF" (LiFePO4): byte 0 "L", byte 1 "F"'),
        Sig("FirmwareMajor", 16, 8), Sig("FirmwareMinor", 24, 8),
        _u16("Capacity", 32, 1, "Ah", "installed capacity")]),
    (0x372, "MODULE_COUNTS", 8, BMS_NODE, "batteries (modules) by state", [
        _u16("BatteriesOnline", 0), _u16("BatteriesBlockingCharge", 16),
        _u16("BatteriesBlockingDischarge", 32), _u16("BatteriesOffline", 48)]),
    (0x373, "CELL_EXTREMES", 8, BMS_NODE, "cell voltage and temperature extremes", [
        _u16("MinCellVoltage", 0, 1, "mV"), _u16("MaxCellVoltage", 16, 1, "mV"),
        _u16("MinCellTemperature", 32, 1, "K", "degC + 273"), _u16("MaxCellTemperature", 48, 1, "K", "degC + 273")]),
    (0x374, "MIN_CELL_VOLTAGE_ID", 8, BMS_NODE, "the lowest cell", [_ascii("CellId", "e.g. B07C03")]),
    (0x375, "MAX_CELL_VOLTAGE_ID", 8, BMS_NODE, "the highest cell", [_ascii("CellId", "e.g. B07C03")]),
    (0x376, "MIN_CELL_TEMPERATURE_ID", 8, BMS_NODE, "the coldest battery", [_ascii("CellId", "e.g. B07")]),
    (0x377, "MAX_CELL_TEMPERATURE_ID", 8, BMS_NODE, "the warmest battery", [_ascii("CellId", "e.g. B07")]),
    (0x379, "INSTALLED_CAPACITY", 8, BMS_NODE, "installed capacity", [_u16("InstalledCapacity", 0, 1, "Ah")]),
    (0x35C, "PYLON_REQUEST", 2, BMS_NODE, "profile pylontech only: charge/discharge enable, full-charge request", [
        Sig("FullChargeRequest", 3, 1), Sig("DischargeEnable", 6, 1), Sig("ChargeEnable", 7, 1)]),
    (0x359, "PYLON_PROTECTION", 7, BMS_NODE, "profile pylontech only: protection (bytes 0-1) and alarm (bytes 2-3) "
     "flags, battery count, \"PN\"", [
        Sig("ProtectHighVoltage", 1, 1), Sig("ProtectLowVoltage", 2, 1), Sig("ProtectHighTemperature", 3, 1),
        Sig("ProtectLowTemperature", 4, 1), Sig("ProtectDischargeCurrent", 7, 1),
        Sig("ProtectChargeCurrent", 8, 1), Sig("ProtectSystemError", 11, 1),
        Sig("AlarmHighVoltage", 17, 1), Sig("AlarmLowVoltage", 18, 1), Sig("AlarmHighTemperature", 19, 1),
        Sig("AlarmLowTemperature", 20, 1), Sig("AlarmDischargeCurrent", 23, 1),
        Sig("AlarmChargeCurrent", 24, 1), Sig("AlarmInternalComms", 27, 1),
        Sig("ModuleCount", 32, 8), Sig("Marker", 40, 16, comment='ASCII "PN": byte 5 "P", byte 6 "N"')]),
    (0x305, "INVERTER_KEEPALIVE", 8, INVERTER_NODE, "the inverter's keep-alive (~1 s); content ignored", []),
    (0x307, "INVERTER_IDENTIFICATION", 8, INVERTER_NODE, "a Victron GX identifies itself; content ignored", []),
]
PYLONTECH_ONLY = frozenset({0x35C, 0x359})
RECEIVED = frozenset({0x305, 0x307})


def build_database() -> Database:
    nodes = [Node(BMS_NODE, comment="smallbms-bus"),
             Node(INVERTER_NODE, comment="an inverter/charger or a Victron GX in CAN-bus BMS mode")]
    messages = []
    for frame_id, name, length, sender, comment, signals in FRAMES:
        receiver = INVERTER_NODE if sender == BMS_NODE else BMS_NODE
        messages.append(Message(frame_id, name, length, [_signal(s, [receiver]) for s in signals], senders=[sender],
                                cycle_time=PERIOD_MS, comment=comment))
    messages.sort(key=lambda m: m.frame_id)
    return Database(messages=messages, nodes=nodes, version="smallbms-bus bms_can 1")


def render() -> str:
    header = "// Generated by `python -m smallbms_bus.dbc.generate` from docs/inverter.md. Do not edit.\n"
    return header + build_database().as_dbc_string().replace("\r\n", "\n")
