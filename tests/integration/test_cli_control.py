"""The installer's command line against a real service (issue 16 items 1 and 4).

`smallbms-bus simulate --pty` makes the SLCAN wire and plays a 2S1P bank of 12.8 V batteries on it,
`smallbms-bus run` reads it through the path simulate printed, and every CLI command runs as a subprocess
against that service. What a command changed is read back over Modbus with pymodbus, an independent client.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from smallbms_bus.bms.settings import SPECS
from smallbms_bus.modbus.control import SETTINGS
from tests.ports import free_port

CMD = [sys.executable, "-m", "smallbms_bus.cli"]
BLOCK_B, SETTING_WORDS = 100, 12


def cli(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CMD, *args], capture_output=True, text=True, timeout=60, stdin=stdin)


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a failed command prints (exit 1, never a traceback)."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def read_line(process: subprocess.Popen[str], pattern: str, timeout: float) -> re.Match[str]:
    assert process.stdout is not None
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            line = process.stdout.readline()
            seen += line
            if match := re.search(pattern, line):
                return match
            if not line:
                break
    raise AssertionError(f"{pattern!r} not printed within {timeout} s (exit {process.poll()}): {seen}")


def ctrl_c_as_on_a_terminal() -> None:
    """Popen's preexec_fn: SIGINT back to its default, as a shell gives a foreground command. A background CI job
    (started with `&` by a non-interactive shell) ignores SIGINT and its children inherit that, so a Ctrl-C sent
    before the command installs its own handler would be lost and the test would wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        _, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, err or ""


def write_config(path: Path, channel: str, port: int, extra: str = "", web_port: int = 0) -> Path:
    path.write_text(f'[bus]\ninterface = "slcan"\nchannel = "{channel}"\n[bms]\ndiscovery_window = 1.0\n'
                    f'[store]\npath = "{path.parent / "state.db"}"\n[metrics]\nport = 0\n'
                    f'[web]\nhost = "127.0.0.1"\nport = {web_port}\n'
                    f'[modbus]\nhost = "127.0.0.1"\nport = {port}\n{extra}')
    return path


def wait_for_status(config: Path, until: Callable[[dict], bool], timeout: float) -> dict:
    deadline, result = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        result = cli("status", "--config", str(config), "--json")
        if result.returncode == 0:
            values = json.loads(result.stdout)
            if until(values):
                return values
        time.sleep(0.2)
    raise AssertionError(f"status never showed what the test waits for: {result}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Iterator[tuple[Path, int, str]]:
    """(config, Modbus port, what simulate --pty printed): the service on the simulator's pty wire, bank learned."""
    tmp = tmp_path_factory.mktemp("cli")
    simulator = subprocess.Popen([*CMD, "simulate", "--pty", "--bank", "2s1p-12v100", "--scenario", "steady"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 preexec_fn=ctrl_c_as_on_a_terminal)
    service = None
    try:
        channel = read_line(simulator, r"run this port: (\S+)", 60).group(1)
        printed = channel + "".join(simulator.stdout.readline() for _ in range(4))
        port = free_port()
        config = write_config(tmp / "smallbms-bus.toml", channel, port, web_port=free_port())
        service = subprocess.Popen([*CMD, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, text=True)
        wait_for_status(config, lambda v: v["state"] == 1 and v["batteries"] == 2, 60)
        yield config, port, printed
    finally:
        if service is not None:
            stop(service)
        stop(simulator)


@pytest.fixture
def modbus(rig) -> Iterator[ModbusTcpClient]:
    client = ModbusTcpClient("127.0.0.1", port=rig[1], timeout=5)
    assert client.connect()
    yield client
    client.close()


def settings_words(client: ModbusTcpClient) -> list[int]:
    return client.read_holding_registers(BLOCK_B, count=SETTING_WORDS, device_id=1).registers


def test_simulate_pty_then_run_on_the_printed_path_sees_the_batteries(rig):
    config, _, printed = rig
    assert 'interface = "slcan"' in printed and f'channel = "{printed.split()[0]}"' in printed
    result = cli("status", "--config", str(config), "--cells")
    assert result.returncode == 0, result.stderr
    batteries = re.findall(r"battery (\d+) +(HQ\w{12}) fresh .*string 1 position (\d)", result.stdout)
    assert [(b[0], b[2]) for b in batteries] == [("1", "1"), ("2", "2")]
    assert len(re.findall(r"\n    cells( \d\.\d{3}[v^ ]?){4}\n", result.stdout + "\n")) == 2, result.stdout


def test_simulate_pty_stops_cleanly_on_ctrl_c_and_removes_its_port(tmp_path):
    simulator = subprocess.Popen([*CMD, "simulate", "--pty", "--pty-dir", str(tmp_path / "wire")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=ctrl_c_as_on_a_terminal)
    path = Path(read_line(simulator, r"run this port: (\S+)", 60).group(1))
    assert path == tmp_path / "wire" / "bms" and os.readlink(path).startswith("/dev/pts/")
    code, err = stop(simulator)
    assert code == 0 and "Traceback" not in err, err
    assert not path.exists()


def test_settings_shows_every_setting_as_modbus_reads_it(rig, modbus):
    config = str(rig[0])
    rows = json.loads(cli("settings", "--config", config, "--json").stdout)
    words = settings_words(modbus)
    assert [r["name"] for r in rows] == list(SETTINGS) and len(rows) == len(SPECS)
    for row in rows:
        reg = SETTINGS[row["name"]].register
        assert row["value"] == pytest.approx(words[reg.address - BLOCK_B] * reg.scale), row
    table = cli("settings", "--config", config).stdout
    assert re.search(r"\ndischarge_floor +\d+\.\d % +10\.0 % +0\.0-99\.0 %\n", table), table
    assert re.search(r"\ncharged_voltage .* 28\.00 V +26\.00-29\.20 V \(13\.00-14\.60 V per 12\.8 V unit x 2\)",
                     table), table


def test_set_writes_engineering_units_read_back_over_modbus(rig, modbus):
    config = str(rig[0])
    result = cli("set", "discharge_floor", "15", "--config", config)
    assert result.returncode == 0 and result.stdout.startswith("discharge_floor = 15.0 % (was "), result
    assert modbus.read_holding_registers(104, count=1, device_id=1).registers == [150]
    result = cli("set", "charged_voltage", "28.2", "--config", config)
    assert result.returncode == 0 and "charged_voltage = 28.20 V" in result.stdout, result
    assert modbus.read_holding_registers(100, count=1, device_id=1).registers == [2820]


@pytest.mark.parametrize(("setup", "name", "value", "why"), [
    ([("discharge_floor", "15")], "low_soc_warning", "5", "low_soc_warning must be >= discharge_floor (15.0 %)"),
    ([("low_soc_warning", "20")], "discharge_floor", "25", "discharge_floor must be <= low_soc_warning (20.0 %)"),
    ([("absorption_voltage", "27.6")], "float_voltage", "27.6", "float_voltage must be < absorption_voltage (27.60 V)"),
    ([], "charged_voltage", "31", "allowed 26.00-29.20 V (13.00-14.60 V per 12.8 V unit x 2)"),
    ([], "tail_current", "0.2", "allowed 0.5-10.0 %"),
    ([], "dcl_zero_at_pre_alarm", "2", "allowed 0 off, 1 on"),
    ([], "absorption_time", "-5", "allowed 10-480 min"),
])
def test_a_refused_setting_says_why_and_changes_nothing(rig, modbus, setup, name, value, why):
    config = str(rig[0])
    for key, val in setup:
        assert cli("set", key, val, "--config", config).returncode == 0
    before = settings_words(modbus)
    line = refused(cli("set", name, value, "--config", config))
    assert line.startswith(f"set: {name} = {value}") and line.endswith(why), line
    assert settings_words(modbus) == before


def test_mode_set_soc_and_commands(rig, modbus):
    config = str(rig[0])
    assert cli("mode", "off", "--config", config).stdout.strip() == "mode off: state off (mode or remote)"
    assert modbus.read_holding_registers(1, count=1, device_id=1).registers == [2]
    assert cli("mode", "on", "--config", config).stdout.strip() == "mode on: state on"
    assert modbus.read_holding_registers(1, count=1, device_id=1).registers == [1]

    assert cli("set-soc", "80", "--config", config).returncode == 0
    assert abs(modbus.read_holding_registers(3, count=1, device_id=1).registers[0] - 800) <= 5
    assert refused(cli("set-soc", "150", "--config", config)) == "set-soc: 150 % refused: allowed 0-100 %"
    assert cli("command", "sync", "--config", config).returncode == 0
    assert modbus.read_holding_registers(3, count=1, device_id=1).registers == [1000]

    assert cli("set", "discharge_floor", "15", "--config", config).returncode == 0
    asked = cli("command", "reset-settings", "--config", config)  # no terminal to ask on: needs --yes
    assert asked.returncode == 2 and "--yes" in asked.stderr
    assert modbus.read_holding_registers(104, count=1, device_id=1).registers == [150]
    assert cli("command", "reset-settings", "--yes", "--config", config).returncode == 0
    assert settings_words(modbus)[:5] == [2800, 40, 3, 200, 100]  # SPECS defaults; charged voltage x 2 units


def test_a_destructive_command_asks_on_a_terminal(rig, modbus):
    config = str(rig[0])
    assert cli("set", "discharge_floor", "12", "--config", config).returncode == 0
    for answer, code, floor in ((b"n\n", 1, 120), (b"y\n", 0, 100)):
        master, slave = os.openpty()
        try:
            os.write(master, answer)
            result = cli("command", "reset-settings", "--config", config, stdin=slave)
        finally:
            os.close(master)
            os.close(slave)
        assert result.returncode == code, result
        assert modbus.read_holding_registers(104, count=1, device_id=1).registers == [floor]


def test_history_reads_block_d(rig, modbus):
    config = str(rig[0])
    values = json.loads(cli("history", "--config", config, "--json").stdout)
    words = modbus.read_holding_registers(200, count=22, device_id=1).registers
    assert values["charge_cycles"] == words[10] << 16 | words[11]
    assert values["min_cell_voltage"] == pytest.approx(words[18] * 0.001)
    text = cli("history", "--config", config).stdout
    assert re.search(r"\nmin cell voltage +3\.\d{3} V\n", text) and "charge cycles" in text, text


def test_status_json_and_watch_until_ctrl_c(rig, modbus):
    config = str(rig[0])
    values = json.loads(cli("status", "--config", config, "--json", "--cells").stdout)
    assert values["batteries"] == 2 and [b["node"] for b in values["per_battery"]] == [1, 2]
    assert all(len(b["cells"]) == 4 and all(3.0 < c < 3.5 for c in b["cells"]) for b in values["per_battery"])
    watch = subprocess.Popen([*CMD, "status", "--config", config, "--watch", "0.3"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                                 preexec_fn=ctrl_c_as_on_a_terminal)
    heartbeats = [int(read_line(watch, r"heartbeat (\d+)", 30).group(1))]
    while heartbeats[-1] == heartbeats[0] and len(heartbeats) < 200:  # +1 a second: fresh readouts, not one reprinted
        heartbeats.append(int(read_line(watch, r"heartbeat (\d+)", 30).group(1)))
    code, err = stop(watch)
    assert code == 0 and "Traceback" not in err, err
    assert heartbeats == sorted(heartbeats) and heartbeats[-1] > heartbeats[0]


def test_writes_from_a_host_not_allowed_are_refused_with_the_reason(tmp_path):
    """A service that takes writes only from another network: the CLI names allow_write_from, nothing changes."""
    config = write_config(tmp_path / "ro.toml", str(tmp_path / "no-adapter"), free_port(),
                          'allow_write_from = ["10.99.0.0/16"]\n')
    service = subprocess.Popen([*CMD, "run", "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_for_status(config, lambda v: True, 60)
        for args in (("set", "discharge_floor", "15"), ("mode", "off"), ("command", "sync")):
            line = refused(cli(*args, "--config", str(config)))
            assert "may not write" in line and "modbus.allow_write_from" in line and "exception 01" in line, line
        rows = json.loads(cli("settings", "--config", str(config), "--json").stdout)
        assert next(r for r in rows if r["name"] == "discharge_floor")["value"] == 10.0
        assert json.loads(cli("status", "--config", str(config), "--json").stdout)["state"] != 2  # mode still on
    finally:
        stop(service)  # type: ignore[arg-type]


@pytest.mark.parametrize("args", [("settings",), ("set", "discharge_floor", "15"), ("mode", "on"),
                                  ("command", "sync"), ("command", "relearn", "--yes"), ("set-soc", "50"),
                                  ("history",), ("status", "--watch", "1"), ("status", "--cells")])
def test_nothing_answers_one_line_exit_1(args):
    port = free_port()  # bound and released: nobody listens there
    line = refused(cli(*args, "--port", str(port)))
    assert f"127.0.0.1:{port}" in line and "connection refused" in line, line


@pytest.mark.parametrize(("args", "named"), [(("set", "discharge_flor", "15"), "discharge_flor"),
                                             (("set", "discharge_floor", "lots"), "lots"),
                                             (("mode", "maybe"), "maybe"), (("command", "explode"), "explode"),
                                             (("set-soc", "x"), "'x'"), (("status", "--watch", "0"), "--watch"),
                                             (("events", "--since", "yesterday"), "yesterday"),
                                             (("events", "-n", "0"), "-n 0"),
                                             (("events", "--url", "ftp://x"), "--url")])
def test_bad_arguments_exit_2(args, named):
    result = cli(*args, *(("--web-port", "1") if args[0] == "events" else ("--port", "1")))
    assert result.returncode == 2 and "Traceback" not in result.stderr and named in result.stderr, result.stderr


def test_set_help_lists_every_setting_with_unit_and_range():
    text = cli("set", "--help").stdout
    for setting in SETTINGS.values():
        spec = setting.spec
        assert re.search(rf"\n  {setting.name} +{spec.minimum:.{setting.digits}f}-{spec.maximum:.{setting.digits}f}"
                         if not spec.choices else rf"\n  {setting.name} +0 off, 1 on", text), setting.name
    assert "charged_voltage         13.00-14.60 V per 12.8 V unit in series" in text


def test_events_with_nothing_listening_or_not_the_api_is_one_line_exit_1(tmp_path):
    port = free_port()
    line = refused(cli("events", "--web-port", str(port)))
    assert line.startswith(f"events: no web API at http://127.0.0.1:{port} (connection refused"), line
    (tmp_path / "api" / "v1").mkdir(parents=True)
    (tmp_path / "api" / "v1" / "events").write_text("<html>not the API</html>")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while "not JSON" not in (result := cli("events", "--web-port", str(port))).stderr:
            assert time.monotonic() < deadline, result
            time.sleep(0.1)
        assert "the answer is not JSON" in refused(result)
        assert "HTTP 404" in refused(cli("events", "--url", f"http://127.0.0.1:{port}/nothing"))
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize(("words", "expected"), [
    ("smallbms-bus set dis", "discharge_floor"), ("smallbms-bus set-s", "set-soc"),
    ("smallbms-bus command reset-", "reset-history reset-settings"), ("smallbms-bus mode o", "on off"),
    ("smallbms-bus status --c", "--config --cells"), ("smallbms-bus events --s", "--since"),
])
def test_bash_completion_completes_commands_settings_and_options(words, expected):
    script = cli("completion", "bash").stdout
    words_list = words.split()
    probe = (f'{script}\nCOMP_WORDS=({" ".join(words_list)}); COMP_CWORD={len(words_list) - 1}; _smallbms_bus; '
             'echo "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.stdout.split() == expected.split(), result


def test_events_shows_what_the_cli_wrote_from_the_web_api(rig):
    config = str(rig[0])
    started = time.time()
    assert cli("set", "discharge_floor", "13", "--config", config).returncode == 0
    assert cli("set", "discharge_floor", "14", "--config", config).returncode == 0
    result = cli("events", "--config", config, "--since", f"{started - 1:.0f}")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "setting" in line and "by Modbus" in line]
    assert len(lines) >= 2 and "13" in lines[-2] and "14" in lines[-1], result.stdout  # oldest first
    newest = json.loads(cli("events", "--config", config, "-n", "1", "--json").stdout)["events"]
    assert len(newest) == 1 and newest[0]["time"] >= started - 1
    assert len(cli("events", "--config", config, "-n", "3").stdout.splitlines()) == 3
    later = cli("events", "--config", config, "--since", f"{time.time() + 3600:.0f}")
    assert later.returncode == 0 and later.stdout.strip() == "no events since then", later


def test_events_says_so_when_the_web_api_is_off(tmp_path):
    config = write_config(tmp_path / "off.toml", "/dev/null", free_port(), web_port=0)
    line = refused(cli("events", "--config", str(config)))
    assert "web.port = 0" in line and "serves no web API" in line, line
