"""backend.evaluation.report: the tables people act on, on a hand-made case whose every count is known.

Two images, classes Car / Person / Sign, precision and recall at score >= 0.5:

- image 1 (task 11): Car and Car found; a Car and a Person predicted where nothing is (0.7, 0.6); the true
  Person only found at 0.2 (below the threshold);
- image 2 (task 12): the true Person predicted as Car (0.95); the Sign found.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from backend.core.detections import Detections
from backend.evaluation.confusion import confusion_matrix
from backend.evaluation.label_errors import label_errors
from backend.evaluation.metrics import detection_metrics, evaluate
from backend.evaluation.report import write_report

CLASSES = ["Car", "Person", "Sign"]
THRESHOLD = 0.5


def _det(boxes, labels, scores, source="yolo") -> Detections:
    return Detections(np.array(boxes, dtype=float).reshape(-1, 4), list(labels), np.array(scores, dtype=float), (100, 100),
                      source)


TRUTH = [_det([[0, 0, 20, 20], [40, 40, 60, 60], [70, 0, 90, 30]], ["Car", "Car", "Person"], [1, 1, 1], "human"),
         _det([[10, 10, 30, 40], [50, 50, 70, 70]], ["Person", "Sign"], [1, 1], "human")]
PRED = [_det([[0, 0, 20, 20], [40, 40, 60, 60], [70, 70, 90, 90], [0, 60, 20, 90], [70, 0, 90, 30]],
             ["Car", "Car", "Car", "Person", "Person"], [0.9, 0.8, 0.7, 0.6, 0.2]),
        _det([[10, 10, 30, 40], [50, 50, 70, 70]], ["Car", "Sign"], [0.95, 0.85])]
PAIRS = list(zip(PRED, TRUTH))
# class: (true, predictions kept, precision, recall) at score >= 0.5, counted by hand
EXPECTED = {"Car": (2, 4, 0.5, 1.0), "Person": (2, 1, 0.0, 0.0), "Sign": (1, 1, 1.0, 1.0)}


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first Markdown table after ``heading``."""
    after = text.split(heading, 1)[1]
    rows = []
    for line in after.splitlines()[1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and rule


@pytest.fixture
def report(tmp_path):
    metrics = evaluate(PAIRS, CLASSES, score_threshold=THRESHOLD)
    metrics["confusion"] = confusion_matrix(PAIRS, CLASSES, score_threshold=THRESHOLD)
    metrics["label_errors"] = label_errors(((task, p, g) for task, (p, g) in zip((11, 12), PAIRS)), 0.5, project=5,
                                           label_studio_url="http://ls.example:8080/")
    perfect = detection_metrics([(g, g) for g in TRUTH], CLASSES)
    mine = detection_metrics(PAIRS, CLASSES, score_threshold=THRESHOLD)
    metrics["side_by_side"] = {
        name: {"map50": m.map50, "map50_95": m.map50_95, "precision": m.precision, "recall": m.recall, "score_threshold": t,
               "n_images": m.n_images, "n_gt": m.n_gt, "n_pred": m.n_pred, "per_class": m.per_class}
        for name, m, t in (("yolo", mine, THRESHOLD), ("gemini", perfect, 0.0))}
    path = write_report(metrics, tmp_path / "rep", about={"source": "hand-made"})
    return metrics, path.read_text(), json.loads((tmp_path / "rep" / "metrics.json").read_text())


def test_per_class_precision_recall_match_metrics_and_hand_counts(report):
    metrics, text, saved = report
    rows = {r[0]: r for r in _table(text, "### By class")}
    assert set(rows) == set(CLASSES)
    for name, (n_gt, kept, precision, recall) in EXPECTED.items():
        row = metrics["per_class"][name]
        assert (row["n_gt"], row["n_kept"], row["precision"], row["recall"]) == (n_gt, kept, precision, recall)
        assert saved["per_class"][name]["precision"] == precision and saved["per_class"][name]["recall"] == recall
        assert rows[name][3] == str(kept) and rows[name][6] == f"{precision:.3f}" and rows[name][7] == f"{recall:.3f}"
        assert rows[name][4] == f"{row['ap50']:.3f}" and rows[name][5] == f"{row['ap50_95']:.3f}"
    # the per-class counts add up to the overall figures: 3 true positives of 6 kept, of 5 true boxes
    assert metrics["gate"]["tp50"] == sum(metrics["per_class"][c]["tp50"] for c in CLASSES) == 3
    assert metrics["gate"]["precision"] == 0.5 and metrics["gate"]["recall"] == 0.6
    # the Car ranking: 0.95 wrong, 0.9 right, 0.8 right, 0.7 wrong -> interpolated precision 2/3 at every recall
    assert metrics["per_class"]["Car"]["ap50"] == pytest.approx(2 / 3, abs=1e-6)


def test_confusion_table_counts_missed_and_background(report):
    metrics, text, _ = report
    assert metrics["confusion"]["matrix"] == [[2, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0], [1, 1, 0, 0]]
    header = next(line for line in text.split("## Confusion matrix", 1)[1].splitlines() if line.startswith("|"))
    assert header == "| true \\ predicted | Car | Person | Sign | missed |"
    assert _table(text, "## Confusion matrix") == [
        ["Car", "2", "0", "0", "0"],
        ["Person", "1", "0", "0", "1"],  # one read as Car (image 2), one found only below the threshold: missed
        ["Sign", "0", "0", "1", "0"],
        ["background", "1", "1", "0", "0"],  # the Car and the Person predicted where nothing is
    ]
    assert "![Confusion matrix](plots/confusion.png)" in text


def test_label_error_links_open_the_tasks(report):
    _, text, saved = report
    rows = _table(text, "## Label-error candidates")
    assert [r[:5] for r in rows] == [
        ["[12](http://ls.example:8080/projects/5/data?task=12)", "wrong_class", "Car", "Person", "0.950"],
        ["[11](http://ls.example:8080/projects/5/data?task=11)", "missed_label", "Car", "–", "0.700"],
        ["[11](http://ls.example:8080/projects/5/data?task=11)", "missed_label", "Person", "–", "0.600"],
    ]
    assert rows[0][5] == "10, 10, 30, 40"  # the labeled box the model contradicts
    links = [f"http://ls.example:8080/projects/5/data?task={t}" for t in (12, 11, 11)]
    assert [c["link"] for c in saved["label_errors"]] == links


def test_sources_side_by_side_one_table_per_source_and_class(report):
    _, text, _ = report
    assert "(yolo: 0.500, gemini: 0.000); 2 images" in text
    rows = _table(text, "## Sources side by side")
    assert [r[:2] for r in rows] == [["all", "yolo"], ["all", "gemini"]] + [[c, s] for c in CLASSES for s in ("yolo", "gemini")]
    by = {(r[0], r[1]): r[2:] for r in rows}
    assert by[("all", "yolo")][:2] == ["5", "6"] and by[("all", "yolo")][4:] == ["0.500", "0.600"]
    assert by[("all", "gemini")][2:] == ["1.000"] * 4
    # AP sees the 0.2 Person too (ranked after the wrong 0.6 one: AP50 = 0.5 * 51/101); P/R at 0.5 do not
    assert by[("Person", "yolo")] == ["2", "1", "0.252", "0.252", "0.000", "0.000"]
    assert by[("Person", "gemini")] == ["2", "2", "1.000", "1.000", "1.000", "1.000"]
    assert by[("Car", "yolo")][4:] == ["0.500", "1.000"]
    assert not re.search(r"\| AP50 \w+ \|", text)  # the old per-class AP50 rows are gone
