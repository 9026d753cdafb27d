"""The playground page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
load it, run a prompt, wait for both canvases, check their text against the API, save a screenshot."""

from __future__ import annotations

import os
import shutil

import pytest

from .conftest import ROOT
from .test_serve_api import post

webdriver = pytest.importorskip("selenium.webdriver")
SCREENSHOT = ROOT / "results" / "serve_playground.png"


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("ADJUST_REQUIRE_BROWSER"):  # CI (.ci/run) installs them: a missing one is a failure
            pytest.fail("chromium / chromedriver not found but ADJUST_REQUIRE_BROWSER is set")
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,900"):
        opts.add_argument(a)
    b = webdriver.Chrome(service=Service(driver), options=opts)
    yield b
    b.quit()


def test_playground_runs_parallel_and_adjust_side_by_side(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(lambda b: len(Select(b.find_element(By.ID, "strategy-right")).options) > 0)
    assert Select(browser.find_element(By.ID, "strategy-left")).first_selected_option.text == "parallel"
    assert Select(browser.find_element(By.ID, "strategy-right")).first_selected_option.text == "adjust"
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("JULIET:")
    for field, value in (("max-tokens", "24"), ("seed", "3"), ("delay", "20")):
        el = browser.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("4")
    browser.find_element(By.ID, "run").click()
    wait.until(lambda b: all(b.find_element(By.ID, f"panel-{s}").get_attribute("data-state") in ("done", "error")
                             for s in ("left", "right")))
    for side, strategy in (("left", "parallel"), ("right", "adjust")):
        assert browser.find_element(By.ID, f"panel-{side}").get_attribute("data-state") == "done"
        shown = browser.find_element(By.ID, f"text-{side}").get_attribute("textContent")
        status, api = post(server.url + "/v1/completions", {"prompt": "JULIET:", "max_tokens": 24, "seed": 3,
                                                            "strategy": strategy, "tokens_per_pass": 4})
        assert status == 200 and shown == api["choices"][0]["text"]
        cells = browser.find_elements(By.CSS_SELECTOR, f"#canvas-{side} .cell")
        assert len(cells) == 24 and all("filled" in c.get_attribute("class") for c in cells)
        stats = browser.find_element(By.ID, f"stats-{side}").text
        assert stats.startswith("6 full passes")  # 24 tokens, K = 4
    SCREENSHOT.parent.mkdir(exist_ok=True)
    tmp = SCREENSHOT.with_suffix(".tmp.png")
    assert browser.save_screenshot(str(tmp))
    os.replace(tmp, SCREENSHOT)
