"""Gemini answer parsing: every documented misbehaviour becomes sane Detections or BadAnswer."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from backend.core.label_config import ProjectConfig
from backend.detectors.gemini.parsing import DEFAULT_SCORE, BadAnswer, load_items, parse_answer, strip_fences

RECT = ProjectConfig.parse(
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="label" toName="image">'
    '<Label value="Car" predicted_values="automobile,truck"/>'
    '<Label value="Helmetless" hint="worker without a helmet"/>'
    '<Label value="Tree"/>'
    "</RectangleLabels></View>"
)
BRUSH = ProjectConfig.parse(
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Car"/><Label value="Tree"/></BrushLabels></View>'
)
SIZE = (2000, 1000)  # width, height: non-square so x/y mix-ups show


def parse(text: str, config: ProjectConfig = RECT, **kwargs):
    kwargs.setdefault("max_objects", 25)
    return parse_answer(text, SIZE, config, **kwargs)


def item(box, label="Car", **extra):
    return {"box_2d": [int(v) for v in box], "label": label, **extra}


def png(mask: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), "L").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_plain_array_maps_box_2d_to_pixels():
    det, stats = parse(json.dumps([item([100, 200, 500, 600])]))
    assert det.source == "gemini" and det.labels == ["Car"]
    np.testing.assert_allclose(det.xyxy[0], [400, 100, 1200, 500])  # x = 0-1000 of 2000, y of 1000
    assert det.scores.tolist() == [DEFAULT_SCORE]
    assert det.masks is None
    assert not stats.truncated and not stats.dropped


@pytest.mark.parametrize("text", [
    '```json\n[{"box_2d": [0, 0, 500, 500], "label": "Car"}]\n```',
    '```\n[{"box_2d": [0, 0, 500, 500], "label": "Car"}]\n```',
    'Here you go:\n```json\n[{"box_2d": [0, 0, 500, 500], "label": "Car"}]\n```\nAnything else?',
    '```json\n[{"box_2d": [0, 0, 500, 500], "label": "Car"}]',  # unclosed fence
])
def test_code_fences_are_stripped(text):
    det, _ = parse(text)
    assert det.labels == ["Car"]
    np.testing.assert_allclose(det.xyxy[0], [0, 0, 1000, 500])


def test_truncated_at_max_tokens_salvages_complete_objects():
    full = json.dumps([item([10 * i, 100 * i, 10 * i + 50, 100 * i + 80], "Tree") for i in range(6)])
    cut = full[: full.index('"box_2d": [40') + 12]  # inside the 5th object
    det, stats = parse(cut, finish_reason="MAX_TOKENS")
    assert len(det) == 4 and det.labels == ["Tree"] * 4
    assert stats.truncated and stats.salvaged
    assert det.meta["truncated"] is True


def test_truncated_boxes_object_form_is_salvaged():
    full = json.dumps({"boxes": [item([0, 0, 100, 100]), item([200, 200, 300, 300], "label with [brackets] {and braces}"),
                                 item([500, 500, 600, 600])]})
    det, stats = parse(full[:-30], finish_reason="MAX_TOKENS")
    # the second label is unknown (dropped), the third object is cut off
    assert det.labels == ["Car"] and stats.truncated
    assert stats.dropped == {"unknown_label": 1}


def test_truncated_flag_from_finish_reason_even_when_json_closes():
    _, stats = parse(json.dumps([item([0, 0, 10, 10])]), finish_reason="MAX_TOKENS")
    assert stats.truncated and not stats.salvaged


def test_swapped_corners_are_ordered():
    det, _ = parse(json.dumps([item([500, 600, 100, 200])]))  # ymin > ymax, xmin > xmax
    np.testing.assert_allclose(det.xyxy[0], [400, 100, 1200, 500])


def test_out_of_range_values_are_clamped_to_the_image():
    det, _ = parse(json.dumps([item([-50, -10, 1200, 1500])]))
    np.testing.assert_allclose(det.xyxy[0], [0, 0, 2000, 1000])


def test_zero_area_and_malformed_boxes_are_dropped_and_counted():
    text = json.dumps([
        item([100, 100, 100, 400]),          # zero height
        item([100, 300, 400, 300]),          # zero width
        item([1200, 0, 1500, 500]),          # fully outside: clamps to a line
        {"box_2d": [1, 2, 3], "label": "Car"},
        {"box_2d": ["a", 2, 3, 4], "label": "Car"},
        {"label": "Car"},
        "not an object",
        item([0, 0, 100, 100]),
    ])
    det, stats = parse(text)
    assert len(det) == 1
    assert stats.dropped == {"zero_area": 3, "malformed": 4}
    assert stats.items == 8


def test_labels_map_via_case_predicted_values_hint_and_plural():
    text = json.dumps([
        item([0, 0, 100, 100], "car"),
        item([0, 200, 100, 300], "Automobile"),
        item([0, 400, 100, 500], "worker without a helmet"),
        item([0, 600, 100, 700], "trees"),
        item([0, 800, 100, 900], "banana"),
        item([200, 0, 300, 100], ""),
    ])
    det, stats = parse(text)
    assert det.labels == ["Car", "Car", "Helmetless", "Tree"]
    assert stats.dropped == {"unknown_label": 2}


def test_fallback_label_keeps_unknown_labels_for_interactive_queries():
    det, stats = parse(json.dumps([item([0, 0, 100, 100], "person with no helmet"), item([0, 200, 100, 300], "tree")]),
                       fallback_label="Helmetless")
    assert det.labels == ["Helmetless", "Tree"] and not stats.dropped


def test_repetition_loop_is_deduped_and_capped():
    rng = np.random.default_rng(0)
    loop = [item(np.array([300, 300, 600, 600]) + rng.integers(-3, 4, 4), "Car") for _ in range(300)]
    distinct = [item([10, 30 * i, 40, 30 * i + 20], "Tree") for i in range(30)]
    det, stats = parse(json.dumps(loop[:150] + distinct + loop[150:]), max_objects=25)
    assert len(det) == 25
    assert det.labels.count("Car") == 1  # the loop collapsed to one box
    assert stats.dropped["duplicate"] == 299
    assert stats.dropped["over_cap"] == 31 - 25
    # the same box under another label is not a duplicate (class-aware)
    det, _ = parse(json.dumps([item([0, 0, 500, 500], "Car"), item([0, 0, 500, 500], "Tree")]))
    assert sorted(det.labels) == ["Car", "Tree"]


def test_empty_array_is_a_real_empty_result():
    for text in ("[]", "```json\n[]\n```", '{"boxes": []}', " [ ] "):
        det, stats = parse(text)
        assert len(det) == 0 and det.image_size == SIZE
        assert det.xyxy.shape == (0, 4) and not stats.truncated


def test_boxes_object_form():
    det, _ = parse(json.dumps({"boxes": [item([0, 0, 500, 500]), item([500, 500, 1000, 1000], "Tree")]}))
    assert det.labels == ["Car", "Tree"]


def test_single_object_instead_of_a_list():
    det, _ = parse(json.dumps(item([0, 0, 500, 500])))
    assert det.labels == ["Car"]


@pytest.mark.parametrize("text", ["", "I cannot help with that.", "```json\n```", '{"answer": 42}', '[{"box_2d": [1, 2', "42"])
def test_unusable_text_is_a_bad_answer(text):
    with pytest.raises(BadAnswer):
        parse(text)


def test_confidence_field_is_used_when_present():
    det, _ = parse(json.dumps([item([0, 0, 100, 100], confidence=0.9), item([0, 200, 100, 300], score=1.7),
                               item([0, 400, 100, 500], confidence="high")]))
    assert det.scores.tolist() == [0.9, 1.0, DEFAULT_SCORE]
    det, _ = parse(json.dumps([item([0, 0, 100, 100])]), default_score=0.3)
    assert det.scores.tolist() == [0.3]


def test_png_masks_of_gemini_25_cover_their_box():
    probability = np.zeros((32, 32), dtype=np.uint8)
    probability[:, :16] = 255  # left half of the box
    det, stats = parse(json.dumps([item([100, 100, 500, 300], mask=png(probability))]), BRUSH)
    assert det.masks is not None and det.masks.shape == (1, 1000, 2000)
    mask = det.masks[0]
    # box = x 200..600, y 100..500; its left half is x 200..400
    assert mask[300, 250] and mask[300, 390]
    assert not mask[300, 450] and not mask[50, 250] and not mask[600, 250]
    assert mask.sum() == pytest.approx(200 * 400, rel=0.05)
    assert stats.mask_fallbacks == 0


def test_polygon_masks_are_x_y_on_0_1000():
    # a triangle over the left half of the image: x 0..500, y 0..1000
    polygon = [[0, 0], [500, 0], [0, 1000]]
    det, _ = parse(json.dumps({"boxes": [item([0, 0, 1000, 500], mask=polygon)]}), BRUSH)
    mask = det.masks[0]
    assert mask[50, 50] and not mask[900, 900] and not mask[50, 1500]
    assert mask.sum() == pytest.approx(0.5 * 1000 * 1000, rel=0.02)


def test_masks_only_when_the_config_wants_them():
    text = json.dumps([item([0, 0, 500, 500], mask=[[0, 0], [500, 0], [500, 500]])])
    assert parse(text, RECT)[0].masks is None
    assert parse(text, BRUSH)[0].masks is not None
    assert parse(text, RECT, want_masks=True)[0].masks is not None


def test_missing_or_broken_mask_falls_back_to_the_box():
    text = json.dumps([item([0, 0, 500, 500]), item([500, 500, 1000, 1000], "Tree", mask="data:image/png;base64,!!!notpng")])
    det, stats = parse(text, BRUSH)
    assert det.masks.shape == (2, 1000, 2000)
    assert det.masks[0][:500, :1000].all() and not det.masks[0][600:, :].any()
    assert det.masks[1][500:, 1000:].all()
    assert stats.mask_fallbacks == 2


def test_masks_stay_aligned_after_dedupe_and_cap():
    polygon = [[0, 0], [100, 0], [100, 100], [0, 100]]
    items = [item([0, 0, 100, 100], mask=polygon)] * 5 + [item([500, 500, 600, 600], "Tree")]
    det, _ = parse(json.dumps(items), BRUSH)
    assert det.labels == ["Car", "Tree"] and det.masks.shape[0] == 2
    assert det.masks[0][:100, :200].all() and det.masks[1][500:600, 1000:1200].all()


def test_helpers():
    assert strip_fences("```json\n[1]\n```") == "[1]"
    assert load_items('[{"a": 1}, {"b": ') == ([{"a": 1}], True)
    assert load_items("[]") == ([], False)
