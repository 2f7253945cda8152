"""GeminiDetector through the real google-genai client against tests/fake_gemini.py."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
from PIL import Image, ImageDraw
from prometheus_client import REGISTRY

from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.detectors.gemini.client import (
    GeminiDetector,
    GeminiUnavailable,
    build_prompt,
    retry_delay_seconds,
    thinking_off_supported,
)
from tests.fake_gemini import (
    FakeGemini,
    Oracle,
    bad_request,
    blocked,
    boxes,
    delayed,
    drop,
    empty,
    error,
    non_json,
    ok,
    rate_limited,
    server_error,
    truncated,
)

RED, GREEN = (220, 30, 30), (30, 160, 60)
CONFIG = ProjectConfig.parse(
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Car" hint="a red passenger car seen from above"/>'
    '<Label value="Tree" predicted_values="bush"/>'
    "</RectangleLabels></View>"
)
BRUSH = ProjectConfig.parse(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Car"/><Label value="Tree"/></BrushLabels></View>'
)




class Sleeps:
    """Records the retry waits (and really sleeps, so deadlines stay real)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        time.sleep(seconds)


@pytest.fixture
def make(fake_gemini, rdb):
    client, prefix = rdb
    made: list[GeminiDetector] = []

    def factory(redis_client=client, **overrides) -> GeminiDetector:
        values = dict(
            gemini_api_key=fake_gemini.api_key, gemini_base_url=fake_gemini.base_url, gemini_api_version="v1beta",
            gemini_model="gemini-2.5-flash", gemini_timeout=2.0, gemini_task_deadline=5.0,
            gemini_breaker_failures=5, gemini_breaker_cooldown=60.0, gemini_daily_budget_usd=0.0,
            gemini_cache_ttl=600, gemini_max_image_side=1024, gemini_max_objects=25, gemini_temperature=0.5,
        )
        values.update(overrides)
        detector = GeminiDetector(Settings(**values), redis_client, prefix=f"{prefix}:{len(made)}", sleep=Sleeps())
        made.append(detector)
        return detector

    yield factory
    for detector in made:
        detector.close()


def scene(size=(2000, 1000), seed: int = 0) -> tuple[Image.Image, str]:
    """A white image with a red car box and a green tree box; the hash makes each seed unique."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.rectangle([0.1 * w, 0.1 * h, 0.3 * w - 1, 0.5 * h - 1], fill=RED)
    draw.rectangle([0.5 * w, 0.5 * h, 0.7 * w - 1, 0.9 * h - 1], fill=GREEN)
    draw.point((seed % size[0], size[1] - 1), fill=(254, 254, 254))
    return image, hashlib.sha256(image.tobytes() + str(seed).encode()).hexdigest()


def one_box(label: str = "Car") -> object:
    return boxes([{"box_2d": [100, 100, 500, 300], "label": label}])


# --- success -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_boxes_land_on_the_original_pixels_after_downscaling(make, fake_gemini, version):
    fake_gemini.responder = Oracle({"Car": RED, "Tree": GREEN})
    image, sha = scene()
    detections = make(gemini_api_version=version).detect(image, sha, CONFIG)
    assert detections.source == "gemini" and detections.image_size == (2000, 1000)
    assert detections.labels == ["Car", "Tree"]
    # the fake saw 1024x512; 0-1000 on a 2000 px side quantises to 2 px (plus JPEG edges)
    np.testing.assert_allclose(detections.xyxy, [[200, 100, 600, 500], [1000, 500, 1400, 900]], atol=6)
    assert detections.meta["cached"] is False and detections.meta["attempts"] == 1
    (call,) = fake_gemini.calls
    assert call.version == version and call.model == "gemini-2.5-flash"
    assert call.api_key == fake_gemini.api_key


def test_request_follows_the_detection_recipe(make, fake_gemini):
    image, sha = scene()
    make().detect(image, sha, CONFIG)
    (call,) = fake_gemini.calls
    assert max(call.image_size) <= 1024 and call.image_size == (1024, 512)
    assert call.image_mime_types == ["image/jpeg"]
    assert call.temperature == 0.5
    assert call.thinking_budget == 0
    assert call.response_mime_type == "application/json"
    assert "a red passenger car seen from above" in call.prompt and "Tree" in call.prompt
    assert "box_2d" in call.system_instruction and "Limit to 25 objects" in call.system_instruction
    assert "mask" not in call.all_text.lower()


@pytest.mark.parametrize("model", ["gemini-2.5-pro", "gemini-3-flash-preview"])
def test_thinking_budget_is_not_sent_to_models_that_reject_it(make, fake_gemini, model):
    image, sha = scene()
    make(gemini_model=model).detect(image, sha, CONFIG)
    (call,) = fake_gemini.calls
    assert call.model == model and call.thinking_budget is None
    assert thinking_off_supported("gemini-2.5-flash-lite") and not thinking_off_supported(model)


def test_empty_answer_is_a_real_empty_result(make, fake_gemini):
    fake_gemini.script(empty())
    image, sha = scene()
    detections = make().detect(image, sha, CONFIG)
    assert len(detections) == 0 and detections.image_size == image.size


def test_truncated_answer_keeps_complete_objects(make, fake_gemini):
    text = '[{"box_2d": [100, 100, 500, 300], "label": "Car"}, {"box_2d": [600, 600, 9'
    fake_gemini.script(truncated(text, len(text)))
    image, sha = scene()
    detections = make().detect(image, sha, CONFIG)
    assert detections.labels == ["Car"] and detections.meta["truncated"] is True


def test_interactive_query_is_sent_and_labels_fall_back(make, fake_gemini):
    fake_gemini.script(boxes([{"box_2d": [0, 0, 100, 100], "label": "something else"},
                              {"box_2d": [0, 200, 100, 300], "label": "Tree"}]))
    image, sha = scene()
    detections = make().detect(image, sha, CONFIG, query="the cars parked in the shade")
    assert detections.labels == ["Car", "Tree"]  # "cars" in the query -> Car for the unknown one
    (call,) = fake_gemini.calls
    assert "the cars parked in the shade" in call.prompt
    fake_gemini.script(one_box("blob"))
    assert make().detect(image, sha, CONFIG, query="anything round").labels == ["Car"]  # first label


def test_masks_when_the_config_wants_them(make, fake_gemini):
    fake_gemini.responder = Oracle({"Car": RED, "Tree": GREEN}, mask_format="png")
    image, sha = scene()
    detections = make().detect(image, sha, BRUSH)
    assert "mask" in fake_gemini.calls[0].all_text
    assert detections.masks is not None and detections.masks.shape == (2, 1000, 2000)
    assert detections.masks[0][300, 400] and not detections.masks[0][700, 1200]
    assert detections.masks[1][700, 1200]


def test_concurrent_calls_from_a_thread_pool(make, fake_gemini):
    fake_gemini.responder = Oracle({"Car": RED, "Tree": GREEN})
    detector = make()
    scenes = [scene(size=(800, 400), seed=i) for i in range(12)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: detector.detect(s[0], s[1], CONFIG), scenes))
    assert all(r.labels == ["Car", "Tree"] for r in results)
    assert len(fake_gemini.calls) == 12


# --- retries -------------------------------------------------------------------------------------

def test_429_retry_delay_is_honoured_then_succeeds(make, fake_gemini):
    fake_gemini.script(rate_limited("1s"), one_box())
    detector = make()
    image, sha = scene()
    detections = detector.detect(image, sha, CONFIG)
    assert detections.labels == ["Car"] and detections.meta["attempts"] == 2
    first, second = fake_gemini.calls
    assert detector._sleep.waits[0] >= 1.0
    assert second.received_at - first.received_at >= 1.0


def test_429_longer_than_the_deadline_gives_up_at_once(make, fake_gemini):
    fake_gemini.script(rate_limited("37s"), one_box())
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        make(gemini_task_deadline=5.0).detect(image, sha, CONFIG)
    assert info.value.reason == "rate_limited"
    assert len(fake_gemini.calls) == 1


def test_server_errors_and_dropped_connections_are_retried(make, fake_gemini):
    fake_gemini.script(server_error(500), server_error(503), drop(), one_box())
    image, sha = scene()
    detections = make(gemini_task_deadline=20.0).detect(image, sha, CONFIG)
    assert detections.labels == ["Car"] and detections.meta["attempts"] == 4
    assert len(fake_gemini.calls) == 4


def test_slow_answers_time_out_within_the_deadline(make, fake_gemini):
    fake_gemini.responder = lambda request: delayed(one_box(), 5.0)
    image, sha = scene()
    started = time.monotonic()
    with pytest.raises(GeminiUnavailable) as info:
        make(gemini_timeout=0.5, gemini_task_deadline=2.0).detect(image, sha, CONFIG)
    elapsed = time.monotonic() - started
    assert info.value.reason in ("timeout", "deadline")
    assert len(fake_gemini.calls) >= 2  # it was retried
    assert elapsed < 2.0 + 1.0  # the deadline bounds the task (slack for a loaded machine)


def test_non_json_200_is_a_bad_answer_not_retried(make, fake_gemini):
    fake_gemini.script(non_json(), one_box())
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        make().detect(image, sha, CONFIG)
    assert info.value.reason == "bad_answer"
    assert len(fake_gemini.calls) == 1


def test_prose_answer_is_a_bad_answer(make, fake_gemini):
    fake_gemini.script(ok("I see a car and a tree."))
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        make().detect(image, sha, CONFIG)
    assert info.value.reason == "bad_answer"


def test_bad_key_is_a_client_error_not_retried(make, fake_gemini):
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        make(gemini_api_key="wrong-key").detect(image, sha, CONFIG)
    assert info.value.reason == "client_error" and "API key not valid" in info.value.message
    assert len(fake_gemini.requests) == 1 and fake_gemini.requests[0].status == 400


def test_other_400s_are_not_retried(make, fake_gemini):
    fake_gemini.script(error(400, "INVALID_ARGUMENT", "Unable to process input image."), one_box())
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        make().detect(image, sha, CONFIG)
    assert info.value.reason == "client_error" and len(fake_gemini.calls) == 1


def test_blocked_prompt_is_a_failure_not_an_empty_result(make, fake_gemini):
    fake_gemini.script(blocked("PROHIBITED_CONTENT"), ok("", finish_reason="SAFETY"))
    image, sha = scene()
    detector = make()
    for _ in range(2):
        with pytest.raises(GeminiUnavailable) as info:
            detector.detect(image, sha, CONFIG)
        assert info.value.reason == "blocked"
    assert len(fake_gemini.calls) == 2  # neither was cached nor retried
    assert detector.breaker.state == "closed"  # Gemini works; the content was the problem


def test_retry_delay_parsing():
    from google.genai import errors

    exc = errors.ClientError(429, {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.5s"}]}})
    assert retry_delay_seconds(exc) == 2.5
    assert retry_delay_seconds(errors.ClientError(429, {"error": {"code": 429}})) is None
    assert retry_delay_seconds(ValueError()) is None


# --- breaker, budget, cache ------------------------------------------------------------------------

def test_breaker_opens_skips_calls_and_closes_after_cooldown(make, fake_gemini):
    detector = make(gemini_breaker_failures=2, gemini_breaker_cooldown=0.5)
    fake_gemini.script(bad_request(), bad_request())
    for seed in range(2):
        image, sha = scene(seed=seed)
        with pytest.raises(GeminiUnavailable) as info:
            detector.detect(image, sha, CONFIG)
        assert info.value.reason == "client_error"
    image, sha = scene(seed=2)
    with pytest.raises(GeminiUnavailable) as info:
        detector.detect(image, sha, CONFIG)
    assert info.value.reason == "circuit_open"
    assert len(fake_gemini.calls) == 2  # the open breaker made no request
    time.sleep(0.6)
    fake_gemini.script(one_box())
    assert detector.detect(image, sha, CONFIG).labels == ["Car"]  # the half-open trial
    assert detector.breaker.state == "closed"
    image, sha = scene(seed=3)
    detector.detect(image, sha, CONFIG)
    assert len(fake_gemini.calls) == 4


def test_budget_exhausted_makes_no_call(make, fake_gemini, rdb):
    client, _ = rdb
    detector = make(gemini_daily_budget_usd=0.0001)
    fake_gemini.script(ok('[{"box_2d": [0, 0, 100, 100], "label": "Car"}]', prompt_tokens=300, output_tokens=25))
    image, sha = scene(seed=1)
    first = detector.detect(image, sha, CONFIG)  # $0.0001525: over budget afterwards
    assert first.meta["cost_usd"] == pytest.approx((300 * 0.30 + 25 * 2.50) / 1e6)
    assert float(client.get(detector.cost.day_key())) == pytest.approx(first.meta["cost_usd"])
    image2, sha2 = scene(seed=2)
    with pytest.raises(GeminiUnavailable) as info:
        detector.detect(image2, sha2, CONFIG)
    assert info.value.reason == "budget"
    assert len(fake_gemini.calls) == 1
    assert detector.detect(image, sha, CONFIG).meta["cached"]  # a cache hit is still free


def test_cache_hit_makes_no_request_and_costs_nothing(make, fake_gemini):
    fake_gemini.responder = Oracle({"Car": RED, "Tree": GREEN})
    detector = make()
    image, sha = scene()
    hits = REGISTRY.get_sample_value("lsb_gemini_cache_total", {"result": "hit"}) or 0.0
    cost = REGISTRY.get_sample_value("lsb_gemini_cost_usd_total", {"model": "gemini-2.5-flash"}) or 0.0
    first = detector.detect(image, sha, CONFIG)
    spent = (REGISTRY.get_sample_value("lsb_gemini_cost_usd_total", {"model": "gemini-2.5-flash"}) or 0.0) - cost
    second = detector.detect(image, sha, CONFIG)
    assert len(fake_gemini.calls) == 1
    assert second.meta["cached"] and second.meta["cost_usd"] == 0.0
    np.testing.assert_allclose(second.xyxy, first.xyxy)
    assert second.labels == first.labels
    assert REGISTRY.get_sample_value("lsb_gemini_cache_total", {"result": "hit"}) == hits + 1
    assert (REGISTRY.get_sample_value("lsb_gemini_cost_usd_total",
                                      {"model": "gemini-2.5-flash"}) or 0.0) - cost == pytest.approx(spent)
    detector.detect(image, sha, CONFIG, query="red cars")  # another question is another answer
    assert len(fake_gemini.calls) == 2


def test_redis_outage_is_never_an_error(make, fake_gemini):
    down = redis.Redis.from_url("redis://127.0.0.1:1/15", socket_connect_timeout=0.2)
    detector = make(redis_client=down)
    fake_gemini.script(one_box(), one_box())
    image, sha = scene()
    assert detector.detect(image, sha, CONFIG).labels == ["Car"]
    assert detector.detect(image, sha, CONFIG).labels == ["Car"]
    assert len(fake_gemini.calls) == 2  # no cache, but no error either


def test_not_configured_without_a_key(monkeypatch):
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GENAI_USE_VERTEXAI"):
        monkeypatch.delenv(name, raising=False)
    detector = GeminiDetector(Settings(gemini_api_key="", google_genai_use_vertexai=False), None)
    image, sha = scene()
    with pytest.raises(GeminiUnavailable) as info:
        detector.detect(image, sha, CONFIG)
    assert info.value.reason == "not_configured"


# --- secrets -------------------------------------------------------------------------------------

def test_api_key_never_leaks_into_logs_or_elsewhere(make, fake_gemini, caplog):
    caplog.set_level(logging.DEBUG)
    fake_gemini.script(rate_limited("0s"), one_box(), bad_request(), non_json())
    detector = make()
    for seed in range(3):
        image, sha = scene(seed=seed)
        try:
            detector.detect(image, sha, CONFIG)
        except GeminiUnavailable as exc:
            assert fake_gemini.api_key not in str(exc)
    wrong = make(gemini_api_key="sk-wrong-secret-123")
    with pytest.raises(GeminiUnavailable) as info:
        wrong.detect(*scene(seed=9), CONFIG)
    assert "sk-wrong-secret-123" not in str(info.value)
    text = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records and "gemini-2.5-flash" in text
    assert fake_gemini.api_key not in text and "sk-wrong-secret-123" not in text
    for request in fake_gemini.requests:  # only ever in the auth header
        assert fake_gemini.api_key not in request.path and fake_gemini.api_key.encode() not in request.raw
        assert not request.query.get("key")


def test_unavailable_survives_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(GeminiUnavailable("bad_answer", "non-JSON 200", service_fault=True)))
    assert (exc.reason, exc.message, exc.service_fault) == ("bad_answer", "non-JSON 200", True)


def test_build_prompt_includes_hints_masks_and_cap():
    system, prompt = build_prompt(CONFIG, None, 7, masks=False)
    assert "Limit to 7 objects" in system and "- Car: a red passenger car seen from above" in prompt and "- Tree" in prompt
    system, _ = build_prompt(BRUSH, None, 25, masks=True)
    assert '"mask"' in system


def test_fake_records_requests_thread_safely():
    with FakeGemini() as fake:
        fake.script(*[empty() for _ in range(20)])
        import httpx

        def post(i: int) -> int:
            return httpx.post(f"{fake.base_url}/v1/models/m:generateContent", json={"contents": []},
                              headers={"x-goog-api-key": fake.api_key}).status_code

        threads = [threading.Thread(target=post, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(fake.calls) == 20 and fake.pending == 0


def test_oracle_answers_registered_ground_truth(make, fake_gemini):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (600, 1500, 3), dtype=np.uint8))
    oracle = Oracle()
    oracle.add(image, [((150, 60, 450, 300), "Car"), ((900, 300, 1200, 540), "Tree"), ((0, 0, 10, 10), "Unasked")])
    fake_gemini.responder = oracle
    detections = make().detect(image, hashlib.sha256(image.tobytes()).hexdigest(), CONFIG)
    assert detections.labels == ["Car", "Tree"]  # only what the prompt asked for
    np.testing.assert_allclose(detections.xyxy, [[150, 60, 450, 300], [900, 300, 1200, 540]], atol=2)
