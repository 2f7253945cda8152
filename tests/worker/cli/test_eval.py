"""``lsb eval`` on a Label Studio export: per-class P/R, label-error links to the tasks, two sources side by side.

Three tasks of project 7 with planted label errors, and two saved ``lsb detect`` results folders:

- task 21: one Car, labeled right; both sources find it;
- task 22: a Car labeled "Person"; YOLO says Car at 0.9 (a wrong_class candidate), Gemini follows the label;
- task 23: a Sign nobody labeled next to a labeled Car; YOLO finds both (the Sign: a missed_label candidate).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.core.detections import Detections
from backend.core.files import write_json_atomic
from backend.core.settings import get_settings
from tests.synthetic import Box, label_config, ls_result
from worker.cli import results
from worker.cli.__main__ import main

CLASSES = ["Car", "Person", "Sign"]
SIZE = (100, 80)
CAR, SIGN = (10.0, 10.0, 40.0, 40.0), (60.0, 30.0, 90.0, 70.0)
TRUTH = {21: [Box("Car", CAR)], 22: [Box("Person", CAR)], 23: [Box("Car", CAR)]}
YOLO = {21: [("Car", CAR, 0.95)], 22: [("Car", CAR, 0.9)], 23: [("Car", CAR, 0.85), ("Sign", SIGN, 0.8)]}
GEMINI = {21: [("Car", CAR, 1.0)], 22: [("Person", CAR, 1.0)], 23: [("Car", CAR, 1.0)]}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """Images under a document root, a Label Studio JSON export of them, and both sources' saved results."""
    for name in list(os.environ):
        if name.startswith("LABEL_STUDIO_"):
            monkeypatch.delenv(name)
    get_settings.cache_clear()
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    export = []
    for i, (task, boxes) in enumerate(TRUTH.items()):
        path = root / "imgs" / f"t{task}.png"
        Image.new("RGB", SIZE, (40 * i, 90, 200 - 40 * i)).save(path)  # distinct bytes: results match by sha256
        export.append({"id": task, "project": 7, "data": {"image": f"/data/local-files/?d=imgs/t{task}.png"},
                       "annotations": [{"id": 100 + task, "project": 7, "was_cancelled": False,
                                        "updated_at": "2026-01-01T00:00:00Z", "result": ls_result(boxes, *SIZE)}],
                       "predictions": []})
        for source, drafts in (("yolo", YOLO), ("gemini", GEMINI)):
            rows = drafts[task]
            det = Detections(np.array([r[1] for r in rows], dtype=float).reshape(-1, 4), [r[0] for r in rows],
                             np.array([r[2] for r in rows]), SIZE, source, f"{source}-model")
            image = {"name": path.name, "path": str(path), "url": None, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            write_json_atomic(tmp_path / source / f"t{task}.json", results.to_json(det, image, CLASSES, label_config(CLASSES)))
    (tmp_path / "export.json").write_text(json.dumps(export))
    yield tmp_path
    get_settings.cache_clear()


def lsb_eval(tmp_path: Path, capsys, out: str, *extra: str) -> tuple[dict, str, dict]:
    """``lsb eval`` of the YOLO results on the export: (metrics.json, report.md, printed summary)."""
    code = main(["eval", "--truth", str(tmp_path / "export.json"), "--document-root", str(tmp_path / "root"),
                 "--label-config", str(tmp_path / "lc.xml"), "--predictions", str(tmp_path / "yolo"),
                 "--out", str(tmp_path / out), "-q", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    folder = tmp_path / out
    return json.loads((folder / "metrics.json").read_text()), (folder / "report.md").read_text(), json.loads(captured.out)


def test_export_truth_links_each_candidate_to_its_task_and_compares_sources(project, capsys):
    (project / "lc.xml").write_text(label_config(CLASSES))
    metrics, text, summary = lsb_eval(project, capsys, "rep", "--compare", str(project / "gemini"),
                                      "--label-studio-url", "http://ls.example:8080/")
    assert summary["images"] == 3 and summary["precision"] == pytest.approx(2 / 4) and summary["recall"] == pytest.approx(2 / 3)
    # per class, at the --pr-threshold default 0 for saved results
    car, person, sign = (metrics["per_class"][c] for c in CLASSES)
    assert (car["precision"], car["recall"]) == (pytest.approx(2 / 3), 1.0)  # 3 Car boxes, 2 on true Cars
    assert (person["precision"], person["recall"]) == (None, 0.0) and person["n_kept"] == 0  # never predicted: no precision
    assert (sign["precision"], sign["recall"]) == (0.0, None)  # nothing true to find (no recall), one predicted
    assert f"| Car | 2 | 3 | 3 | {car['ap50']:.3f} | {car['ap50_95']:.3f} | 0.667 | 1.000 |" in text

    assert [(c["task_id"], c["kind"], c.get("predicted"), c.get("labeled")) for c in metrics["label_errors"]] == [
        (22, "wrong_class", "Car", "Person"), (23, "missed_label", "Sign", None)]
    assert [c["link"] for c in metrics["label_errors"]] == ["http://ls.example:8080/projects/7/data?task=22",
                                                             "http://ls.example:8080/projects/7/data?task=23"]
    assert "| [22](http://ls.example:8080/projects/7/data?task=22) | wrong_class | Car | Person | 0.900 |" in text
    assert "| [23](http://ls.example:8080/projects/7/data?task=23) | missed_label | Sign | – | 0.800 |" in text
    assert "links open the task in http://ls.example:8080/projects/7/data" in text

    # confusion: task 22's true Person read as Car, task 23's Sign on background
    confusion = metrics["confusion"]
    assert confusion["matrix"] == [[2, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]]
    assert "| Person | 1 | 0 | 0 | 0 |" in text and "| background | 0 | 0 | 1 | 0 |" in text

    sides = metrics["side_by_side"]
    assert list(sides) == ["yolo", "gemini"] and sides["gemini"]["map50"] == 1.0 and sides["yolo"]["map50"] < 1.0
    assert "| all | gemini | 3 | 3 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    assert "| Person | yolo | 1 | 0 | 0.000 | 0.000 | – | 0.000 |" in text
    assert "| Sign | yolo | 0 | 1 | – | – | 0.000 | – |" in text
    assert "| Person | gemini | 1 | 1 | 1.000 | 1.000 | 1.000 | 1.000 |" in text
    assert sides["yolo"]["per_class"]["Car"]["precision"] == car["precision"]  # the same figures as the report's own


def test_links_from_the_setting_and_project_flag_and_none_without_url(project, capsys, monkeypatch):
    (project / "lc.xml").write_text(label_config(CLASSES))
    export = json.loads((project / "export.json").read_text())
    for task in export:  # an export without project ids: --project names it
        task.pop("project")
        for ann in task["annotations"]:
            ann.pop("project")
    (project / "export.json").write_text(json.dumps(export))
    metrics, text, _ = lsb_eval(project, capsys, "no-url")
    assert [c["link"] for c in metrics["label_errors"]] == [None, None]
    assert "| 22 | wrong_class |" in text and "no links: set LABEL_STUDIO_URL or --label-studio-url" in text

    monkeypatch.setenv("LABEL_STUDIO_URL", "http://studio.internal")
    metrics, text, _ = lsb_eval(project, capsys, "no-project")
    assert [c["link"] for c in metrics["label_errors"]] == [None, None] and "give --project" in text
    metrics, _, _ = lsb_eval(project, capsys, "setting", "--project", "9")
    assert [c["link"] for c in metrics["label_errors"]] == ["http://studio.internal/projects/9/data?task=22",
                                                             "http://studio.internal/projects/9/data?task=23"]
