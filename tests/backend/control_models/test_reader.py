"""backend.control_models.reader: Label Studio result lists -> pixel boxes, labels, masks, skip counts."""

from __future__ import annotations

import numpy as np
from label_studio_sdk.converter.brush import mask2rle

from backend.control_models.reader import labels_in_regions, parse_regions, region_width_height
from backend.core.geometry import xyxy_to_ls
from backend.core.label_config import ProjectConfig
from tests.synthetic import Box, crafted_brush_rle, label_config, ls_region

CLASSES = ("Car", "Person")
CONFIG = ProjectConfig.parse(label_config(CLASSES))


def brush_value(mask: np.ndarray, label: str) -> dict:
    return {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [label]}


def test_parse_regions_converts_and_counts():
    w, h = 200, 100
    rotated = {**xyxy_to_ls((50, 20, 90, 40), w, h), "rotation": 90, "rectanglelabels": ["Car"]}
    polygon = {"points": [[10, 10], [30, 10], [20, 50]], "polygonlabels": ["Person"]}
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[60:80, 120:150] = 255
    brush = {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Car"]}
    result = [
        {"type": "rectanglelabels", "from_name": "label", "value": rotated},
        {"type": "polygonlabels", "from_name": "label", "value": polygon},
        {"type": "brushlabels", "from_name": "label", "value": brush},
        ls_region(Box("Truck", (0, 0, 10, 10)), w, h),  # unknown label
        ls_region(Box("Car", (5, 5, 5.2, 30)), w, h),  # zero area
        ls_region(Box("Person", (100, 10, 140, 50)), w, h),
        ls_region(Box("Person", (101, 10, 140, 50)), w, h),  # duplicate (IoU > 0.9)
        ls_region(Box("Car", (101, 10, 140, 50)), w, h),  # same place, other class: kept
        {"type": "keypointlabels", "from_name": "kp", "value": {"x": 1, "y": 1, "keypointlabels": ["Car"]}},
        {"type": "choices", "from_name": "other", "value": {"choices": ["x"]}},
    ]
    boxes = parse_regions(result, CONFIG, (w, h))
    assert boxes.labels == ["Car", "Person", "Car", "Person", "Car"]
    # 40x20 at (50, 20) rotated 90 deg clockwise around its top-left corner: x in [30, 50], y in [20, 60]
    np.testing.assert_allclose(boxes.xyxy[0], [30, 20, 50, 60], atol=1e-6)
    np.testing.assert_allclose(boxes.xyxy[1], [20, 10, 60, 50], atol=1e-6)
    np.testing.assert_allclose(boxes.xyxy[2], [120, 60, 150, 80], atol=1e-6)
    assert boxes.converted == {"rotated": 1, "polygon": 1, "brush": 1}
    assert boxes.skipped == {"unknown_label": 1, "zero_area": 1, "duplicate": 1, "other_control": 2}
    assert boxes.masks is None and boxes.stacked_masks() is None  # masks only when asked for


def test_malformed_and_shapeless_regions_are_counted():
    w, h = 64, 48
    result = [
        "not a region",
        {"type": "rectanglelabels", "from_name": "label", "value": {"x": 1, "rectanglelabels": ["Car"]}},  # no y/width/height
        {"type": "rectanglelabels", "from_name": "label", "value": {"rectanglelabels": []}},  # no label
        {"type": "polygonlabels", "from_name": "label", "value": {"points": [[1, 1], [5, 5]], "polygonlabels": ["Car"]}},
        {"type": "brushlabels", "from_name": "label", "value": brush_value(np.ones((h + 1, w), bool), "Car")},  # other size
        {"type": "brushlabels", "from_name": "label", "value": {"format": "rle", "rle": [], "brushlabels": ["Car"]}},
        {**ls_region(Box("Car", (1, 1, 20, 20)), w, h), "from_name": "not_in_config"},
    ]
    parsed = parse_regions(result, CONFIG, (w, h))
    assert len(parsed) == 0 and parsed.xyxy.shape == (0, 4)
    # The brush of another size is refused by its RLE header (bad_region), the empty RLE has no shape.
    assert parsed.skipped == {"bad_region": 3, "unknown_label": 1, "zero_area": 2, "other_control": 1}
    assert parsed.converted == {}


def test_a_brush_rle_over_its_image_fails_that_region_only(caplog):
    """A 4 KB RLE declaring 4 G values is skipped, counted and logged; the other regions are read."""
    w, h = 64, 48
    config = ProjectConfig.parse(label_config(CLASSES, tag="BrushLabels").replace(
        "</View>", '<RectangleLabels name="box" toName="image"><Label value="Car"/></RectangleLabels></View>'))
    mask = np.zeros((h, w), dtype=bool)
    mask[10:30, 20:50] = True
    bomb = {"id": "bomb", "type": "brushlabels", "from_name": "label",
            "value": {"format": "rle", "rle": crafted_brush_rle(2**32 - 1), "brushlabels": ["Car"]}}
    good = {"type": "brushlabels", "from_name": "label", "value": brush_value(mask, "Person")}
    box = ls_region(Box("Car", (1, 1, 20, 20)), w, h, from_name="box")
    for with_masks in (False, True):
        caplog.clear()
        parsed = parse_regions([bomb, good, box], config, (w, h), with_masks=with_masks)
        assert parsed.labels == ["Person", "Car"] and parsed.skipped == {"bad_region": 1}
        assert "region bomb" in caplog.text and "declares 4294967295 values" in caplog.text


def test_size_falls_back_to_the_regions_own():
    region = ls_region(Box("Car", (10, 5, 30, 25)), 64, 48)
    assert region_width_height(region, (640, 480)) == (640, 480)
    assert region_width_height(region, None) == (64, 48)
    assert region_width_height({"original_width": 0, "original_height": 48}, None) is None
    np.testing.assert_allclose(parse_regions([region], CONFIG, None).xyxy, [[10, 5, 30, 25]], atol=1e-6)
    orphan = {k: v for k, v in region.items() if not k.startswith("original_")}
    assert parse_regions([orphan], CONFIG, None).skipped == {"bad_region": 1}


def test_scores_sources_and_label_matching():
    w, h = 64, 48
    config = ProjectConfig.parse(
        '<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
        '<Label value="Car" predicted_values="automobile"/><Label value="Person"/></RectangleLabels></View>')
    result = [
        ls_region(Box("automobile", (1, 1, 20, 20)), w, h, score=0.7, source="gemini"),
        ls_region(Box("person", (30, 10, 60, 40)), w, h, source="yolo"),
    ]
    parsed = parse_regions(result, config, (w, h), source_of=lambda r: r["meta"]["source"], default_score=0.25)
    assert parsed.labels == ["Car", "Person"]
    np.testing.assert_allclose(parsed.scores, [0.7, 0.25])
    assert parsed.sources == ["gemini", "yolo"]
    det = parsed.detections(w, h, "drafts", "m1")
    assert det.labels == ["Car", "Person"] and det.image_size == (w, h) and det.source == "drafts" and det.masks is None


def test_with_masks_stacks_only_when_every_region_has_one():
    w, h = 64, 48
    config = ProjectConfig.parse(label_config(CLASSES, tag="BrushLabels"))
    mask = np.zeros((h, w), dtype=bool)
    mask[10:30, 20:50] = True
    brush = {"type": "brushlabels", "from_name": "label", "value": brush_value(mask, "Car")}
    polygon = {"type": "polygonlabels", "from_name": "label",
               "value": {"points": [[0, 0], [50, 0], [50, 50], [0, 50]], "polygonlabels": ["Person"]}}
    parsed = parse_regions([brush, polygon], config, (w, h), with_masks=True)
    stacked = parsed.stacked_masks()
    assert stacked is not None and stacked.shape == (2, h, w)
    np.testing.assert_array_equal(stacked[0], mask)
    assert stacked[1][: h // 2, : w // 2].all() and not stacked[1][h // 2 + 1:, :].any()
    np.testing.assert_allclose(parsed.xyxy, [[20, 10, 50, 30], [0, 0, 32, 24]], atol=1e-6)
    assert parsed.detections(w, h, "human").masks.shape == (2, h, w)
    with_box = parse_regions([brush, ls_region(Box("Car", (1, 1, 5, 5)), w, h)], config, (w, h), with_masks=True)
    assert with_box.masks[1] is None and with_box.stacked_masks() is None


def test_labels_in_regions_in_first_seen_order():
    regions = [
        ls_region(Box("Person", (1, 1, 5, 5)), 10, 10),
        {"type": "brushlabels", "value": {"brushlabels": ["Road", "Person"]}},
        {"type": "polygonlabels", "value": {"polygonlabels": ["Tree"]}},
        {"type": "choices", "value": {"choices": ["x"]}},
        {"type": "rectanglelabels"},
    ]
    assert labels_in_regions(regions) == ["Person", "Road", "Tree"]
    assert labels_in_regions([]) == []
