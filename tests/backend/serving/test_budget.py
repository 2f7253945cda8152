"""Bounds of one /predict: decoded images held at once (memory), and inline vs background (time)."""

from __future__ import annotations

import base64
import gc
import io
import threading
import tracemalloc
import uuid
import weakref

import numpy as np
import pytest
from PIL import Image

from backend.core.images import ImageLoader
from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.detectors.gemini.client import GeminiDetector
from backend.detectors.yolo import YoloDetector
from backend.serving.budget import LatencyModel, PixelBudget, estimate, plan
from backend.serving.routing import Router
from tests import fake_gemini as fg
from tests.models import make_checkpoint

CONFIG = ProjectConfig.parse('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                             '<Label value="Car" predicted_values="car"/><Label value="Person"/></RectangleLabels></View>')
SIDE = 1000  # noise images: the PNG (kept as LoadedImage.data, traced) is about as large as the pixels
BUDGET_IMAGES = 3


# --- the decision: answer inline or draft in the background -----------------------------------------

def test_estimate_counts_gemini_in_waves_of_the_concurrency_and_yolo_task_by_task():
    assert estimate(16, ["gemini", "yolo"], 8.0, 0.1, 0.0, 16) == 8.0
    assert estimate(17, ["gemini", "yolo"], 8.0, 0.1, 0.0, 16) == 16.0
    assert estimate(200, ["gemini", "yolo"], 8.0, 0.1, 0.0, 16) == 13 * 8.0
    assert estimate(100, ["yolo"], 8.0, 0.1, 0.0, 16) == pytest.approx(10.0)
    # a share of the tasks falls back: their fallback cost is added
    assert estimate(100, ["gemini", "yolo"], 2.0, 0.1, 0.5, 10) == pytest.approx(20.0 + 0.5 * 10.0)
    assert estimate(100, ["yolo", "gemini"], 2.0, 0.1, 0.5, 10) == pytest.approx(10.0 + 0.5 * 20.0)


def test_two_hundred_tasks_at_a_slow_gemini_go_to_the_background():
    """The issue's case: 8 s a call, 16 at once, Label Studio waits 100 s (half of it is the budget)."""
    model = LatencyModel(gemini_prior_s=30.0)
    model.observe("gemini", 8.0)
    decision = plan(200, ["gemini", "yolo"], model, concurrency=16, timeout_s=100, inline_share=0.5)
    assert not decision.inline and decision.estimate_s == 13 * 8.0 and decision.budget_s == 50
    assert plan(96, ["gemini", "yolo"], model, 16, 100, 0.5).inline  # 6 waves = 48 s
    assert not plan(97, ["gemini", "yolo"], model, 16, 100, 0.5).inline  # 7 waves = 56 s
    # a fast Gemini serves the same 200 inline
    fast = LatencyModel(gemini_prior_s=30.0)
    fast.observe("gemini", 1.5)
    assert plan(200, ["gemini", "yolo"], fast, 16, 100, 0.5).inline


def test_a_cold_process_assumes_the_task_deadline_until_it_measured():
    model = LatencyModel(gemini_prior_s=30.0)
    assert plan(16, ["gemini"], model, 16, 100, 0.5).inline  # one wave of 30 s
    assert not plan(17, ["gemini"], model, 16, 100, 0.5).inline
    model.observe("gemini", 2.0)  # the first sample replaces the prior, later ones move the mean
    assert model.snapshot()[0] == 2.0
    model.observe("gemini", 12.0)
    assert model.snapshot()[0] == pytest.approx(2.0 + 0.2 * 10.0)


def test_the_router_measures_gemini_calls_including_slow_ones():
    with fg.FakeGemini() as server:
        server.responder = lambda request: fg.delayed(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'), 0.4)
        settings = Settings(gemini_api_key=fg.DEFAULT_KEY, gemini_base_url=server.base_url, gemini_task_deadline=5,
                            gemini_breaker_failures=1000)
        latency = LatencyModel(gemini_prior_s=settings.gemini_task_deadline)
        gemini = GeminiDetector(settings, None)
        loader = ImageLoader(settings, cache=False)
        try:
            (outcome,) = Router(settings, loader, gemini, latency).run([(data_url(64, seed=1), 1)], CONFIG, None)
        finally:
            loader.close()
            gemini.close()
    assert outcome.detections.source == "gemini"
    assert latency.measured["gemini"] and 0.4 <= latency.snapshot()[0] < 5


def test_cache_hits_are_not_measured_as_gemini_latency(redis_client):
    """A batch answered from the Gemini cache says nothing of Gemini's latency: measuring its milliseconds
    once made a 200-task Retrieve look fast enough to answer inline, and it ran into the deadline."""
    with fg.FakeGemini() as server:
        server.responder = lambda request: fg.delayed(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'), 0.4)
        settings = Settings(gemini_api_key=fg.DEFAULT_KEY, gemini_base_url=server.base_url, gemini_task_deadline=5,
                            gemini_breaker_failures=1000)
        prefix = f"test:budget:{uuid.uuid4().hex}"
        gemini = GeminiDetector(settings, redis_client, prefix=prefix)
        loader = ImageLoader(settings, cache=False)
        url = data_url(64, seed=2)
        try:
            called, hit = LatencyModel(gemini_prior_s=5.0), LatencyModel(gemini_prior_s=5.0)
            Router(settings, loader, gemini, called).run([(url, 1)], CONFIG, None)
            (outcome,) = Router(settings, loader, gemini, hit).run([(url, 1)], CONFIG, None)
        finally:
            loader.close()
            gemini.close()
            for key in redis_client.scan_iter(f"{prefix}*"):
                redis_client.delete(key)
    assert len(server.calls) == 1 and outcome.detections.meta.get("cached")
    assert called.measured["gemini"] and 0.4 <= called.snapshot()[0] < 5
    assert not hit.measured["gemini"] and hit.snapshot()[0] == 5.0  # still the pessimistic prior


# --- the pixel budget ---------------------------------------------------------------------------------

def test_budget_grants_in_ticket_order_and_always_admits_one_image():
    budget = PixelBudget(100)
    assert budget.acquire(500, ticket=0)  # larger than the budget, but nothing else is held
    got = []

    def take(ticket):
        got.append((ticket, budget.acquire(60, ticket=ticket)))

    threads = [threading.Thread(target=take, args=(t,)) for t in (2, 1)]
    for thread in threads:
        thread.start()
    threads[0].join(0.2)
    assert got == []  # ticket 1 waits for room, ticket 2 waits for ticket 1
    budget.release(500)
    threads[1].join(5)
    assert got == [(1, True)]
    budget.close()  # an abandoned request wakes whoever waits
    threads[0].join(5)
    assert got == [(1, True), (2, False)]


def data_url(side: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=0)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def yolo(tmp_path_factory):
    return YoloDetector(make_checkpoint(tmp_path_factory.mktemp("b") / "m.pt", ["car", "Person"]), "v0001")


def peak_of_a_request(n: int, url: str, yolo, max_pixels: int, gemini_server=None, trace: bool = True) -> tuple[int, int]:
    """(peak traced bytes, most decoded images alive at once) while a request drafts n large images.

    With ``gemini_server``: Gemini first, one call at a time (slower than the loads); else YOLO only."""
    extra = {"gemini_api_key": fg.DEFAULT_KEY, "gemini_base_url": gemini_server.base_url, "gemini_concurrency": 1,
             "gemini_task_deadline": 10, "gemini_breaker_failures": 1000} if gemini_server else {}
    settings = Settings(routing="gemini" if gemini_server else "yolo", image_max_pixels=SIDE * SIDE,
                        predict_max_pixels=max_pixels, **extra)
    gemini = GeminiDetector(settings, None) if gemini_server else None
    loader = ImageLoader(settings, cache=False)
    alive, most = [0], [0]
    lock = threading.Lock()
    real_load = loader.load

    def counted(url, task_id=None):  # counts the LoadedImage objects alive (not a stand-in: the real load)
        image = real_load(url, task_id)
        with lock:
            alive[0] += 1
            most[0] = max(most[0], alive[0])

        def gone():
            with lock:
                alive[0] -= 1

        weakref.finalize(image, gone)
        return image

    loader.load = counted
    router = Router(settings, loader, gemini)
    gc.collect()
    if trace:  # (not around YOLO: tracing torch's Python allocations makes a run take minutes)
        tracemalloc.start()
    try:
        outcomes = router.run([(url, i) for i in range(n)], CONFIG, yolo)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        loader.close()
        if gemini is not None:
            gemini.close()
    source = "gemini" if gemini_server else "yolo"
    assert all(o.detections is not None and o.detections.source == source for o in outcomes), outcomes[:2]
    return peak, most[0]


def test_many_large_images_drafted_by_yolo_are_held_a_few_at_a_time(yolo):
    """Was: every decoded image (and its bytes) of the batch kept until the request ended (all 24 alive)."""
    url = data_url(SIDE, seed=7)  # one string for every task: the inputs cost nothing per task
    budget = BUDGET_IMAGES * SIDE * SIDE
    _, few_alive = peak_of_a_request(BUDGET_IMAGES, url, yolo, budget, trace=False)
    _, many_alive = peak_of_a_request(8 * BUDGET_IMAGES, url, yolo, budget, trace=False)
    assert many_alive <= BUDGET_IMAGES + 1, many_alive  # +1: a finalizer may run a moment after the release
    assert few_alive <= BUDGET_IMAGES


def test_one_task_is_always_answered_inline():
    model = LatencyModel(gemini_prior_s=120.0)  # a task deadline longer than Label Studio's wait
    assert plan(1, ["gemini"], model, 16, 100, 0.5).inline
    assert not plan(2, ["gemini"], model, 16, 100, 0.5).inline


def test_many_large_images_behind_a_slow_gemini_hold_no_more_memory_than_a_few():
    """Peak traced memory of 24 large images vs 3: the loads run ahead of the Gemini calls, and without
    the budget and the release every image of the batch piled up (the peak grew with the batch)."""
    url = data_url(SIDE, seed=8)
    budget = BUDGET_IMAGES * SIDE * SIDE
    with fg.FakeGemini() as server:
        def responder(request):
            server.clear()  # the fake keeps every request (and its image) it got: not the backend's memory
            return fg.delayed(fg.ok('[{"box_2d": [0, 0, 500, 500], "label": "Car"}]'), 0.1)

        server.responder = responder
        few_peak, few_alive = peak_of_a_request(BUDGET_IMAGES, url, None, budget, server)
        many_peak, many_alive = peak_of_a_request(8 * BUDGET_IMAGES, url, None, budget, server)
    assert many_alive <= BUDGET_IMAGES + 1, many_alive
    assert many_peak / few_peak < 1.5, (many_peak, few_peak)
