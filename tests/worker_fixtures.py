"""Fixtures and helpers shared by the worker tests (fixtures registered by tests/conftest.py; import only helpers).

- ``redis15``: a bytes client on db 15 (RQ needs bytes); keys of the test's project are removed after.
- ``project_id``: a random project id, so tests never share Redis keys.
- ``fake_ls``: a running :class:`tests.fake_label_studio.FakeLabelStudio`.
- ``make_settings(tmp_path, fake_ls, **overrides)``: a real :class:`backend.core.settings.Settings` for tiny runs.
- ``populate(fake_ls, n, ...)``: a project with synthetic annotated tasks.
- ``good_model()``: one tiny checkpoint of measured quality per test process (about 30 s, memoised).
- ``RQWorker``: a real ``rq worker`` subprocess in its own process group (SIGKILL-able).
- ``stub_train``: a cheap training job that follows the real locking protocol.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from backend.core.ultralytics_env import prepare

prepare()  # before anything imports ultralytics

from backend.core import keys  # noqa: E402
from backend.core.settings import Settings  # noqa: E402
from tests.fake_label_studio import FakeLabelStudio  # noqa: E402
from tests.paths import TEST_REDIS_URL  # noqa: E402
from tests.synthetic import label_config, ls_result, make_images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = TEST_REDIS_URL
CLASSES = ("Car", "Person")
TINY = {"train_imgsz": 96, "train_epochs": 1, "train_min_steps": 0, "train_batch": 8, "yolo_base_model": "yolov8n.yaml",
        "train_val_fraction": 0.2, "train_val_min": 4,
        "export_int8": False}  # INT8 exports cost seconds per promotion: tests that want one turn it on


def rq_bin() -> str:
    candidate = Path(sys.executable).parent / "rq"
    return str(candidate) if candidate.exists() else "rq"


@pytest.fixture
def redis15():
    client = redis_lib.Redis.from_url(REDIS_URL, socket_timeout=5)
    client.ping()
    yield client
    client.close()


def cleanup_project(client: redis_lib.Redis, project: str | int) -> None:
    """Every key of ``project`` (keys.project_patterns, the service's own list) and the tests' own ``test:*:<p>``."""
    for pattern in (*keys.project_patterns(project), f"test:*:{project}"):
        for k in client.scan_iter(pattern):
            client.delete(k)


@pytest.fixture
def project_id(redis15):
    pid = random.randint(10_000_000, 99_999_999)
    yield pid
    cleanup_project(redis15, pid)


@pytest.fixture
def fake_ls():
    with FakeLabelStudio() as ls:
        yield ls


def make_settings(tmp_path: Path, fake_ls: FakeLabelStudio | None = None, api_key: str | None = None, **overrides) -> Settings:
    values = {
        "redis_url": REDIS_URL,
        "data_dir": tmp_path / "data",
        "model_dir": tmp_path / "models",
        "label_studio_url": fake_ls.url if fake_ls else "",
        "label_studio_api_key": api_key or (fake_ls.pat if fake_ls else ""),
        **TINY,
    }
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``get_settings()`` in a worker subprocess equal ``settings``."""
    env = {}
    for name in ("redis_url", "data_dir", "model_dir", "label_studio_url", "train_imgsz", "train_epochs", "train_min_steps",
                 "train_batch", "yolo_base_model", "train_val_fraction", "train_val_min", "promote_min_gain", "keep_versions",
                 "train_min_new_annotations", "train_job_timeout", "train_time_limit_min"):
        env[name.upper()] = str(getattr(settings, name))
    env["LABEL_STUDIO_API_KEY"] = settings.label_studio_api_key.get_secret_value()
    return env


def populate(fake_ls: FakeLabelStudio, n: int = 24, seed: int = 0, classes=CLASSES, project: int | None = None,
             predictions: Callable | None = None, size=(128, 96)) -> tuple[int, list, list[int]]:
    """A project of ``n`` annotated synthetic tasks; returns (project id, images, task ids)."""
    pid = fake_ls.add_project(label_config(classes), project_id=project)
    images = make_images(n, seed=seed, classes=classes, size=size, max_objects=2)
    ids = []
    for i, im in enumerate(images):
        preds = predictions(i, im) if predictions else None
        ids.append(fake_ls.add_task(pid, im.encode(), result=ls_result(im.boxes, im.width, im.height), predictions=preds))
    return pid, images, ids


# --- a well-trained model, once per process ------------------------------------------------------

_MEMO: dict[str, object] = {}


def _memo_dir() -> Path:
    if "dir" not in _MEMO:
        path = Path(tempfile.mkdtemp(prefix="lsb-worker-tests-"))
        atexit.register(shutil.rmtree, path, True)
        _MEMO["dir"] = path
    return _MEMO["dir"]  # type: ignore[return-value]


class _DictLoader:
    """An in-memory image source with the ImageLoader interface (for the memoised fixtures)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def load(self, url, task_id=None):
        import hashlib
        import io
        import types

        from PIL import Image

        data = self.files[url]
        im = Image.open(io.BytesIO(data)).convert("RGB")
        return types.SimpleNamespace(image=im, width=im.width, height=im.height, sha256=hashlib.sha256(data).hexdigest(),
                                     data=data)


def synthetic_tasks(n: int, seed: int, classes=CLASSES, size=(128, 96)):
    """(AnnotatedTask list, loader) without any server."""
    from backend.core.label_studio import AnnotatedTask

    images = make_images(n, seed=seed, classes=classes, size=size, max_objects=2)
    files, tasks = {}, []
    for i, im in enumerate(images):
        url = f"/data/upload/1/{seed}-{i}.png"
        files[url] = im.encode()
        tasks.append(AnnotatedTask(id=i + 1, data={"image": url}, annotation_id=1000 + i, annotation_updated_at="t0",
                                   result=ls_result(im.boxes, im.width, im.height)))
    return tasks, _DictLoader(files), images


GOOD_MODEL = {"n": 40, "seed": 11, "imgsz": 96, "epochs": 16, "batch": 4}
# The quality good_model() guarantees on its held-out tasks (the gate's figures): measured, never assumed.
GOOD_QUALITY = {"map50": 0.9, "map50_95": 0.5}
GOOD_EXTRA_ROUNDS = 3  # more training rounds of GOOD_MODEL["epochs"] // 2 epochs each, until GOOD_QUALITY


def good_model() -> dict:
    """A checkpoint trained at imgsz 96 on 40 synthetic images until its held-out quality reaches GOOD_QUALITY.

    16 epochs first (val mAP50-95 about 0.7 measured), batch 4 (= nbs) and no warm-up: from random
    init, Ultralytics' 100-iteration warm-up would otherwise eat the whole tiny run. Training is not
    bit-for-bit reproducible across machines, so the quality is measured with the gate's own
    evaluation and training goes on (fine-tuning rounds) until it is reached; the fixture fails loudly
    otherwise. Trained once per test process in a temporary folder: nothing is read from a cache.
    """
    if "good" not in _MEMO:
        from backend.core.label_config import ProjectConfig
        from worker.training.dataset import build_dataset
        from worker.training.gate import held_out_metrics
        from worker.training.trainer import train

        base = _memo_dir() / "good"
        settings = Settings(data_dir=base / "data", model_dir=base / "models", train_imgsz=GOOD_MODEL["imgsz"],
                            train_epochs=GOOD_MODEL["epochs"], train_min_steps=0, train_batch=GOOD_MODEL["batch"],
                            yolo_base_model="yolov8n.yaml")
        tasks, loader, images = synthetic_tasks(GOOD_MODEL["n"], seed=GOOD_MODEL["seed"])
        config = ProjectConfig.parse(label_config(CLASSES))
        dataset = build_dataset("1", tasks, config, settings, loader=loader)
        target = base / "good.pt"
        started = time.monotonic()
        checkpoint = train(dataset.data_yaml, settings, progress=None, warmup_epochs=0).checkpoint
        metrics = held_out_metrics(checkpoint, dataset, config)
        for _ in range(GOOD_EXTRA_ROUNDS):
            if all(metrics[k] >= v for k, v in GOOD_QUALITY.items()):
                break
            checkpoint = train(dataset.data_yaml, settings, current_checkpoint=checkpoint, progress=None, warmup_epochs=0,
                               epochs=GOOD_MODEL["epochs"] // 2).checkpoint
            metrics = held_out_metrics(checkpoint, dataset, config)
        assert all(metrics[k] >= v for k, v in GOOD_QUALITY.items()), f"good_model() did not reach {GOOD_QUALITY}: {metrics}"
        shutil.copyfile(checkpoint, target)
        _MEMO["good"] = {"checkpoint": target, "dataset": dataset, "config": config, "tasks": tasks, "metrics": metrics,
                         "loader": loader, "images": images, "seconds": time.monotonic() - started}
    return _MEMO["good"]  # type: ignore[return-value]


# --- a real rq worker ------------------------------------------------------------------------------

class RQWorker:
    """``rq worker --with-scheduler`` on the test Redis in its own session (``kill()`` SIGKILLs the whole group)."""

    def __init__(self, queues: list[str], env: dict[str, str], log_path: Path, burst: bool = False, name: str | None = None):
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        cmd = [rq_bin(), "worker", "--url", REDIS_URL, "--with-scheduler", "--worker-ttl", "30"]
        if burst:
            cmd.append("--burst")
        if name:
            cmd += ["--name", name]
        cmd += queues
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def descendants(self) -> list[int]:
        """Every process below the worker (the work horse runs in its own process group: RQ calls setpgrp)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tasks:
                try:
                    children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                except OSError:
                    continue
                for child in map(int, children):
                    if child not in found:
                        found.append(child)
                        todo.append(child)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker, its work horse and its scheduler: the machine died."""
        if self.proc.poll() is None:
            children = self.descendants()
            for target in (self.proc.pid, *children):
                try:
                    os.killpg(os.getpgid(target), sig)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    os.kill(target, sig)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            children = self.descendants()
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # warm shutdown: waits for the running job
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                self.kill()
            for child in children:  # a horse left running (own process group) is ended too
                try:
                    os.kill(child, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        else:  # burst mode exited by itself; make sure nothing of the group is left
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


def job_status(client: redis_lib.Redis, job_id: str) -> str | None:
    value = client.hget(f"rq:job:{job_id}", "status")
    return value.decode() if value else None


def cleanup_queues(client: redis_lib.Redis, prefix: str) -> None:
    for k in client.scan_iter(f"rq:*{prefix}*"):
        client.delete(k)


@pytest.fixture
def qprefix(monkeypatch, redis15):
    """A queue prefix (``LSB_QUEUE_PREFIX``) only this test uses; its queues are removed after."""
    prefix = f"t{uuid.uuid4().hex[:8]}-"
    monkeypatch.setenv("LSB_QUEUE_PREFIX", prefix)
    yield prefix
    cleanup_queues(redis15, prefix)


# --- a cheap training job that follows the real protocol ------------------------------------------

def stub_train(project: str, label_config: str | None = None, force: bool = False) -> dict:
    """Holds the running lock for ``STUB_SECONDS`` and records when it ran (for coalescing tests)."""
    from rq import get_current_job

    from worker.training.lock import training_slot

    job = get_current_job()
    conn = job.connection
    with training_slot(conn, project, job.id) as slot:
        start = time.time()
        time.sleep(float(os.environ.get("STUB_SECONDS", "2")))
        record = {"job": job.id, "force": bool(force or slot.force_requested), "start": start, "end": time.time(),
                  "events": slot.events_consumed, "pid": os.getpid()}
        conn.rpush(f"test:runs:{project}", json.dumps(record))
    return record
