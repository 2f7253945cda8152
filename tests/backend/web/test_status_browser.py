"""The status page in real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

One live stack (gunicorn with two workers, one rq worker, Redis db 15, the fake Label Studio), one
tiny real training: the page loads without console errors, its numbers match /status.json,
/train/status and /metrics, the live progress moves, the rollback button changes the served
version, and nothing overflows at 1280x800 or 390x844. Screenshots go to var/test-artifacts/screenshots/.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from backend.core.registry import ModelRegistry
from tests.live import ROOT, base_env, gunicorn, rq_worker, wait_for
from tests.models import make_checkpoint
from tests.worker_fixtures import CLASSES, cleanup_queues, make_settings, populate, settings_env

pytestmark = pytest.mark.slow
SECRET = "browser-secret-1234"
HOOK = {"X-Webhook-Secret": SECRET}
SHOTS = ROOT / "var" / "test-artifacts" / "screenshots"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _browser() -> webdriver.Chrome:
    os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))


def _viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Set the page's inner size (the window adds its frame in headless mode too)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 500})


def _shot(driver: webdriver.Chrome, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def test_status_page_in_a_real_browser(tmp_path, redis15, project_id, fake_ls):
    if not (Path(CHROMEDRIVER).exists() and shutil.which("chromium")):
        pytest.fail("chromium and chromium-driver are missing: run scripts/bootstrap.sh "
                    "(apt-get install chromium chromium-driver)")
    pid, _images, _ids = populate(fake_ls, n=16, project=project_id)
    # Enough epochs that the page (it polls every 3 s) sees two of them even on an idle machine (~1 s an epoch).
    settings = make_settings(tmp_path, fake_ls, train_epochs=12, promote_min_gain=-1.0)
    # v0001: a real (untrained) checkpoint, so the training fine-tunes it into v0002 and a rollback has somewhere to go.
    registry = ModelRegistry(settings.model_dir, redis15)
    first = registry.add_version(pid, make_checkpoint(tmp_path / "start.pt", list(CLASSES)), {
        "metrics": {"map50": 0.01, "map50_95": 0.005}, "classes": list(CLASSES)})
    registry.promote(pid, first.version)
    prefix = f"page{uuid.uuid4().hex[:6]}:"
    env = base_env(**settings_env(settings), LSB_QUEUE_PREFIX=prefix, WEBHOOK_SECRET=SECRET, ROUTING="yolo",
                   HOTSWAP_POLL_SECONDS="0.5")
    print(f"\nscreenshots: {SHOTS}")
    driver = None
    try:
        with gunicorn(env, tmp_path / "web.log", workers=2, threads=4) as url, \
                rq_worker(env, [prefix + "training", prefix + "prelabel"], tmp_path / "worker.log"):
            driver = _browser()
            _viewport(driver, 1280, 800)
            driver.get(f"{url}/?token={SECRET}")
            wait_for(lambda: driver.find_elements(By.ID, f"project-{pid}"), timeout=20, message="the project on the page")
            assert _text(driver, f"#project-{pid} .current-version") == "v0001"

            # A real tiny training; the live card shows epochs while it runs.
            assert requests.post(f"{url}/train", params={"project": pid}, headers=HOOK, timeout=5).status_code == 202
            epochs_seen: set[str] = set()

            def progressed() -> bool:
                found = driver.find_elements(By.CSS_SELECTOR, f"#live-{pid} .live-epoch")
                if found and found[0].text not in ("", "–"):
                    epochs_seen.add(found[0].text)
                return len(epochs_seen) >= 2

            wait_for(progressed, timeout=240, interval=0.5, message="two different epochs on the live card",
                     on_timeout=lambda: (tmp_path / "worker.log").read_text()[-3000:])
            _shot(driver, "status-training-1280x800")
            wait_for(lambda: _text(driver, f"#project-{pid} .current-version") == "v0002", timeout=240, interval=1.0,
                     message="v0002 promoted and shown", on_timeout=lambda: (tmp_path / "worker.log").read_text()[-3000:])

            # The numbers on the page are those of /status.json, /train/status and /metrics.
            status = requests.get(f"{url}/train/status", params={"project": pid}, headers=HOOK, timeout=5).json()
            page = requests.get(f"{url}/status.json", headers=HOOK, timeout=5).json()
            project = next(p for p in page["projects"] if p["project"] == str(pid))
            assert status["current_version"] == project["current_version"] == "v0002"
            history = driver.find_element(By.ID, f"trainings-{pid}").text
            assert status["last"]["status"] in history and "v0002" in history
            map50 = project["versions"][-1]["map50"]
            assert f"{map50:.3f}" in driver.find_element(By.ID, f"versions-{pid}").text
            metrics = requests.get(f"{url}/metrics", headers=HOOK, timeout=5).text
            yolo = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                       if line.startswith('lsb_predictions_total{source="yolo"}'))
            gemini = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                         if line.startswith('lsb_predictions_total{source="gemini"}'))
            assert _text(driver, "#predictions") == f"{int(gemini)} / {int(yolo)}"

            # The rollback button: the served version changes, and the page says so.
            driver.find_element(By.CSS_SELECTOR, f'#versions-{pid} button[data-version="v0001"]').click()
            wait_for(lambda: _text(driver, f"#project-{pid} .current-version") == "v0001", timeout=20,
                     message="the page showing v0001 after the rollback")
            assert requests.get(f"{url}/train/status", params={"project": pid}, headers=HOOK,
                                timeout=5).json()["current_version"] == "v0001"

            # Usable on a desktop and on a phone: no horizontal scrolling.
            for width, height in ((1280, 800), (390, 844)):
                _viewport(driver, width, height)
                driver.refresh()
                wait_for(lambda: driver.find_elements(By.ID, f"project-{pid}"), timeout=20, message="the page after resize")
                overflow = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
                assert overflow[0] <= overflow[1], f"horizontal overflow at {width}x{height}: {overflow}"
                _shot(driver, f"status-{width}x{height}")

            errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            assert not errors, f"console errors: {errors}"
    finally:
        if driver is not None:
            driver.quit()
        cleanup_queues(redis15, prefix)
