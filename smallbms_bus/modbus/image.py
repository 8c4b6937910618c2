"""The words a unit answers with: register maps compiled against one ModbusView, built lazily per block.

A unit serves one or more maps (unit 1: native + SunSpec; the GX unit: gx). Each placed block's words
are built on the first read after a new snapshot and reused until the next one, so a PLC polling
block A 32 times between two decisions costs one encoding, and block E of battery 40 is only encoded
when someone reads it.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Any

from smallbms_bus.modbus.regmap import (
    MAX_CELLS,
    MODEL_LENGTH,
    SF_NOT_IMPLEMENTED,
    PlacedBlock,
    Register,
    RegisterMap,
    encode,
)
from smallbms_bus.modbus.sources import BANK, BATTERY, ModbusView

Getter = Callable[[ModbusView], Any]
Layout = tuple[tuple[int, int], ...]  # (node, cells) per battery in the bank


def layout_of(snapshot: ModbusView) -> Layout:
    """What the address space depends on: the batteries in the bank and each one's cell count."""
    return tuple((node, b.info.cell_count if b.info is not None else MAX_CELLS)
                 for node, b in sorted(snapshot.batteries.items()))


def _getter(reg: Register, placed: PlacedBlock) -> Getter:
    if reg.source == MODEL_LENGTH:
        length = placed.length - 2  # SunSpec's L: the model without its ID and L
        return lambda s: length
    if reg.source is None:
        value = reg.value
        return lambda s: value
    if reg.source in BANK:
        get = BANK[reg.source]
    else:
        battery, node = BATTERY[reg.source], placed.node
        get = (lambda s: battery(s.batteries.get(node)))  # noqa: E731 - node is bound per placed block
    if reg.index is None:
        return get
    index = reg.index
    return lambda s: _element(get(s), index)


def _element(values: Sequence[Any] | None, index: int) -> Any:
    return None if values is None or index >= len(values) else values[index]


# One register compiled: the register, its value, the map's not-available rule, and its SunSpec scale factor
Compiled = tuple[Register, Getter, str, Getter | None]


class UnitImage:
    """The address space of one unit for a given bank layout (the SunSpec part depends on the batteries)."""

    def __init__(self, maps: Sequence[RegisterMap], layout: Layout) -> None:
        nodes = tuple(node for node, _ in layout)
        placed: list[tuple[PlacedBlock, RegisterMap]] = []
        for regmap in maps:
            placed += [(p, regmap) for p in regmap.layout(nodes, dict(layout))]
        placed.sort(key=lambda item: item[0].start)
        self.layout = tuple(layout)
        self.blocks = [p for p, _ in placed]
        self.starts = [p.start for p in self.blocks]
        self._compiled: list[list[Compiled]] = []
        self.registers: dict[int, tuple[Register, int]] = {}  # address -> (register, block index), every word
        for i, (p, regmap) in enumerate(placed):
            base = p.start if p.block.repeat != 1 or p.block.start is None else 0
            getters = {reg.name: _getter(reg, p) for reg in p.registers}
            self._compiled.append([(reg, getters[reg.name], regmap.missing,
                                    None if reg.sf is None else getters[reg.sf]) for reg in p.registers])
            for reg in p.registers:
                for word in range(reg.words):
                    self.registers[base + reg.address + word] = (reg, i)
        self._cache: list[list[int] | None] = [None] * len(self.blocks)
        self._snapshot: ModbusView | None = None

    def _words(self, i: int, snapshot: ModbusView) -> list[int]:
        if snapshot is not self._snapshot:
            self._cache = [None] * len(self.blocks)
            self._snapshot = snapshot
        words = self._cache[i]
        if words is None:
            words = []
            for reg, get, missing, sf in self._compiled[i]:
                if sf is None:
                    words += encode(reg, get(snapshot), missing)
                else:
                    exponent = sf(snapshot)
                    known = exponent is not None and exponent != SF_NOT_IMPLEMENTED
                    words += encode(reg, get(snapshot) if known else None, missing, 10.0 ** exponent if known else 1.0)
            self._cache[i] = words
        return words

    def read(self, snapshot: ModbusView, address: int, count: int) -> list[int] | None:
        """`count` words from `address`, or None when any of them is not mapped (exception 02)."""
        i = bisect_right(self.starts, address) - 1
        out: list[int] = []
        while count > 0:
            if i < 0 or i >= len(self.blocks):
                return None
            block = self.blocks[i]
            if not block.start <= address < block.end:
                return None
            take = min(count, block.end - address)
            offset = address - block.start
            out += self._words(i, snapshot)[offset:offset + take]
            address += take
            count -= take
            i += 1
        return out

    def register_at(self, address: int) -> tuple[Register, int] | None:
        """The register that holds `address` and the word of it `address` is (0 = its first word)."""
        found = self.registers.get(address)
        if found is None:
            return None
        reg, i = found
        placed = self.blocks[i]
        base = placed.start if placed.block.repeat != 1 or placed.block.start is None else 0
        return reg, address - base - reg.address
