"""PREDICTION_SCORE: what the ``score`` of a draft from /predict and pre-labeling means."""

from __future__ import annotations

import pytest
import redis

from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings
from backend.serving.predictor import ServingState
from backend.serving.services import build_predictor
from tests.synthetic import label_config

CONFIG = ProjectConfig.parse(label_config(("Car", "Person")))
STATE = ServingState("1", "v0001", None)
SURE = Detections([(0, 0, 40, 40), (50, 10, 90, 60)], ["Car", "Person"], [0.95, 0.9], (128, 96), "yolo", "yolo:v0001")
DOUBTFUL = Detections([(0, 0, 40, 40), (50, 10, 90, 60)], ["Car", "Person"], [0.3, 0.35], (128, 96), "yolo", "yolo:v0001")


@pytest.fixture
def predictor_for(tmp_path, redis_url):
    made = []

    def make(score: str):
        settings = Settings(model_dir=tmp_path / "m", data_dir=tmp_path / "d", redis_url=redis_url, gemini_api_key="",
                            prediction_score=score)
        made.append(build_predictor(settings, redis.Redis.from_url(redis_url)))
        return made[-1]

    yield make
    for predictor in made:
        predictor.close()


def test_usefulness_ranks_doubtful_yolo_drafts_first_and_unseen_gemini_drafts_at_the_top(predictor_for):
    predictor = predictor_for("usefulness")
    sure, doubtful = (predictor._prediction(1, CONFIG, d, "", STATE) for d in (SURE, DOUBTFUL))
    assert 0.0 <= sure["score"] < 0.15 < 0.5 < doubtful["score"] <= 1.0
    assert [r["score"] for r in sure["result"]] == [0.95, 0.9]  # regions keep their confidence
    gemini = Detections(SURE.xyxy, list(SURE.labels), [1.0, 1.0], (128, 96), "gemini", "gemini-x")
    assert predictor._prediction(1, CONFIG, gemini, "", STATE)["score"] == 1.0
    assert predictor._prediction(1, CONFIG, None, "failed", STATE)["score"] == 0.0


def test_confidence_keeps_the_mean_region_confidence(predictor_for):
    predictor = predictor_for("confidence")
    assert predictor._prediction(1, CONFIG, SURE, "", STATE)["score"] == pytest.approx(0.925)
    assert predictor._prediction(1, CONFIG, DOUBTFUL, "", STATE)["score"] == pytest.approx(0.325)
