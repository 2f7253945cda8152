"""worker.training.gate: metrics on known boxes, draft quality per source, and the gate on real models."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask, StoredPrediction
from tests.synthetic import draft_result, label_config, perturb
from tests.worker_fixtures import CLASSES, Settings, good_model, synthetic_tasks
from worker.training.dataset import build_dataset
from worker.training.gate import average_precision, draft_quality, evaluate_checkpoint, evaluate_detections, evaluate_gate, gate

CONFIG = ProjectConfig.parse(label_config(CLASSES))


def det(boxes, labels, scores=None, source="x"):
    n = len(labels)
    return Detections(np.array(boxes, dtype=float).reshape(n, 4), list(labels),
                      np.ones(n) if scores is None else np.array(scores, dtype=float), (100, 100), source)


GT = det([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]], ["Car", "Car", "Person"], source="human")


def test_perfect_predictions():
    m = evaluate_detections([(det(GT.xyxy, GT.labels, [0.9, 0.8, 0.7]), GT)])
    assert (m.map50, m.map50_95, m.precision, m.recall, m.tp50) == (1.0, 1.0, 1.0, 1.0, 3)


def test_misses_false_positives_and_wrong_class():
    pred = det([[0, 0, 10, 10], [20, 20, 40, 40], [80, 80, 90, 90]], ["Car", "Person", "Car"], [0.9, 0.8, 0.95])
    m = evaluate_detections([(pred, GT)], classes=CLASSES)
    assert m.tp50 == 1 and m.precision == pytest.approx(1 / 3) and m.recall == pytest.approx(1 / 3)
    # Car: ranked FP (0.95) then TP (0.9): precision 0.5 up to recall 0.5, then nothing -> AP = 51/101 * 0.5
    assert m.per_class["Car"]["ap50"] == pytest.approx(0.5 * 51 / 101, abs=1e-6)
    assert m.per_class["Person"]["ap50"] == 0.0  # its only prediction is in the wrong place
    assert m.map50 == pytest.approx((0.5 * 51 / 101 + 0.0) / 2, abs=1e-6)


def test_iou_thresholds_and_duplicates():
    shifted = det([[1, 1, 10, 10]], ["Car"], [0.9])  # IoU 0.81 with the first Car
    m = evaluate_detections([(shifted, det([[0, 0, 10, 10]], ["Car"]))])
    assert m.map50 == 1.0 and m.map50_95 == pytest.approx(0.7)  # TP at 0.50 ... 0.80: 7 of 10 thresholds
    dup = det([[0, 0, 10, 10], [0, 0, 10, 10]], ["Car", "Car"], [0.9, 0.8])
    m = evaluate_detections([(dup, det([[0, 0, 10, 10]], ["Car"]))])
    assert m.tp50 == 1 and m.precision == 0.5 and m.map50 == 1.0  # the duplicate ranks below the match


def test_score_threshold_only_affects_precision_recall():
    pred = det(GT.xyxy, GT.labels, [0.9, 0.2, 0.1])
    m = evaluate_detections([(pred, GT)], score_threshold=0.5)
    assert m.map50 == 1.0 and m.recall == pytest.approx(1 / 3) and m.precision == 1.0


def test_empty_cases():
    empty = det([], [])
    assert evaluate_detections([(empty, empty)]).map50 == 0.0
    m = evaluate_detections([(empty, GT)])
    assert (m.precision, m.recall, m.map50) == (0.0, 0.0, 0.0)
    m = evaluate_detections([(det([[0, 0, 5, 5]], ["Car"]), empty)])
    assert m.precision == 0.0 and m.n_gt == 0
    assert np.isnan(average_precision(np.zeros((0, 1), bool), np.zeros(0), 0)).all()


def test_gate_rule():
    assert gate({"map50_95": 0.1}, None, 0.0).promote
    assert gate({"map50_95": 0.51}, {"map50_95": 0.5}, 0.0).promote
    assert not gate({"map50_95": 0.5}, {"map50_95": 0.5}, 0.0).promote
    assert not gate({"map50_95": 0.55}, {"map50_95": 0.5}, 0.1).promote


def test_draft_quality_per_source(tmp_path):
    tasks, loader, images = synthetic_tasks(12, seed=3)
    rng = np.random.default_rng(0)
    with_drafts = []
    for task, im in zip(tasks, images):
        gemini = draft_result([(b, 0.9) for b in im.boxes], im.width, im.height, source="gemini")  # perfect
        yolo = draft_result(perturb(im.boxes, rng, im.width, im.height, jitter=0.0, drop=1.0), im.width, im.height)  # misses all
        mixed = draft_result([(im.boxes[0], 0.5)], im.width, im.height, source="yolo")
        preds = (
            StoredPrediction(1, "gemini-2.5-flash", 0.9, gemini, "2026-01-01T00:00:00Z"),
            StoredPrediction(2, "yolo-v0003", 0.5, yolo, "2026-01-02T00:00:00Z"),  # the latest yolo draft: empty
            StoredPrediction(3, "lsb-v1", 0.5, mixed, "2025-01-01T00:00:00Z"),  # older, region meta says yolo
        )
        with_drafts.append(AnnotatedTask(task.id, task.data, task.annotation_id, task.annotation_updated_at, task.result, preds))
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "m", train_val_fraction=0.5, train_val_min=4)
    ds = build_dataset("3", with_drafts, CONFIG, settings, loader=loader)
    q = draft_quality(with_drafts, ds.val_items, CONFIG)
    assert set(q) == {"gemini", "yolo"}
    assert q["gemini"]["precision"] == 1.0 and q["gemini"]["recall"] == 1.0 and q["gemini"]["map50"] == 1.0
    assert q["gemini"]["n"] == len(ds.val_ids)
    assert q["yolo"]["recall"] == 0.0 and q["yolo"]["n_pred"] == 0  # the empty latest yolo draft counts
    # ground truth comes from the human labels of exactly the val tasks
    assert q["gemini"]["n_gt"] == sum(len(i.labels) for i in ds.val_items)


@pytest.mark.slow
def test_gate_on_real_models(tmp_path):
    """A well-trained current model beats a 1-epoch candidate, and the other way round."""
    from worker.training.trainer import train

    good = good_model()
    ds, config = good["dataset"], good["config"]
    metrics = evaluate_checkpoint(good["checkpoint"], ds, config)
    assert metrics["map50_95"] > 0.3 and metrics["map50"] > 0.6, metrics
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "m", train_imgsz=64, train_epochs=1, train_batch=8,
                        train_min_steps=0, yolo_base_model="yolov8n.yaml")
    weak = train(ds.data_yaml, settings, progress=None).checkpoint  # 1 epoch from scratch
    decision = evaluate_gate(weak, good["checkpoint"], ds, config, min_gain=0.0)
    assert not decision.promote and decision.candidate["map50_95"] < decision.current["map50_95"]
    assert decision.current["map50_95"] == pytest.approx(metrics["map50_95"], abs=1e-9)  # deterministic
    assert evaluate_gate(good["checkpoint"], weak, ds, config, min_gain=0.0).promote
    # a model trained under another class order/name set is mapped by name
    renamed = ProjectConfig.parse(label_config(("Person", "Car")))
    same = evaluate_checkpoint(good["checkpoint"], ds, renamed)
    assert same["map50_95"] == pytest.approx(metrics["map50_95"], abs=1e-9)
