"""The commissioning page in a real browser (issue 16 item 5): Debian's chromium, headless, driven by Selenium
through Debian's chromium-driver, against `smallbms-bus demo` as an installer starts it. What the page shows
and does is checked against the service's Modbus registers (pymodbus), an independent way in."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from tests.ports import free_port
from tests.web.rig import PASSWORD

CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not CHROMEDRIVER.exists() or shutil.which("chromium") is None,
                                reason="Debian's chromium and chromium-driver are not installed (tests/run installs "
                                       "them as root: apt-get install chromium chromium-driver)")
SOC, FLOOR, MODE, OUTPUTS = 3, 104, 105, 19  # native map registers (docs/registers.md)
WAIT_S = 30.0


class Demo:
    def __init__(self, tmp: Path) -> None:
        self.web_port, self.modbus_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.web_port}"
        self.log = (tmp / "demo.log").open("w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smallbms_bus.cli", "demo", "--web-port", str(self.web_port), "--web-password",
             PASSWORD, "--modbus-port", str(self.modbus_port), "--metrics-port", "0", "--soc", "60", "--every",
             "1000", "--duration", "900"], stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def status(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/v1/status", timeout=5) as answer:
            return json.load(answer)

    def register(self, address: int) -> int:
        client = ModbusTcpClient("127.0.0.1", port=self.modbus_port, timeout=5, retries=0)
        assert client.connect()
        try:
            return client.read_holding_registers(address, count=1, device_id=1).registers[0]
        finally:
            client.close()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


def until(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except Exception as error:  # not up yet, an element not rendered yet
            last = error
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout} s (last: {last!r})")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = Demo(tmp_path_factory.mktemp("web-demo"))
    try:
        until(lambda: d.status()["started"] and d.status()["soc"] is not None, "the demo's bank learned, SoC set", 60)
        yield d
    finally:
        d.stop()


def browser(width: int = 1280, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture
def page(demo):
    driver = browser()
    try:
        driver.get(demo.url + "/")
        yield driver
    finally:
        driver.quit()


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def log_in(driver) -> None:
    until(lambda: by_id(driver, "login-password").is_displayed(), "the login field")
    by_id(driver, "login-password").send_keys(PASSWORD)
    by_id(driver, "login-button").click()
    until(lambda: by_id(driver, "access-state").text.startswith("logged in"), "logged in")


def test_the_page_shows_the_demos_soc_and_every_cell(demo, page):
    soc = demo.register(SOC) / 10  # what the service says over Modbus
    until(lambda: by_id(page, "soc").text not in ("--", ""), "the live SoC")
    shown = float(by_id(page, "soc").text.removesuffix(" %"))
    assert abs(shown - soc) <= 0.5, (shown, soc)
    # read in one go: the grid is redrawn with every stream update (twice a second)
    script = ("return [...document.querySelectorAll('.cell[data-battery]')].map(c => [c.dataset.battery, "
              "c.dataset.cell, c.textContent, c.className])")
    cells = until(lambda: page.execute_script(script), "the cell grid")
    assert len(cells) == 16  # the demo's 2s2p-12v100 bank: 4 batteries x 4 cells
    status = demo.status()
    expected = {(str(b["node"]), str(i + 1)): v for b in status["batteries"] for i, v in enumerate(b["cells"])}
    for battery, cell, shown_text, classes in cells:
        assert abs(float(shown_text) - expected[battery, cell]) < 0.05
        assert "ok" in classes.split()  # a healthy demo cell is coloured normal
    assert by_id(page, "live").text == "live"


def test_without_the_password_the_page_is_read_only(demo, page):
    until(lambda: "read-only" in by_id(page, "access-state").text, "read-only state")
    until(lambda: page.find_elements("css selector", "#save-discharge_floor"), "the settings")
    assert "read-only" in page.find_element("tag name", "body").get_attribute("class").split()
    for control in ("mode-off", "mode-on", "save-discharge_floor", "setting-discharge_floor", "soc-button"):
        assert not by_id(page, control).is_displayed(), control
    assert by_id(page, "login-password").is_displayed()
    assert by_id(page, "value-discharge_floor").text.endswith("%")  # the values are still shown


def test_a_setting_changed_in_the_page_reads_back_over_modbus_and_a_bad_one_changes_nothing(demo, page):
    log_in(page)
    field = until(lambda: by_id(page, "setting-discharge_floor"), "the discharge floor field")
    field.clear()
    field.send_keys("12.5")
    by_id(page, "save-discharge_floor").click()
    until(lambda: by_id(page, "error-discharge_floor").text == "saved", "saved")
    assert demo.register(FLOOR) == 125  # scale 0.1
    field = by_id(page, "setting-discharge_floor")
    field.clear()
    field.send_keys("150")
    by_id(page, "save-discharge_floor").click()
    message = until(lambda: by_id(page, "error-discharge_floor").text, "the inline error")
    assert message == "discharge_floor = 150 is not allowed: 0..99 %"
    assert demo.register(FLOOR) == 125  # nothing changed
    assert by_id(page, "value-discharge_floor").text == "12.5 %"


def test_mode_off_in_the_page_opens_the_relays(demo, page):
    assert demo.register(OUTPUTS) & 0b11 == 0b11  # load and charge closed
    log_in(page)
    by_id(page, "mode-off").click()
    page.switch_to.alert.accept()  # the confirmation
    until(lambda: demo.register(MODE) == 0, "mode off over Modbus")
    until(lambda: demo.register(OUTPUTS) & 0b11 == 0, "load and charge relays open")
    until(lambda: by_id(page, "out-load").text == "load off", "the page shows the load off")
    by_id(page, "mode-on").click()
    page.switch_to.alert.accept()
    until(lambda: demo.register(OUTPUTS) & 0b11 == 0b11, "relays closed again")
