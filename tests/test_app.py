"""The web page: `python -m helpers app` served on 127.0.0.1, driven by a real headless Chromium (Playwright with the
browser `conftest.find_browser` finds: Debian's chromium here, since `playwright install` cannot download browsers)
and by gradio_client."""

import io
import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import PIL.Image
import pytest
import torch
from loopback import free_port
from playwright.sync_api import sync_playwright
from reference import assert_same_pictures

from helpers.core.results import outputs_dir
from helpers.core.stages import generate
from helpers.serving.app import make_request

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 240  # importing gradio and diffusers and loading the toy on 2 busy cores
STEPS = 8  # fewer steps than the page's default, to keep the tests short


@dataclass
class Server:
    url: str
    network_log: Path  # what the server tried to reach beyond this machine (absent: nothing)


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`python -m helpers app` exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the app did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


# Loaded into the server process (through PYTHONPATH): every name look-up or connection that would leave this
# machine is refused and written down, so a test can say the server made none.
NETWORK_GUARD = """
import os, socket

LOG = os.environ["SD_NETWORK_LOG"]
open(LOG + ".guarded", "w").close()  # proof that the guard was loaded


def _local(host):
    return host in (None, "", "localhost", "0.0.0.0", "::1") or str(host).startswith("127.")


def _refuse(what):
    with open(LOG, "a") as log:
        log.write(what + "\\n")
    raise OSError(f"offline test: {what} refused")


_getaddrinfo = socket.getaddrinfo
_connect = socket.socket.connect


def getaddrinfo(host, *args, **kwargs):
    return _getaddrinfo(host, *args, **kwargs) if _local(host) else _refuse(f"look-up of {host}")


def connect(self, address):
    if isinstance(address, tuple) and not _local(address[0]):
        _refuse(f"connection to {address}")
    return _connect(self, address)


socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app, started as a user would, with the test process's thread count (so its images match ours)."""
    folder = tmp_path_factory.mktemp("app")
    port = free_port()
    (folder / "guard").mkdir()
    (folder / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    python_path = os.pathsep.join(filter(None, [str(folder / "guard"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(folder / "gradio"), "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": python_path, "SD_NETWORK_LOG": str(folder / "network.log")}
    log = folder / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "helpers", "app", "--port", str(port), "--model", "toy"],
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield Server(url, folder / "network.log")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def expected_pictures(pipe, prompt: str, seed: int, steps: int = STEPS) -> list:
    """What `generate` makes for one request: the reference the page's and the API's pictures are held to."""
    return generate(pipe, [prompt], seeds=[seed], num_inference_steps=steps).images


def read_pixels(source) -> np.ndarray:
    image = PIL.Image.open(source if not isinstance(source, bytes) else io.BytesIO(source))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_page_in_a_headless_browser(server, toy_pipe, browser_path):
    """Type a prompt, click Generate, see the image appear (the one generate() makes) and take a screenshot."""
    prompt, seed = "a large blue square on the right on a black background", 7
    requested = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("request", lambda request: requested.append(request.url))
        page.goto(server.url)
        page.locator("#prompt textarea").fill(prompt)
        for field, value in (("#steps", 20), ("#seed", seed)):
            number = page.locator(f"{field} input[type=number]")
            number.fill(str(value))
            number.press("Enter")
        page.locator("#generate").click()
        picture = page.locator("#output-image img")
        picture.wait_for(state="visible", timeout=180_000)
        page.wait_for_function("() => document.querySelector('#output-image img').naturalWidth > 0")
        page.locator("#info").get_by_text("denoise").first.wait_for(timeout=30_000)
        screenshot = outputs_dir() / "app_page.png"
        page.screenshot(path=str(screenshot), full_page=True)
        source = picture.get_attribute("src")
        info_text = page.locator("#info").inner_text()
        browser.close()

    assert screenshot.stat().st_size > 10_000
    with urllib.request.urlopen(source if source.startswith("http") else server.url.rstrip("/") + source) as response:
        shown = read_pixels(response.read())
    assert_same_pictures([shown], expected_pictures(toy_pipe, prompt, seed, steps=20), atol=1)
    for stage in ("encode_text", "denoise", "decode", "total"):
        assert stage in info_text
    hosts = {urlparse(url).hostname for url in requested if url.startswith("http")}
    assert hosts == {"127.0.0.1"}, f"the page reached out to {hosts - {'127.0.0.1'}}"


def test_concurrent_requests_each_get_their_own_image(server, toy_pipe):
    """Requests sent at once queue up; each answer is its own prompt's and seed's image, as generate() makes it."""
    from gradio_client import Client

    client = Client(server.url, verbose=False)
    asks = [("a large red circle on the left on a white background", 1),
            ("a large red circle on the left on a white background", 2),
            ("a small green triangle on the right on a gray background", 3)]

    def ask(prompt_seed):
        prompt, seed = prompt_seed
        return client.predict(prompt, "", STEPS, 7.5, seed, 64, 64, "toy", api_name="/generate")

    start = time.perf_counter()
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(ask, asks))
    wall = time.perf_counter() - start
    # served in turn: one after the other, the answers took at least their generation times added up (had they run
    # side by side, each one's time would span the others' and their sum would exceed the wall time)
    assert wall >= sum(info["timings"]["total"] for _, info in answers)

    images = [read_pixels(path) for path, _ in answers]
    for (prompt, seed), (_, info), image in zip(asks, answers, images):
        assert info["seed"] == seed and info["model"] == "toy"
        assert set(info["timings"]) >= {"encode_text", "denoise", "decode", "total"}
        assert_same_pictures([image], expected_pictures(toy_pipe, prompt, seed), atol=1)
    for i in range(len(images)):
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 5, "two requests got the same picture"


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": "  "}, "prompt is empty"),
    ({"width": 66}, "width=66 must be a multiple of 4"),
    ({"model": "nobody/no-such-model"}, "Cannot load MODEL='nobody/no-such-model': the hub is switched off"),
    # the form's sliders refuse values past their ends themselves (Gradio checks them before our code runs)
    ({"steps": 100_000}, "Value 100000 is greater than maximum value 150"),
    ({"height": 100_000}, "Value 100000 is greater than maximum value 256"),
    ({"guidance": -3}, "Value -3 is less than minimum value 1.0"),
])
def test_bad_input_is_answered_with_a_message(server, change, message):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    request = {"prompt": "a red circle", "negative": "", "steps": 2, "guidance": 7.5, "seed": 0, "height": 64,
               "width": 64, "model": "toy"} | change
    client = Client(server.url, verbose=False)
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(*request.values(), api_name="/generate")
    path, info = client.predict(*(request | {"prompt": "a red circle", "model": "toy", "steps": 2, "guidance": 7.5,
                                             "height": 64, "width": 64}).values(), api_name="/generate")
    assert info["seed"] == 0 and Path(path).exists(), "the server goes on serving after a bad request"


def test_form_fields_must_be_whole_numbers():
    with pytest.raises(ValueError, match="steps=3.5 must be a whole number"):
        make_request("a red circle", "", 3.5, 7.5, 0, 64, 64)
    with pytest.raises(ValueError, match="seed='x' must be a whole number"):
        make_request("a red circle", "", 3, 7.5, "x", 64, 64)
    assert make_request("a red circle", "", 3.0, 7, 5.0, 64, 64).seed == 5


def test_the_server_reached_nothing_beyond_this_machine(server):
    """Runs after the others (pytest keeps file order): starting, serving the page and every request above made no
    name look-up or connection outside 127.0.0.1 (no analytics, no version check, no hub, no share link)."""
    log = server.network_log
    assert Path(f"{log}.guarded").exists(), "the network guard was not loaded into the server"
    assert not log.exists(), f"the server tried to reach out: {log.read_text()}"
