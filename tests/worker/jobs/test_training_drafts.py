"""worker.jobs.training with drafts: they train, they never judge (gate and draft quality see human labels only).

Ultralytics is stubbed out (a fixed checkpoint file stands for the trained model, a detector that finds
nothing stands for it in the gate): what is checked is which tasks each step gets, not a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from backend.core.detections import Detections
from tests.synthetic import draft_result, make_images
from tests.worker_fixtures import CLASSES, make_settings, populate
from worker.jobs.training import run_training
from worker.training import gate
from worker.training.dataset import DatasetItem
from worker.training.trainer import TrainResult

VERSION = "gemini:gemini-2.5-flash"


def _draft(im) -> dict:
    return {"result": draft_result([(b, 0.9) for b in im.boxes], im.width, im.height, source="gemini"),
            "model_version": VERSION, "score": 0.9}


class NothingDetector:
    """Stands for YoloDetector in the gate: loads nothing, finds nothing."""

    max_det = 300

    def __init__(self, checkpoint, name, device="cpu", imgsz=0):
        self.checkpoint = checkpoint


@pytest.fixture
def stubbed_training(monkeypatch, tmp_path):
    """No Ultralytics: ``train`` returns a fixed file; the gate's predictions are recorded and empty."""
    scored: list[list[DatasetItem]] = []

    def fake_train(data_yaml, settings, current_checkpoint=None, **_):
        checkpoint = tmp_path / f"candidate-{len(scored)}.pt"
        checkpoint.write_bytes(b"not a real model")
        return TrainResult(checkpoint=checkpoint, start_from="stub", fine_tuned=False, epochs_run=1, seconds=0.0,
                           train_args={"imgsz": 96})

    def record(detector, items, config, conf=gate.ALL_BOXES):
        scored.append(list(items))
        return [Detections(np.zeros((0, 4)), [], np.zeros(0), (i.width, i.height), "yolo") for i in items]

    monkeypatch.setattr("worker.jobs.training.train", fake_train)
    monkeypatch.setattr(gate, "YoloDetector", NothingDetector)
    monkeypatch.setattr(gate, "predict_items", record)
    return scored


def test_drafts_train_but_the_gate_and_draft_quality_see_human_labels_only(fake_ls, tmp_path, redis15, project_id,
                                                                          stubbed_training):
    pid, _, human_ids = populate(fake_ls, n=12, project=project_id, predictions=lambda i, im: [_draft(im)])
    drafted_ids = [fake_ls.add_task(pid, im.encode(), predictions=[_draft(im)])
                   for im in make_images(5, seed=50, classes=CLASSES, max_objects=2)]
    settings = make_settings(tmp_path, fake_ls)
    result = run_training(pid, settings=settings, redis=redis15)

    counts = result["counts"]
    assert result["status"] == "promoted"
    assert (counts["human_tasks"], counts["draft_tasks"]) == (12, 5) and counts["drafts"]["used"] == 5
    assert set(result["val_task_ids"]) <= set(human_ids) and not set(result["val_task_ids"]) & set(drafted_ids)
    # the gate scored exactly the human-annotated held-out tasks
    (scored,) = stubbed_training
    assert sorted(i.task_id for i in scored) == sorted(result["val_task_ids"]) and {i.source for i in scored} == {"human"}
    # draft quality: the drafts of the human held-out tasks, against their human labels
    assert result["draft_quality"]["gemini"]["n"] == counts["val"] and result["draft_quality"]["gemini"]["recall"] == 1.0
    manifest = Path(settings.data_dir) / "datasets" / str(pid) / result["dataset_hash"] / "manifest.json"
    manifest_sources = {i["task_id"]: i["source"] for i in json.loads(manifest.read_text())["items"]}
    assert {t for t, s in manifest_sources.items() if s == "draft"} == set(drafted_ids)

    # TRAIN_DRAFTS=false: the drafts are not even listed
    off = make_settings(tmp_path, fake_ls, train_drafts=False)
    listed_before = len(fake_ls.api_calls("/api/tasks/"))
    result_off = run_training(pid, force=True, settings=off, redis=redis15)
    assert result_off["counts"]["draft_tasks"] == 0 and result_off["counts"]["drafts"] == {"enabled": False}
    assert result_off["counts"]["human_tasks"] == 12
    queries = [r["args"].get("query", "") for r in fake_ls.api_calls("/api/tasks/")[listed_before:]]
    assert queries and not any("total_predictions" in q for q in queries)


def test_the_gate_refuses_a_draft_in_the_held_out_split():
    item = DatasetItem(1, "val", Path("1.jpg"), 10, 10, 10, 10, [], np.zeros((0, 4)), source="draft")
    with pytest.raises(ValueError, match="held-out"):
        gate.human_held_out([item])
    with pytest.raises(ValueError, match="held-out"):
        gate.draft_quality([], [item], None)


def test_drafts_that_cannot_be_listed_leave_the_human_annotations_to_train_on(fake_ls, tmp_path, redis15, project_id,
                                                                             stubbed_training, monkeypatch, caplog):
    pid, _, _ = populate(fake_ls, n=12, project=project_id)

    def refused(*args, **kwargs):
        raise RuntimeError("HTTP 400: unknown filter")

    monkeypatch.setattr("worker.jobs.training.fetch_drafted_tasks", refused)
    result = run_training(pid, settings=make_settings(tmp_path, fake_ls), redis=redis15)
    assert result["status"] == "promoted" and result["counts"]["human_tasks"] == 12
    assert result["counts"]["draft_tasks"] == 0
    assert "stored drafts could not be listed" in caplog.text
