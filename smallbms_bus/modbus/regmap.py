"""Register maps as data: load register_maps/*.toml, lay them out, encode values, export them.

A map is a list of blocks; a block is a list of registers at absolute addresses, or (with `repeat`)
a template repeated at `start + k * length` once per battery slot (a fixed count) or once per battery
in the bank (`repeat = "batteries"`, for SunSpec, whose models follow each other: `start = "next"`).
A battery block with `cell_group = n` ends with one group of n words per cell of that battery (SunSpec
model 805): its registers with `count = "cells"` repeat once per cell, and its length is `length` plus
n per cell, so the layout depends on the bank's cell counts, not only on its batteries.
A register with `sf = "X_SF"` takes its scale from the SunSpec scale factor register X_SF of its block,
whose value may be computed from the bank (a source) rather than fixed.
`validate` refuses overlaps, gaps inside a block, registers outside their block, unknown types,
unknown sources and unknown write targets, so a typo in a map file fails a test, not a PLC.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from smallbms_bus.protocol import MAX_CELLS  # a battery whose cell count is unknown gets 16

# type -> (words, signed, not-available marker); strings and reserved space take `words` from the map.
TYPES: dict[str, tuple[int, bool, int | None]] = {
    "uint16": (1, False, 0xFFFF), "enum16": (1, False, 0xFFFF), "bitfield16": (1, False, 0xFFFF),
    "int16": (1, True, 0x8000), "sunssf": (1, True, 0x8000),
    "uint32": (2, False, 0xFFFFFFFF), "bitfield32": (2, False, 0xFFFFFFFF), "int32": (2, True, 0x80000000),
    "acc32": (2, False, 0), "string": (0, False, 0), "reserved": (0, False, 0), "pad": (1, False, 0x8000),
}
ACCESS = ("r", "rw", "w")
MAP_NAMES = ("native", "sunspec", "gx")
MODEL_LENGTH = "model.length"  # a source: the length of the placed block minus ID and L (SunSpec's L)
SF_NOT_IMPLEMENTED = -32768  # a sunssf of 0x8000: the points it scales are not implemented either


class RegisterMapError(ValueError):
    """A map file that does not describe a valid, gap-free, overlap-free register layout."""


@dataclass(frozen=True)
class Register:
    address: int  # absolute, or the offset inside a repeated block
    name: str
    type: str
    words: int
    scale: float = 1.0
    unit: str = ""
    access: str = "r"
    range: tuple[float, float] | None = None
    source: str | None = None
    value: Any = None  # a constant instead of a source
    target: str | None = None  # what a write does (smallbms_bus/modbus/writes.py)
    index: int | None = None  # element of an array source (count = n in the map file)
    fill: int | None = None  # reserved words read as this instead of 0
    values: str = ""  # enum / bit meanings, for the docs
    description: str = ""
    sf: str | None = None  # SunSpec: the scale factor register of the block that gives this point's scale
    per_cell: bool = False  # one of the block's per-cell registers (count = "cells"), element `index`

    @property
    def signed(self) -> bool:
        return TYPES[self.type][1]

    @property
    def writable(self) -> bool:
        return self.access in ("rw", "w")


@dataclass(frozen=True)
class Block:
    name: str
    title: str
    start: int | None  # None = right after the previous block ("next")
    length: int
    registers: tuple[Register, ...]
    repeat: int | str = 1  # a count, or "batteries": one per battery in the bank
    item: str | None = None  # "battery" for repeated battery blocks
    cell_group: int = 0  # words per cell group after `length` (0: no per-cell groups)


@dataclass(frozen=True)
class PlacedBlock:
    """One block at its absolute address; `node` is the battery it shows (repeated blocks), `cells` the
    cell groups it carries (blocks with `cell_group`)."""

    block: Block
    start: int
    slot: int  # 0-based repetition
    node: int | None
    cells: int = 0

    @property
    def length(self) -> int:
        return self.block.length + self.block.cell_group * self.cells

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def registers(self) -> tuple[Register, ...]:
        block = self.block
        if not block.cell_group:
            return block.registers
        return tuple(r for r in block.registers if not r.per_cell or (r.index or 0) < self.cells)


@dataclass(frozen=True)
class RegisterMap:
    name: str
    title: str
    unit_key: str  # the config key that gives this map's unit id
    missing: str  # "sentinel" (0xFFFF...) or "zero" (the GX's "no value")
    description: str
    blocks: tuple[Block, ...]
    notes: str = ""
    dynamic: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dynamic", any(b.repeat == "batteries" for b in self.blocks))

    def layout(self, nodes: Sequence[int] = (), cells: Mapping[int, int] | None = None) -> tuple[PlacedBlock, ...]:
        """Absolute placement. Fixed repeats show nodes 1..n; "batteries" repeats one block per node in `nodes`.
        `cells`: each node's cell count, for blocks with cell groups (MAX_CELLS when not given)."""
        placed: list[PlacedBlock] = []
        cursor = 0
        for block in self.blocks:
            start = cursor if block.start is None else block.start
            if block.repeat == "batteries":
                slots: list[int | None] = list(nodes)
            else:
                slots = [k + 1 if block.item else None for k in range(int(block.repeat))]
            at = start
            for k, node in enumerate(slots):
                count = (cells or {}).get(node, MAX_CELLS) if block.cell_group and node is not None else 0
                placed.append(PlacedBlock(block, at, k, node, count))
                at = placed[-1].end
            cursor = at
        return tuple(placed)

    def registers(self, nodes: Sequence[int] = (), cells: Mapping[int, int] | None = None,
                  ) -> Iterator[tuple[int, PlacedBlock, Register]]:
        for placed in self.layout(nodes, cells):
            base = placed.start if placed.block.repeat != 1 or placed.block.start is None else 0
            for reg in placed.registers:
                yield base + reg.address, placed, reg


def _range(text: str | None, where: str) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(x) for x in str(text).split("-", 1))
    except ValueError:
        raise RegisterMapError(f"{where}: range {text!r} is not 'min-max'") from None
    return low, high


def _registers(raw: list[dict[str, Any]], where: str) -> list[Register]:
    out: list[Register] = []
    for entry in raw:
        entry = dict(entry)
        name = entry.pop("name", None)
        here = f"{where} register {name!r}"
        if not name:
            raise RegisterMapError(f"{where}: a register without a name")
        kind = entry.pop("type", None)
        if kind not in TYPES:
            raise RegisterMapError(f"{here}: type {kind!r} is not one of {', '.join(TYPES)}")
        words = entry.pop("words", None) or TYPES[kind][0]
        if not words:
            raise RegisterMapError(f"{here}: type {kind} needs words = n")
        count = entry.pop("count", None)
        per_cell = count == "cells"
        if per_cell:
            count = MAX_CELLS
        stride = int(entry.pop("stride", 0)) or int(words)
        access = entry.pop("access", "r")
        if access not in ACCESS:
            raise RegisterMapError(f"{here}: access {access!r} is not one of {', '.join(ACCESS)}")
        try:
            address = int(entry.pop("address"))
            common = {
                "type": kind, "words": int(words), "scale": float(entry.pop("scale", 1.0)),
                "unit": entry.pop("unit", ""), "access": access, "range": _range(entry.pop("range", None), here),
                "source": entry.pop("source", None), "value": entry.pop("value", None),
                "target": entry.pop("target", None), "fill": entry.pop("fill", None),
                "values": entry.pop("values", ""), "description": entry.pop("description", ""),
                "sf": entry.pop("sf", None), "per_cell": per_cell,
            }
        except KeyError:
            raise RegisterMapError(f"{here}: no address") from None
        if entry:
            raise RegisterMapError(f"{here}: unknown keys {', '.join(sorted(entry))}")
        if count is None:
            out.append(Register(address, name, **common))
        else:
            out += [Register(address + i * stride, f"{name}_{i + 1}", index=i, **common) for i in range(int(count))]
    return out


def parse_map(text: str, where: str) -> RegisterMap:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise RegisterMapError(f"{where}: {error}") from None
    head = data.get("map", {})
    blocks = []
    for raw in data.get("block", []):
        name = raw.get("name", "?")
        start = raw.get("start")
        registers = _registers(raw.get("registers", []), f"{where} block {name}")
        # A point whose scale factor is a constant has that scale (what a write is decoded with, and the exports)
        constants = {r.name: r.value for r in registers if r.type == "sunssf" and isinstance(r.value, int)
                     and r.value != SF_NOT_IMPLEMENTED}
        registers = [dataclasses.replace(r, scale=10.0 ** constants[r.sf]) if r.sf in constants else r
                     for r in registers]
        blocks.append(Block(
            name=name, title=raw.get("title", ""), start=None if start == "next" else int(start),
            length=int(raw["length"]),
            registers=tuple(sorted(registers, key=lambda r: r.address)),  # arrays with a stride interleave
            repeat=raw.get("repeat", 1), item=raw.get("item"), cell_group=int(raw.get("cell_group", 0)),
        ))
    return RegisterMap(name=head.get("name", where), title=head.get("title", ""), unit_key=head.get("unit", ""),
                       missing=head.get("missing", "sentinel"), description=head.get("description", ""),
                       blocks=tuple(blocks), notes=head.get("notes", ""))


def load_map(name: str) -> RegisterMap:
    if name not in MAP_NAMES:
        raise RegisterMapError(f"no register map {name!r}: one of {', '.join(MAP_NAMES)}")
    text = resources.files("smallbms_bus.register_maps").joinpath(f"{name}.toml").read_text(encoding="utf-8")
    return parse_map(text, f"register_maps/{name}.toml")


def load_maps() -> dict[str, RegisterMap]:
    return {name: load_map(name) for name in MAP_NAMES}


def validate(regmap: RegisterMap, sources: set[str], targets: set[str], nodes: Sequence[int] = (1, 2)) -> None:
    """Every problem a map file can have, as one RegisterMapError naming the first."""
    where = f"map {regmap.name}"
    if regmap.missing not in ("sentinel", "zero"):
        raise RegisterMapError(f"{where}: missing = {regmap.missing!r}: sentinel or zero")
    for block in regmap.blocks:
        if block.repeat != "batteries" and not (isinstance(block.repeat, int) and block.repeat >= 1):
            raise RegisterMapError(f"{where} block {block.name}: repeat {block.repeat!r}: a count or 'batteries'")
        if block.cell_group and not block.item:
            raise RegisterMapError(f"{where} block {block.name}: cell groups need a battery block (item)")
        factors = {r.name: r for r in block.registers if r.type == "sunssf"}
        for reg in block.registers:
            _check_register(f"{where} block {block.name} register {reg.name}", reg, block, sources, targets, factors)
        for cells in ((MAX_CELLS, 4, 1) if block.cell_group else (0,)):
            _check_coverage(f"{where} block {block.name}", PlacedBlock(block, 0, 0, 1, cells))
    seen: list[tuple[int, int, str]] = sorted((p.start, p.end, p.block.name) for p in regmap.layout(nodes))
    for (_, end, name), (start, _, other) in itertools.pairwise(seen):
        if start < end:
            raise RegisterMapError(f"{where}: block {other} at {start} overlaps block {name}")


def _check_register(here: str, reg: Register, block: Block, sources: set[str], targets: set[str],
                    factors: Mapping[str, Register]) -> None:
    if reg.source is not None and reg.source not in sources and reg.source != MODEL_LENGTH:
        raise RegisterMapError(f"{here}: source {reg.source!r} does not exist")
    if reg.source is None and reg.value is None and reg.type not in ("reserved", "pad"):
        raise RegisterMapError(f"{here}: needs a source or a value")
    if reg.sf is not None and reg.sf not in factors:
        raise RegisterMapError(f"{here}: sf {reg.sf!r} is not a sunssf register of the block")
    if reg.sf is not None and reg.writable and factors[reg.sf].value is None:
        raise RegisterMapError(f"{here}: writable, so its scale factor {reg.sf} must be a constant")
    if reg.per_cell and not block.cell_group:
        raise RegisterMapError(f"{here}: count = 'cells' needs cell_group on the block")
    if reg.writable and reg.target not in targets:
        raise RegisterMapError(f"{here}: writable, but target {reg.target!r} does not exist")
    if reg.writable and reg.words != 1 and reg.type != "string":
        raise RegisterMapError(f"{here}: only single-word registers and strings may be writable")
    if reg.target is not None and not reg.writable:
        raise RegisterMapError(f"{here}: has a target but access {reg.access!r}")


def _check_coverage(here: str, placed: PlacedBlock) -> None:
    """No overlap, no gap, nothing outside the block (with `placed.cells` cell groups)."""
    block = placed.block
    base = 0 if block.repeat != 1 or block.start is None else block.start
    used = [False] * placed.length
    for reg in placed.registers:
        first = reg.address - base
        if first < 0 or first + reg.words > placed.length:
            raise RegisterMapError(f"{here} register {reg.name}: address {reg.address} is outside the block")
        for i in range(first, first + reg.words):
            if used[i]:
                raise RegisterMapError(f"{here} register {reg.name}: overlaps another register at {base + i}")
            used[i] = True
    if not all(used):
        gap = base + used.index(False)
        raise RegisterMapError(f"{here}: gap at address {gap} (declare it reserved)")


# -- encoding ------------------------------------------------------------------------------------------
def encode(reg: Register, value: Any, missing: str, scale: float | None = None) -> list[int]:
    """One register's words for an engineering value (None = not available); `scale` overrides the register's
    (SunSpec points whose scale factor is computed from the bank)."""
    words, signed, marker = reg.words, *TYPES[reg.type][1:]
    if reg.type == "reserved":
        return [0 if reg.fill is None else reg.fill] * words
    if reg.type == "string":
        data = ("" if value is None else str(value)).encode("ascii", "replace")[: 2 * words].ljust(2 * words, b"\0")
        return [data[i] << 8 | data[i + 1] for i in range(0, 2 * words, 2)]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):  # inf: "not discharging"
        raw = 0 if missing == "zero" or marker is None else marker
    else:
        scale = reg.scale if scale is None else scale
        raw = round(value / scale) if scale != 1.0 else round(value)
        low, high = _range_of(signed, words)
        if missing == "zero" or not low <= raw <= high:
            low, high = limits(reg.type, words, missing)
            raw = min(max(raw, low), high)  # does not fit: the type's limit, as Victron's converter does
        if raw < 0:
            raw += 1 << (16 * words)
    return [(raw >> 16) & 0xFFFF, raw & 0xFFFF] if words == 2 else [raw & 0xFFFF]


def limits(kind: str, words: int, missing: str) -> tuple[int, int]:
    """Where a number that does not fit this type is clamped: never to 0, never to the not-available marker.
    On the GX map exactly Victron's dbus_modbustcp rule, qBound(min, value, max - 1), for every value; elsewhere
    the type's range without its marker (0xFFFF, 0x8000, ...), for values outside the type (a value inside it
    is encoded as it is, so a map's constant 0xFFFF still says "not implemented")."""
    signed, marker = TYPES[kind][1], TYPES[kind][2]
    low, high = _range_of(signed, words)
    if missing == "zero":
        return low, high - 1
    if marker == high:
        high -= 1
    if signed and marker == low + (1 << (16 * words)):
        low += 1
    return low, high


def _range_of(signed: bool, words: int) -> tuple[int, int]:
    bits = 16 * words
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def decode_word(reg: Register, word: int) -> float:
    """A written word as an engineering value (writable registers are single words)."""
    raw = word - 0x10000 if reg.signed and word & 0x8000 else word
    return round(raw * reg.scale, 9)  # 222 x 0.1 is 22.2, not 22.200000000000003 (stored and shown as written)


# -- exports ---------------------------------------------------------------------------------------------
COLUMNS = ("map", "unit", "block", "address", "register", "name", "type", "words", "scale", "unit_of_measure",
           "access", "range", "values", "source", "description")


def rows(regmap: RegisterMap, nodes: Sequence[int] | None = None,
         target_range: Callable[[str], str] | None = None, cells: int = 4) -> list[dict[str, Any]]:
    """One row per register at its absolute address (repeated blocks expanded for every slot; batteries
    with `cells` cells each where the layout depends on it)."""
    if nodes is None:
        nodes = (1,) if regmap.dynamic else ()
    out = []
    for address, placed, reg in regmap.registers(nodes, dict.fromkeys(nodes, cells)):
        prefix = f"battery_{placed.node}." if placed.node is not None else ""
        rng = ""
        if reg.range is not None:
            rng = f"{reg.range[0]:g}-{reg.range[1]:g}"
        elif reg.target and target_range is not None:
            rng = target_range(reg.target)
        out.append({
            "map": regmap.name, "unit": regmap.unit_key, "block": placed.block.name, "address": address,
            "register": address + 1, "name": prefix + reg.name, "type": reg.type, "words": reg.words,
            "scale": _scale_text(reg) or "1", "unit_of_measure": reg.unit, "access": reg.access, "range": rng,
            "values": reg.values, "source": reg.source or ("" if reg.value is None else f"constant {reg.value}"),
            "description": reg.description,
        })
    return out


def _scale_text(reg: Register) -> str:
    """The scale as the docs and exports show it: `10^A_SF` for a SunSpec point, '' for 1."""
    if reg.sf is not None:
        return f"10^{reg.sf}"
    return "" if reg.scale == 1.0 else f"{reg.scale:g}"


def to_csv(all_rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(all_rows)
    return buffer.getvalue()


def to_json(all_rows: list[dict[str, Any]]) -> str:
    return json.dumps(all_rows, indent=1, ensure_ascii=False) + "\n"


def to_markdown(maps: Sequence[RegisterMap], target_range: Callable[[str], str] | None = None) -> str:
    """docs/registers.md: every map, block by block, as the data files define them."""
    out = ["# Modbus registers", "",
           "Generated from `register_maps/*.toml` by `smallbms-bus regmap --format md` (do not edit by hand;",
           "tests/modbus/test_regmap.py fails when this file is stale). Conventions, exceptions and write",
           "rules: [modbus.md](modbus.md). Addresses are 0-based PDU addresses; a 1-based PLC register number",
           "is address + 1. Scale = the value of one count (0.01 = hundredths); `10^X_SF` = the SunSpec scale",
           "factor register X_SF of the same model. A value too large (or too small) for its register reads as",
           "the type's limit, never 0 and never the not-available marker (modbus.md, \"Values that do not",
           "fit\"). The alarm and warning bits (native registers 20-21, SunSpec EvtVnd1 and EvtVnd2), what each",
           "means and what the BMS did: [behaviour.md](behaviour.md#alarm-and-warning-bits).", ""]
    for regmap in maps:
        out += [f"## {regmap.title} (`{regmap.name}`, unit from `{regmap.unit_key}`)", "", regmap.description, ""]
        if regmap.missing == "zero":
            out += ["Values the service does not have read as 0 (the GX's \"no value\").", ""]
        else:
            out += ["Values the service does not have read as 0xFFFF (uint16), 0x8000 (int16), "
                    "0xFFFFFFFF (uint32), 0x80000000 (int32).", ""]
        placed = regmap.layout((1,), {1: 4})  # "next" blocks placed after one 12.8 V battery (4 cells)
        for block in regmap.blocks:
            first = next(p for p in placed if p.block is block)
            relative = block.repeat != 1
            shift = first.start if block.start is None and not relative else 0  # "next" blocks: show absolute
            if block.repeat == "batteries" and block.cell_group:
                where = (f"at {first.start}; one block per battery in the bank, in node order, of "
                         f"{block.length} registers plus {block.cell_group} per cell of that battery (4, 8 or 16 "
                         "cells); the addresses after it are those of a bank of one 4-cell battery and move down "
                         "with every battery and cell")
            elif block.repeat == "batteries":
                where = (f"at {first.start} with one battery; one block of {block.length} registers per battery "
                         "in the bank, in node order; the blocks after it move down accordingly")
            elif block.repeat != 1:
                where = f"battery n at {first.start} + {block.length} x (n - 1), n = 1..{block.repeat}"
            else:
                where = f"{first.start}-{first.end - 1}"
            out += [f"### {block.name}: {block.title} ({where})", "",
                    f"| {'offset' if relative else 'address'} | name | type | scale | unit | access | range "
                    "| values / description | source |",
                    "|---|---|---|---|---|---|---|---|---|"]
            for reg in block.registers:
                if reg.per_cell and reg.index:
                    continue  # one row per per-cell register, for cell k
                at = reg.address + shift
                span = f"{at}" if reg.words == 1 else f"{at}-{at + reg.words - 1}"
                name = reg.name
                if reg.per_cell:
                    span = f"{at} + {block.cell_group} (k - 1)" + (f", {reg.words} words" if reg.words > 1 else "")
                    name = reg.name.rsplit("_", 1)[0] + "_k"
                rng = (f"{reg.range[0]:g}-{reg.range[1]:g}" if reg.range else
                       target_range(reg.target) if reg.target and target_range else "")
                text = "; ".join(t for t in (reg.values, reg.description) if t)
                source = reg.source or ("" if reg.value is None else f"constant {reg.value}")
                scale = _scale_text(reg)
                out.append(f"| {span} | {name} | {reg.type} | {scale} | {reg.unit} | {reg.access} | {rng} "
                           f"| {text} | {source} |")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def decode(reg: Register, words: Sequence[int], missing: str = "sentinel") -> Any:
    """The inverse of `encode`: an engineering value, or None for the not-available marker."""
    if reg.type == "string":
        data = b"".join(w.to_bytes(2, "big") for w in words)
        return data.rstrip(b"\0").decode("ascii", "replace")
    raw = words[0] << 16 | words[1] if reg.words == 2 else words[0]
    marker = TYPES[reg.type][2]
    if missing == "sentinel" and raw == marker and reg.type not in ("reserved", "acc32"):
        return None
    if reg.signed and raw & (1 << (16 * reg.words - 1)):
        raw -= 1 << (16 * reg.words)
    return round(raw * reg.scale, 9) if reg.scale != 1.0 else raw  # 2649 x 0.01 is 26.49, not 26.490000000000002


def decode_block(regmap: RegisterMap, block_name: str, words: Sequence[int]) -> dict[str, Any]:
    """Register name -> value for one non-repeated block read whole (what `smallbms-bus status` prints)."""
    block = next(b for b in regmap.blocks if b.name == block_name)
    base = block.start or 0
    return {reg.name: decode(reg, words[reg.address - base:reg.address - base + reg.words], regmap.missing)
            for reg in block.registers if reg.type != "reserved"}
