"""worker.training.base_model: pretrained weights when they can be had, the yaml fallback (said so) when not.

Nothing here downloads: weights are checkpoints the tests make themselves (tests/models.make_checkpoint)
placed where the download would put them, and the download itself runs with the network blocked (a
proxy that refuses, or one that never answers).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from tests.models import make_checkpoint
from tests.worker_fixtures import CLASSES, Settings
from worker.training import base_model
from worker.training.base_model import (
    BASE_FOLDER,
    NotACheckpoint,
    checksum_path,
    install,
    is_intact,
    obtain_base_model,
    sha256_of,
)
from worker.training.trainer import resolve_start

#: Generous bound for "answers within seconds": a child interpreter importing Ultralytics takes ~2 s here.
FALLBACK_BOUND_S = 30.0


def fallbacks(reason: str) -> float:
    return REGISTRY.get_sample_value("lsb_base_model_fallback_total", {"reason": reason}) or 0.0


def settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(model_dir=tmp_path / "models", data_dir=tmp_path / "data",
                    **{"yolo_base_model": "yolo11n.pt", "yolo_base_download_timeout": 60.0, **overrides})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A loadable Ultralytics detection checkpoint (random init: these tests check mechanics, not accuracy)."""
    return make_checkpoint(tmp_path_factory.mktemp("weights") / "made.pt", list(CLASSES))


@pytest.fixture
def no_download(monkeypatch):
    """Fail the test if a download child is started."""
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(base_model, "_download", refuse)


def _proxy_env(monkeypatch, url: str) -> None:
    """Every HTTP(S) request of the download child goes to ``url`` (requests honours these variables)."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, url)


@pytest.fixture
def refused_network(monkeypatch):
    """A proxy address where nothing listens: every connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _proxy_env(monkeypatch, f"http://127.0.0.1:{port}")


@pytest.fixture
def silent_network(monkeypatch):
    """A proxy that accepts connections and never answers: a download would hang until killed."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # never accepted: the kernel completes the handshake, nobody ever replies
    _proxy_env(monkeypatch, f"http://127.0.0.1:{server.getsockname()[1]}")
    yield server
    server.close()


# --- what YOLO_BASE_MODEL names ------------------------------------------------------------------

def test_a_model_yaml_is_random_init_as_asked(tmp_path, no_download):
    base = obtain_base_model(settings(tmp_path, yolo_base_model="yolo11n.yaml"))
    assert (base.used, base.pretrained, base.reason, base.fallback) == ("yolo11n.yaml", False, "model_yaml", False)
    assert resolve_start(settings(tmp_path, yolo_base_model="yolo11n.yaml"), None)[:2] == ("yolo11n.yaml", False)


def test_a_local_file_is_used_as_given(tmp_path, checkpoint, no_download):
    base = obtain_base_model(settings(tmp_path, yolo_base_model=str(checkpoint)))
    assert (base.used, base.pretrained, base.reason) == (str(checkpoint), True, "local_file")


def test_a_missing_path_falls_back_without_downloading(tmp_path, no_download, caplog):
    before = fallbacks("not_downloadable")
    with caplog.at_level(logging.WARNING, logger="worker.training.base_model"):
        base = obtain_base_model(settings(tmp_path, yolo_base_model=str(tmp_path / "elsewhere" / "yolo11n.pt")))
    assert (base.used, base.pretrained, base.reason) == ("yolo11n.yaml", False, "not_downloadable")
    assert fallbacks("not_downloadable") == before + 1 and "random init" in caplog.text


def test_a_name_ultralytics_does_not_publish_is_never_downloaded(tmp_path, no_download):
    base = obtain_base_model(settings(tmp_path, yolo_base_model="my-own-model.pt"))
    assert (base.used, base.reason) == ("my-own-model.yaml", "not_downloadable")


# --- weights present ----------------------------------------------------------------------------

def test_installed_weights_are_the_start_of_a_first_training(tmp_path, checkpoint, no_download):
    s = settings(tmp_path)
    info = install(checkpoint, s.model_dir / BASE_FOLDER, "yolo11n.pt")
    weights = s.model_dir / BASE_FOLDER / "yolo11n.pt"
    assert info["path"] == str(weights) and info["sha256"] == sha256_of(checkpoint) and info["classes"] == len(CLASSES)
    assert checksum_path(weights).read_text() == f"{info['sha256']}  yolo11n.pt\n" and is_intact(weights)

    start = resolve_start(s, None)
    assert (start.model, start.fine_tune) == (str(weights), True)
    assert start.base.to_status() == {"requested": "yolo11n.pt", "used": str(weights), "pretrained": True,
                                      "reason": "cached", "detail": "", "fallback": False}
    current = tmp_path / "current.pt"
    current.write_bytes(b"x")
    assert resolve_start(s, current) == (str(current), True, None)  # a project's own model always wins


def test_bundled_weights_are_used_when_model_dir_has_none(tmp_path, checkpoint, no_download):
    bundled = tmp_path / "image-weights"
    install(checkpoint, bundled, "yolo11n.pt")
    base = obtain_base_model(settings(tmp_path, yolo_base_bundled_dir=str(bundled)))
    assert (base.used, base.pretrained, base.reason) == (str(bundled / "yolo11n.pt"), True, "bundled")


def test_corrupt_weights_are_discarded_and_training_falls_back(tmp_path, checkpoint, caplog):
    s = settings(tmp_path, yolo_base_download_timeout=0)  # air-gapped: no download to replace them
    weights = Path(install(checkpoint, s.model_dir / BASE_FOLDER, "yolo11n.pt")["path"])
    with open(weights, "r+b") as fh:  # one flipped byte: bit rot, a torn copy
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    assert not is_intact(weights)
    before = fallbacks("download_disabled")
    with caplog.at_level(logging.WARNING, logger="worker.training.base_model"):
        base = obtain_base_model(s)
    assert (base.used, base.pretrained, base.reason) == ("yolo11n.yaml", False, "download_disabled")
    assert "discarded" in base.detail and "discarding" in caplog.text
    assert not weights.exists() and not checksum_path(weights).exists()
    assert fallbacks("download_disabled") == before + 1


def test_weights_without_their_checksum_are_not_trusted(tmp_path, checkpoint):
    s = settings(tmp_path, yolo_base_download_timeout=0)
    (s.model_dir / BASE_FOLDER).mkdir(parents=True)
    (s.model_dir / BASE_FOLDER / "yolo11n.pt").write_bytes(checkpoint.read_bytes()[:5000])  # a torn copy, no .sha256
    assert obtain_base_model(s).reason == "download_disabled"
    assert not (s.model_dir / BASE_FOLDER / "yolo11n.pt").exists()


# --- the download -------------------------------------------------------------------------------

def test_download_impossible_falls_back_within_seconds(tmp_path, refused_network, caplog):
    """Offline (the connection is refused): the yaml, a warning, the metric, in seconds, not the 60 s allowed."""
    s = settings(tmp_path)
    before = fallbacks("offline")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.training.base_model"):
        base = obtain_base_model(s)
    elapsed = time.monotonic() - started
    assert (base.used, base.pretrained, base.reason) == ("yolo11n.yaml", False, "offline"), base
    assert elapsed < FALLBACK_BOUND_S, elapsed
    assert "download failed" in base.detail and "random init" in caplog.text
    assert fallbacks("offline") == before + 1
    assert [p.name for p in (s.model_dir / BASE_FOLDER).iterdir()] == [".yolo11n.pt.lock"]  # no staging left


def test_a_hanging_download_is_cut_at_the_deadline(tmp_path, silent_network):
    """The connection is made and never answered (Ultralytics would wait 30 s per read, 3 retries)."""
    s = settings(tmp_path, yolo_base_download_timeout=8)  # the child's imports take ~2 s: it reaches the proxy
    before = fallbacks("timeout")
    started = time.monotonic()
    base = obtain_base_model(s)
    assert time.monotonic() - started < FALLBACK_BOUND_S
    assert (base.used, base.reason) == ("yolo11n.yaml", "timeout"), base
    silent_network.settimeout(0)
    silent_network.accept()[0].close()  # the child did reach the silent proxy: the deadline cut a real wait
    assert fallbacks("timeout") == before + 1
    assert [p.name for p in (s.model_dir / BASE_FOLDER).iterdir()] == [".yolo11n.pt.lock"]


def test_downloaded_weights_are_kept_with_their_checksum(tmp_path, checkpoint, monkeypatch):
    """The child's file (here copied, as Ultralytics' download would write it) is renamed in with its checksum."""
    script = "import shutil, sys; shutil.copyfile(sys.argv[1], sys.argv[2])"
    monkeypatch.setattr(base_model, "_child_command",
                        lambda name, staging: [sys.executable, "-c", script, str(checkpoint), str(staging / name)])
    s = settings(tmp_path)
    base = obtain_base_model(s)
    weights = s.model_dir / BASE_FOLDER / "yolo11n.pt"
    assert (base.used, base.pretrained, base.reason) == (str(weights), True, "downloaded")
    assert is_intact(weights) and sha256_of(weights) == sha256_of(checkpoint)
    monkeypatch.setattr(base_model, "_download", lambda *a: pytest.fail("downloaded twice"))
    assert obtain_base_model(s).reason == "cached"  # every later training, and every host sharing MODEL_DIR


def test_two_workers_download_once(tmp_path, checkpoint, monkeypatch):
    """Concurrent first trainings: one downloads under the lock, the other waits and takes its file."""
    calls = []

    def slow_download(name, folder, timeout):
        calls.append(name)
        time.sleep(0.5)
        base_model._publish(checkpoint, folder / name, move=False)
        return "downloaded", ""

    monkeypatch.setattr(base_model, "_download", slow_download)
    s = settings(tmp_path)
    results = []
    threads = [threading.Thread(target=lambda: results.append(obtain_base_model(s))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and sorted(b.reason for b in results) == ["cached", "downloaded"]
    assert all(b.pretrained and b.used == str(s.model_dir / BASE_FOLDER / "yolo11n.pt") for b in results)


def test_download_child_checks_what_ultralytics_wrote(tmp_path, checkpoint, monkeypatch):
    """The child's exit codes: 0 for a checkpoint, EXIT_INVALID for junk, EXIT_UNREACHABLE for no connection."""
    import shutil

    from ultralytics.utils import downloads

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(downloads, "attempt_download_asset", lambda f: shutil.copyfile(checkpoint, f))
    assert base_model._download_child("yolo11n.pt", str(tmp_path / "a")) == 0
    monkeypatch.setattr(downloads, "attempt_download_asset", lambda f: Path(f).write_text("<html>proxy error</html>"))
    assert base_model._download_child("yolo11n.pt", str(tmp_path / "b")) == base_model.EXIT_INVALID

    def offline(f):
        raise ConnectionError("Download failure. Environment may be offline.")
    monkeypatch.setattr(downloads, "attempt_download_asset", offline)
    assert base_model._download_child("yolo11n.pt", str(tmp_path / "b")) == base_model.EXIT_UNREACHABLE


# --- install --------------------------------------------------------------------------------------

class _Planted:
    """A pickle that would create a file if it were ever unpickled without restrictions."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_install_refuses_what_is_not_a_checkpoint(tmp_path):
    import torch

    notes = tmp_path / "notes.pt"
    notes.write_text("not weights")
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted.pt"
    torch.save({"model": _Planted(marker)}, planted)
    no_model = tmp_path / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, no_model)
    for path in (notes, planted, no_model, tmp_path / "missing.pt"):
        with pytest.raises(NotACheckpoint):
            install(path, tmp_path / "base", "yolo11n.pt")
    assert not marker.exists(), "the restricted loader ran code from the file"
    assert not (tmp_path / "base" / "yolo11n.pt").exists()
    with pytest.raises(NotACheckpoint, match="bare .pt file name"):
        install(notes, tmp_path / "base", "../yolo11n.pt")


def test_staging_left_by_a_killed_worker_is_removed(tmp_path):
    old, live = tmp_path / ".download-old", tmp_path / ".download-live"
    old.mkdir()
    live.mkdir()
    (old / ".yolo11n.pt.1234.part").write_bytes(b"half")
    os.utime(old, (time.time() - base_model.STALE_STAGING_S - 60,) * 2)
    base_model._remove_stale_staging(tmp_path)
    assert not old.exists() and live.exists()
