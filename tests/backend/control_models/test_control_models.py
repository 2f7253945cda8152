"""backend.control_models: Detections -> Label Studio regions, each validated against its config
with label-studio-sdk's own validator (Label Studio itself stores wrong regions silently), and read back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

from backend.control_models import BY_RESULT_TYPE, CONTROL_MODELS, ControlModel, parse_regions
from backend.control_models.brush_labels import BrushLabelsModel
from backend.control_models.polygon_labels import PolygonLabelsModel
from backend.control_models.rectangle_labels import RectangleLabelsModel
from backend.core import geometry
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from tests.paths import RECORDED_REQUESTS

W, H = 64, 48

MULTI = (
    '<View><Image name="image" value="$image"/>'
    '<RectangleLabels name="box" toName="image"><Label value="Car"/><Label value="Person"/></RectangleLabels>'
    '<BrushLabels name="brush" toName="image"><Label value="Person"/><Label value="Road"/></BrushLabels>'
    '<PolygonLabels name="poly" toName="image"><Label value="Tree"/><Label value="Car"/></PolygonLabels>'
    '</View>'
)
RECORDED = json.loads(RECORDED_REQUESTS.read_text())["requests"][1]["body"]["schema"]


def assert_valid(xml: str, regions: list[dict]) -> None:
    prediction = {"result": regions, "score": 0.5, "model_version": "x"}
    assert LabelInterface(xml).validate_prediction(prediction, return_errors=True) == []


def control(xml: str, name: str):
    config = ProjectConfig.parse(xml)
    return next(c for c in config.controls if c.name == name)


def rect_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def disk_mask(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2


def decoded(rle: list[int]) -> np.ndarray:
    """Label Studio's RLE back to a boolean (H, W) mask, via the SDK's decoder."""
    flat = decode_rle(rle)
    assert flat.size == H * W * 4
    rgba = flat.reshape(H, W, 4)
    assert (rgba == rgba[:, :, :1]).all()  # all four channels carry the mask
    return rgba[:, :, 3] > 0


@pytest.fixture
def detections() -> Detections:
    masks = np.stack([rect_mask(6, 4, 30, 20), rect_mask(32, 10, 60, 40), disk_mask(20, 32, 10), rect_mask(1, 1, 4, 4)])
    return Detections(
        xyxy=[[6, 4, 30, 20], [32, 10, 60, 40], [10, 22, 31, 43], [1, 1, 4, 4]],
        labels=["Car", "Person", "Road", "Tree"],
        scores=[0.9, 0.4, 0.6, 0.2],
        image_size=(W, H),
        source="yolo",
        model="v7",
        masks=masks,
    )


def test_registry_maps_every_supported_tag():
    assert set(CONTROL_MODELS) == {"RectangleLabels", "BrushLabels", "PolygonLabels"}
    assert CONTROL_MODELS["RectangleLabels"] is RectangleLabelsModel
    assert CONTROL_MODELS["BrushLabels"] is BrushLabelsModel
    assert CONTROL_MODELS["PolygonLabels"] is PolygonLabelsModel
    for tag, cls in CONTROL_MODELS.items():
        assert issubclass(cls, ControlModel)
        assert cls.tag == tag
        assert cls.result_type == tag.lower()


class TestCommonFields:
    @pytest.mark.parametrize("name", ["box", "brush", "poly"])
    def test_region_fields(self, detections, name):
        spec = control(MULTI, name)
        regions = CONTROL_MODELS[spec.tag](spec).regions(detections)
        assert regions
        for region in regions:
            assert region["from_name"] == name
            assert region["to_name"] == "image"
            assert region["type"] == spec.tag.lower()
            assert region["original_width"] == W and region["original_height"] == H
            assert region["image_rotation"] == 0
            assert isinstance(region["score"], float)
            assert region["meta"]["source"] == "yolo"
            assert region["meta"]["text"] == ["source: yolo v7"]
            assert isinstance(region["id"], str) and region["id"]
            labels = region["value"][spec.tag.lower()]
            assert len(labels) == 1 and labels[0] in spec.label_values
        assert len({r["id"] for r in regions}) == len(regions)
        json.dumps(regions)  # plain JSON types only (no NumPy scalars)
        assert_valid(MULTI, regions)

    def test_meta_text_without_model(self):
        spec = control(MULTI, "box")
        d = Detections([[0, 0, 10, 10]], ["Car"], [0.5], (W, H), "gemini")
        region = RectangleLabelsModel(spec).regions(d)[0]
        assert region["meta"] == {"source": "gemini", "text": ["source: gemini"]}
        assert_valid(MULTI, [region])

    def test_empty_detections(self):
        for name in ("box", "brush", "poly"):
            spec = control(MULTI, name)
            assert CONTROL_MODELS[spec.tag](spec).regions(Detections([], [], [], (W, H), "gemini")) == []


class TestRectangleLabels:
    def test_percent_values(self, detections):
        regions = RectangleLabelsModel(control(MULTI, "box")).regions(detections)
        assert [r["value"]["rectanglelabels"] for r in regions] == [["Car"], ["Person"]]  # Road, Tree: not this control
        value = regions[0]["value"]
        assert value["x"] == pytest.approx(6 / W * 100)
        assert value["y"] == pytest.approx(4 / H * 100)
        assert value["width"] == pytest.approx(24 / W * 100)
        assert value["height"] == pytest.approx(16 / H * 100)
        assert value["rotation"] == 0
        assert [r["score"] for r in regions] == [0.9, 0.4]
        for region, box in zip(regions, ([6, 4, 30, 20], [32, 10, 60, 40])):
            np.testing.assert_allclose(geometry.ls_to_xyxy(region["value"], W, H), box)
        assert_valid(MULTI, regions)

    def test_recorded_label_studio_config(self):
        spec = control(RECORDED, "label")
        d = Detections([[0, 0, 32, 24], [10, 10, 20, 20], [1, 1, 2, 2]], ["Car", "Person", "Dog"], [0.8, 0.7, 0.9], (W, H),
                       "gemini")
        regions = RectangleLabelsModel(spec).regions(d)
        assert [r["value"]["rectanglelabels"] for r in regions] == [["Car"], ["Person"]]
        value = dict(regions[0]["value"])
        assert value.pop("rectanglelabels") == ["Car"]
        assert value == pytest.approx({"x": 0, "y": 0, "width": 50, "height": 50, "rotation": 0})
        assert_valid(RECORDED, regions)

    def test_threshold(self, detections):
        spec = control(MULTI, "box")
        assert [r["value"]["rectanglelabels"][0] for r in RectangleLabelsModel(spec, 0.5).regions(detections)] == ["Car"]
        assert [r["score"] for r in RectangleLabelsModel(spec, 0.4).regions(detections)] == [0.9, 0.4]  # inclusive
        assert RectangleLabelsModel(spec, 0.95).regions(detections) == []
        assert_valid(MULTI, RectangleLabelsModel(spec, 0.5).regions(detections))

    def test_boxes_outside_or_flat_are_skipped_and_overhang_clamped(self):
        spec = control(MULTI, "box")
        d = Detections(
            [[70, 50, 90, 60], [10, 10, 10, 30], [-10, -5, 20, 60]],
            ["Car", "Car", "Person"], [0.9, 0.9, 0.9], (W, H), "gemini",
        )
        regions = RectangleLabelsModel(spec).regions(d)
        assert len(regions) == 1
        value = regions[0]["value"]
        assert value["x"] == 0 and value["y"] == 0
        assert value["width"] == pytest.approx(20 / W * 100)
        assert value["height"] == pytest.approx(100)
        assert_valid(MULTI, regions)

    def test_ignores_masks(self, detections):
        spec = control(MULTI, "box")
        without = Detections(detections.xyxy, detections.labels, detections.scores, (W, H), "yolo", "v7")
        strip = [{**r, "id": ""} for r in RectangleLabelsModel(spec).regions(detections)]
        assert strip == [{**r, "id": ""} for r in RectangleLabelsModel(spec).regions(without)]


class TestBrushLabels:
    def test_rle_decodes_back_to_the_mask(self, detections):
        regions = BrushLabelsModel(control(MULTI, "brush")).regions(detections)
        assert [r["value"]["brushlabels"] for r in regions] == [["Person"], ["Road"]]
        for region, index in zip(regions, (1, 2)):
            value = region["value"]
            assert value["format"] == "rle"
            assert isinstance(value["rle"], list) and all(isinstance(v, int) for v in value["rle"])
            np.testing.assert_array_equal(decoded(value["rle"]), detections.masks[index])
            assert region["score"] == float(detections.scores[index])
        assert_valid(MULTI, regions)

    def test_irregular_mask_round_trip(self):
        g = np.random.default_rng(5)
        mask = g.uniform(size=(H, W)) > 0.7
        d = Detections([[0, 0, W, H]], ["Road"], [0.5], (W, H), "gemini", masks=mask[None])
        regions = BrushLabelsModel(control(MULTI, "brush")).regions(d)
        np.testing.assert_array_equal(decoded(regions[0]["value"]["rle"]), mask)
        assert_valid(MULTI, regions)

    def test_no_masks_no_regions(self, detections):
        without = Detections(detections.xyxy, detections.labels, detections.scores, (W, H), "yolo")
        assert BrushLabelsModel(control(MULTI, "brush")).regions(without) == []

    def test_empty_mask_is_skipped(self):
        masks = np.stack([np.zeros((H, W), dtype=bool), rect_mask(0, 0, 5, 5)])
        d = Detections([[0, 0, 5, 5], [0, 0, 5, 5]], ["Road", "Person"], [0.9, 0.8], (W, H), "gemini", masks=masks)
        regions = BrushLabelsModel(control(MULTI, "brush")).regions(d)
        assert [r["value"]["brushlabels"] for r in regions] == [["Person"]]
        assert_valid(MULTI, regions)

    def test_threshold(self, detections):
        regions = BrushLabelsModel(control(MULTI, "brush"), 0.5).regions(detections)
        assert [r["value"]["brushlabels"] for r in regions] == [["Road"]]
        assert_valid(MULTI, regions)


class TestPolygonLabels:
    def test_polygon_from_mask(self, detections):
        regions = PolygonLabelsModel(control(MULTI, "poly")).regions(detections)
        assert [r["value"]["polygonlabels"] for r in regions] == [["Car"], ["Tree"]]
        value = regions[0]["value"]
        assert value["closed"] is True
        points = np.array(value["points"])
        assert points.shape == (4, 2)
        assert ((points >= 0) & (points <= 100)).all()
        back = geometry.polygon_to_mask(geometry.ls_points_to_pixels(value["points"], W, H), W, H)
        np.testing.assert_array_equal(back, detections.masks[0])
        assert_valid(MULTI, regions)

    def test_round_shape(self):
        mask = disk_mask(32, 24, 15)
        d = Detections([[17, 9, 48, 40]], ["Tree"], [0.7], (W, H), "gemini", masks=mask[None])
        regions = PolygonLabelsModel(control(MULTI, "poly")).regions(d)
        assert len(regions) == 1
        points = regions[0]["value"]["points"]
        assert len(points) >= 8
        back = geometry.polygon_to_mask(geometry.ls_points_to_pixels(points, W, H), W, H)
        assert np.logical_and(back, mask).sum() / np.logical_or(back, mask).sum() > 0.9
        assert_valid(MULTI, regions)

    def test_no_masks_no_regions(self, detections):
        without = Detections(detections.xyxy, detections.labels, detections.scores, (W, H), "yolo")
        assert PolygonLabelsModel(control(MULTI, "poly")).regions(without) == []

    def test_empty_or_tiny_masks_skipped(self):
        single = np.zeros((H, W), dtype=bool)
        single[5, 5] = True
        masks = np.stack([np.zeros((H, W), dtype=bool), single, rect_mask(10, 10, 20, 20)])
        d = Detections([[0, 0, 1, 1], [5, 5, 6, 6], [10, 10, 20, 20]], ["Car", "Tree", "Car"], [0.9, 0.9, 0.3], (W, H), "gemini",
                       masks=masks)
        regions = PolygonLabelsModel(control(MULTI, "poly")).regions(d)
        assert len(regions) == 1 and regions[0]["score"] == 0.3
        assert_valid(MULTI, regions)

    def test_threshold(self, detections):
        assert PolygonLabelsModel(control(MULTI, "poly"), 0.9).regions(detections)[0]["value"]["polygonlabels"] == ["Car"]
        assert PolygonLabelsModel(control(MULTI, "poly"), 0.91).regions(detections) == []


def test_whole_prediction_over_all_controls_validates(detections):
    """What the predictor assembles: every control's regions in one prediction."""
    config = ProjectConfig.parse(MULTI)
    regions = []
    for spec in config.controls:
        regions.extend(CONTROL_MODELS[spec.tag](spec).regions(detections))
    by_control = {}
    for region in regions:
        by_control.setdefault(region["from_name"], []).append(region["value"][region["type"]][0])
    assert by_control == {"box": ["Car", "Person"], "brush": ["Person", "Road"], "poly": ["Car", "Tree"]}
    assert_valid(MULTI, regions)


def test_validator_would_catch_a_wrong_region(detections):
    """Guard that the validation used above is not vacuous."""
    regions = RectangleLabelsModel(control(MULTI, "box")).regions(detections)
    bad_label = [{**regions[0], "value": {**regions[0]["value"], "rectanglelabels": ["Road"]}}]
    bad_name = [{**regions[0], "from_name": "brush"}]
    li = LabelInterface(MULTI)
    assert li.validate_prediction({"result": bad_label, "score": 0.5, "model_version": "x"}, return_errors=True)
    assert li.validate_prediction({"result": bad_name, "score": 0.5, "model_version": "x"}, return_errors=True)


class TestWriteThenRead:
    """Each control model reads back what it wrote: same labels, scores, boxes and masks in pixels."""

    def test_rectangle_round_trip(self, detections):
        spec = control(MULTI, "box")
        regions = RectangleLabelsModel(spec).regions(detections)
        parsed = parse_regions(regions, ProjectConfig.parse(MULTI), None, with_masks=True)
        assert parsed.labels == ["Car", "Person"]
        np.testing.assert_allclose(parsed.scores, [0.9, 0.4])
        np.testing.assert_allclose(parsed.xyxy, detections.xyxy[:2], atol=1e-9)
        assert parsed.masks == [None, None] and parsed.converted == {} and parsed.skipped == {}
        for region, box in zip(regions, detections.xyxy[:2]):
            np.testing.assert_allclose(RectangleLabelsModel.read_box(region["value"], W, H), box, atol=1e-9)
            assert RectangleLabelsModel.read_mask(region["value"], W, H) is None

    def test_polygon_round_trip(self, detections):
        regions = PolygonLabelsModel(control(MULTI, "poly")).regions(detections)
        parsed = parse_regions(regions, ProjectConfig.parse(MULTI), None, with_masks=True)
        assert parsed.labels == ["Car", "Tree"] and parsed.converted == {"polygon": 2}
        np.testing.assert_allclose(parsed.scores, [0.9, 0.2])
        for index, mask, box in zip((0, 3), parsed.masks, parsed.xyxy):
            np.testing.assert_array_equal(mask, detections.masks[index])
            # the outline runs through the edge pixels' centres: one pixel short on the right and bottom
            np.testing.assert_allclose(box, detections.xyxy[index] - [0, 0, 1, 1], atol=1e-6)

    def test_round_polygon_round_trip(self):
        mask = disk_mask(32, 24, 15)
        d = Detections([[17, 9, 48, 40]], ["Tree"], [0.7], (W, H), "gemini", masks=mask[None])
        value = PolygonLabelsModel(control(MULTI, "poly")).regions(d)[0]["value"]
        back = PolygonLabelsModel.read_mask(value, W, H)
        assert np.logical_and(back, mask).sum() / np.logical_or(back, mask).sum() > 0.9
        np.testing.assert_allclose(PolygonLabelsModel.read_box(value, W, H), geometry.mask_to_xyxy(mask) - [0, 0, 1, 1], atol=1)

    def test_brush_round_trip(self, detections):
        regions = BrushLabelsModel(control(MULTI, "brush")).regions(detections)
        parsed = parse_regions(regions, ProjectConfig.parse(MULTI), None, with_masks=True)
        assert parsed.labels == ["Person", "Road"] and parsed.converted == {"brush": 2}
        np.testing.assert_allclose(parsed.scores, [0.4, 0.6])
        for index, mask, box in zip((1, 2), parsed.masks, parsed.xyxy):
            np.testing.assert_array_equal(mask, detections.masks[index])
            np.testing.assert_allclose(box, geometry.mask_to_xyxy(detections.masks[index]))
        np.testing.assert_array_equal(parsed.stacked_masks(), detections.masks[[1, 2]])

    def test_whole_prediction_round_trip(self, detections):
        """Every control's regions in one result list read back, each by its own control model."""
        config = ProjectConfig.parse(MULTI)
        regions = [r for spec in config.controls for r in CONTROL_MODELS[spec.tag](spec).regions(detections)]
        parsed = parse_regions(regions, config, (W, H), dedupe=False)
        assert parsed.labels == ["Car", "Person", "Person", "Road", "Car", "Tree"]
        assert parsed.converted == {"brush": 2, "polygon": 2} and parsed.skipped == {}


def test_reading_registry_is_keyed_by_result_type():
    assert {model.result_type: model for model in CONTROL_MODELS.values()} == BY_RESULT_TYPE
    assert set(BY_RESULT_TYPE) == {"rectanglelabels", "brushlabels", "polygonlabels"}
