"""backend.core.geometry: every box / polygon / mask conversion, with known values and seeded properties.

Property checks use a seeded NumPy generator (many random cases per test, deterministic), so they
need no extra dependency.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from label_studio_sdk.converter.utils import convert_annotation_to_yolo_obb

from backend.core import geometry
from tests.synthetic import crafted_brush_rle

W, H = 640, 480  # non-square on purpose: x and y must never be mixed up


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def random_boxes(n: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """``n`` valid pixel boxes inside a ``width`` x ``height`` image, each at least 1 px wide."""
    g = rng(seed)
    x0 = g.uniform(0, width - 2, n)
    y0 = g.uniform(0, height - 2, n)
    x1 = x0 + 1 + g.uniform(0, 1, n) * (width - 1 - x0)
    y1 = y0 + 1 + g.uniform(0, 1, n) * (height - 1 - y0)
    return np.stack([x0, y0, x1, y1], axis=1)


# --- Gemini ----------------------------------------------------------------------------------

class TestGeminiBoxes:
    def test_y_first_on_non_square_image(self):
        # box_2d = [ymin, xmin, ymax, xmax] on 0-1000
        xyxy = geometry.gemini_to_xyxy([100, 200, 500, 800], W, H)
        np.testing.assert_allclose(xyxy, [128.0, 48.0, 512.0, 240.0])

    def test_returns_float_array_of_four(self):
        xyxy = geometry.gemini_to_xyxy([0, 0, 1000, 1000], W, H)
        assert isinstance(xyxy, np.ndarray)
        assert xyxy.shape == (4,)
        np.testing.assert_allclose(xyxy, [0, 0, W, H])

    def test_swapped_corners_are_ordered(self):
        normal = geometry.gemini_to_xyxy([100, 200, 500, 800], W, H)
        both_swapped = geometry.gemini_to_xyxy([500, 800, 100, 200], W, H)
        y_swapped = geometry.gemini_to_xyxy([500, 200, 100, 800], W, H)
        x_swapped = geometry.gemini_to_xyxy([100, 800, 500, 200], W, H)
        for swapped in (both_swapped, y_swapped, x_swapped):
            np.testing.assert_allclose(swapped, normal)

    def test_out_of_range_is_clamped(self):
        np.testing.assert_allclose(geometry.gemini_to_xyxy([-50, -10, 1200, 1001], W, H), [0, 0, W, H])
        np.testing.assert_allclose(geometry.gemini_to_xyxy([1500, 1500, 2000, 2000], W, H), [W, H, W, H])
        np.testing.assert_allclose(geometry.gemini_to_xyxy([-5, 500, 250, 1500], W, H), [320, 0, W, 120])

    def test_accepts_strings_and_floats(self):
        np.testing.assert_allclose(geometry.gemini_to_xyxy(["100", 200.0, "500", 800], W, H), [128, 48, 512, 240])

    def test_downscaled_upload_maps_back(self):
        # Gemini saw a 320x240 copy: the 0-1000 grid is relative, so the box maps straight back.
        small = geometry.xyxy_to_gemini([32, 24, 160, 120], 320, 240)
        np.testing.assert_allclose(geometry.gemini_to_xyxy(small, W, H), [64, 48, 320, 240])

    def test_xyxy_to_gemini_known_value(self):
        assert geometry.xyxy_to_gemini([128, 48, 512, 240], W, H) == [100, 200, 500, 800]
        assert all(isinstance(v, int) for v in geometry.xyxy_to_gemini([1.3, 2.7, 100.1, 200.9], W, H))

    def test_round_trip_from_gemini_is_exact(self):
        g = rng(1)
        for _ in range(300):
            ys = np.sort(g.integers(0, 1001, 2))
            xs = np.sort(g.integers(0, 1001, 2))
            box = [int(ys[0]), int(xs[0]), int(ys[1]), int(xs[1])]
            width, height = int(g.integers(1, 5000)), int(g.integers(1, 5000))
            assert geometry.xyxy_to_gemini(geometry.gemini_to_xyxy(box, width, height), width, height) == box

    def test_round_trip_from_pixels_within_half_a_grid_step(self):
        for width, height in ((W, H), (333, 1999), (4000, 30)):
            boxes = random_boxes(200, width, height, seed=width)
            for box in boxes:
                back = geometry.gemini_to_xyxy(geometry.xyxy_to_gemini(box, width, height), width, height)
                tolerance = np.array([width, height, width, height]) / 1000 / 2 + 1e-9
                assert np.all(np.abs(back - box) <= tolerance)

    def test_points_to_pixels_x_first_and_clamped(self):
        pts = geometry.gemini_points_to_pixels([[200, 100], [800, 500], [1200, -10]], W, H)
        assert pts.shape == (3, 2)
        np.testing.assert_allclose(pts, [[128, 48], [512, 240], [W, 0]])

    def test_points_to_pixels_accepts_flat_and_generators(self):
        flat = geometry.gemini_points_to_pixels(np.array([0, 0, 1000, 1000]), W, H)
        np.testing.assert_allclose(flat, [[0, 0], [W, H]])
        gen = geometry.gemini_points_to_pixels(((x, y) for x, y in [(500, 250)]), W, H)
        np.testing.assert_allclose(gen, [[320, 120]])


class TestGeminiMask:
    def test_places_probability_map_inside_box_with_threshold_127(self):
        prob = np.array([[0, 127], [128, 255]], dtype=np.uint8)
        full = geometry.gemini_mask_to_full(prob, [10, 20, 30, 40], 100, 50)
        assert full.shape == (50, 100)
        assert full.dtype == bool
        # outside the box: nothing
        assert not full[:20].any() and not full[40:].any()
        assert not full[:, :10].any() and not full[:, 30:].any()
        # strictly greater than 127: 127 is off, 128 is on
        assert not full[20, 10]   # from the 0 corner
        assert not full[20, 29]   # from the 127 corner
        assert full[39, 10]       # from the 128 corner
        assert full[39, 29]       # from the 255 corner

    def test_uniform_map_fills_exactly_the_box(self):
        full = geometry.gemini_mask_to_full(np.full((7, 3), 200, dtype=np.uint8), [5, 6, 25, 16], 40, 30)
        assert full.sum() == 20 * 10
        assert geometry.mask_to_xyxy(full).tolist() == [5, 6, 25, 16]

    def test_custom_threshold(self):
        prob = np.full((4, 4), 100, dtype=np.uint8)
        assert not geometry.gemini_mask_to_full(prob, [0, 0, 4, 4], 8, 8).any()
        assert geometry.gemini_mask_to_full(prob, [0, 0, 4, 4], 8, 8, threshold=99).sum() == 16

    def test_resizes_a_coarse_map_to_the_box(self):
        # left half on, right half off, on a 2x2 map stretched to a 40x20 box
        prob = np.array([[255, 0], [255, 0]], dtype=np.uint8)
        full = geometry.gemini_mask_to_full(prob, [0, 0, 40, 20], 40, 20)
        assert full[:, :15].all()
        assert not full[:, 25:].any()

    def test_box_partly_outside_keeps_the_map_aligned(self):
        # A 20 px wide box starting 10 px left of the image: only the map's right half is visible.
        prob = np.zeros((10, 20), dtype=np.uint8)
        prob[:, 10:] = 255   # right half of the box: visible part
        full = geometry.gemini_mask_to_full(prob, [-10, 0, 10, 10], 30, 10)
        assert full[:, :10].all()
        assert not full[:, 10:].any()
        prob2 = np.zeros((10, 20), dtype=np.uint8)
        prob2[:, :10] = 255  # left half: entirely off the image
        assert not geometry.gemini_mask_to_full(prob2, [-10, 0, 10, 10], 30, 10).any()

    def test_box_past_the_far_edges(self):
        prob = np.zeros((20, 20), dtype=np.uint8)
        prob[:10, :10] = 255  # top-left quarter of the box, which is the visible part
        full = geometry.gemini_mask_to_full(prob, [20, 20, 40, 40], 30, 30)
        assert full[20:30, 20:30].all()
        assert full.sum() == 100

    def test_empty_and_degenerate_inputs(self):
        assert not geometry.gemini_mask_to_full(np.zeros((0, 0), dtype=np.uint8), [0, 0, 10, 10], 20, 20).any()
        assert not geometry.gemini_mask_to_full(np.full((3, 3), 255, np.uint8), [5, 5, 5, 9], 20, 20).any()
        assert not geometry.gemini_mask_to_full(np.full((3, 3), 255, np.uint8), [30, 30, 40, 40], 20, 20).any()
        assert geometry.gemini_mask_to_full(np.full((3, 3), 255, np.uint8), [30, 30, 40, 40], 20, 20).shape == (20, 20)


# --- Label Studio --------------------------------------------------------------------------------

class TestLabelStudioBoxes:
    def test_known_value(self):
        value = geometry.xyxy_to_ls([64, 48, 320, 240], W, H)
        assert value == pytest.approx({"x": 10.0, "y": 10.0, "width": 40.0, "height": 40.0, "rotation": 0})

    def test_clamped_to_the_image(self):
        value = geometry.xyxy_to_ls([-10, -20, 700, 500], W, H)
        assert value == pytest.approx({"x": 0.0, "y": 0.0, "width": 100.0, "height": 100.0, "rotation": 0})
        value = geometry.xyxy_to_ls([600, 400, 900, 900], W, H)
        assert value["x"] + value["width"] == pytest.approx(100.0)
        assert value["y"] + value["height"] == pytest.approx(100.0)

    def test_percent_pixels_round_trip(self):
        for width, height in ((W, H), (37, 1001), (5000, 20)):
            for box in random_boxes(300, width, height, seed=height):
                value = geometry.xyxy_to_ls(box, width, height)
                assert 0 <= value["x"] <= 100 and 0 <= value["y"] <= 100
                assert value["x"] + value["width"] <= 100 + 1e-9
                assert value["y"] + value["height"] <= 100 + 1e-9
                np.testing.assert_allclose(geometry.ls_to_xyxy(value, width, height), box, atol=1e-6)

    def test_ls_to_pixels_to_ls_round_trip(self):
        g = rng(7)
        for _ in range(300):
            x, y = g.uniform(0, 90, 2)
            value = {"x": x, "y": y, "width": g.uniform(0.1, 100 - x), "height": g.uniform(0.1, 100 - y), "rotation": 0}
            back = geometry.xyxy_to_ls(geometry.ls_to_xyxy(value, W, H), W, H)
            assert back == pytest.approx(value)

    def test_missing_or_none_rotation(self):
        value = {"x": 10, "y": 10, "width": 40, "height": 40}
        np.testing.assert_allclose(geometry.ls_to_xyxy(value, W, H), [64, 48, 320, 240])
        np.testing.assert_allclose(geometry.ls_to_xyxy({**value, "rotation": None}, W, H), [64, 48, 320, 240])
        np.testing.assert_allclose(geometry.ls_to_xyxy({**value, "rotation": 360}, W, H), [64, 48, 320, 240])

    def test_rotated_90_becomes_axis_aligned_bounds(self):
        # 200x100 image; top-left (100, 50), w=20, h=20 px; clockwise 90 deg around the top-left:
        # the width now points down, the height points left.
        value = {"x": 50, "y": 50, "width": 10, "height": 20, "rotation": 90}
        np.testing.assert_allclose(geometry.ls_to_xyxy(value, 200, 100), [80, 50, 100, 70], atol=1e-9)

    def test_rotated_45(self):
        value = {"x": 50, "y": 50, "width": 10, "height": 20, "rotation": 45}  # 20 x 20 px
        d = 20 / math.sqrt(2)
        np.testing.assert_allclose(geometry.ls_to_xyxy(value, 200, 100), [100 - d, 50, 100 + d, 50 + 2 * d], atol=1e-9)

    def test_rotated_270_and_negative_90_agree(self):
        value = {"x": 50, "y": 50, "width": 10, "height": 20, "rotation": 270}
        expected = [100, 30, 120, 50]
        np.testing.assert_allclose(geometry.ls_to_xyxy(value, 200, 100), expected, atol=1e-9)
        np.testing.assert_allclose(geometry.ls_to_xyxy({**value, "rotation": -90}, 200, 100), expected, atol=1e-9)

    def test_rotated_is_clipped_to_the_image(self):
        value = {"x": 0, "y": 0, "width": 10, "height": 20, "rotation": 90}  # would reach x = -20
        np.testing.assert_allclose(geometry.ls_to_xyxy(value, 200, 100), [0, 0, 0, 20], atol=1e-9)
        value = {"x": 95, "y": 90, "width": 10, "height": 20, "rotation": 45}
        xyxy = geometry.ls_to_xyxy(value, 200, 100)
        assert xyxy[0] >= 0 and xyxy[1] >= 0 and xyxy[2] == 200 and xyxy[3] == 100

    def test_rotation_matches_label_studio_sdk_corners(self):
        """The bounds equal those of the corners label-studio-sdk computes for YOLO OBB export."""
        g = rng(3)
        for _ in range(200):
            value = {
                "x": g.uniform(20, 60), "y": g.uniform(20, 60),
                "width": g.uniform(1, 20), "height": g.uniform(1, 20), "rotation": g.uniform(0, 360),
            }
            corners = np.array(convert_annotation_to_yolo_obb(
                {**value, "original_width": W, "original_height": H}, normalize=False))
            expected = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
            expected = np.clip(expected, 0, [W, H, W, H])
            np.testing.assert_allclose(geometry.ls_to_xyxy(value, W, H), expected, atol=1e-6)

    def test_polygon_points_round_trip(self):
        g = rng(4)
        pts = np.stack([g.uniform(0, W, 50), g.uniform(0, H, 50)], axis=1)
        ls_points = geometry.pixels_to_ls_points(pts, W, H)
        assert isinstance(ls_points, list) and all(isinstance(p, list) and len(p) == 2 for p in ls_points)
        assert all(isinstance(v, float) for p in ls_points for v in p)
        assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in ls_points)
        np.testing.assert_allclose(geometry.ls_points_to_pixels(ls_points, W, H), pts)
        assert geometry.pixels_to_ls_points(np.array([[64, 240]]), W, H) == [[10.0, 50.0]]


# --- YOLO ----------------------------------------------------------------------------------------

class TestYolo:
    def test_known_value(self):
        np.testing.assert_allclose(geometry.xyxy_to_yolo([64, 48, 320, 240], W, H), [0.3, 0.3, 0.4, 0.4])
        np.testing.assert_allclose(geometry.yolo_to_xyxy([0.5, 0.5, 1.0, 1.0], W, H), [0, 0, W, H])

    def test_round_trip(self):
        for width, height in ((W, H), (17, 923)):
            for box in random_boxes(300, width, height, seed=width + 1):
                yolo = geometry.xyxy_to_yolo(box, width, height)
                assert np.all((yolo >= 0) & (yolo <= 1))
                np.testing.assert_allclose(geometry.yolo_to_xyxy(yolo, width, height), box, atol=1e-6)


# --- box maths -----------------------------------------------------------------------------------

class TestBoxMaths:
    def test_box_area(self):
        np.testing.assert_allclose(geometry.box_area([[0, 0, 10, 5], [3, 3, 3, 9], [5, 5, 0, 0]]), [50, 0, 0])
        np.testing.assert_allclose(geometry.box_area([0, 0, 2, 2]), [4])

    def test_iou_known_values(self):
        a = np.array([[0, 0, 10, 10]])
        b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [10, 10, 20, 20], [20, 20, 30, 30], [0, 0, 5, 5]])
        iou = geometry.box_iou(a, b)
        assert iou.shape == (1, 5)
        np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0, 0.0, 0.25])

    def test_iou_is_symmetric_matrix(self):
        boxes = random_boxes(30, W, H, seed=9)
        iou = geometry.box_iou(boxes, boxes)
        assert iou.shape == (30, 30)
        np.testing.assert_allclose(iou, iou.T)
        np.testing.assert_allclose(np.diag(iou), 1.0)
        assert np.all((iou >= 0) & (iou <= 1 + 1e-12))

    def test_iou_zero_area(self):
        point = np.array([[5, 5, 5, 5]])
        line = np.array([[0, 5, 10, 5]])
        assert geometry.box_iou(point, point)[0, 0] == 0.0
        assert geometry.box_iou(line, line)[0, 0] == 0.0
        assert geometry.box_iou(point, [[0, 0, 10, 10]])[0, 0] == 0.0
        assert not np.isnan(geometry.box_iou(point, line)).any()

    def test_iou_empty(self):
        assert geometry.box_iou(np.zeros((0, 4)), np.zeros((3, 4))).shape == (0, 3)
        assert geometry.box_iou(np.zeros((2, 4)), np.zeros((0, 4))).shape == (2, 0)

    def test_nms_same_box_different_labels_both_kept(self):
        boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]])
        keep = geometry.nms_keep(boxes, np.array([0.9, 0.8]), ["car", "person"], 0.5)
        assert keep.tolist() == [0, 1]

    def test_nms_near_duplicates_keep_best_score(self):
        boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10.5], [0.5, 0, 10, 10], [50, 50, 60, 60]])
        scores = np.array([0.3, 0.9, 0.6, 0.1])
        keep = geometry.nms_keep(boxes, scores, ["car"] * 4, 0.7)
        assert keep.tolist() == [1, 3]  # the best of the three duplicates, and the distant box
        assert keep.dtype.kind == "i"

    def test_nms_is_class_aware_in_a_mixed_loop(self):
        boxes = np.array([[0, 0, 10, 10]] * 4 + [[100, 100, 110, 110]])
        scores = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
        labels = ["a", "b", "a", "b", "a"]
        assert geometry.nms_keep(boxes, scores, labels, 0.5).tolist() == [2, 3, 4]

    def test_nms_threshold_is_exclusive_and_ties_keep_the_first(self):
        boxes = np.array([[0, 0, 10, 10], [5, 0, 15, 10]])  # IoU 1/3
        assert geometry.nms_keep(boxes, np.array([0.5, 0.5]), ["a", "a"], 1 / 3).tolist() == [0, 1]
        assert geometry.nms_keep(boxes, np.array([0.5, 0.5]), ["a", "a"], 0.3).tolist() == [0]

    def test_nms_output_is_sorted_and_empty_ok(self):
        boxes = random_boxes(50, W, H, seed=11)
        scores = rng(11).uniform(0, 1, 50)
        keep = geometry.nms_keep(boxes, scores, ["x"] * 50, 0.3)
        assert keep.tolist() == sorted(keep.tolist())
        kept_iou = geometry.box_iou(boxes[keep], boxes[keep])
        assert np.all(kept_iou[~np.eye(len(keep), dtype=bool)] <= 0.3)
        assert geometry.nms_keep(np.zeros((0, 4)), np.zeros(0), [], 0.5).tolist() == []

    @pytest.mark.parametrize(
        "size, max_side, expected",
        [
            ((4000, 3000), 1024, (1024, 768)),
            ((3000, 4000), 1024, (768, 1024)),
            ((640, 480), 1024, (640, 480)),      # never upscaled
            ((1024, 10), 1024, (1024, 10)),
            ((10000, 5), 1000, (1000, 1)),       # never 0
        ],
    )
    def test_scaled_size(self, size, max_side, expected):
        assert geometry.scaled_size(*size, max_side) == expected

    def test_scaled_size_keeps_aspect(self):
        g = rng(12)
        for _ in range(300):
            width, height = (int(v) for v in g.integers(1, 8000, 2))
            max_side = int(g.integers(64, 2048))
            w2, h2 = geometry.scaled_size(width, height, max_side)
            assert max(w2, h2) <= max(max_side, 1)
            assert w2 <= width and h2 <= height
            assert w2 >= 1 and h2 >= 1
            if max(width, height) <= max_side:
                assert (w2, h2) == (width, height)
            elif min(w2, h2) > 1:
                # rounding moves each side by at most half a pixel
                assert abs(w2 / h2 - width / height) <= (width / height) * (0.5 / w2 + 0.5 / h2) * 1.01


# --- masks and polygons --------------------------------------------------------------------------

class TestMasksAndPolygons:
    def test_polygon_to_mask_rectangle(self):
        mask = geometry.polygon_to_mask(np.array([[10, 5], [19, 5], [19, 14], [10, 14]]), 40, 30)
        assert mask.shape == (30, 40) and mask.dtype == bool
        assert mask.sum() == 100
        assert geometry.mask_to_xyxy(mask).tolist() == [10, 5, 20, 15]

    def test_polygon_to_mask_triangle_and_degenerate(self):
        tri = geometry.polygon_to_mask([[0, 0], [20, 0], [0, 20]], 30, 30)
        assert tri[1, 1] and not tri[19, 19]
        assert not geometry.polygon_to_mask([[0, 0], [5, 5]], 10, 10).any()
        assert not geometry.polygon_to_mask(np.zeros((0, 2)), 10, 10).any()

    def test_mask_to_polygon_to_mask_is_exact_for_rectangles(self):
        mask = np.zeros((48, 64), dtype=bool)
        mask[10:30, 5:45] = True
        poly = geometry.mask_to_polygon(mask)
        assert poly is not None and poly.shape[1] == 2 and len(poly) == 4
        assert np.array_equal(geometry.polygon_to_mask(poly, 64, 48), mask)

    def test_mask_polygon_round_trip_on_a_disk(self):
        yy, xx = np.mgrid[:100, :120]
        disk = (xx - 60) ** 2 + (yy - 50) ** 2 <= 30 ** 2
        poly = geometry.mask_to_polygon(disk)
        assert poly is not None and len(poly) >= 8
        back = geometry.polygon_to_mask(poly, 120, 100)
        inter = np.logical_and(back, disk).sum()
        union = np.logical_or(back, disk).sum()
        assert inter / union > 0.95
        assert geometry.mask_to_xyxy(back).tolist() == geometry.mask_to_xyxy(disk).tolist()

    def test_mask_to_polygon_takes_the_largest_component(self):
        mask = np.zeros((50, 50), dtype=bool)
        mask[2:5, 2:5] = True
        mask[20:40, 10:45] = True
        poly = geometry.mask_to_polygon(mask)
        np.testing.assert_allclose(poly.min(axis=0), [10, 20])
        np.testing.assert_allclose(poly.max(axis=0), [44, 39])

    def test_mask_to_polygon_empty_and_tiny(self):
        assert geometry.mask_to_polygon(np.zeros((10, 10), dtype=bool)) is None
        single = np.zeros((10, 10), dtype=bool)
        single[4, 4] = True
        assert geometry.mask_to_polygon(single) is None
        line = np.zeros((10, 10), dtype=bool)
        line[4, 2:8] = True
        assert geometry.mask_to_polygon(line) is None

    def test_mask_to_xyxy(self):
        mask = np.zeros((30, 40), dtype=bool)
        mask[3, 7] = True
        assert geometry.mask_to_xyxy(mask).tolist() == [7, 3, 8, 4]
        mask[20, 30] = True
        assert geometry.mask_to_xyxy(mask).tolist() == [7, 3, 31, 21]
        assert geometry.mask_to_xyxy(np.zeros((5, 5), dtype=bool)) is None

    def test_random_polygon_round_trips_through_mask_bounds(self):
        g = rng(13)
        for _ in range(30):
            x0, y0 = g.integers(0, 40, 2)
            x1, y1 = x0 + g.integers(3, 20), y0 + g.integers(3, 20)
            rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=float)
            mask = geometry.polygon_to_mask(rect, 64, 64)
            assert geometry.mask_to_xyxy(mask).tolist() == [x0, y0, x1 + 1, y1 + 1]
            poly = geometry.mask_to_polygon(mask)
            assert np.array_equal(geometry.polygon_to_mask(poly, 64, 64), mask)


class TestBrushRle:
    """Label Studio brush RLE: the header is checked against the image before the SDK decodes anything."""

    def test_round_trip_and_header(self):
        mask = np.zeros((30, 40), dtype=bool)
        mask[5:20, 10:30] = True
        rle = mask2rle(mask.astype(np.uint8) * 255)
        assert geometry.brush_rle_length(rle) == 40 * 30 * 4
        assert np.array_equal(geometry.ls_brush_to_mask(rle, 40, 30), mask)

    def test_a_4kb_rle_declaring_4g_values_is_refused_without_allocating(self):
        rle = crafted_brush_rle(2**32 - 1)
        assert len(rle) == 4096 and geometry.brush_rle_length(rle) == 2**32 - 1
        tracemalloc.start()
        try:
            with pytest.raises(geometry.BrushMaskError, match="declares 4294967295 values"):
                geometry.ls_brush_to_mask(rle, W, H)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # The SDK's decoder would first allocate the declared 4 GB, then fill ~80 MB of it.
        assert peak < 2 * 1024 * 1024, f"{peak} bytes traced"

    def test_a_region_claiming_a_huge_image_is_refused_too(self):
        # Header and claimed size agree (16384 x 16384 x 4 = 2**30), but no loadable image is that large.
        rle = crafted_brush_rle(16384 * 16384 * 4)
        tracemalloc.start()
        try:
            with pytest.raises(geometry.BrushMaskError, match="exceeds"):
                geometry.ls_brush_to_mask(rle, 16384, 16384)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 2 * 1024 * 1024, f"{peak} bytes traced"

    @pytest.mark.parametrize("rle", [[], [0, 0, 1], [256, 0, 0, 0, 0], ["a", "b", "c", "d"], "abcdefgh"])
    def test_malformed_headers_are_refused(self, rle):
        with pytest.raises(geometry.BrushMaskError):
            geometry.ls_brush_to_mask(rle, 4, 4)

    def test_a_truncated_body_is_refused(self):
        rle = crafted_brush_rle(400 * 300 * 4, size_bytes=12)  # the right header, one run: 65,536 of 480,000 values
        with pytest.raises(geometry.BrushMaskError, match="does not decode"):
            geometry.ls_brush_to_mask(rle, 400, 300)
