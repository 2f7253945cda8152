"""worker.train: where training starts from, offline safety, progress, and the copied checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.worker_fixtures import CLASSES, Settings, good_model, synthetic_tasks
from worker.train import resolve_start, train


def test_resolve_start(tmp_path):
    s = Settings(yolo_base_model="yolo11n.yaml")
    assert resolve_start(s, None) == ("yolo11n.yaml", False)
    # a .pt that is not a local file is never handed to YOLO() (it would download): same-stem yaml
    assert resolve_start(Settings(yolo_base_model="yolo11n.pt"), None) == ("yolo11n.yaml", False)
    local = tmp_path / "base.pt"
    local.write_bytes(b"x")
    assert resolve_start(Settings(yolo_base_model=str(local)), None) == (str(local), True)
    current = tmp_path / "current.pt"
    current.write_bytes(b"x")
    assert resolve_start(Settings(yolo_base_model=str(local)), current) == (str(current), True)
    assert resolve_start(s, tmp_path / "gone.pt") == ("yolo11n.yaml", False)


@pytest.mark.slow
def test_train_from_scratch_and_fine_tune(tmp_path, monkeypatch):
    import torch
    from ultralytics import YOLO

    from backend.label_config import ProjectConfig
    from tests.synthetic import label_config
    from worker.dataset import build_dataset

    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    tasks, loader, _ = synthetic_tasks(16, seed=5)
    settings = Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "m", train_imgsz=64, train_epochs=2,
                        train_batch=8, yolo_base_model="yolov8n.pt")  # not a local file: falls back to yaml
    ds = build_dataset("9", tasks, ProjectConfig.parse(label_config(CLASSES)), settings, loader=loader)
    updates = []
    result = train(ds.data_yaml, settings, progress=updates.append)

    assert result.checkpoint.is_file() and result.checkpoint.parent == (tmp_path / "data" / "candidates").resolve()
    assert not result.fine_tuned and result.start_from == "yolov8n.yaml"
    assert result.epochs_run == 2
    assert result.train_args["nbs"] == 8 and result.train_args["amp"] is False and result.train_args["workers"] == 0
    assert result.train_args["pretrained"] is False
    assert [u["epoch"] for u in updates if u["stage"] == "training"] == [1, 2]
    assert all(u["epochs"] == 2 for u in updates)
    assert "train/box_loss" in updates[0]["losses"] and "metrics/mAP50-95(B)" in updates[0]["metrics"]
    assert not list((tmp_path / "data" / "runs").iterdir())  # runs/ cleaned up
    assert not (tmp_path / "runs").exists()
    assert all(u["threads"] == (os.cpu_count() or 1) for u in updates if u["stage"] == "training")  # not cpu_count - 1
    assert torch.get_num_threads() == (os.cpu_count() or 1)
    model = YOLO(str(result.checkpoint))
    assert list(model.names.values()) == list(CLASSES)

    # fine-tuning from the current checkpoint keeps its weights (no pretrained=False)
    good = good_model()
    tuned = train(good["dataset"].data_yaml, Settings(data_dir=tmp_path / "data", model_dir=tmp_path / "m",
                                                      train_imgsz=96, train_epochs=1, train_batch=8),
                  current_checkpoint=good["checkpoint"], progress=None)
    assert tuned.fine_tuned and tuned.start_from == str(good["checkpoint"])
    assert "pretrained" not in tuned.train_args
    from worker.evaluate import evaluate_checkpoint

    after = evaluate_checkpoint(tuned.checkpoint, good["dataset"], good["config"])
    assert after["map50"] > 0.5, after  # a from-scratch epoch would score about 0


def test_missing_checkpoint_is_not_downloaded(tmp_path):
    from worker.evaluate import predict_items

    with pytest.raises(FileNotFoundError):
        predict_items(tmp_path / "nope.pt", [], None)  # type: ignore[arg-type]
    assert not Path("nope.pt").exists()
