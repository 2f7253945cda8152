"""worker.training.dataset writes each image as it is fetched: bounded memory, same dataset as before.

The reference figures of ``test_split_and_manifest_match_the_reference`` were produced by the build
that kept every decoded image until the split was known (before worker/training/staging.py): the
streaming build must give the same split, counts, manifest and bytes. Training on drafts came later and
added fields (:data:`DRAFT_FIELDS`, each item's ``source``); the reference digest is of the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import threading
import time
import types
import weakref

import pytest

from backend.core.images import ImageError
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask
from backend.core.settings import Settings
from tests.synthetic import label_config
from tests.worker_fixtures import CLASSES, synthetic_tasks
from worker.training.dataset import build_dataset
from worker.training.staging import TASKS_PER_THREAD

CONFIG = ProjectConfig.parse(label_config(CLASSES))
#: Counts added by training on drafts (worker/training/drafts.py), after the reference was taken.
DRAFT_FIELDS = {"human_tasks": 20, "draft_tasks": 0, "drafts": {"enabled": False}}


def _settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "models", train_val_fraction=0.2, train_val_min=4)


class CountingLoader:
    """Decodes from memory and counts decoded images still alive (a finalizer per image)."""

    def __init__(self, inner, delay: float = 0.0, slow: dict[int, float] | None = None, jitter: float = 0.0):
        self.inner = inner
        self.delay = delay
        self.slow = slow or {}
        self.jitter = random.Random(5) if jitter else None
        self.jitter_max = jitter
        self.lock = threading.Lock()
        self.alive = 0
        self.max_alive = 0
        self.loads = 0

    def _released(self) -> None:
        with self.lock:
            self.alive -= 1

    def load(self, url, task_id=None):
        with self.lock:
            pause = self.delay + self.slow.get(task_id, 0.0) + (self.jitter.uniform(0, self.jitter_max) if self.jitter else 0.0)
        time.sleep(pause)
        loaded = self.inner.load(url, task_id)
        with self.lock:
            self.loads += 1
            self.alive += 1
            self.max_alive = max(self.max_alive, self.alive)
        weakref.finalize(loaded.image, self._released)
        return loaded


def _reference_tasks():
    """20 annotated 300x200 tasks, one whose image is missing, one without an image URL."""
    tasks, loader, _ = synthetic_tasks(20, seed=7, size=(300, 200))
    tasks.append(AnnotatedTask(id=21, data={"image": "/data/upload/1/missing.png"}, annotation_id=5,
                               annotation_updated_at="t0", result=[]))
    tasks.append(AnnotatedTask(id=22, data={}, annotation_id=6, annotation_updated_at="t0", result=[]))
    return tasks, loader


def _manifest_digest(root) -> str:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("created_at")
    for name in DRAFT_FIELDS:
        manifest["counts"].pop(name)
    for item in manifest["items"]:
        assert item.pop("source") == "human"
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def test_decoded_images_alive_stay_bounded(tmp_path):
    """60 tasks, 3 threads, one slow image: never more than 3 decoded at once (the old build held all 60)."""
    threads = 3
    tasks, inner, _ = synthetic_tasks(60, seed=2, size=(64, 48))
    loader = CountingLoader(inner, delay=0.002, slow={tasks[0].id: 0.3})
    ds = build_dataset("7", tasks, CONFIG, _settings(tmp_path), loader=loader, threads=threads)
    assert loader.loads == 60 and ds.counts["images"] == 60
    assert 1 <= loader.max_alive <= threads <= TASKS_PER_THREAD * threads, loader.max_alive
    assert loader.alive == 0  # every decoded image released by the end


def test_split_and_manifest_match_the_reference(tmp_path):
    """Same split, counts, manifest and image bytes as the build that kept every image, whatever the load order."""
    tasks, inner = _reference_tasks()
    expected_counts = {
        "tasks": 22, "images": 20, "train": 15, "val": 5, "negatives": 0, "boxes": 31, "per_class": {"Car": 15, "Person": 16},
        "skipped_tasks": {"load_error": 1, "no_image": 1}, "skipped_regions": {}, "converted_regions": {},
        "errors": ["task 21: load_error: '/data/upload/1/missing.png'", "task 22: no_image: task data has no 'image'"],
        **DRAFT_FIELDS,
    }
    digests = set()
    for threads, jitter in ((3, 0.0), (4, 0.02), (1, 0.0)):  # load order scrambled by random delays in the 2nd run
        loader = CountingLoader(inner, jitter=jitter)
        ds = build_dataset("42", tasks, CONFIG, _settings(tmp_path / str(threads)), loader=loader, max_image_side=160,
                           threads=threads)
        assert ds.val_ids == [1, 7, 9, 11, 17]
        assert [i.task_id for i in ds.items] == list(range(1, 21))  # task order, not completion order
        assert ds.counts == expected_counts
        digests.add(_manifest_digest(ds.root))
        folders = sorted(str(p.relative_to(ds.root)) for p in ds.root.rglob("*") if p.is_dir())
        assert folders == ["images", "images/train", "images/val", "labels", "labels/train", "labels/val"]
        assert not list(ds.root.parent.glob(".staging-*"))
        for item in ds.items:  # each image is the original downscaled to 160 px and saved as JPEG q95
            original = inner.load(tasks[item.task_id - 1].data["image"]).image
            buf = io.BytesIO()
            original.resize((160, 107)).convert("RGB").save(buf, "JPEG", quality=95)
            assert item.image_path.read_bytes() == buf.getvalue()
            assert (ds.root / "labels" / item.split / f"{item.task_id}.txt").is_file()
    assert digests == {"767f1f74d3ae4ffeac10c0692fff30e5462fc8b6e037d6ef924c17627f89a909"}


class FailingLoader:
    """Fails some tasks' loads, and can hand out one image that breaks while it is written."""

    def __init__(self, inner, fail: dict[int, Exception], broken: int | None = None):
        self.inner, self.fail, self.broken = inner, fail, broken

    def load(self, url, task_id=None):
        if task_id in self.fail:
            raise self.fail[task_id]
        loaded = self.inner.load(url, task_id)
        if task_id == self.broken:
            def convert(*_args, **_kwargs):
                raise OSError("disk full")
            return types.SimpleNamespace(image=types.SimpleNamespace(width=loaded.width, height=loaded.height,
                                                                     convert=convert),
                                         width=loaded.width, height=loaded.height)
        return loaded


def test_a_failing_image_fails_only_its_task(tmp_path):
    tasks, inner, _ = synthetic_tasks(12, seed=4)
    loader = FailingLoader(inner, {3: ImageError("decode_error", "cannot identify image file"), 8: RuntimeError("boom")})
    ds = build_dataset("9", tasks, CONFIG, _settings(tmp_path), loader=loader, threads=2)
    assert ds.counts["images"] == 10 and ds.counts["skipped_tasks"] == {"decode_error": 1, "load_error": 1}
    assert ds.counts["errors"] == ["task 3: decode_error: cannot identify image file", "task 8: load_error: boom"]
    assert sorted(ds.train_ids + ds.val_ids) == [t.id for t in tasks if t.id not in (3, 8)]
    files = {p.stem for p in ds.root.rglob("*.jpg")}
    assert files == {str(t.id) for t in tasks if t.id not in (3, 8)}


def test_an_unexpected_write_error_fails_the_build_and_leaves_nothing(tmp_path):
    """Not a load failure (a full disk): the build raises once running writes are done, and removes its staging."""
    tasks, inner, _ = synthetic_tasks(30, seed=4)
    with pytest.raises(OSError, match="disk full"):
        build_dataset("9", tasks, CONFIG, _settings(tmp_path), loader=FailingLoader(inner, {}, broken=5), threads=2)
    base = tmp_path / "data" / "datasets" / "9"
    time.sleep(0.1)  # a write still running after the build returned would show up now
    assert list(base.iterdir()) == []
