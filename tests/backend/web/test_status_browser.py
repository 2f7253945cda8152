"""The status page in real headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

One live stack (gunicorn with two workers, one rq worker, Redis db 15, the fake Label Studio, the fake
Gemini), one tiny real training: the page loads without console errors, its numbers match /status.json,
/train/status and /metrics, the live progress moves, the evaluation (Gemini vs YOLO, per class,
confusion) and the project's money are drawn from /status.json, the rollback button changes the served
version, and nothing overflows at 1280x800 or 390x844. Screenshots go to var/test-artifacts/screenshots/.
"""

from __future__ import annotations

import base64
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
from tests import fake_gemini as fg
from tests.live import ROOT, base_env, gunicorn, rq_worker, wait_for
from tests.models import make_checkpoint
from tests.synthetic import colour, draft_result
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


def _diagnosis(driver: webdriver.Chrome, pid: int, epochs_seen: set[str], worker_log: Path) -> str:
    """What a timed-out wait on the live card saw: the epochs, the card's text, the page's console, the worker's log."""
    try:
        card = _text(driver, f"#live-{pid}")
    except Exception as exc:  # noqa: BLE001 - a diagnosis must not raise
        card = f"(no live card: {exc!r})"
    console = "\n".join(str(entry) for entry in driver.get_log("browser"))
    return (f"epochs seen: {sorted(epochs_seen)}\nlive card: {card}\nbrowser console:\n{console}\n"
            f"worker log:\n{worker_log.read_text()[-3000:]}")


def _shot(driver: webdriver.Chrome, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def _full_page_shot(driver: webdriver.Chrome, name: str) -> Path:
    """The whole page at the current width (the README's picture: versions, money and evaluation at once)."""
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    data = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})["data"]
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    path.write_bytes(base64.b64decode(data))
    return path


def _text(driver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


def _gemini_draft(_i, im) -> list[dict]:
    """A stored Gemini draft of the task that misses its last box (so the side by side has something to rank)."""
    boxes = im.boxes[:-1] if len(im.boxes) > 1 else im.boxes
    return [{"result": draft_result([(b, 0.9) for b in boxes], im.width, im.height, source="gemini"),
             "model_version": "gemini:gemini-2.5-flash", "score": 0.9}]


def _metric(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name))


def _check_evaluation(driver, pid: int, ev: dict) -> None:
    """The side by side, per-class and confusion tables hold /status.json's evaluation, cell for cell."""
    sbs = driver.find_element(By.ID, f"side-by-side-{pid}")
    for source, figures in ev["side_by_side"].items():
        row = sbs.find_element(By.XPATH, f'.//tr[td[@data-source="{source}"]]').text
        assert f"{figures['map50']:.3f}" in row and f"{figures['map50_95']:.3f}" in row, (source, row)
    if len(ev["side_by_side"]) > 1:
        best = max(ev["side_by_side"], key=lambda s: ev["side_by_side"][s]["map50"])
        assert sbs.find_element(By.XPATH, f'.//tr[td[@data-source="{best}"]]/td[@data-figure="map50"]').get_attribute(
            "class").split() == ["num", "best"]
    rows = driver.find_elements(By.CSS_SELECTOR, f"#per-class-{pid} tbody tr")
    assert len(rows) == sum(len(sources) for sources in ev["per_class"].values())
    cm = ev["confusion"]
    table = driver.find_element(By.ID, f"confusion-{pid}")
    assert [th.text for th in table.find_elements(By.CSS_SELECTOR, "thead th")][1:] == cm["columns"]
    body = [[c.text for c in tr.find_elements(By.CSS_SELECTOR, "th, td")]
            for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert body == [[name, *map(str, line)] for name, line in zip(cm["rows"], cm["matrix"])]


def _check_money(driver, pid: int, money: dict, shared: dict, metrics: str) -> None:
    """The project's money on the page is /status.json's; the service-wide per-tier spend and cost per 1,000 are /metrics'."""
    usd = lambda v: "$" + f"{v:.4f}"  # noqa: E731 - the page's own format
    assert _text(driver, f"#money-{pid}-total") == usd(money["total_usd"])
    assert _text(driver, f"#money-{pid}-per1000") == usd(money["cost_per_1000_tasks_usd"])
    assert _text(driver, f"#money-{pid}-saved").splitlines()[0] == usd(money["yolo_savings_usd"])
    assert _text(driver, f"#money-{pid}-share") == " · ".join(
        f"{s} {100 * v:.1f}%" for s, v in sorted(money["share_by_source"].items()))
    assert usd(money["spend_by_tier_usd"]["standard"]) in _text(driver, f"#money-tiers-{pid}")
    for tier, value in shared["spend_by_tier_usd"].items():
        assert _metric(metrics, f'lsb_gemini_spend_by_tier_usd{{tier="{tier}"}}') == pytest.approx(value, rel=1e-6)
    assert _metric(metrics, "lsb_cost_per_1000_drafted_tasks_usd ") == pytest.approx(shared["cost_per_1000_tasks_usd"], rel=1e-6)


def test_status_page_in_a_real_browser(tmp_path, redis15, project_id, fake_ls):
    if not (Path(CHROMEDRIVER).exists() and shutil.which("chromium")):
        pytest.fail("chromium and chromium-driver are missing: run scripts/bootstrap.sh "
                    "(apt-get install chromium chromium-driver)")
    pid, _images, ids = populate(fake_ls, n=16, project=project_id, predictions=_gemini_draft)
    # Enough epochs that the page (it polls every 3 s) sees two of them even on an idle machine (~1 s an epoch) and
    # when chromium and the web workers get little of the two cores the training takes (12 epochs missed 1 run in 6).
    settings = make_settings(tmp_path, fake_ls, train_epochs=30, promote_min_gain=-1.0)
    # v0001: a real (untrained) checkpoint, so the training fine-tunes it into v0002 and a rollback has somewhere to go.
    registry = ModelRegistry(settings.model_dir, redis15)
    first = registry.add_version(pid, make_checkpoint(tmp_path / "start.pt", list(CLASSES)), {
        "metrics": {"map50": 0.01, "map50_95": 0.005}, "classes": list(CLASSES)})
    registry.promote(pid, first.version)
    prefix = f"page{uuid.uuid4().hex[:6]}:"
    gemini = fg.FakeGemini(responder=fg.Oracle(colors={c: colour(c, CLASSES) for c in CLASSES})).start()
    env = base_env(**settings_env(settings), LSB_QUEUE_PREFIX=prefix, WEBHOOK_SECRET=SECRET, ROUTING="gemini",
                   HOTSWAP_POLL_SECONDS="0.5", GEMINI_API_KEY=fg.DEFAULT_KEY, GEMINI_BASE_URL=gemini.base_url,
                   GEMINI_CACHE_TTL="0")
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
                     on_timeout=lambda: _diagnosis(driver, pid, epochs_seen, tmp_path / "worker.log"))
            _shot(driver, "status-training-1280x800")
            wait_for(lambda: _text(driver, f"#project-{pid} .current-version") == "v0002", timeout=240, interval=1.0,
                     message="v0002 promoted and shown", on_timeout=lambda: (tmp_path / "worker.log").read_text()[-3000:])

            # Drafts through /predict: Gemini drafts two tasks, refuses the third (YOLO drafts it); the project's money.
            config = fake_ls.projects[pid]["label_config"]
            gemini.script(fg.error(400, "INVALID_ARGUMENT", "refused on purpose"))
            for batch in (ids[:1], ids[1:3]):
                body = {"project": f"{pid}.1700000000", "label_config": config,
                        "tasks": [{"id": t, "data": fake_ls.tasks[t]["data"]} for t in batch]}
                assert requests.post(f"{url}/predict", json=body, headers=HOOK, timeout=60).status_code == 200
            wait_for(lambda: _text(driver, f"#money-{pid}-drafted") == "3", timeout=20, message="three drafts on the page")

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
            by_gemini = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                            if line.startswith('lsb_predictions_total{source="gemini"}'))
            assert _text(driver, "#predictions") == f"{int(by_gemini)} / {int(yolo)}"
            money = project["money"]
            assert money["tasks_by_source"] == {"gemini:standard": 2, "yolo": 1} and money["spend_by_tier_usd"]["standard"] > 0
            _check_money(driver, pid, money, page["money"], metrics)
            ev = project["evaluation"]
            assert set(ev["side_by_side"]) == {"yolo", "gemini"} and ev["version"] == "v0002"
            _check_evaluation(driver, pid, ev)
            driver.find_element(By.ID, f"side-by-side-{pid}").location_once_scrolled_into_view  # noqa: B018 - scrolls
            _shot(driver, "status-evaluation-1280x800")
            _full_page_shot(driver, "status-full-1280x800")

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
        gemini.stop()
        cleanup_queues(redis15, prefix)
