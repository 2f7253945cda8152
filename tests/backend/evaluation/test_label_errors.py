"""backend.evaluation.label_errors: a missed label, a wrong class, background, a spurious box, ranking and links."""

from __future__ import annotations

from backend.core.detections import Detections
from backend.evaluation.label_errors import label_errors, task_link

SIZE = (100, 100)


def _det(boxes, labels, scores=None):
    return Detections(boxes, labels, scores if scores is not None else [1.0] * len(labels), SIZE, "yolo")


def test_kinds_ranking_cap_and_links():
    truth = _det([[0, 0, 10, 10], [20, 20, 30, 30], [60, 0, 70, 10]], ["Car", "Person", "Car"])
    pred = _det([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60], [80, 80, 90, 90]], ["Car", "Car", "Person", "Car"],
                [0.95, 0.8, 0.9, 0.2])
    found = label_errors([(7, pred, truth)], 0.5, project=3, label_studio_url="http://ls:8080/")
    kinds = [(c["kind"], c["score"]) for c in found]
    # strong kinds by confidence; the low-score box is no candidate; the unmatched true Car is the weak kind, last
    assert kinds == [("missed_label", 0.9), ("wrong_class", 0.8), ("spurious_label", 0.95)]
    missed, wrong, spurious = found
    assert missed["predicted"] == "Person" and missed["box"] == [50.0, 50.0, 60.0, 60.0] and missed["task_id"] == 7
    assert wrong["predicted"] == "Car" and wrong["labeled"] == "Person" and wrong["box"] == [20.0, 20.0, 30.0, 30.0]
    assert spurious["labeled"] == "Car" and spurious["box"] == [60.0, 0.0, 70.0, 10.0]
    assert missed["link"] == "http://ls:8080/projects/3/data?task=7"
    assert len(label_errors([(7, pred, truth)], 0.5, limit=2)) == 2


def test_agreement_gives_nothing_and_no_url_no_link():
    truth = _det([[0, 0, 10, 10]], ["Car"])
    assert label_errors([(1, _det([[0, 0, 10, 10]], ["Car"], [0.99]), truth)], 0.5) == []
    assert task_link("", 3, 1) is None
    only_low = label_errors([(1, _det([[50, 50, 60, 60]], ["Car"], [0.3]), truth)], 0.5)
    assert only_low == []  # not confident anywhere: neither a missed label nor a spurious one
