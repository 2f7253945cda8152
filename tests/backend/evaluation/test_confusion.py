"""backend.evaluation.confusion: hand-built detections with known answers."""

from __future__ import annotations

from backend.core.detections import Detections
from backend.evaluation.confusion import confusion_matrix

SIZE = (100, 100)


def _det(boxes, labels, scores=None, source="yolo"):
    return Detections(boxes, labels, scores if scores is not None else [1.0] * len(labels), SIZE, source)


def test_match_wrong_class_missed_and_background():
    truth = _det([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], ["Car", "Person", "Car"])
    pred = _det([[0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90], [81, 81, 90, 90]], ["Car", "Car", "Person", "Car"],
                [0.9, 0.8, 0.7, 0.1])
    out = confusion_matrix([(pred, truth)], ["Car", "Person"], score_threshold=0.5)
    assert out["rows"] == ["Car", "Person", "background"] and out["columns"] == ["Car", "Person", "missed"]
    # Car matched, Person labeled as Car, the second Car missed, a Person predicted on background; 0.1 below threshold
    assert out["matrix"] == [[1, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_unknown_labels_ignored_and_empty_images():
    truth = _det([[0, 0, 10, 10]], ["Car"])
    pred = _det([[0, 0, 10, 10]], ["Tree"])
    out = confusion_matrix([(pred, truth), (_det([], []), _det([], []))], ["Car"])
    assert out["matrix"] == [[0, 1], [0, 0]] and out["n_images"] == 2
    assert confusion_matrix([], ["Car"])["matrix"] == [[0, 0], [0, 0]]
