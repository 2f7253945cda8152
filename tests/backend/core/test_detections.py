"""backend.core.detections: the one internal detection type."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from backend.core.detections import Detections

SIZE = (40, 30)  # (width, height)


def masks_for(boxes) -> np.ndarray:
    """One full-image boolean mask per pixel box (the box filled)."""
    out = np.zeros((len(boxes), SIZE[1], SIZE[0]), dtype=bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        out[i, int(y0):int(y1), int(x0):int(x1)] = True
    return out


BOXES = [[0, 0, 10, 10], [5, 5, 20, 25], [30, 1, 40, 3]]


def make(masks: bool = False, **kwargs) -> Detections:
    return Detections(
        xyxy=kwargs.pop("xyxy", BOXES),
        labels=kwargs.pop("labels", ["car", "person", "car"]),
        scores=kwargs.pop("scores", [0.9, 0.5, 0.7]),
        image_size=SIZE,
        source="yolo",
        model="v3",
        masks=masks_for(BOXES) if masks else None,
        meta=kwargs.pop("meta", {"k": 1}),
    )


class TestShapes:
    def test_lists_become_float_arrays(self):
        d = make()
        assert isinstance(d.xyxy, np.ndarray) and d.xyxy.dtype == float and d.xyxy.shape == (3, 4)
        assert isinstance(d.scores, np.ndarray) and d.scores.dtype == float and d.scores.shape == (3,)
        np.testing.assert_array_equal(d.xyxy, np.array(BOXES, dtype=float))
        np.testing.assert_array_equal(d.scores, [0.9, 0.5, 0.7])
        assert len(d) == 3

    def test_flat_and_integer_inputs_are_reshaped(self):
        d = Detections(np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int32), ["a", "b"], np.array([[1], [0]]), SIZE, "gemini")
        assert d.xyxy.shape == (2, 4) and d.xyxy.dtype == float
        assert d.xyxy[1].tolist() == [5.0, 6.0, 7.0, 8.0]
        assert d.scores.shape == (2,) and d.scores.tolist() == [1.0, 0.0]

    def test_single_detection(self):
        d = Detections([1, 2, 3, 4], ["a"], 0.5, SIZE, "gemini")
        assert d.xyxy.shape == (1, 4)
        assert d.scores.shape == (1,)

    def test_wrong_box_count_raises(self):
        with pytest.raises(ValueError):
            Detections([[0, 0, 1, 1]], ["a", "b"], [0.1, 0.2], SIZE, "x")

    def test_wrong_score_count_raises(self):
        with pytest.raises(ValueError):
            Detections([[0, 0, 1, 1], [0, 0, 2, 2]], ["a", "b"], [0.1], SIZE, "x")

    def test_masks_become_bool(self):
        masks = masks_for(BOXES).astype(np.uint8) * 255
        d = Detections(BOXES, ["a", "b", "c"], [1, 1, 1], SIZE, "gemini", masks=masks)
        assert d.masks.dtype == bool
        assert d.masks.shape == (3, SIZE[1], SIZE[0])
        np.testing.assert_array_equal(d.masks, masks_for(BOXES))

    @pytest.mark.parametrize("count", [0, 2, 4])
    def test_mask_count_mismatch_raises(self, count):
        masks = np.zeros((count, SIZE[1], SIZE[0]), dtype=bool)
        with pytest.raises(ValueError, match=f"{count} masks for 3 detections"):
            Detections(BOXES, ["a", "b", "c"], [1, 1, 1], SIZE, "gemini", masks=masks)

    def test_frozen_and_meta_not_shared(self):
        d = make()
        with pytest.raises(dataclasses.FrozenInstanceError):
            d.source = "other"  # type: ignore[misc]
        a = Detections([], [], [], SIZE, "x")
        b = Detections([], [], [], SIZE, "x")
        assert a.meta is not b.meta

    def test_defaults(self):
        d = Detections([[0, 0, 1, 1]], ["a"], [0.3], SIZE, "gemini")
        assert d.model == "" and d.masks is None and d.meta == {}


class TestEmpty:
    def test_empty(self):
        d = Detections([], [], [], SIZE, "gemini", "gemini-2.5-flash", meta={"reason": "nothing", "tokens": 12})
        assert len(d) == 0
        assert d.xyxy.shape == (0, 4)
        assert d.scores.shape == (0,)
        assert d.labels == []
        assert d.masks is None
        assert d.image_size == SIZE
        assert (d.source, d.model) == ("gemini", "gemini-2.5-flash")
        assert d.meta == {"reason": "nothing", "tokens": 12}

    def test_empty_with_empty_masks(self):
        d = Detections(np.zeros((0, 4)), [], np.zeros(0), SIZE, "x", masks=np.zeros((0, SIZE[1], SIZE[0])))
        assert d.masks.shape == (0, SIZE[1], SIZE[0]) and d.masks.dtype == bool

    @pytest.mark.parametrize("keep", [[], np.zeros(0, dtype=bool), np.zeros(0, dtype=int)])
    def test_filter_of_empty(self, keep):
        d = Detections([], [], [], SIZE, "gemini", "m", meta={"reason": "r"}).filter(keep)
        assert len(d) == 0 and d.xyxy.shape == (0, 4) and d.scores.shape == (0,)
        assert (d.source, d.model, d.meta) == ("gemini", "m", {"reason": "r"})


class TestFilter:
    def test_by_bool_keeps_order_and_masks(self):
        d = make(masks=True)
        sub = d.filter(np.array([True, False, True]))
        assert sub.labels == ["car", "car"]
        np.testing.assert_array_equal(sub.xyxy, [BOXES[0], BOXES[2]])
        np.testing.assert_array_equal(sub.scores, [0.9, 0.7])
        np.testing.assert_array_equal(sub.masks, masks_for([BOXES[0], BOXES[2]]))

    def test_by_bool_list(self):
        sub = make(masks=True).filter([False, True, False])
        assert sub.labels == ["person"]
        np.testing.assert_array_equal(sub.masks[0], masks_for(BOXES)[1])

    def test_by_index_list_keeps_given_order(self):
        d = make(masks=True)
        sub = d.filter([2, 0])
        assert sub.labels == ["car", "car"]
        np.testing.assert_array_equal(sub.xyxy, [BOXES[2], BOXES[0]])
        np.testing.assert_array_equal(sub.scores, [0.7, 0.9])
        np.testing.assert_array_equal(sub.masks, masks_for([BOXES[2], BOXES[0]]))

    def test_by_index_array(self):
        sub = make().filter(np.array([1]))
        assert sub.labels == ["person"] and sub.scores.tolist() == [0.5]
        assert sub.masks is None

    def test_by_score_condition(self):
        d = make(masks=True)
        sub = d.filter(d.scores >= 0.7)
        assert sub.labels == ["car", "car"]
        assert len(sub.masks) == 2

    @pytest.mark.parametrize("keep", [[], np.zeros(0, dtype=int), [False, False, False]])
    def test_keep_nothing(self, keep):
        sub = make(masks=True).filter(keep)
        assert len(sub) == 0
        assert sub.xyxy.shape == (0, 4)
        assert sub.scores.shape == (0,)
        assert sub.masks.shape == (0, SIZE[1], SIZE[0])

    def test_wrong_length_bool_mask_raises(self):
        with pytest.raises(IndexError):
            make().filter([True, False])

    def test_keeps_metadata_and_copies_meta(self):
        d = make()
        sub = d.filter([0])
        assert (sub.image_size, sub.source, sub.model) == (SIZE, "yolo", "v3")
        assert sub.meta == {"k": 1}
        sub.meta["k"] = 2
        assert d.meta == {"k": 1}

    def test_original_is_untouched(self):
        d = make(masks=True)
        before = (d.xyxy.copy(), list(d.labels), d.scores.copy(), d.masks.copy())
        d.filter([1])
        np.testing.assert_array_equal(d.xyxy, before[0])
        assert d.labels == before[1]
        np.testing.assert_array_equal(d.scores, before[2])
        np.testing.assert_array_equal(d.masks, before[3])
