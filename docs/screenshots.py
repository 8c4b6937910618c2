"""Take the commissioning page's screenshots shown in README.md (docs/web-*.png): a demo, Debian's headless
chromium driven by Selenium (as tests/web/test_browser.py does). Run from the repository's root:

    .venv/bin/python docs/screenshots.py

Needs `apt-get install chromium chromium-driver` and the test extra (selenium).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

DOCS = Path(__file__).resolve().parent
PASSWORD = "screenshots only"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.3)
    raise SystemExit(f"screenshots: {what} not within {timeout:g} s")


def browser(width: int, height: int) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(url: str, name: str, width: int, height: int, log_in: bool, anchor: str | None = None) -> None:
    driver = browser(width, height)
    try:
        driver.get(url)
        wait(lambda: driver.find_element(By.ID, "live").text == "live", "the live readout")
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".cell[data-battery]"), "the cells")
        if log_in:
            driver.find_element(By.ID, "login-password").send_keys(PASSWORD)
            driver.find_element(By.ID, "login-button").click()
            wait(lambda: driver.find_element(By.ID, "access-state").text.startswith("logged in"), "logged in")
        if anchor:
            driver.execute_script(f"document.getElementById('{anchor}').scrollIntoView()")
        time.sleep(1.0)  # one more stream update, so the picture is settled
        driver.save_screenshot(str(DOCS / name))
        print(f"screenshots: docs/{name}")
    finally:
        driver.quit()


def main() -> int:
    web, modbus = free_port(), free_port()
    url = f"http://127.0.0.1:{web}/"
    demo = subprocess.Popen([sys.executable, "-m", "smallbms_bus.cli", "demo", "--web-port", str(web),
                             "--web-password", PASSWORD, "--modbus-port", str(modbus), "--metrics-port", "0",
                             "--scenario", "discharge", "--soc", "72", "--every", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def ready() -> bool:
            with urllib.request.urlopen(url + "api/v1/status", timeout=5) as answer:
                status = json.load(answer)
            return status["started"] and status["soc"] is not None

        wait(ready, "the demo")
        shoot(url, "web-desktop.png", 1280, 1400, log_in=True)
        shoot(url, "web-phone.png", 390, 1500, log_in=False)
        shoot(url, "web-settings-phone.png", 390, 1500, log_in=True, anchor="settings")
    finally:
        demo.terminate()
        demo.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
