"""``lsb base-model``: installing weights copied onto an air-gapped host, and seeing where they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.core.settings import get_settings
from tests.models import make_checkpoint
from tests.worker_fixtures import CLASSES
from worker.cli.__main__ import main
from worker.training.base_model import checksum_path, is_intact, obtain_base_model, sha256_of


@pytest.fixture
def model_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("YOLO_BASE_MODEL", "yolo11n.pt")
    monkeypatch.setenv("YOLO_BASE_DOWNLOAD_TIMEOUT", "0")  # air-gapped
    monkeypatch.delenv("YOLO_BASE_BUNDLED_DIR", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "models"
    get_settings.cache_clear()


def lsb(capsys, *argv) -> tuple[int, dict | None, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_install_then_the_first_training_starts_from_it(model_dir, tmp_path, capsys):
    copied = make_checkpoint(tmp_path / "usb" / "yolo11n.pt", list(CLASSES))
    code, before, _ = lsb(capsys, "base-model", "status")
    assert code == 0 and before["places"]["model_dir"]["exists"] is False

    code, out, err = lsb(capsys, "base-model", "install", copied)
    assert code == 0, err
    weights = model_dir / "base" / "yolo11n.pt"
    assert out["path"] == str(weights) and out["sha256"] == sha256_of(copied) and out["used_by_training"] is True
    assert out["task"] == "detect" and out["classes"] == len(CLASSES)
    assert is_intact(weights) and checksum_path(weights).is_file()
    code, after, _ = lsb(capsys, "base-model", "status")
    assert after["places"]["model_dir"] == {"path": str(weights), "exists": True, "checksum": True, "intact": True}

    base = obtain_base_model(get_settings())
    assert (base.used, base.pretrained, base.reason) == (str(weights), True, "cached")


def test_install_under_another_name_and_folder(model_dir, tmp_path, capsys):
    copied = make_checkpoint(tmp_path / "weights (1).pt", list(CLASSES))
    code, out, err = lsb(capsys, "base-model", "install", copied, "--name", "yolo11n.pt", "--dir", tmp_path / "image")
    assert code == 0, err
    assert out["path"] == str(tmp_path / "image" / "yolo11n.pt") and is_intact(tmp_path / "image" / "yolo11n.pt")
    code, out, _ = lsb(capsys, "base-model", "install", copied, "--name", "other.pt", "--dir", tmp_path / "image")
    assert code == 0 and out["used_by_training"] is False  # installed, but not what YOLO_BASE_MODEL names


def test_install_refuses_a_file_that_is_not_a_checkpoint(model_dir, tmp_path, capsys):
    notes = tmp_path / "yolo11n.pt"
    notes.write_text("<html>a proxy's error page saved as weights</html>")
    code, out, err = lsb(capsys, "base-model", "install", notes)
    assert code == 2 and out is None
    assert "not a loadable Ultralytics checkpoint" in err and "Traceback" not in err
    assert not (model_dir / "base" / "yolo11n.pt").exists()
    code, _, err = lsb(capsys, "base-model", "install", tmp_path / "missing.pt")
    assert code == 2 and "is not a file" in err
