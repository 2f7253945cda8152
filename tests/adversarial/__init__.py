"""The adversarial suite: the service keeps working, and loses nothing, when inputs and neighbours misbehave.

Every case asserts its outcome (status code, message, what was served, what was stored). Shared pieces
(the fixtures ``private_redis`` and ``app_factory`` live in tests/adversarial/conftest.py, the helpers here):

- :class:`PrivateRedis` / ``private_redis``: a ``redis-server`` of our own on a free port, so tests can
  kill, pause and restart it, and use the plain ``training``/``prelabel`` queue names, without touching
  the Redis other suites share (TEST_REDIS_URL).
- ``app_factory``: the real Flask app (``create_app`` + ``build``) on that Redis, with tmp dirs and an
  optional fake Gemini / fake Label Studio, like production wires them.
- image helpers: encoders and the "red car" picture the fake Gemini's Oracle finds by colour.

Cases covered elsewhere and not repeated here: the image loader's own unit cases (tests/backend/core/images/),
a worker SIGKILLed mid-training (tests/backend/core/test_queue.py::test_sigkill_mid_training_leaves_current_untouched),
Label Studio down until a retry succeeds (tests/backend/core/test_queue.py::test_label_studio_down_is_retried_with_backoff),
a crash inside ``add_version`` at the registry level (tests/backend/core/test_registry.py).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import redis as redis_lib
from PIL import Image, ImageDraw

from tests.live import free_port, wait_for

RED = (220, 30, 30)
GREEN = (40, 160, 60)
CAR_BOX = (10, 8, 42, 32)  # x0, y0, x1, y1 (exclusive) of the red car on the 64 x 48 picture
CONFIG = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Car"/><Label value="Person"/></RectangleLabels></View>')
PROJECT = "7.1795306664"


# --- a private Redis -------------------------------------------------------------------------------

class PrivateRedis:
    """``redis-server --port P --save ''`` as a child process: start, kill (SIGKILL), pause, restart."""

    def __init__(self, log_dir: Path) -> None:
        self.binary = shutil.which("redis-server")
        self.port = free_port()
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 2.0) -> redis_lib.Redis:
        return redis_lib.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def start(self) -> PrivateRedis:
        assert self.binary, "redis-server is not installed"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--daemonize", "no"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: self.client(0.2).ping(), timeout=10, message=f"redis-server on port {self.port}", interval=0.05,
                 on_timeout=lambda: self.log_path.read_text(errors="replace")[-2000:])
        return self

    def kill(self) -> None:
        """SIGKILL: connections drop at once, nothing is saved."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (a hung Redis)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# --- the app ---------------------------------------------------------------------------------------

def make_settings(tmp_path: Path, redis_url: str, *, gemini=None, ls=None, **overrides):
    from backend.core.settings import Settings

    values = {
        "redis_url": redis_url, "model_dir": tmp_path / "models", "data_dir": tmp_path / "data",
        "label_studio_url": ls.url if ls is not None else "", "label_studio_api_key": ls.pat if ls is not None else "",
        "gemini_api_key": gemini.api_key if gemini is not None else "",
        "gemini_base_url": gemini.base_url if gemini is not None else "",
        "gemini_task_deadline": 5.0, "gemini_timeout": 2.0, "gemini_breaker_failures": 1000, "yolo_score_threshold": 0.0001,
    }
    values.update(overrides)
    return Settings(**values)


class AppHandle:
    """The app under test: ``client`` (Flask test client), ``services``, ``settings``."""

    def __init__(self, settings, services, app):
        self.settings, self.services, self.app = settings, services, app
        self.client = app.test_client()


def build_app(tmp_path: Path, redis_url: str, *, gemini=None, ls=None, **overrides) -> AppHandle:
    """The real app on ``redis_url``; a Gemini detector gets its own cache/breaker prefix."""
    from backend.detectors.gemini.client import GeminiDetector
    from backend.serving.services import build
    from backend.web.app import create_app

    settings = make_settings(tmp_path, redis_url, gemini=gemini, ls=ls, **overrides)
    services = build(settings)
    if services.gemini is not None:
        client = redis_lib.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        services.gemini = GeminiDetector(settings, client, prefix=f"lsb:adv:{uuid.uuid4().hex}")
        services.predictor.gemini = services.gemini
        services.predictor.router.gemini = services.gemini
    return AppHandle(settings, services, create_app(settings, services))


# --- images ----------------------------------------------------------------------------------------

def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def car_picture(size: tuple[int, int] = (64, 48), box: tuple[int, int, int, int] = CAR_BOX,
                background=GREEN, color=RED) -> Image.Image:
    """A plain background with one solid "car" rectangle (``box`` is x0, y0, x1, y1 exclusive)."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=color)
    return image


def percent_box(box: tuple[int, int, int, int], width: int, height: int) -> dict[str, float]:
    """What Label Studio should receive for ``box`` on a ``width`` x ``height`` image (test-side truth)."""
    x0, y0, x1, y1 = box
    return {"x": 100 * x0 / width, "y": 100 * y0 / height, "width": 100 * (x1 - x0) / width,
            "height": 100 * (y1 - y0) / height}


def assert_box(region: dict, box: tuple[int, int, int, int], width: int, height: int, tol_px: float = 2.5) -> None:
    """``region`` (Label Studio percent) covers ``box`` (pixels) within ``tol_px`` pixels per edge: the
    fake Gemini sees a JPEG of the image, whose blurred edges can cost a pixel or two."""
    expected = percent_box(box, width, height)
    value = region["value"]
    for key, want in expected.items():
        scale = (width if key in ("x", "width") else height) / 100
        assert abs(value[key] - want) * scale <= tol_px, (key, value, expected)
    assert (region["original_width"], region["original_height"]) == (width, height)


def task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}}


def predict_body(tasks: list[dict], config: str = CONFIG, project: str = PROJECT) -> dict:
    return {"tasks": tasks, "label_config": config, "project": project, "params": {}}


def rss_kb(pid: int) -> int:
    """Resident set size of a process from /proc, in kB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (gunicorn's workers), from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def elapsed(start: float) -> float:
    return time.perf_counter() - start
