"""Routing: which detector drafts each task, and what happens when one cannot."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from backend.core.images import ImageLoader
from backend.core.label_config import ProjectConfig
from backend.core.registry import VersionInfo
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector
from backend.detectors.yolo import YoloDetector
from backend.serving.routing import Router
from tests import fake_gemini as fg
from tests.models import make_checkpoint

CONFIG = ProjectConfig.parse('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                             '<Label value="Car" predicted_values="car"/><Label value="Person"/></RectangleLabels></View>')
GOOD = {"metrics": {"map50": 0.9}, "draft_quality": {"gemini": {"map50": 0.5, "n": 10}}}


def data_url(color=(200, 20, 20)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    return YoloDetector(make_checkpoint(tmp_path_factory.mktemp("r") / "m.pt", ["car", "Person"]), "v0007")


@pytest.fixture(scope="module")
def gemini_server():
    with fg.FakeGemini() as fake:
        yield fake


def router(routing: str, gemini_server=None, **extra) -> Router:
    settings = Settings(routing=routing, gemini_api_key=fg.DEFAULT_KEY if gemini_server else "",
                        gemini_base_url=gemini_server.base_url if gemini_server else "", gemini_task_deadline=3,
                        yolo_score_threshold=0.0001, gemini_breaker_failures=1000, **extra)
    gemini = GeminiDetector(settings, None) if gemini_server else None
    return Router(settings, ImageLoader(settings, cache=False), gemini)


def version(meta: dict) -> VersionInfo:
    return VersionInfo("1", "v0007", Path("/x"), meta)


def test_order_by_mode(yolo):
    assert router("yolo").order(yolo, version(GOOD)) == ["yolo"]
    assert router("gemini").order(yolo, version(GOOD)) == ["gemini", "yolo"]
    assert router("auto").order(yolo, version({})) == ["gemini", "yolo"]
    assert router("auto").order(None, version(GOOD)) == ["gemini", "yolo"]
    assert router("auto").order(yolo, version(GOOD)) == ["yolo", "gemini"]


def test_auto_mode_stops_paying_for_gemini_once_yolo_measured_better(yolo, gemini_server):
    gemini_server.clear()
    outcomes = router("auto", gemini_server).run([(data_url(), 1), (data_url(), 2)], CONFIG, yolo, version(GOOD))
    assert [o.detections.source for o in outcomes] == ["yolo", "yolo"]
    assert gemini_server.calls == []


def test_auto_mode_falls_back_to_gemini_when_yolo_breaks(yolo, gemini_server, monkeypatch):
    gemini_server.clear()
    gemini_server.script(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'))

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(yolo, "detect_batch", broken)
    (outcome,) = router("auto", gemini_server).run([(data_url(), 1)], CONFIG, yolo, version(GOOD))
    assert outcome.detections.source == "gemini" and outcome.detections.labels == ["Car"]


def test_gemini_mode_uses_yolo_only_for_the_failed_tasks(yolo, gemini_server):
    gemini_server.clear()
    gemini_server.script(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'), fg.bad_request(), fg.bad_request())
    outcomes = router("gemini", gemini_server).run([(data_url(), 1), (data_url((0, 0, 200)), 2)], CONFIG, yolo, None)
    assert sorted(o.detections.source for o in outcomes) == ["gemini", "yolo"]
    failed = next(o for o in outcomes if o.detections.source == "yolo")
    assert failed.fallback_reason == "gemini client_error"


def test_nothing_available_gives_a_reason_per_task():
    (outcome,) = router("gemini").run([(data_url(), 1)], CONFIG, None, None)
    assert outcome.detections is None
    assert "not_configured" in outcome.reason and "no YOLO model" in outcome.reason


def test_yolo_mode_never_calls_gemini(yolo, gemini_server):
    gemini_server.clear()
    (outcome,) = router("yolo", gemini_server).run([(data_url(), 1)], CONFIG, yolo, None)
    assert outcome.detections.source == "yolo" and gemini_server.calls == []


def test_images_load_ahead_of_the_gemini_calls(gemini_server, monkeypatch):
    """Loads run in their own pool: a Gemini slot that frees up finds its next image decoded."""
    import threading

    gemini_server.clear()
    loaded, answered_after_all_loads = [], []
    all_loaded = threading.Event()

    def responder(request):
        answered_after_all_loads.append(all_loaded.wait(2))
        return fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]')

    monkeypatch.setattr(gemini_server, "responder", responder)
    r = router("gemini", gemini_server, gemini_concurrency=1)  # one slot: calls go one after another
    real_load = r.loader.load

    def load(url, task_id=None):
        image = real_load(url, task_id)
        loaded.append(task_id)
        if len(loaded) == 4:
            all_loaded.set()
        return image

    monkeypatch.setattr(r.loader, "load", load)
    outcomes = r.run([(data_url(), i) for i in range(1, 5)], CONFIG, None, None)
    assert [o.detections.source for o in outcomes] == ["gemini"] * 4
    assert answered_after_all_loads[0] is True  # every image was in while the first call was in flight


def test_a_bad_image_fails_only_its_task(gemini_server):
    gemini_server.clear()
    gemini_server.script(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'))
    outcomes = router("gemini", gemini_server).run([("data:image/png;base64,bm90IGFuIGltYWdl", 1), (data_url(), 2)],
                                                   CONFIG, None, None)
    assert outcomes[0].detections is None and outcomes[0].reason.startswith("image ")
    assert outcomes[1].detections.source == "gemini" and len(gemini_server.calls) == 1
