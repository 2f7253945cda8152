"""backend.detectors.yolo: every prediction of a process runs on its one inference thread."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from backend.core.label_config import ProjectConfig
from backend.detectors import yolo as yolo_module
from backend.detectors.yolo import YoloDetector, on_inference_thread
from tests.models import make_checkpoint

CONFIG = ProjectConfig.parse('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
                             '<Label value="car"/><Label value="person"/></RectangleLabels></View>')


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    det = YoloDetector(make_checkpoint(tmp_path_factory.mktemp("y") / "m.pt", ["car", "person"]), "v0001")
    det.warm_up()
    return det


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_predictions_from_many_threads_run_on_one_thread(detector, monkeypatch):
    """Torch keeps an OpenMP team per calling thread: gunicorn's request threads must not each get one."""
    threads: set[int] = set()
    predict = detector._model.predict

    def recording_predict(*args, **kwargs):
        threads.add(threading.get_ident())
        return predict(*args, **kwargs)

    monkeypatch.setattr(detector._model, "predict", recording_predict)
    images = _images(6)
    expected = [detector.detect_batch([image], CONFIG, 0.0) for image in images]
    with ThreadPoolExecutor(6) as pool:  # like gunicorn's gthreads serving requests at once
        got = list(pool.map(lambda image: detector.detect_batch([image], CONFIG, 0.0), images))
    assert threads == {on_inference_thread(threading.get_ident)}
    assert threading.get_ident() not in threads
    for (a,), (b,) in zip(expected, got):  # same answers as one after another
        assert a.labels == b.labels and np.allclose(a.xyxy, b.xyxy) and np.allclose(a.scores, b.scores)


def test_torch_threads_are_set_on_the_inference_thread(detector):
    import torch

    assert on_inference_thread(torch.get_num_threads) == detector._threads


def test_a_failing_predict_reaches_the_caller(detector, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(detector._model, "predict", broken)
    with pytest.raises(RuntimeError, match="boom"):
        detector.detect_batch(_images(1), CONFIG, 0.25)
    assert yolo_module.on_inference_thread(lambda: 42) == 42  # the thread survives it
