"""The `simulate` sub-command: option checking, --list, a short run, clean stop on signals."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from smallbms_bus.sim import cli
from smallbms_bus.sim.bank import BankShape

REPO = Path(__file__).parents[2]


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="smallbms-bus")
    subparsers = top.add_subparsers(dest="command", required=True)
    cli.add_parser(subparsers)
    return top


def test_defaults() -> None:
    args = parser().parse_args(["simulate"])
    assert args.bank == BankShape.parse("2s2p-12v100")
    assert (args.scenario, args.speed, args.duration, args.bitrate) == ("steady", 1.0, None, 500000)
    assert (args.soc, args.ambient, args.seed, args.ignore_bms, args.list) == (None, None, 0, False, False)
    assert (args.relay_board, args.devices, args.load_relay, args.charge_relay, args.start_at) == (None, None, 1, 2, 0)


def test_values_are_parsed() -> None:
    args = parser().parse_args([
        "simulate", "--interface", "slcan", "--channel", "/dev/ttyACM0", "--bitrate", "250000",
        "--bank", "max-48v", "--scenario", "overcharge", "--speed", "20", "--duration", "3.5",
        "--soc", "95", "--ambient", "-10", "--seed", "7", "--ignore-bms", "--slcan-wait",
    ])
    assert args.bank == BankShape(1, 25, 4, 100)
    assert (args.interface, args.channel, args.bitrate) == ("slcan", "/dev/ttyACM0", 250000)
    assert args.scenario == "overcharge"
    assert (args.speed, args.duration, args.soc, args.ambient, args.seed) == (20.0, 3.5, 95.0, -10.0, 7)
    assert args.ignore_bms and args.slcan_wait


@pytest.mark.parametrize(("option", "value"), [
    ("--speed", "0"), ("--speed", "fast"), ("--speed", "nan"), ("--bank", "5s1p-12v100"),
    ("--bank", "1s26p-48v100"), ("--scenario", "meltdown"), ("--soc", "101"), ("--soc", "-1"),
    ("--ambient", "200"), ("--bitrate", "5"), ("--bitrate", "500k"), ("--interface", "carrier-pigeon"),
    ("--seed", "-1"), ("--seed", "1.5"), ("--duration", "0"), ("--duration", "-3"),
    ("--relay-board", "127.0.0.1:502"), ("--relay-board", "modbus-tcp:host"), ("--relay-board", "modbus-tcp:h:70000"),
    ("--devices", "relay"), ("--devices", "charger=relays"), ("--load-relay", "0"), ("--start-at", "-1"),
])
def test_bad_values_exit_2_naming_the_option(capsys: pytest.CaptureFixture[str], option: str, value: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(["simulate", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


def test_list_prints_presets_and_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(parser().parse_args(["simulate", "--list"])) == 0
    out = capsys.readouterr().out
    for name in ("home-24v", "max-chain", "1s25p-48v100", "steady", "discharge", "overcharge", "cold-charge",
                 "comms-loss", "alive-freeze", "firmware-update", "hardware-fault"):
        assert name in out


def test_short_run_on_a_virtual_bus(capsys: pytest.CaptureFixture[str]) -> None:
    before = signal.getsignal(signal.SIGTERM)
    args = parser().parse_args(["simulate", "--interface", "virtual", "--channel", f"cli-{uuid.uuid4().hex}",
                                "--duration", "0.3", "--bank", "1s2p-24v200", "--scenario", "discharge"])
    assert cli.run(args) == 0
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    for part in ("1s2p-24v200", "discharge", "virtual", "cli-"):
        assert part in first
    assert "frames sent" in err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored


def test_a_bus_that_cannot_open_exits_2_naming_the_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = parser().parse_args(["simulate", "--interface", "slcan", "--channel", str(tmp_path / "no-such-tty")])
    assert cli.run(args) == 2
    assert "--interface slcan --channel" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly_with_exit_0(signum: int) -> None:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "smallbms_bus.cli", "simulate", "--interface", "virtual",
         "--channel", f"sig-{uuid.uuid4().hex}"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stderr is not None
        first = process.stderr.readline()  # the start summary: the loop is about to run
        assert first.startswith("simulate: bank 2s2p-12v100")
        process.send_signal(signum)
        rest = process.communicate(timeout=10)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "stopped after" in rest and "Traceback" not in rest


def test_relay_wiring_options_are_parsed() -> None:
    args = parser().parse_args(["simulate", "--relay-board", "modbus-tcp:10.0.0.5:5021:3", "--devices",
                                "charger=bms-state,load=relays", "--load-relay", "4", "--charge-relay", "5"])
    assert (args.relay_board.host, args.relay_board.port, args.relay_board.unit) == ("10.0.0.5", 5021, 3)
    assert args.devices == ("bms-state", "relays") and (args.load_relay, args.charge_relay) == (4, 5)
    assert parser().parse_args(["simulate", "--relay-board", "modbus-tcp:[::1]:502"]).relay_board.host == "::1"


@pytest.mark.parametrize("extra", [["--devices", "relays"], ["--devices", "charger=bms-state,load=both"]])
def test_relay_wired_devices_need_a_relay_board(capsys: pytest.CaptureFixture[str], extra: list[str]) -> None:
    assert cli.run(parser().parse_args(["simulate", "--interface", "virtual", *extra])) == 2
    assert "give --relay-board modbus-tcp:HOST:PORT" in capsys.readouterr().err


def test_the_same_channel_for_both_relays_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["simulate", "--relay-board", "modbus-tcp:127.0.0.1:1", "--charge-relay", "1"])
    assert cli.run(args) == 2
    assert "--load-relay and --charge-relay are both 1" in capsys.readouterr().err


def test_a_speed_other_than_1_says_the_bms_figures_will_not_match(capsys: pytest.CaptureFixture[str]) -> None:
    args = parser().parse_args(["simulate", "--interface", "virtual", "--channel", f"cli-{uuid.uuid4().hex}",
                                "--duration", "0.2", "--speed", "20"])
    assert cli.run(args) == 0
    err = capsys.readouterr().err
    assert "WARNING speed 20" in err and "1/20 of the batteries'" in err
    args = parser().parse_args(["simulate", "--interface", "virtual", "--channel", f"cli-{uuid.uuid4().hex}",
                                "--duration", "0.2"])
    assert cli.run(args) == 0
    assert "WARNING" not in capsys.readouterr().err
