"""[web] in the configuration: bad values exit 2 naming the key (as every section's), TLS with the same options
and checks as Modbus, and a page served over HTTPS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import sys

import aiohttp
import pytest

from smallbms_bus.config import ConfigError, parse_config
from tests.modbus.test_tls_and_fuzz import _openssl
from tests.ports import free_port
from tests.test_service import Running


@pytest.mark.parametrize(("text", "key", "allowed"), [
    ("[web]\nport = 70000", "web.port", "0..65535"),
    ('[web]\nport = "8080"', "web.port", "an integer"),
    ('[web]\npassword = "short"', "web.password", "8 to 256 printable characters"),
    (f'[web]\npassword = "{"x" * 257}"', "web.password", "8 to 256"),
    ("[web]\npassword = 12345678", "web.password", "8 to 256"),
    ('[web]\nallow_write_from = ["anyone"]', "web.allow_write_from", "IPv4/IPv6"),
    ('[web]\ntls_cert = "/etc/c.pem"', "web.tls_key", "both a certificate and its key"),
    ('[web]\ntls_key = "/etc/c.key"', "web.tls_cert", "both a certificate and its key"),
    ('[web]\nhots = "0.0.0.0"', "web.hots", "one of the keys of [web]"),
    ("[web]\nport = 9108", "web.port", "other than metrics.port (9108)"),
    ("[web]\nport = 5020\n[modbus]\nport = 5020", "web.port", "other than modbus.port"),
])
def test_bad_web_values_name_the_key(text, key, allowed):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "test.toml")
    assert info.value.key == key and allowed in info.value.allowed


def test_a_wrong_password_value_is_not_echoed(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_config('[web]\npassword = "secret!"', "test.toml")
    assert "secret!" not in str(info.value)


def test_check_config_exits_2_naming_a_web_key_and_its_tls_files(tmp_path):
    config = tmp_path / "c.toml"
    store = f'[store]\npath = "{tmp_path}/state.db"\n[outputs]\nbackend = "memory"\n'
    config.write_text(store + '[web]\npassword = "short"\n')
    result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "web.password" in result.stderr and "Traceback" not in result.stderr
    config.write_text(store + f'[web]\ntls_cert = "{tmp_path}/none.pem"\ntls_key = "{tmp_path}/none.key"\n')
    result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "check-config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "web.tls_cert" in result.stderr and "readable PEM file" in result.stderr


def test_the_page_and_api_over_https(tmp_path):
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "web.key", "-out", "web.pem", "-days", "2",
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", cwd=tmp_path)
    port = free_port()
    extra = (f'[web]\nhost = "127.0.0.1"\nport = {port}\ntls_cert = "{tmp_path}/web.pem"\n'
             f'tls_key = "{tmp_path}/web.key"\n')
    with Running(tmp_path, extra=extra) as run:
        run.wait_for(lambda: run.service.web is not None and run.service.web.bound, 10, "the page bound")

        async def get() -> tuple[int, dict, int, str]:
            context = ssl.create_default_context(cafile=str(tmp_path / "web.pem"))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
                async with session.get(f"https://127.0.0.1:{port}/") as page:
                    html = await page.text()
                async with session.get(f"https://127.0.0.1:{port}/api/v1/settings") as api:
                    return api.status, await api.json(), page.status, html

        status, body, page, html = asyncio.run(get())
        assert status == 200 and body["settings"][0]["name"] == "charged_voltage"
        assert page == 200 and "<title>smallbms-bus</title>" in html


def test_a_demo_whose_web_port_is_taken_runs_on_and_says_so():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "smallbms_bus.cli", "demo", "--web-port", str(port),
                                 "--modbus-port", "0", "--metrics-port", "0", "--duration", "2", "--every", "1"],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"web: cannot serve the page on 127.0.0.1:{port}" in result.stderr and "--web-port" in result.stderr
    assert "Traceback" not in result.stderr and "demo: stopped" in result.stdout
