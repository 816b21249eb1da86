"""The web page at / in a real browser: Debian's Chromium, driven by Selenium, against the real server."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
API_KEY = "test-key"
STEPS = 4
# The page's progress bar as (value, max) each time the page sets it, recorded from the page's own DOM.
RECORD_PROGRESS = """
window.progressSeen = [];
const bar = document.getElementById("progress");
new MutationObserver(() => window.progressSeen.push([bar.value, bar.max]))
    .observe(bar, {attributes: true, attributeFilter: ["value", "max"]});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(pipeline_dir_512, tmp_path_factory):
    """`pixart serve` on a loopback port with the tiny 512 model and an API key; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pixart", "serve", "--model", str(pipeline_dir_512), "--port", str(port),
             "--dtype", "fp32", "--device", "cpu", "--api-key", API_KEY],
            stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pixart serve exited with {proc.returncode}:\n{log_path.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pixart serve not healthy after 60 s:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium with explicit binary and driver paths (runs as root, so no sandbox)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found: install Debian's Chromium with "
                    "`apt-get install -y chromium chromium-driver` (.ci/run does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_script_timeout(10)
    yield driver
    driver.quit()


def save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """A PNG of the page under tmp_path, copied to $PIXART_ARTIFACTS when set."""
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), f"screenshot {name} failed"
    if os.environ.get("PIXART_ARTIFACTS"):
        target = Path(os.environ["PIXART_ARTIFACTS"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def server_job_count(url: str) -> int:
    """Jobs waiting or running, from the server's AUTOMATIC1111 progress route."""
    request = urllib.request.Request(url + "/sdapi/v1/progress", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(request, timeout=5) as res:
        return json.load(res)["state"]["job_count"]


def wait_for(driver, condition, timeout: float = 30, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition, message)


def test_page_generates_after_401_key_with_moving_progress_and_shows_image_with_seed(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = browser
    d.get(server + "/")
    wait_for(d, lambda d: len(Select(d.find_element(By.ID, "size")).options) > 0, 20, "sizes never loaded")
    # the smallest non-square preset: width and height must not be swapped on the way
    presets = [tuple(map(int, o.get_attribute("value").split("x")))
               for o in Select(d.find_element(By.ID, "size")).options]
    width, height = min((p for p in presets if p[0] != p[1]), key=lambda p: p[0] * p[1])
    Select(d.find_element(By.ID, "size")).select_by_value(f"{width}x{height}")
    d.find_element(By.ID, "prompt").send_keys("a red fox in the snow, watercolor")
    steps = d.find_element(By.ID, "steps")
    steps.clear()
    steps.send_keys(str(STEPS))
    seed_field = d.find_element(By.ID, "seed")
    d.find_element(By.ID, "dice").click()
    seed = seed_field.get_attribute("value")
    assert seed.isdigit(), f"the dice gave {seed!r}"

    # without the key the server answers 401: the page says so and the key field is there to fill
    error = d.find_element(By.ID, "error")
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "needs an API key" in error.text, 10, "no 401 message in the page")
    key = d.find_element(By.ID, "api-key")
    assert key.is_displayed()
    # a wrong key: the page says the server rejected it, and typing replaces it
    key.send_keys("wrong-key", Keys.TAB)
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "rejected this API key" in error.text, 10, f"a wrong key got {error.text!r}")
    assert d.switch_to.active_element == key and key.is_displayed()
    key.send_keys(API_KEY, Keys.TAB)  # `change` stores it in localStorage
    assert d.execute_script("return localStorage.getItem('pixart.apiKey')") == API_KEY

    d.execute_script(RECORD_PROGRESS)
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: d.find_element(By.ID, "cancel").is_enabled(), 5, "Cancel not enabled while running")
    img = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"), 45, "no image appeared")[0]

    seen = d.execute_script("return window.progressSeen")
    values = [v for v, _ in seen]
    print("progress bar (value, max) seen:", seen)
    assert values == sorted(values), f"the progress bar went backwards: {seen}"
    assert any(0 < v < STEPS for v, m in seen if m == STEPS), f"no intermediate progress: {seen}"
    assert seen[-1] == [STEPS, STEPS], f"the bar did not end full: {seen}"
    assert not d.find_element(By.ID, "cancel").is_enabled()

    src = img.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).size == (width, height)
    caption = d.find_element(By.CSS_SELECTOR, "#gallery figcaption").text
    assert f"seed {seed}" in caption and f"{width}×{height}" in caption and f"{STEPS} steps" in caption
    assert "a red fox in the snow" in caption
    link = d.find_element(By.LINK_TEXT, "Download")
    assert link.get_attribute("href") == src and link.get_attribute("download") == f"pixart-{seed}.png"
    save_screenshot(d, tmp_path, "webpage-desktop.png")

    # "reuse these settings" puts the image's settings back into the form
    d.find_element(By.ID, "prompt").clear()
    seed_field.clear()
    d.find_element(By.XPATH, "//button[text()='Reuse these settings']").click()
    assert d.find_element(By.ID, "prompt").get_attribute("value") == "a red fox in the snow, watercolor"
    assert seed_field.get_attribute("value") == seed
    assert Select(d.find_element(By.ID, "size")).first_selected_option.get_attribute("value") == f"{width}x{height}"

    # Cancel while running: the page stops listening and the server drops the job
    steps.clear()
    steps.send_keys("100")
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: d.execute_script("return document.getElementById('progress').value") >= 1, 20,
             "the long job never started")
    d.find_element(By.ID, "cancel").click()
    assert d.find_element(By.ID, "status").text == "Cancelled."
    assert d.find_element(By.ID, "generate").is_enabled()
    wait_for(d, lambda d: server_job_count(server) == 0, 10, "the server still runs the cancelled job")
    assert len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 1

    # a full queue: the page relays the server's Retry-After
    d.execute_script("""
        const real = window.fetch;
        window.fetch = (url, init) => url === "/api/jobs"
            ? Promise.resolve(new Response('{"error": {"message": "queue full"}}',
                                           {status: 429, headers: {"Retry-After": "7"}}))
            : real(url, init);
    """)
    d.find_element(By.ID, "generate").click()
    wait_for(d, lambda d: "retry in 7 s" in d.find_element(By.ID, "error").text, 5, "no 429 message in the page")
    assert d.find_element(By.ID, "generate").is_enabled()

    # phone width: nothing wider than the screen
    d.set_window_size(390, 844)
    wait_for(d, lambda d: d.execute_script("return window.innerWidth") <= 400, 5, "window did not shrink")
    overflow = d.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert overflow[0] <= overflow[1], f"horizontal overflow at phone width (scrollWidth, innerWidth) = {overflow}"
    d.execute_script("document.querySelector('#gallery figure').scrollIntoView()")
    save_screenshot(d, tmp_path, "webpage-phone.png")


def test_page_opened_while_the_model_loads_waits_for_it_then_generates(pipeline_dir_512, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    from test_serve import running  # in-process: the model's load waits for the test

    from pixart import PixArtAlphaPipeline
    from pixart.serve.app import create_app

    pipe = PixArtAlphaPipeline.from_pretrained(pipeline_dir_512)
    loaded = threading.Event()

    def load():
        assert loaded.wait(60)
        return pipe

    with running(create_app(load, model_name="tiny-512")) as (url, _):
        d = browser
        d.get(url + "/")
        status, generate = d.find_element(By.ID, "status"), d.find_element(By.ID, "generate")
        wait_for(d, lambda d: "still loading" in status.text, 10, "the page does not say the model is loading")
        assert not generate.is_enabled(), "Generate is enabled without the sizes"
        assert not Select(d.find_element(By.ID, "size")).options
        loaded.set()
        # /api/config answers 503 with Retry-After: 5 while loading: the page asks again then
        wait_for(d, lambda d: generate.is_enabled(), 20, f"the page never got the config: {status.text!r}")
        assert d.find_element(By.ID, "model").text == "tiny-512"
        assert d.find_element(By.ID, "error").text == "" and status.text == ""
        sizes = Select(d.find_element(By.ID, "size"))
        width, height = min((tuple(map(int, o.get_attribute("value").split("x"))) for o in sizes.options),
                            key=lambda p: p[0] * p[1])
        sizes.select_by_value(f"{width}x{height}")
        d.find_element(By.ID, "prompt").send_keys("a red fox")
        steps = d.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("1")
        generate.click()
        img = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery figure img"), 45,
                       f"no image: {d.find_element(By.ID, 'error').text!r}")[0]
        png = base64.b64decode(img.get_attribute("src").split(",", 1)[1])
        assert Image.open(io.BytesIO(png)).size == (width, height)
