"""``lsb rank``: in-process re-score against the fake Label Studio, ``--queue`` (coalesced), and its errors."""

from __future__ import annotations

import pytest

from backend.core import keys
from backend.core.registry import ModelRegistry
from backend.core.settings import get_settings
from tests.fake_label_studio import as_prediction
from tests.models import make_checkpoint
from tests.synthetic import label_config, ls_result, make_images
from tests.worker.cli.test_cli import lsb
from tests.worker_fixtures import CLASSES


@pytest.fixture
def project(monkeypatch, tmp_path, fake_ls, redis15, project_id, qprefix, redis_url):
    for name, value in (("LABEL_STUDIO_URL", fake_ls.url), ("LABEL_STUDIO_API_KEY", fake_ls.pat), ("REDIS_URL", redis_url),
                        ("MODEL_DIR", str(tmp_path / "models")), ("DATA_DIR", str(tmp_path / "data"))):
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    fake_ls.add_project(label_config(CLASSES), project_id=project_id)
    images = make_images(3, seed=4, classes=CLASSES, max_objects=2)
    drafted = [fake_ls.add_task(project_id, im.encode(), predictions=[as_prediction([], "yolo:v0001", 0.5)]) for im in images[:2]]
    done = fake_ls.add_task(project_id, images[2].encode(), result=ls_result(images[2].boxes, 128, 96),
                            predictions=[as_prediction([], "yolo:v0001", 0.5)])
    yield tmp_path, drafted, done
    redis15.delete(keys.rank_pending(project_id), keys.model_current(project_id))
    get_settings.cache_clear()


def test_rank_without_a_model_says_so_and_touches_nothing(project, fake_ls, capsys, project_id):
    _, drafted, _ = project
    code, out, _ = lsb(capsys, "rank", "--project", project_id)
    assert code == 1 and out["status"] == "skipped" and "no YOLO model" in out["reason"]
    assert not [r for r in fake_ls.api_calls("/api/predictions/") if r["method"] == "PATCH"]


def test_rank_rescores_the_drafted_tasks_here_and_queues_once(project, fake_ls, capsys, project_id, redis15):
    tmp_path, drafted, done = project
    registry = ModelRegistry(tmp_path / "models", redis15)
    registry.promote(str(project_id), registry.add_version(str(project_id), make_checkpoint(tmp_path / "r.pt", list(CLASSES)),
                                                           {"classes": list(CLASSES)}).version)
    code, out, err = lsb(capsys, "rank", "--project", project_id, "--scores")
    assert code == 0, err
    assert (out["status"], out["tasks"], out["scored"], out["failed"], out["version"]) == ("ranked", 2, 2, 0, "v0001")
    scores = {int(k): v for k, v in out["scores"].items()}
    assert set(scores) == set(drafted) and all(0.0 <= v <= 1.0 and v != 0.5 for v in scores.values())
    assert [fake_ls.tasks[t]["predictions"][0]["score"] for t in drafted] == [scores[t] for t in drafted]
    assert fake_ls.tasks[done]["predictions"][0]["score"] == 0.5

    code, first, _ = lsb(capsys, "rank", "--project", project_id, "--queue")
    assert code == 0 and first["status"] == "queued"
    code, second, _ = lsb(capsys, "rank", "--project", project_id, "--queue")
    assert code == 0 and second == {**first, "status": "coalesced"}


def test_rank_refuses_a_bad_project_id(project, capsys):
    code, _, err = lsb(capsys, "rank", "--project", "-3")
    assert code == 2 and "not a Label Studio project id" in err
