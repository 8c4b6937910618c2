"""`smallbms-bus regmap`: the register maps as CSV (for PLC tools), Markdown (docs/registers.md) or JSON."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from smallbms_bus.modbus.regmap import MAP_NAMES, load_maps, rows, to_csv, to_json, to_markdown
from smallbms_bus.modbus.writes import target_range


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("regmap", help="print the Modbus register maps (csv, md or json)",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=("csv", "md", "json"), default="csv", help="output format (default csv)")
    parser.add_argument("--map", choices=MAP_NAMES, default=None, help="only this map (default: all)")
    parser.add_argument("--batteries", type=int, default=None,
                        help="csv/json: batteries in the bank, for the SunSpec layout (default 1)")
    parser.add_argument("--cells", type=int, choices=(4, 8, 16), default=4,
                        help="csv/json: cells per battery (12.8 V 4, 25.6 V 8, 51.2 V 16), for the SunSpec layout: "
                             "model 805 has one cell group per cell (default 4)")
    return parser


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    maps = load_maps()
    selected = [maps[args.map]] if args.map else list(maps.values())
    if args.batteries is not None and not 1 <= args.batteries <= 50:
        print("regmap: --batteries must be 1..50", file=sys.stderr)
        return 2
    if args.format == "md":
        out.write(to_markdown(selected, target_range))
        return 0
    nodes = None if args.batteries is None else tuple(range(1, args.batteries + 1))
    table = [row for m in selected for row in rows(m, nodes if m.dynamic else None, target_range, args.cells)]
    out.write(to_csv(table) if args.format == "csv" else to_json(table))
    return 0
