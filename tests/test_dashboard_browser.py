"""The page end to end in headless Chromium (Debian's ``chromium``, driven by Playwright).

The real pipeline (recorder, analyzer, healer ``--source sim`` as processes, the dashboard in
this process) and the simulated publisher with two GPUs running the ``hang`` scenario at 20x:
the page shows a card per GPU, a banner when GPU 0's hang is confirmed (critical) and none
once the healer's GPU reset healed it; the self-healing switch reaches the healer through the
broker and back. The screenshot of the page is saved as ``docs/dashboard.png`` (the README
shows it).

Playwright drives the system browser (its own browser download is not needed): it waits for
conditions inside the page (``expect``, ``wait_for_function`` polling every animation frame),
so a banner that lives for less than a second is still seen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gpuheal.broker import PrivateBroker
from tests.support import Collector
from tests.support_dashboard import HOST, REPO, Pipeline

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None  # type: ignore[assignment]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
SCREENSHOT = REPO / "docs" / "dashboard.png"

pytestmark = [
    pytest.mark.skipif(sync_playwright is None,
                       reason="Playwright for Python is not installed (pip install playwright)"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install "
                       "chromium)"),
]

FIRST_BANNER_JS = """() => {
  const b = document.querySelector('#banners .banner');
  return b ? b.textContent : null;
}"""


def latest_enabled(seen: Collector) -> bool | None:
    states = seen.payloads("/healer/state")
    return states[-1]["enabled"] if states else None


@pytest.mark.timeout(150)
def test_the_page_follows_an_incident_and_switches_the_healer(
        broker: PrivateBroker, prefix: str, tmp_path: Path) -> None:
    pipe = Pipeline(broker.url, prefix, tmp_path, scenario="hang", gpus=2, speed=20.0).start()
    assert pipe.dashboard is not None
    errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda m: m.type == "error" and errors.append(m.text))
                page.goto(pipe.dashboard.url + "/")
                expect(page.locator("#link")).to_have_text("live", timeout=20_000)
                pipe.start_publisher()

                expect(page.locator("#gpus .card")).to_have_count(2, timeout=30_000)
                expect(page.locator(f'#gpus .card[data-key="{HOST}/1"] .name')).to_contain_text(
                    "simulated")

                banner = page.wait_for_function(FIRST_BANNER_JS, polling="raf",
                                                timeout=60_000).json_value()
                assert f"{HOST} · GPU 0" in banner and "gpu_hang, critical" in banner, banner
                expect(page.locator("#banners .banner")).to_have_count(0, timeout=60_000)
                expect(page.locator("#actions tbody")).to_contain_text("reset_gpu",
                                                                      timeout=20_000)
                expect(page.locator("#actions td.out-verified").first).to_be_visible(
                    timeout=30_000)

                host = page.locator(f'#hosts .host[data-host="{HOST}"]')
                toggle = host.locator("input.healing")
                expect(toggle).to_be_checked(timeout=10_000)
                with Collector(broker.url, f"{prefix}/{HOST}/healer/state") as seen:
                    seen.wait(lambda _ms: latest_enabled(seen) is True, 10, "retained state")
                    toggle.click()
                    seen.wait(lambda _ms: latest_enabled(seen) is False, 15,
                              "the healer's state on the broker saying enabled false")
                    expect(host.locator(".mode")).to_have_text("paused", timeout=10_000)
                    toggle.click()
                    seen.wait(lambda _ms: latest_enabled(seen) is True, 15,
                              "enabled true again")
                    expect(host.locator(".mode")).to_have_text("healing", timeout=10_000)

                expect(page.locator("#gpus .card .uplot")).to_have_count(2, timeout=10_000)
                SCREENSHOT.parent.mkdir(exist_ok=True)
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            finally:
                browser.close()
    except BaseException:
        print(pipe.logs())
        raise
    finally:
        pipe.stop()
    assert not errors, errors
    assert SCREENSHOT.stat().st_size > 10_000
