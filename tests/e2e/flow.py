"""The shared state and helpers of tests/e2e/test_label_studio.py's ordered flow (kept apart to keep files short).

:class:`Flow` drives the real Label Studio (uploads that teach the fake Gemini noisy drafts, stored
predictions, Data Manager views, Retrieve Predictions); the helpers read stored regions back, run the
promoted checkpoint locally, and score detections through the one evaluation (backend.evaluation).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.control_models.reader import parse_regions
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.evaluation.metrics import detection_metrics
from bench.curve import DRAFT_NOISE
from tests.e2e.conftest import CLASSES, TIMINGS
from tests.live import wait_for
from tests.synthetic import Box, SyntheticImage, make_image, perturb

ROOT = Path(__file__).resolve().parents[2]
CONFIG = (ROOT / "label_config.xml").read_text()
PARSED_CONFIG = ProjectConfig.parse(CONFIG)

# --- geometry of stored regions --------------------------------------------------------------------

def region_boxes(result: list[dict]) -> list[tuple[str, np.ndarray, str | None, float | None]]:
    """(label, xyxy in original pixels, meta.source, score) of each rectangle region."""
    out = []
    for region in result:
        value, w, h = region["value"], region["original_width"], region["original_height"]
        x0, y0 = value["x"] / 100 * w, value["y"] / 100 * h
        xyxy = np.array([x0, y0, x0 + value["width"] / 100 * w, y0 + value["height"] / 100 * h])
        out.append((value["rectanglelabels"][0], xyxy, (region.get("meta") or {}).get("source"), region.get("score")))
    return out


def iou(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_valid(prediction, interface: LabelInterface, task_id: int) -> None:
    errors = interface.validate_prediction({"result": prediction.result, "score": prediction.score}, return_errors=True)
    assert not errors, f"task {task_id}: the stored prediction is not valid for label_config.xml: {errors}"
    for region in prediction.result:
        assert (region["from_name"], region["to_name"], region["type"]) == ("label", "image", "rectanglelabels"), region


def assert_matches(prediction, expected: list[Box], task_id: int, min_iou: float = 0.9) -> None:
    """The stored regions are ``expected`` (what the fake Gemini answered), in Label Studio's percent units."""
    boxes = region_boxes(prediction.result)
    assert len(boxes) == len(expected), f"task {task_id}: {len(boxes)} regions for {len(expected)} boxes: {boxes}"
    for truth in expected:
        best = max((iou(truth.xyxy, xyxy) for label, xyxy, _, _ in boxes if label == truth.label), default=0.0)
        assert best >= min_iou, f"task {task_id}: no {truth.label!r} region on {truth.xyxy} (best IoU {best:.2f}): {boxes}"


# --- the shared state of the flow ------------------------------------------------------------------

@dataclass
class Flow:
    ls: object  # label_studio_sdk.LabelStudio
    api: object  # conftest.LSApi
    backend: object  # conftest.Backend
    gemini: object  # conftest.GeminiFake
    base_model: object  # conftest.BaseModel
    seed: int
    interface: LabelInterface = field(default_factory=lambda: LabelInterface(CONFIG))
    project: int | None = None
    ml_id: int | None = None
    images: dict[int, SyntheticImage] = field(default_factory=dict)  # task id -> its image (and true boxes)
    drafts: dict[int, list[Box]] = field(default_factory=dict)  # task id -> the boxes the fake Gemini answers
    annotated: set[int] = field(default_factory=set)
    view: int | None = None  # the Data Manager view "most useful first" (test 5)
    order_before: list[int] = field(default_factory=list)  # its task order before the training
    done: set[str] = field(default_factory=set)

    def need(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.skip(f"needs the earlier step(s) {missing}")

    def upload(self, images: list[SyntheticImage], prefix: str) -> dict[int, SyntheticImage]:
        """Teach the fake Gemini noisy drafts of the images, upload them as files (one import), return task id -> image."""
        names = [f"{prefix}-{self.seed}-{i:03d}.png" for i in range(len(images))]
        rng = np.random.default_rng([self.seed, len(self.images)])
        answers = []
        for image in images:
            noisy = [box for box, _ in perturb(image.boxes, rng, image.width, image.height, classes=CLASSES, **DRAFT_NOISE)]
            self.gemini.oracle.add(image.image, [(box.xyxy, box.label) for box in noisy])
            answers.append(noisy)
        files = {name: (name, image.encode(), "image/png") for name, image in zip(names, images)}
        response = self.api.post(f"/api/projects/{self.project}/import", files=files)
        assert response.status_code == 201, f"import failed: HTTP {response.status_code} {response.text[:500]}"
        assert response.json().get("task_count") == len(images), response.json()
        by_name = {name: (image, noisy) for name, image, noisy in zip(names, images, answers)}
        new: dict[int, SyntheticImage] = {}
        for task in self.ls.tasks.list(project=self.project, fields="all"):
            url = (task.data or {}).get("image", "")
            for name, (image, noisy) in by_name.items():
                if url.endswith(f"-{name}") or url.endswith(f"/{name}"):
                    new[task.id] = image
                    self.drafts[task.id] = noisy
        assert len(new) == len(images), f"could not find the {len(images)} uploaded tasks (found {len(new)})"
        self.images.update(new)
        return new

    def predictions(self) -> dict[int, list]:
        """task id -> its stored predictions (GET /api/predictions never makes Label Studio call /predict)."""
        out: dict[int, list] = collections.defaultdict(list)
        for prediction in self.ls.predictions.list(project=self.project):
            out[int(prediction.task)].append(prediction)
        return out

    def wait_predictions(self, task_ids, timeout: float, what: str) -> dict[int, list]:
        def ready():
            current = self.predictions()
            return current if all(current.get(t) for t in task_ids) else None

        return wait_for(ready, timeout, what, interval=1.0, on_timeout=self._missing(task_ids))

    def _missing(self, task_ids):
        def describe() -> str:
            current = self.predictions()
            missing = [t for t in task_ids if not current.get(t)]
            return f"tasks without a prediction: {missing}\n{self.backend.story(self.project)}"
        return describe

    def view_order(self) -> list[int]:
        """Task ids in the order Label Studio's Data Manager lists them in ``self.view`` (its filters and ordering)."""
        response = self.api.get("/api/tasks/", params={"project": self.project, "view": self.view, "page_size": 1000})
        assert response.status_code == 200, f"GET /api/tasks/?view=: HTTP {response.status_code} {response.text[:500]}"
        body = response.json()
        return [int(task["id"]) for task in (body["tasks"] if isinstance(body, dict) else body)]

    def ranking_job(self, timeout: float):
        """The finished re-score job the promotion queued (``rank-<project>-...`` on the backend's prelabel queue)."""
        import redis as redis_lib
        from rq.job import Job
        from rq.registry import FailedJobRegistry, FinishedJobRegistry

        connection = redis_lib.Redis.from_url(self.backend.env["REDIS_URL"])
        queue, prefix = self.backend.env["LSB_QUEUE_PREFIX"] + "prelabel", f"rank-{self.project}-"

        def done():
            failed = [j for j in FailedJobRegistry(queue, connection=connection).get_job_ids() if j.startswith(prefix)]
            assert not failed, f"the re-score job failed: {Job.fetch(failed[0], connection=connection).exc_info}"
            ids = [j for j in FinishedJobRegistry(queue, connection=connection).get_job_ids() if j.startswith(prefix)]
            return Job.fetch(ids[0], connection=connection) if ids else None

        try:
            return wait_for(done, timeout, "the re-score job queued by the promotion", interval=1.0,
                            on_timeout=lambda: self.backend.story(self.project))
        finally:
            connection.close()

    def retrieve(self, task_ids) -> dict:
        """Data Manager "Retrieve Predictions" on ``task_ids`` (synchronous without LS's Redis)."""
        response = self.api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": self.project},
                                 json={"selectedItems": {"all": False, "included": list(task_ids)}})
        assert response.status_code == 200, f"retrieve_tasks_predictions: HTTP {response.status_code} {response.text[:500]}"
        return response.json()



def timed(name: str, since: float) -> float:
    TIMINGS[name] = time.monotonic() - since
    return time.monotonic()


# --- the promoted model, scoring --------------------------------------------------------------------

class LocalYolo:
    """The promoted checkpoint run here the way backend.detectors.yolo runs it (trained imgsz, conf)."""

    def __init__(self, checkpoint: Path):
        from ultralytics import YOLO

        self.model = YOLO(str(checkpoint))
        self.imgsz = self.model.overrides.get("imgsz") or 640

    def detect(self, image: SyntheticImage, conf: float) -> list[tuple[str, np.ndarray, float]]:
        result = self.model.predict(image.image, imgsz=self.imgsz, conf=conf, device="cpu", verbose=False)[0]
        return [(self.model.names[int(c)], np.asarray(xyxy, float), float(s))
                for c, xyxy, s in zip(result.boxes.cls.tolist(), result.boxes.xyxy.tolist(), result.boxes.conf.tolist())]


def pick_yolo_friendly_image(local: LocalYolo, seed: int) -> tuple[SyntheticImage, list]:
    """A fresh image the promoted model finds objects on above label_config.xml's threshold (0.3)."""
    rng = np.random.default_rng(seed)
    best, best_score = None, -1.0
    for _ in range(12):
        image = make_image(rng, classes=CLASSES, n_objects=int(rng.integers(1, 3)))
        found = local.detect(image, conf=0.3)
        good = [d for d in found if any(d[0] == b.label and iou(d[1], b.xyxy) >= 0.5 for b in image.boxes)]
        score = len(good) + (max(d[2] for d in good) if good else 0.0) - 0.5 * (len(found) - len(good))
        if good and score > best_score:
            best, best_score = (image, found), score
    assert best is not None, "the promoted YOLO model finds no object above 0.3 on 12 fresh images"
    return best


def assert_yolo_draft(prediction, local: list, task_id: int) -> None:
    """Regions from YOLO, above the config's threshold, the boxes the promoted checkpoint finds here."""
    boxes = region_boxes(prediction.result)
    assert boxes, f"task {task_id}: the YOLO fallback stored no region: {prediction.result}"
    assert {source for _, _, source, _ in boxes} == {"yolo"}, boxes
    assert all(score is not None and score >= 0.3 for _, _, _, score in boxes), boxes
    # (an export may differ from the .pt in the last digits: compare boxes, and only clear scores)
    for label, xyxy, _, _ in boxes:
        assert any(label == name and iou(xyxy, box) >= 0.8 for name, box, _ in local), (
            f"{label} {xyxy} not found locally: {local}")
    for name, box, score in local:
        if score >= 0.4:
            assert any(label == name and iou(xyxy, box) >= 0.8 for label, xyxy, _, _ in boxes), (
                f"{name} {box} {score:.2f} missing: {boxes}")


def unannotated(flow: Flow) -> list[int]:
    return sorted(set(flow.images) - flow.annotated)


def truth(image: SyntheticImage) -> Detections:
    """The synthetic ground truth as detections (pixels of the original image)."""
    boxes = np.array([box.xyxy for box in image.boxes], float).reshape(-1, 4)
    return Detections(boxes, [box.label for box in image.boxes], np.ones(len(boxes)), (image.width, image.height), "truth")


def stored(prediction, image: SyntheticImage) -> Detections:
    """A stored prediction read back as the training's draft quality reads drafts (regions -> pixels, their scores)."""
    parsed = parse_regions(prediction.result, PARSED_CONFIG, (image.width, image.height), dedupe=False)
    return parsed.detections(image.width, image.height, "stored", prediction.model_version)


def map50(pairs) -> float:
    """The one evaluation (pycocotools through backend.evaluation.metrics)."""
    return detection_metrics(list(pairs), PARSED_CONFIG.class_names).map50


def start_training_and_wait(flow: Flow, timeout: float) -> dict:
    """Label Studio's "Start Training" button, then the backend's /train/status until the training ended."""
    backend = flow.backend
    response = flow.api.post(f"/api/ml/{flow.ml_id}/train")
    assert response.status_code == 200, f"Start Training: HTTP {response.status_code} {response.text[:500]}"
    assert wait_for(lambda: backend.access("POST", "/webhook", 201, "heartex/"), 10, "START_TRAINING accepted by /webhook")

    def finished():
        current = backend.train_status(flow.project)
        last = current.get("last") or {}
        return current if last.get("status") in ("promoted", "rejected", "skipped", "failed") else None

    return wait_for(finished, timeout, "the training started from Label Studio to finish", interval=2.0,
                    on_timeout=lambda: str(backend.train_status(flow.project)))
