"""The web page in a real headless Chromium (Debian's package, driven by Playwright)."""

import os
import shutil
from pathlib import Path

import pytest

from tests.unit.test_serve_protocol import ServerProcess

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
ARTIFACTS = Path(os.environ.get("FLASHDREAMS_TEST_ARTIFACTS",
                                Path(__file__).parents[2] / "outputs" / "test-artifacts"))  # fmt: skip

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install -y chromium; .ci/run does this)",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("browser"), "serve.lead_s=0.5")
    yield srv
    srv.close()


@pytest.fixture()
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        yield page
        browser.close()


def stat(page, key):
    return page.evaluate(f"window.flashdreams.{key}")


def test_page_streams_steers_and_switches_prompt(server, page):
    page.goto(server.url + "/")
    page.wait_for_function("window.flashdreams.hello !== null", timeout=20_000)
    page.fill("#prompt", "a red fox running through snow")
    page.click("#start")
    page.wait_for_function("window.flashdreams.framesDrawn >= 3", timeout=30_000)

    snapshots = set()  # the canvas changes (the preview decoder repeats a frame 4 times)
    for _ in range(5):
        drawn = stat(page, "framesDrawn")
        page.wait_for_function(f"window.flashdreams.framesDrawn >= {drawn + 4}", timeout=10_000)
        snapshots.add(page.evaluate("document.getElementById('canvas').toDataURL()"))
    assert len(snapshots) >= 3

    page.focus("#canvas")
    page.keyboard.down("w")  # forwarded as a control message, echoed by the next step
    page.wait_for_function("(window.flashdreams.lastControl || {}).keys?.includes('w')",
                           timeout=10_000)  # fmt: skip
    page.keyboard.up("w")

    page.fill("#prompt", "a river at night")
    page.click("#switch")
    page.wait_for_function("window.flashdreams.promptVersion === 1", timeout=20_000)
    assert stat(page, "stepMs") > 0 and page.inner_text("#latency") != "-"
    assert float(page.inner_text("#fps")) > 0
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve_browser.png"))

    page.click("#stop")
    page.wait_for_function("window.flashdreams.state.startsWith('stopped')", timeout=20_000)
    assert stat(page, "errors") == []
    server.wait_idle()
