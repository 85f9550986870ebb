"""The real ``attnguide ui`` (built-in model) in headless Chromium, driven through Selenium.

Uses Debian's chromium and chromedriver (``apt-get install chromium chromium-driver``); nothing
is downloaded. With ``ATTNGUIDE_SCREENSHOT=docs/ui.png`` the comparison page is saved there.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parents[2]

if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromedriver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install -y chromium chromium-driver", allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    script = Path(sys.executable).with_name("attnguide")
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from attnguide.cli import main; main()"]
    log = (tmp_path_factory.mktemp("ui") / "server.log").open("w+")
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([*command, "ui", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    yield process, url, log
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def _wait_until_serving(process, url: str, log, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            pytest.fail(f"attnguide ui exited with {process.returncode}:\n{log.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"attnguide ui did not answer at {url} within {timeout:.0f} s")


@pytest.fixture(scope="module")
def page(server):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1050", "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # starts while the model loads
    try:
        process, url, log = server
        _wait_until_serving(process, url, log)
        driver.get(url)
        _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#generate"), "the page to load")
        yield driver, server
    finally:
        driver.quit()


def _wait(driver, condition, what: str, timeout: float = 60.0):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        pytest.fail(f"timed out waiting for {what}; page text:\n{driver.find_element(By.TAG_NAME, 'body').text[:2000]}")


def _type(driver, selector: str, text: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.click()
    field.send_keys(Keys.CONTROL, "a")  # typing replaces the selection: the field is never empty (None)
    field.send_keys(text)
    field.send_keys(Keys.TAB)


def _choose_methods(driver, wanted: set[str]) -> None:
    for box in driver.find_elements(By.CSS_SELECTOR, "#methods input[type=checkbox]"):
        if box.is_selected() != (box.get_attribute("name") in wanted):
            box.click()


def _status(driver) -> str:
    return driver.find_element(By.CSS_SELECTOR, "#status").text


def _overlay_src(driver) -> str | None:
    images = driver.find_elements(By.CSS_SELECTOR, "#overlay img")
    return images[0].get_attribute("src") if images else None


def _save_screenshot(driver, target: str) -> None:
    from PIL import Image

    path = Path(target) if Path(target).is_absolute() else ROOT / target
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0); document.activeElement.blur();")
    time.sleep(0.5)
    driver.save_screenshot(str(path))
    image = Image.open(path).convert("RGB")
    image.save(path, optimize=True)
    if path.stat().st_size > 300_000:  # keep the README light: a 256-colour palette
        image.quantize(256).save(path, optimize=True)


def test_compare_two_methods_and_step_through_masks(page):
    driver, _ = page
    screenshot = os.environ.get("ATTNGUIDE_SCREENSHOT")
    _type(driver, "#prompt textarea", "a red circle to the left of a blue square")
    _choose_methods(driver, {"cfg", "scfg"})
    _type(driver, "#steps input", "12" if screenshot else "4")
    _type(driver, "#seeds input, #seeds textarea", "0, 1" if screenshot else "0")
    driver.find_element(By.CSS_SELECTOR, "#generate").click()

    _wait(driver, lambda d: _status(d).startswith("Done") or "Error" in _status(d), "the comparison")
    assert _status(driver).startswith("Done"), _status(driver)
    results = driver.find_element(By.CSS_SELECTOR, "#results")
    _wait(driver, lambda d: len(results.find_elements(By.TAG_NAME, "img")) >= (4 if screenshot else 2), "the result images")
    assert "cfg · seed 0" in results.text and "scfg · seed 0" in results.text, results.text
    summary = driver.find_element(By.CSS_SELECTOR, "#summary").text
    assert "U-Net evaluations" in summary and "scfg" in summary, summary
    _wait(driver, _overlay_src, "the S-CFG mask overlay")
    last = driver.find_element(By.CSS_SELECTOR, "#mask_step input[type=number]").get_attribute("value")
    assert last == ("11" if screenshot else "3")
    if screenshot:
        _save_screenshot(driver, screenshot)

    before = _overlay_src(driver)
    _type(driver, "#mask_step input[type=number]", "0")
    _wait(driver, lambda d: _overlay_src(d) not in (None, before), "the overlay of step 0")
    assert "Traceback" not in driver.page_source


def test_bad_input_shows_an_error_not_a_traceback(page):
    driver, (process, _, log) = page
    _type(driver, "#prompt textarea", "a green cross")
    _choose_methods(driver, {"cfg", "scfg"})
    _type(driver, "#steps input", "4")
    _type(driver, "#width input", "60")  # not a multiple of the model's factor (16)
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(driver, lambda d: "Error" in _status(d), "the size error")
    assert _status(driver).startswith("Error: width must be a positive multiple of 16"), _status(driver)

    _type(driver, "#width input", "64")
    _choose_methods(driver, set())
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    _wait(driver, lambda d: "at least one method" in _status(d), "the no-method error")
    assert _status(driver) == "Error: choose at least one method to compare"
    assert "Traceback" not in driver.page_source
    assert process.poll() is None
