"""worker.training.gate: the rule, draft quality per source, the gate on real models, and that it scores the served model.

The metrics themselves (pycocotools, on known boxes) are tested in tests/backend/evaluation/test_metrics.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.core.label_config import ProjectConfig
from backend.core.label_studio import AnnotatedTask, StoredPrediction
from backend.detectors.yolo import YoloDetector
from backend.evaluation.metrics import detection_metrics
from tests.synthetic import draft_result, label_config, perturb
from tests.worker_fixtures import CLASSES, Settings, good_model, synthetic_tasks
from worker.training.dataset import build_dataset
from worker.training.gate import ALL_BOXES, draft_quality, evaluate_gate, gate, held_out_metrics

CONFIG = ProjectConfig.parse(label_config(CLASSES))


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
    metrics = held_out_metrics(good["checkpoint"], ds, config)
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
    same = held_out_metrics(good["checkpoint"], ds, renamed)
    assert same["map50_95"] == pytest.approx(metrics["map50_95"], abs=1e-9)


@pytest.mark.slow
def test_the_gate_scores_what_the_serving_detector_serves():
    """The gate's held-out mAP of a checkpoint equals the serving detector's score on the same tasks."""
    good = good_model()
    ds, config = good["dataset"], good["config"]
    gate_figures = held_out_metrics(good["checkpoint"], ds, config, score_threshold=0.25)
    served = YoloDetector.load(good["checkpoint"], "v0001")  # as the hot-swap loader loads a version, warmed up
    pairs = []
    for item in ds.val_items:
        with Image.open(item.image_path) as image:
            pairs.append((served.detect_batch([image.convert("RGB")], config, ALL_BOXES)[0], item.ground_truth(saved=True)))
    scored = detection_metrics(pairs, config.class_names, score_threshold=0.25, max_det=served.max_det)
    assert scored.n_images == len(ds.val_items) > 0 and scored.n_pred > 0
    assert (gate_figures["map50_95"], gate_figures["map50"]) == (scored.map50_95, scored.map50)
    assert (gate_figures["precision"], gate_figures["recall"]) == (scored.precision, scored.recall)


def test_a_missing_checkpoint_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tasks, loader, _ = synthetic_tasks(8, seed=2)
    settings = Settings(data_dir=tmp_path, model_dir=tmp_path / "m", train_val_fraction=0.5, train_val_min=2)
    ds = build_dataset("5", tasks, CONFIG, settings, loader=loader)
    with pytest.raises(FileNotFoundError):
        held_out_metrics(tmp_path / "nope.pt", ds, CONFIG)
    assert not Path("nope.pt").exists()
