"""The widget panel in a real frontend: JupyterLab served headless on 127.0.0.1 (offline: no news, no update check,
no extension manager, the network guard of test_app.py in the server and its kernels), notebook 02 opened in a real
headless Chromium (Playwright), Run All from the menu, a slider of the `GenerationPanel` moved, Generate clicked, and
a new image with the stage timings seen in the page. A screenshot is kept in outputs/panel_jupyterlab.png.

Notebook 02 runs in a temporary copy of notebooks/ whose parameters cell is edited to small sizes (SMALL_KNOBS: 4
steps, a 1×2 grid, 2 oracle samples): the panel is the point here, not the notebook's findings (the smoke runs check
those), and the toy at the notebook's own sizes takes minutes on 2 busy cores."""

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import Page, expect, sync_playwright
from test_app import CHROMIUM_FLAGS, NETWORK_GUARD, free_port

from helpers.core.results import outputs_dir

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK = "02_three_stages.ipynb"
SMALL_KNOBS = {"STEPS": 4, "CALLBACK_EVERY": 2, "GRID_STEPS": [2], "GRID_GUIDANCE": [1.0, 7.5], "ORACLE_SAMPLES": 2}
SLIDER_STEPS = 6  # the steps slider is moved from SMALL_KNOBS["STEPS"] to this
START_TIMEOUT_S = 180  # the server imports jupyterlab and its extensions on 2 busy cores
RUN_TIMEOUT_S = 420  # kernel start (torch, diffusers), the toy's load and every cell of 02 at SMALL_KNOBS
GENERATE_TIMEOUT_S = 180
STAGES = ("encode_text", "denoise", "decode")
# Lab settings for an offline, deterministic page: no news or update check; every cell attached to the DOM (the
# default windowing leaves cells out of view unrendered, which the locators below would wait on)
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def small_notebook_copy(folder: Path) -> Path:
    """notebooks/ copied into `folder`, with 02's parameters cell set to SMALL_KNOBS (each line must exist)."""
    target = folder / "notebooks"
    shutil.copytree(NOTEBOOKS_DIR, target)
    path = target / NOTEBOOK
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    for knob, value in SMALL_KNOBS.items():
        cell.source, count = re.subn(rf"^{knob} = [^#\n]*", f"{knob} = {value!r}  ", cell.source, flags=re.M)
        assert count == 1, f"{NOTEBOOK}'s parameters cell has no line `{knob} = ...`: update SMALL_KNOBS"
    nbformat.write(notebook, path)
    return target


def is_local(link: str, url: str) -> bool:
    return link.startswith((url, "blob:", "data:"))


def start_lab(folder: Path, root: Path, port: int, token: str) -> tuple[subprocess.Popen, Path]:
    """JupyterLab on 127.0.0.1:port serving `root`, its config, data, runtime and settings under `folder`."""
    for name, values in LAB_SETTINGS.items():
        settings = folder / "lab" / "user-settings" / name
        settings.parent.mkdir(parents=True, exist_ok=True)
        settings.write_text(json.dumps(values))
    (folder / "guard").mkdir()
    (folder / "guard" / "sitecustomize.py").write_text(NETWORK_GUARD)
    python_path = os.pathsep.join(filter(None, [str(folder / "guard"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path,
           "SD_NETWORK_LOG": str(folder / "network.log"), "SD_OUTPUTS": str(folder / "outputs"),
           "JUPYTER_CONFIG_DIR": str(folder / "config"), "JUPYTER_DATA_DIR": str(folder / "data"),
           "JUPYTER_RUNTIME_DIR": str(folder / "runtime"), "IPYTHONDIR": str(folder / "ipython")}
    env.pop("SD_HEADLESS", None)  # the panel must see the frontend it is in
    command = [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
               "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
               f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True", "--LabApp.news_url=None",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", f"--LabApp.user_settings_dir={folder / 'lab' / 'user-settings'}",
               f"--LabApp.workspaces_dir={folder / 'lab' / 'workspaces'}"]
    log = folder / "server.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root)
    return process, log


def wait_until_serving(url: str, token: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}api/status?token={token}", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"JupyterLab did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """The server, then its kernels (they are its children; a terminated server shuts them down)."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


def error_outputs(page: Page) -> list[str]:
    return page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
                        ).filter(has_text="Traceback").all_inner_texts() + page.locator(
        '.jp-RenderedText[data-mime-type="application/vnd.jupyter.error"]').all_inner_texts()


def code_cells(path: Path) -> int:
    return sum(cell.cell_type == "code" for cell in nbformat.read(path, as_version=4).cells)


def open_notebook(page: Page, link: str, cells: int) -> None:
    """Open the notebook; wait until all its code cells are drawn and its kernel is started and idle (the status bar
    says "Python 3 (ipykernel) | Idle"; before that it says "No Kernel | Initializing" and a click runs nothing)."""
    page.goto(link, timeout=START_TIMEOUT_S * 1000)
    page.locator(".jp-StatusBar-Widget").get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(
        timeout=START_TIMEOUT_S * 1000)
    page.wait_for_function("n => document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').length === n",
                           arg=cells, timeout=START_TIMEOUT_S * 1000)


def run_all_cells(page: Page) -> None:
    """Run → Run All Cells, as a user would, then wait until every code cell has run (its prompt a number)."""
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    prompts = page.locator(".jp-CodeCell .jp-InputArea-prompt")
    start = time.monotonic()
    while time.monotonic() < start + RUN_TIMEOUT_S:
        errors = error_outputs(page)
        if errors:
            pytest.fail(f"{NOTEBOOK} failed in JupyterLab:\n{errors[0][-3000:]}")
        texts = [text.strip() for text in prompts.all_inner_texts()]
        if texts and all(re.fullmatch(r"\[\d+\]:", text) for text in texts):
            return
        if time.monotonic() > start + 60 and all(text == "[ ]:" for text in texts):
            pytest.fail("Run → Run All Cells queued no cell within 60 s")
        time.sleep(2)
    pytest.fail(f"{NOTEBOOK} did not finish within {RUN_TIMEOUT_S} s; prompts: {prompts.all_inner_texts()}")


def result_image(panel):
    """The panel's result picture: the <img> in the box titled "seed N" (previews are titled "step k")."""
    boxes = panel.locator(".widget-vbox:has(> .widget-html small)")
    return boxes.filter(has_text=re.compile(r"^\s*seed \d+\s*$")).locator("img").first


def image_digest(image) -> str:
    """The SHA-256 of the bytes the <img> shows (ipywidgets serves them as a blob: URL)."""
    data = image.evaluate("async img => Array.from(new Uint8Array(await (await fetch(img.src)).arrayBuffer()))")
    return hashlib.sha256(bytes(data)).hexdigest()


def generate_and_wait(panel, previous_src: str | None) -> str:
    """Click Generate; wait for a result image with a new src (each result is a new <img>) and the button enabled
    again; the image's src."""
    button = panel.locator("button.widget-button", has_text="Generate")
    button.click()
    image = result_image(panel)
    expect(image).to_be_visible(timeout=GENERATE_TIMEOUT_S * 1000)
    if previous_src is not None:
        expect(image).not_to_have_attribute("src", previous_src, timeout=GENERATE_TIMEOUT_S * 1000)
    expect(button).to_be_enabled(timeout=GENERATE_TIMEOUT_S * 1000)
    return image.get_attribute("src")


def test_panel_in_jupyterlab(tmp_path, browser_path):
    root = small_notebook_copy(tmp_path)
    port, token = free_port(), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}/"
    process, log = start_lab(tmp_path, root, port, token)
    requested: list[str] = []
    try:
        wait_until_serving(url, token, process, log)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1300})
            try:
                page.on("request", lambda request: requested.append(request.url))
                page.route(lambda link: not is_local(link, url), lambda route: route.abort())  # offline: say so now
                open_notebook(page, f"{url}lab/tree/{NOTEBOOK}?token={token}", code_cells(root / NOTEBOOK))
                run_all_cells(page)

                generate = page.locator("button.widget-button", has_text="Generate")
                assert generate.count() == 1, "the GenerationPanel was not drawn (one Generate button expected)"
                panel = page.locator(".jp-OutputArea-output").filter(has=generate)
                first_src = generate_and_wait(panel, None)
                first = image_digest(result_image(panel))

                steps = panel.locator(".widget-slider").filter(has=page.locator("label", has_text="steps"))
                handle = steps.locator(".noUi-handle")
                handle.focus()
                for _ in range(SLIDER_STEPS - SMALL_KNOBS["STEPS"]):
                    handle.press("ArrowRight")
                assert steps.locator(".widget-readout").inner_text().strip() == str(SLIDER_STEPS)

                generate_and_wait(panel, first_src)
                second = image_digest(result_image(panel))
                assert second != first, "the image did not change after moving the steps slider and generating"
                # the kernel ran the slider's value: the progress bar counted that many steps
                expect(panel.get_by_text(f"{SLIDER_STEPS}/{SLIDER_STEPS}", exact=True)).to_be_visible()
                status = panel.locator(".widget-html-content").filter(has_text="image(s)").inner_text()
                assert "1 image(s)" in status, status
                timings = panel.locator(".widget-html-content table").inner_text()
                for stage in STAGES:
                    assert re.search(rf"{stage}\s+\d+\.\d+ s", timings), f"no {stage} time in the panel: {timings}"

                cell = page.locator(".jp-CodeCell").filter(has=panel)  # the screenshot: its code, then the panel
                cell.evaluate("element => element.scrollIntoView({block: 'start'})")
                page.screenshot(path=outputs_dir() / "panel_jupyterlab.png")
            except BaseException:
                page.screenshot(path=outputs_dir() / "panel_jupyterlab_failed.png")  # what the page showed
                raise
            finally:
                browser.close()
    finally:
        stop(process)
    # The notebook's own badges (Open in Colab / Kaggle images in its title cell) are the only links out allowed
    markdown = "\n".join(cell.source for cell in nbformat.read(root / NOTEBOOK, as_version=4).cells
                         if cell.cell_type == "markdown")
    outside = [link for link in requested if not is_local(link, url) and link not in markdown]
    assert not outside, f"the page asked for something beyond the server: {outside[:5]}"
    assert (tmp_path / "network.log.guarded").exists(), "the network guard was not loaded in the server"
    network = tmp_path / "network.log"
    assert not network.exists(), f"the server or a kernel tried to reach the network:\n{network.read_text()}"
