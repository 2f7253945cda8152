"""End to end against a real Label Studio 1.23.2: the backend as scripts/run.sh starts it, Gemini faked.

One flow in ordered steps sharing module state (a failed step skips the ones after it):

1. a project from the repository's label_config.xml, created with label-studio-sdk;
2. the backend connected with ``POST /api/ml`` (Basic auth): Label Studio called /health and /setup
   and reports the backend connected; the webhook it created is found and given the shared secret,
   which the backend then requires;
3. synthetic images uploaded as tasks: drafts appear WITHOUT anyone asking (TASKS_CREATED -> the
   worker's pre-labeling job -> ``POST /api/predictions``; Label Studio never calls /predict), one per
   task, valid for the config, of the version /setup reports, with Gemini's boxes (= the truth);
4. "Retrieve Predictions" on a task whose draft was deleted and on tasks that hold one: one /predict
   call for the missing task only, and exactly one prediction of the current version per task;
5. annotations for every task (counted through ANNOTATION_CREATED webhooks, no automatic training),
   "Start Training": a fine-tuned YOLO version is promoted, /setup reports ``...+yolo:v0001``; with
   Gemini answering 500 the next import is drafted by YOLO v0001 in the worker, and Retrieve has the
   web workers draft it again with v0001 (the boxes the promoted checkpoint finds here) while tasks
   of the old version get exactly one prediction of the new one; gunicorn and the rq worker were
   never restarted, and no secret reached their log.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.label_interface import LabelInterface

from backend.core.settings import Settings
from tests.e2e.conftest import CLASSES, TIMINGS
from tests.fake_gemini import server_error
from tests.live import wait_for
from tests.synthetic import SyntheticImage, ls_result, make_image, make_images

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = (ROOT / "label_config.xml").read_text()
GEMINI_VERSION = f"gemini:{Settings.model_fields['gemini_model'].default}"
N_TASKS = 16
SECRET_HEADER = "X-Webhook-Secret"


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


def assert_matches_truth(prediction, image: SyntheticImage, task_id: int, min_iou: float = 0.9) -> None:
    boxes = region_boxes(prediction.result)
    assert len(boxes) == len(image.boxes), f"task {task_id}: {len(boxes)} regions for {len(image.boxes)} objects: {boxes}"
    for truth in image.boxes:
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
    images: dict[int, SyntheticImage] = field(default_factory=dict)  # task id -> its image
    done: set[str] = field(default_factory=set)

    def need(self, *steps: str) -> None:
        missing = [s for s in steps if s not in self.done]
        if missing:
            pytest.skip(f"needs the earlier step(s) {missing}")

    def upload(self, images: list[SyntheticImage], prefix: str) -> dict[int, SyntheticImage]:
        """Teach the fake Gemini the images, upload them as files (one import), return task id -> image."""
        names = [f"{prefix}-{self.seed}-{i:03d}.png" for i in range(len(images))]
        for image in images:
            self.gemini.oracle.add(image.image, [(box.xyxy, box.label) for box in image.boxes])
        files = {name: (name, image.encode(), "image/png") for name, image in zip(names, images)}
        response = self.api.post(f"/api/projects/{self.project}/import", files=files)
        assert response.status_code == 201, f"import failed: HTTP {response.status_code} {response.text[:500]}"
        assert response.json().get("task_count") == len(images), response.json()
        by_name = dict(zip(names, images))
        new: dict[int, SyntheticImage] = {}
        for task in self.ls.tasks.list(project=self.project, fields="all"):
            url = (task.data or {}).get("image", "")
            for name, image in by_name.items():
                if url.endswith(f"-{name}") or url.endswith(f"/{name}"):
                    new[task.id] = image
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

    def retrieve(self, task_ids) -> dict:
        """Data Manager "Retrieve Predictions" on ``task_ids`` (synchronous without LS's Redis)."""
        response = self.api.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": self.project},
                                 json={"selectedItems": {"all": False, "included": list(task_ids)}})
        assert response.status_code == 200, f"retrieve_tasks_predictions: HTTP {response.status_code} {response.text[:500]}"
        return response.json()


@pytest.fixture(scope="module")
def flow(base_model, backend, ls_sdk, ls_api, gemini) -> Flow:
    # base_model first: on a machine without the cached checkpoint its background build then
    # overlaps the Label Studio venv, template and start.
    seed = int(time.time() * 1000) % 1_000_000  # fresh images every run: no Gemini answer cached in Redis
    print(f"\n[e2e] synthetic image seed {seed}", flush=True)
    state = Flow(ls_sdk, ls_api, backend, gemini, base_model, seed)
    yield state
    gemini.restore()


def timed(name: str, since: float) -> float:
    TIMINGS[name] = time.monotonic() - since
    return time.monotonic()


# --- 1. the project ----------------------------------------------------------------------------------

def test_1_project_from_label_config(flow: Flow):
    started = time.monotonic()
    project = flow.ls.projects.create(title="Site safety (e2e)", label_config=CONFIG)
    flow.project = int(project.id)
    flow.backend.projects.add(flow.project)
    stored = LabelInterface(flow.ls.projects.get(id=flow.project).label_config)
    control = stored.get_control("label")
    assert control.tag == "RectangleLabels"
    assert tuple(control.labels) == CLASSES
    assert [c.tag for c in stored.controls] == ["RectangleLabels", "TextArea"]
    timed("1. create the project", started)
    flow.done.add("project")


# --- 2. connect the backend ----------------------------------------------------------------------

def test_2_connect_backend(flow: Flow):
    flow.need("project")
    backend, started = flow.backend, time.monotonic()
    user, password = backend.auth
    response = flow.api.post("/api/ml", json={
        "url": backend.url, "project": flow.project, "is_interactive": False, "title": "Gemini + YOLO",
        "auth_method": "BASIC_AUTH", "basic_auth_user": user, "basic_auth_pass": password,
    })
    assert response.status_code == 201, f"POST /api/ml: HTTP {response.status_code} {response.text[:800]}"
    flow.ml_id = response.json()["id"]

    ml = flow.api.get(f"/api/ml/{flow.ml_id}").json()
    assert ml["state"] == "CO", f"Label Studio does not report the backend connected: {ml}"
    assert not ml.get("error_message"), ml
    # Label Studio really asked: /health, then /setup with the Basic credentials (401 without them).
    assert backend.access("GET", "/health", 200, "heartex/"), "Label Studio never called /health"
    assert backend.access("POST", "/setup", 200, "heartex/"), "Label Studio never called /setup (with Basic auth)"
    assert backend.access("POST", "/setup", 401, "heartex/") == [], "Label Studio sent /setup without the Basic credentials"
    assert ml["model_version"] in ("", backend.setup_version(flow.project, CONFIG)), ml

    # The webhook Label Studio created with the backend, now given the shared secret.
    hooks = flow.api.get("/api/webhooks/", params={"project": flow.project}).json()
    mine = [h for h in hooks if h["url"] == f"{backend.url}/webhook"]
    assert len(mine) == 1, f"expected one auto-created webhook to {backend.url}/webhook: {hooks}"
    hook = mine[0]
    assert hook["is_active"] and hook["send_payload"] and hook["send_for_all_actions"], hook
    response = flow.api.patch(f"/api/webhooks/{hook['id']}/", json={"headers": {SECRET_HEADER: backend.webhook_secret}})
    assert response.status_code == 200, f"PATCH webhook: HTTP {response.status_code} {response.text[:500]}"
    assert flow.api.get(f"/api/webhooks/{hook['id']}/").json()["headers"] == {SECRET_HEADER: backend.webhook_secret}

    # The backend refuses events without the secret (and /predict without Basic auth).
    import requests

    event = {"action": "PROJECT_UPDATED", "project": {"id": flow.project}}
    assert requests.post(f"{backend.url}/webhook", json=event, timeout=10).status_code == 401
    assert requests.post(f"{backend.url}/webhook", json=event, headers={SECRET_HEADER: "wrong"}, timeout=10).status_code == 401
    assert requests.post(f"{backend.url}/webhook", json=event, headers={SECRET_HEADER: backend.webhook_secret},
                         timeout=10).status_code == 200
    assert requests.post(f"{backend.url}/predict", json={"tasks": [{"data": {}}]}, timeout=10).status_code == 401
    timed("2. connect the backend + webhook secret", started)
    flow.done.add("connected")


# --- 3. drafts on import ---------------------------------------------------------------------------

def test_3_import_gets_drafts_without_asking(flow: Flow):
    flow.need("connected")
    backend, started = flow.backend, time.monotonic()
    # Label Studio's own calls only ("heartex/" agent): test 2's unauthenticated /predict may reach the
    # access log after this count.
    predict_calls = len(backend.access("POST", "/predict", agent="heartex/"))
    webhooks_ok, webhooks_refused = len(backend.access("POST", "/webhook", 200)), len(backend.access("POST", "/webhook", 401))
    gemini_calls = len(flow.gemini.calls)

    images = make_images(N_TASKS, seed=flow.seed, classes=CLASSES, max_objects=2)
    tasks = flow.upload(images, "site")
    t = timed("3a. upload 16 images", started)
    predictions = flow.wait_predictions(list(tasks), 180, "a draft on every imported task (TASKS_CREATED pre-labeling)")
    timed("3b. drafts for 16 imported tasks", t)

    version = backend.setup_version(flow.project, CONFIG)
    assert version == GEMINI_VERSION
    for task_id, image in tasks.items():
        stored = predictions[task_id]
        assert len(stored) == 1, f"task {task_id}: {len(stored)} predictions"
        prediction = stored[0]
        assert prediction.model_version == version
        assert_valid(prediction, flow.interface, task_id)
        sources = {source for _, _, source, _ in region_boxes(prediction.result)}
        assert sources == {"gemini"}, f"task {task_id}: region sources {sources}"
        assert_matches_truth(prediction, image, task_id)

    # Nobody asked: Label Studio never called /predict; its TASKS_CREATED webhook carried the secret.
    assert len(backend.access("POST", "/predict", agent="heartex/")) == predict_calls, "Label Studio called /predict on import"
    assert len(backend.access("POST", "/webhook", 200)) > webhooks_ok, "no webhook from Label Studio was accepted"
    assert len(backend.access("POST", "/webhook", 401)) == webhooks_refused, "Label Studio sent a webhook without the secret"
    calls = flow.gemini.calls[gemini_calls:]
    assert len(calls) >= N_TASKS and all(c.status == 200 for c in calls), [c.status for c in calls]
    flow.done.add("drafts")


# --- 4. Retrieve Predictions -----------------------------------------------------------------------

def test_4_retrieve_predictions_stores_no_duplicate(flow: Flow):
    flow.need("drafts")
    backend, started = flow.backend, time.monotonic()
    extra = flow.upload([make_image(np.random.default_rng(flow.seed + 1), classes=CLASSES, n_objects=2)], "extra")
    (task_id, image), = extra.items()
    draft = flow.wait_predictions([task_id], 120, "the draft of the extra task")[task_id]
    assert len(draft) == 1
    flow.ls.predictions.delete(id=draft[0].id)
    assert not flow.predictions().get(task_id), "the deleted prediction is still listed"

    version = backend.setup_version(flow.project, CONFIG)
    others = sorted(t for t in flow.images if t != task_id)[:3]
    predict_calls = len(backend.access("POST", "/predict", 200, "heartex/"))
    result = flow.retrieve([task_id, *others])
    assert result.get("processed_items") == 4, result

    predictions = flow.predictions()
    for tid in [task_id, *others]:
        versions = [p.model_version for p in predictions[tid]]
        assert versions == [version], f"task {tid}: predictions of versions {versions}, expected exactly one {version}"
    assert_valid(predictions[task_id][0], flow.interface, task_id)
    assert_matches_truth(predictions[task_id][0], image, task_id)
    assert sum(len(p) for p in predictions.values()) == len(flow.images)
    # One /predict request: Label Studio skipped the tasks that hold the current version.
    assert len(backend.access("POST", "/predict", 200, "heartex/")) == predict_calls + 1

    # Retrieving everything again stores nothing and asks nothing.
    flow.retrieve(sorted(flow.images))
    assert sum(len(p) for p in flow.predictions().values()) == len(flow.images)
    assert len(backend.access("POST", "/predict", 200, "heartex/")) == predict_calls + 1
    timed("4. retrieve predictions (one missing, three present)", started)
    flow.done.add("retrieve")


# --- 5. Start Training, promotion, hot-swap, YOLO fallback ------------------------------------------

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


def test_5_start_training_promotes_and_hot_swaps(flow: Flow):
    flow.need("retrieve")
    backend, started = flow.backend, time.monotonic()

    # Ground truth for every task; each ANNOTATION_CREATED webhook is counted, none starts a training.
    for task_id, image in sorted(flow.images.items()):
        flow.ls.annotations.create(id=task_id, result=ls_result(image.boxes, image.width, image.height),
                                   was_cancelled=False, ground_truth=True)
    n_annotated = len(flow.images)
    status = wait_for(lambda: (s := backend.train_status(flow.project))["events_since_training"] >= n_annotated and s,
                      30, f"{n_annotated} ANNOTATION_CREATED webhooks counted by the backend")
    assert status["events_since_training"] == n_annotated
    assert status["queued"] is None and status["running"] is None and status["current_version"] is None, status
    t = timed("5a. annotate every task", started)

    flow.base_model.wait()
    t = timed("5b. wait for the YOLO base checkpoint", t)
    response = flow.api.post(f"/api/ml/{flow.ml_id}/train")
    assert response.status_code == 200, f"Start Training: HTTP {response.status_code} {response.text[:500]}"
    assert wait_for(lambda: backend.access("POST", "/webhook", 201, "heartex/"), 10, "START_TRAINING accepted by /webhook")

    def finished():
        current = backend.train_status(flow.project)
        last = current.get("last") or {}
        return current if last.get("status") in ("promoted", "rejected", "skipped", "failed") else None

    status = wait_for(finished, 420, "the training started from Label Studio to finish", interval=2.0,
                      on_timeout=lambda: str(backend.train_status(flow.project)))
    t = timed("5c. training (Start Training -> promoted)", t)
    last = status["last"]
    assert last["status"] == "promoted", f"training did not promote: {last}"
    assert status["current_version"] == "v0001" and last["version"] == "v0001", status
    print(f"\n[e2e] training: {last.get('durations')} candidate {(last.get('candidate_metrics') or {}).get('map50')}", flush=True)

    version = backend.setup_version(flow.project, CONFIG)
    assert version == f"{GEMINI_VERSION}+yolo:v0001"
    # Every serving process switches without a restart (pub/sub + poll): ask until one serves it.
    wait_for(lambda: backend.get("/models", params={"project": flow.project}).json().get("serving") == "v0001", 60,
             "a web worker serving YOLO v0001")
    t = timed("5d. hot-swap to v0001", t)

    # Gemini down: the next import is drafted by the promoted YOLO model (in the worker's job) ...
    local_model = LocalYolo(backend.model_dir / str(flow.project) / "v0001" / "model.pt")
    image, local = pick_yolo_friendly_image(local_model, flow.seed + 2)
    flow.gemini.fail_with(server_error(500))
    new = flow.upload([image], "after-training")
    (task_id, _), = new.items()
    stored = flow.wait_predictions([task_id], 180, "the YOLO draft of the task imported after training")[task_id]
    assert [p.model_version for p in stored] == [version], [p.model_version for p in stored]
    assert_valid(stored[0], flow.interface, task_id)
    assert_yolo_draft(stored[0], local, task_id)
    assert [c for c in flow.gemini.calls if c.status == 500], "the backend did not try Gemini before falling back"
    t = timed("5e. YOLO fallback draft on import (worker)", t)

    # ... and by the web workers: Retrieve for that task (its draft deleted) and for tasks holding only
    # the old version: one /predict; Gemini's cached answers serve the old tasks, YOLO the new one.
    flow.ls.predictions.delete(id=stored[0].id)
    olds = sorted(flow.images)[:3]
    predict_calls = len(backend.access("POST", "/predict", 200, "heartex/"))
    flow.retrieve([*olds, task_id])
    predictions = flow.predictions()
    for tid in olds:
        counts = collections.Counter(p.model_version for p in predictions[tid])
        assert counts == {GEMINI_VERSION: 1, version: 1}, f"task {tid}: {dict(counts)}"
    assert [p.model_version for p in predictions[task_id]] == [version]
    assert_valid(predictions[task_id][0], flow.interface, task_id)
    assert_yolo_draft(predictions[task_id][0], local, task_id)
    assert len(backend.access("POST", "/predict", 200, "heartex/")) == predict_calls + 1
    timed("5f. retrieve after the version change (web)", t)

    # Same processes all along: promoted and served without any restart.
    pids = backend.service_pids()
    assert pids == backend.initial_pids, f"processes changed since run.sh started: {backend.initial_pids} -> {pids}"
    assert len(pids["gunicorn workers"]) == 2 and len(pids["rq worker"]) == 1, pids
    log = backend.log()
    for secret in (backend.webhook_secret, backend.auth[1], backend.env["LABEL_STUDIO_API_KEY"],
                   backend.env["GEMINI_API_KEY"]):
        assert secret not in log, "a secret reached the backend log"
    flow.done.add("trained")
