"""BANK-3 checks that depend only on BAT_INFO, and the words the bank's issues are written in.

Split from smallbms_bus/bank.py (which re-exports every name): the bank's theory of operation is there.
"""

from __future__ import annotations

from collections import Counter

from smallbms_bus.bank_views import BankIssue
from smallbms_bus.protocol import MAX_BATTERIES_BY_UNITS, MAX_SERIES_UNITS, SERIAL_PART_CHARS, UNIT_VOLTAGE
from smallbms_bus.reports import BatteryInfo


def validate_shape(infos: list[BatteryInfo]) -> list[BankIssue]:
    """BANK-3 on BAT_INFO alone: voltages, capacities, positions, strings and the manual's limits."""
    infos = sorted(infos, key=lambda i: i.node)
    issues: list[BankIssue] = []
    if not infos:
        return issues
    by_units = Counter(i.nominal_units for i in infos)
    if len(by_units) > 1:
        detail = ", ".join(f"{UNIT_VOLTAGE * u:.1f} V x{c}" for u, c in sorted(by_units.items()))
        issues.append(BankIssue("mixed_nominal_voltage", f"batteries of mixed nominal voltage: {detail}",
                                tuple(i.node for i in infos)))
    by_cap = Counter(i.nominal_capacity_ah for i in infos)
    if len(by_cap) > 1:
        detail = ", ".join(f"{ah} Ah x{c}" for ah, c in sorted(by_cap.items()))
        issues.append(BankIssue("mixed_capacity", f"batteries of mixed capacity: {detail}",
                                tuple(i.node for i in infos)))
    positions = Counter((i.string_index, i.series_index) for i in infos)
    for (string, pos), count in sorted(positions.items()):
        if count > 1:
            nodes = tuple(i.node for i in infos if (i.string_index, i.series_index) == (string, pos))
            issues.append(BankIssue("duplicate_position",
                                    f"string {string} position {pos} is claimed by batteries {nodes_text(nodes)}",
                                    nodes))
    strings: dict[int, list[BatteryInfo]] = {}
    for i in infos:
        strings.setdefault(i.string_index, []).append(i)
    sizes = {s: len(members) for s, members in strings.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"string {s}: {n}" for s, n in sorted(sizes.items()))
        issues.append(BankIssue("unequal_strings", f"strings have unequal battery counts ({detail})"))
    for s, members in sorted(strings.items()):
        have = {m.series_index for m in members}
        missing = sorted(set(range(1, max(have) + 1)) - have)
        if missing:
            issues.append(BankIssue("position_gap",
                                    f"string {s} has no battery at position {nodes_text(tuple(missing))}",
                                    tuple(m.node for m in members)))
    missing_strings = sorted(set(range(1, max(strings) + 1)) - set(strings))
    if missing_strings:
        issues.append(BankIssue("string_gap", f"no battery reports string {nodes_text(tuple(missing_strings))}"))
    for units in by_units:
        limit = MAX_BATTERIES_BY_UNITS[units]
        if len(infos) > limit:
            issues.append(BankIssue("too_many_batteries",
                                    f"{len(infos)} batteries; at most {limit} of {UNIT_VOLTAGE * units:.1f} V "
                                    "are allowed"))
    series = max(sizes.values())
    for units in by_units:
        if series * units > MAX_SERIES_UNITS:
            issues.append(BankIssue("too_many_in_series",
                                    f"{series} x {UNIT_VOLTAGE * units:.1f} V in series exceeds "
                                    f"{MAX_SERIES_UNITS} x {UNIT_VOLTAGE:.1f} V"))
    return issues


def nodes_text(nodes: tuple[int, ...]) -> str:
    return ", ".join(str(n) for n in nodes)


def serial_halves(serial: str) -> tuple[str, str]:
    """A learned serial number as the two BAT_SERIAL halves that carry it (PROTOCOL.md: 7 + 7 characters)."""
    return serial[:SERIAL_PART_CHARS], serial[SERIAL_PART_CHARS:]


def info_key(info: BatteryInfo) -> tuple[int, int, int, int]:
    """What of BAT_INFO is identity (the learned bank keeps it); firmware is not: an update changes it."""
    return info.nominal_units, info.nominal_capacity_ah, info.string_index, info.series_index


def describe_info(key: tuple[int, int, int, int]) -> str:
    units, capacity, string, series = key
    return f"{UNIT_VOLTAGE * units:.1f} V {capacity} Ah string {string} position {series}"
