"""The usefulness score on hand-built detections: uncertain > confident, disagreement > agreement, always in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from backend.core.detections import Detections
from backend.serving import usefulness as u

SIZE = (200, 100)


def yolo(boxes: list[tuple[tuple[float, float, float, float], str, float]], source: str = "yolo") -> Detections:
    return Detections([b for b, _, _ in boxes], [label for _, label, _ in boxes], [s for _, _, s in boxes], SIZE, source)


CONFIDENT = yolo([((10, 10, 50, 50), "Car", 0.95), ((100, 20, 150, 80), "Person", 0.92)])
UNCERTAIN = yolo([((10, 10, 50, 50), "Car", 0.30), ((100, 20, 150, 80), "Person", 0.28),
                  ((60, 10, 90, 40), "Car", 0.12), ((160, 60, 190, 90), "Sign", 0.08)])
TIED = yolo([((10, 10, 50, 50), "Car", 0.55), ((11, 10, 50, 51), "Person", 0.53)])  # two classes on one spot
NOTHING = yolo([])


@pytest.mark.parametrize("variant", u.VARIANTS)
def test_an_uncertain_view_is_more_useful_than_a_confident_one(variant):
    confident, uncertain = (u.usefulness(d, 0.25, variant=variant) for d in (CONFIDENT, UNCERTAIN))
    assert 0.0 <= confident < uncertain <= 1.0


def test_each_component_reads_what_it_says():
    assert u.least_confidence(CONFIDENT, 0.25) < 0.1
    assert u.least_confidence(UNCERTAIN, 0.25) > 0.65
    assert u.least_confidence(NOTHING, 0.25) == 1.0  # the model sees nothing: everything to learn
    assert u.band(CONFIDENT, 0.25) == 0.0
    assert u.band(UNCERTAIN, 0.25) == pytest.approx(1 - np.exp(-4 / u.BAND_SCALE))
    assert u.margin(TIED, 0.25) > 0.9  # 0.55 vs 0.53 on the same spot: a coin toss between classes
    assert u.margin(yolo([((10, 10, 50, 50), "Car", 0.55)]), 0.25) == pytest.approx(0.45)  # alone: margin = its confidence


def test_disagreement_with_gemini_raises_the_score_and_agreement_lowers_it():
    agreeing = Detections(CONFIDENT.xyxy, list(CONFIDENT.labels), [1.0, 1.0], SIZE, "gemini")
    moved = Detections(CONFIDENT.xyxy + 30, list(CONFIDENT.labels), [1.0, 1.0], SIZE, "gemini")
    relabelled = Detections(CONFIDENT.xyxy, ["Sign", "Sign"], [1.0, 1.0], SIZE, "gemini")
    assert u.disagreement(CONFIDENT, agreeing, 0.25) == pytest.approx(0.0)
    assert u.disagreement(CONFIDENT, relabelled, 0.25) == pytest.approx(1.0)
    assert 0.3 < u.disagreement(CONFIDENT, moved, 0.25) < 1.0
    assert u.disagreement(NOTHING, NOTHING.filter([]), 0.25) == 0.0
    assert u.disagreement(NOTHING, agreeing, 0.25) == 1.0
    alone = u.usefulness(CONFIDENT, 0.25)
    assert u.usefulness(CONFIDENT, 0.25, other=agreeing) < alone < u.usefulness(CONFIDENT, 0.25, other=relabelled)
    # YOLO's own draft is not a second opinion
    assert u.usefulness(CONFIDENT, 0.25, other=CONFIDENT) == alone


def test_boxes_under_the_served_threshold_do_not_count_as_disagreement():
    faint = yolo([((10, 10, 50, 50), "Car", 0.95), ((100, 20, 150, 80), "Person", 0.1)])
    gemini = Detections([(10, 10, 50, 50)], ["Car"], [1.0], SIZE, "gemini")
    assert u.disagreement(faint, gemini, 0.25) == pytest.approx(0.0)


def test_rank_is_most_useful_first_and_stable_and_unknown_variants_are_refused():
    assert u.rank([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]
    with pytest.raises(ValueError, match="unknown usefulness variant"):
        u.usefulness(CONFIDENT, 0.25, variant="entropy")
