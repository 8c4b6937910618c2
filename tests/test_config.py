"""Configuration: every error names the key, the bad value and what is allowed; exit 2; the example is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from smallbms_bus.config import SCHEMA, ConfigError, defaults, load_config, parse_config
from tests.test_deploy import example_store_is_creatable

EXAMPLE = Path(__file__).resolve().parents[1] / "deploy" / "smallbms-bus.toml"


def test_the_annotated_example_parses_to_the_defaults_and_mentions_every_key():
    config = load_config(EXAMPLE)
    assert config.sections == defaults().sections
    text = EXAMPLE.read_text()
    for section, keys in SCHEMA.items():
        assert f"[{section}]" in text
        for key in keys:
            assert f"{key} =" in text or f"[{section}.{key}]" in text, f"{section}.{key} is not in the example"


def test_empty_file_is_all_defaults():
    config = parse_config("")
    assert config["bus"]["interface"] == "socketcan" and config["bms"]["comm_timeout"] == 5.0
    assert config.output_channels() == {"load_disconnect": 1, "charge_disconnect": 2, "pre_alarm": 3}


def test_values_are_normalised():
    config = parse_config('[modbus]\nallow_write_from = ["192.168.1.7", "10.0.0.0/8"]\n'
                          '[outputs]\nerror_led = 4\n[outputs.options]\nport = "/dev/ttyUSB0"\nunit = 3\n')
    assert config["modbus"]["allow_write_from"] == ("192.168.1.7/32", "10.0.0.0/8")
    assert config["outputs"]["options"] == {"port": "/dev/ttyUSB0", "unit": 3}
    assert config.output_channels()["error_led"] == 4


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("[bus]\nbitrate = 5", "bus.bitrate", "10000..1e+06"),
    ("[bus]\nbitrate = 500000.5", "bus.bitrate", "an integer"),
    ('[bus]\ninterface = ""', "bus.interface", "non-empty"),
    ("[bms]\ncomm_timeout = 0.5", "bms.comm_timeout", "1..60"),
    ("[bms]\ncomm_timeout = true", "bms.comm_timeout", "a number"),
    ("[modbus]\nport = 70000", "modbus.port", "0..65535"),
    ('[modbus]\nallow_write_from = ["everyone"]', "modbus.allow_write_from", "IPv4/IPv6"),
    ("[modbus]\nallow_write_from = 3", "modbus.allow_write_from", "a list of addresses"),
    ("[modbus]\ngx_unit = 1", "modbus.gx_unit", "other than modbus.unit"),
    ('[modbus]\ntls_cert = "/etc/c.pem"', "modbus.tls_key", "both a certificate and its key"),
    ('[outputs]\nbackend = "usb-magic"', "outputs.backend", "memory, modbus, lcus, gpiod"),
    ("[outputs]\npre_alarm = 1", "outputs.pre_alarm", "not already used by outputs.load_disconnect"),
    ("[outputs]\nload_disconnect = 0", "outputs.load_disconnect", "cannot protect the bank"),
    ("[outputs]\noptions = 3", "outputs.options", "a table"),
    ('[remote]\nsource = "gpio"', "remote.line", "the GPIO line"),
    ('[remote]\nsource = "gpio"\nline = -1', "remote.line", "a line offset"),
    ('[remote]\nsource = "gpio"\nline = 17\nbias = "up"', "remote.bias", "pull_up"),
    ('[remote]\nsource = "board"', "remote.channel", "the relay board's input"),
    ('[remote]\nsource = "board"\nchannel = 1\n[outputs]\nbackend = "lcus"', "remote.source", "no inputs"),
    ('[log]\nlevel = "chatty"', "log.level", "DEBUG, INFO"),
    ("[bus]\nbitrat = 500000", "bus.bitrat", "one of the keys of [bus]"),
    ("[canbus]\nchannel = 'can0'", "[canbus]", "one of the sections"),
    ("bus = 3", "bus", "a [bus] table"),
    ("[bus\n", "(file)", "valid TOML"),
])
def test_every_error_names_the_key_value_and_what_is_allowed(text, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    assert info.value.key == key and allowed in info.value.allowed
    assert str(info.value).startswith(f"test.toml: {key} = ")


def test_check_config_command_exits_2_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[bms]\ncomm_timeout = 90\n")
    result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "bms.comm_timeout = 90 is not allowed: a number in 1..60" in result.stderr
    good = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config", str(EXAMPLE)],
                          capture_output=True, text=True, timeout=60)
    if example_store_is_creatable():  # else: this user may not create /var/lib/smallbms-bus (tests/test_deploy.py)
        assert good.returncode == 0 and good.stdout.strip().endswith(": ok"), good.stderr
    missing = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config", str(tmp_path / "no.toml")],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "a readable file" in missing.stderr


def test_an_empty_allow_write_from_means_nobody_may_write_over_modbus():
    assert parse_config("[modbus]\nallow_write_from = []\n")["modbus"]["allow_write_from"] == ()


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("[modbus]\nmax_connections_per_address = 0", "modbus.max_connections_per_address", "an integer in 1..1000"),
    ("[modbus]\nmax_connections_per_address = 2.5", "modbus.max_connections_per_address", "an integer"),
    ("[modbus]\nfirst_request_timeout = 0.5", "modbus.first_request_timeout", "a number in 1..3600"),
    ("[metrics]\nmax_connections = 0", "metrics.max_connections", "an integer in 1..1000"),
    ("[metrics]\nmax_connections_per_address = 1001", "metrics.max_connections_per_address", "1..1000"),
    ('[metrics]\nfirst_request_timeout = "10"', "metrics.first_request_timeout", "a number in 1..3600"),
    ("[metrics]\nidle_timeout = 0", "metrics.idle_timeout", "a number in 1..86400"),
])
def test_connection_policy_keys_are_checked(text, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    assert info.value.key == key and allowed in info.value.allowed


def test_connection_policy_keys_reach_the_modbus_server_and_the_metrics_endpoint():
    from smallbms_bus.metrics import limits_of
    from smallbms_bus.modbus.server import ModbusOptions

    assert (defaults()["metrics"]["max_connections"], defaults()["metrics"]["max_connections_per_address"],
            defaults()["modbus"]["max_connections_per_address"], defaults()["modbus"]["first_request_timeout"]) \
        == (16, 4, 8, 10.0)
    config = parse_config("[modbus]\nmax_connections = 100\nmax_connections_per_address = 3\n"
                          "first_request_timeout = 2.5\nidle_timeout = 30\n"
                          "[metrics]\nmax_connections = 5\nmax_connections_per_address = 2\n"
                          "first_request_timeout = 4\nidle_timeout = 20.0\n")
    options = ModbusOptions.from_config(config["modbus"])
    assert (options.max_connections, options.max_connections_per_address, options.first_request_timeout,
            options.idle_timeout) == (100, 3, 2.5, 30)
    limits = limits_of(config["metrics"])
    assert (limits.max_connections, limits.max_connections_per_address, limits.first_request_timeout,
            limits.idle_timeout) == (5, 2, 4, 20.0)


def test_a_gpio_remote_input_beside_any_relay_board():
    config = parse_config('[outputs]\nbackend = "modbus"\n[outputs.options]\nport = "/dev/ttyUSB0"\n'
                          '[remote]\nsource = "gpio"\nline = "GPIO17"\nbias = "pull_up"\ninverted = true\n')
    remote = config["remote"]
    assert (remote["source"], remote["chip"], remote["line"], remote["bias"]) == ("gpio", "/dev/gpiochip0",
                                                                                 "GPIO17", "pull_up")


# -- issue 12, item 9: check-config and run refuse the same configs, exit 2 naming the key, no traceback ------------

def _base(tmp_path: Path, extra: str = "") -> str:
    """A config `run` accepts on any machine (virtual bus, memory board, no listeners), plus `extra`."""
    return (f'[bus]\ninterface = "virtual"\nchannel = "cfg-{tmp_path.name}"\n[modbus]\nport = 0\n'
            f'[metrics]\nport = 0\n[store]\npath = "{tmp_path}/state.db"\n{extra}')


def _both(tmp_path: Path, content: str | bytes) -> list[subprocess.CompletedProcess[str]]:
    """check-config and run on the same file; run is expected to refuse before it opens anything."""
    path = tmp_path / "smallbms-bus.toml"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return [subprocess.run([sys.executable, "-m", "smallbms_bus.cli", *command, str(path)], capture_output=True,
                           text=True, timeout=60) for command in (["check-config"], ["run", "--config"])]


def _refused_naming(results: list[subprocess.CompletedProcess[str]], *names: str) -> None:
    for result in results:
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and all(name in lines[0] for name in names), result.stderr
    check, run = (r.stderr.strip() for r in results)
    assert check.removeprefix("check-config: ") == run.removeprefix("run: ")  # the same validation, word for word


def test_a_non_utf8_config_exits_2_naming_the_file_line_and_byte(tmp_path):
    content = _base(tmp_path).encode() + b'[log]\nlevel = "INFO" # caf\xe9\n'
    results = _both(tmp_path, content)
    _refused_naming(results, "smallbms-bus.toml", "UTF-8", "line 11", "0xe9")
    assert not (tmp_path / "state.db").exists()


@pytest.mark.parametrize(("options", "key"), [
    ("stuck = 3", "outputs.options.stuck"),  # was a TypeError from set(3): exit 1 with a traceback
    ('channels = "8"', "outputs.options.channels"),
    ("fail_open = 1", "outputs.options.fail_open"),
    ("[outputs.options.inputs]\nn = 8", "outputs.options.inputs"),
])
def test_relay_board_options_of_the_wrong_type_exit_2_naming_the_option(tmp_path, options, key):
    results = _both(tmp_path, _base(tmp_path, f'[outputs]\nbackend = "memory"\n[outputs.options]\n{options}\n'))
    _refused_naming(results, key)
    assert not (tmp_path / "state.db").exists()


def test_check_config_refuses_a_relay_board_without_its_required_option_as_run_does(tmp_path):
    results = _both(tmp_path, _base(tmp_path, '[outputs]\nbackend = "lcus"\n'))
    _refused_naming(results, "outputs.options.port", "/dev/ttyUSB0")


def test_check_config_refuses_a_store_path_that_is_a_directory_as_run_does(tmp_path):
    (tmp_path / "state.db").mkdir()
    results = _both(tmp_path, _base(tmp_path))
    _refused_naming(results, "store.path", "a directory")
