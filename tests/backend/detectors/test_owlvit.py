"""OWL-ViT / OWLv2 + SAM drafting on tiny randomly initialised models (no weights, no network).

The models are built from small configs, saved with ``save_pretrained`` and loaded back from that
folder, exactly the path real weights take. Accuracy is meaningless here; the tests check shapes,
the query -> label mapping, the box frame (OWLv2 pads to a square, OWL-ViT stretches), masks and
what merging / NMS / Soft-NMS / the mask-area filter do to known raw outputs.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from backend.core import geometry
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from tests.paths import ROOT
from tests.synthetic import label_config, make_images

transformers = pytest.importorskip("transformers")

CLASSES = ("Car", "Person", "Sign")


@pytest.fixture(scope="session")
def owlv2(tiny_models):
    from backend.detectors.owlvit import OwlVitDetector, OwlVitOptions

    return OwlVitDetector(OwlVitOptions(model=str(tiny_models["owlv2"]), threshold=0.0, threads=1))


RECT = ProjectConfig.parse(label_config(CLASSES))
BRUSH = ProjectConfig.parse(label_config(CLASSES, tag="BrushLabels"))


# --- queries ------------------------------------------------------------------------------------------

def test_queries_come_from_values_hints_and_predicted_values():
    from backend.detectors.owlvit import build_queries

    config = ProjectConfig.parse((ROOT / "label_config.xml").read_text())
    queries = build_queries(config)
    texts = {t.lower(): label for t, label in queries}
    assert texts["a photo of a helmet"] == "Helmet"  # values first: "helmet" is Helmet's, not a hint's
    assert texts["a photo of a construction worker wearing a hard hat"] == "Person with helmet"
    assert texts["a photo of a hard hat / safety helmet"] == "Helmet"
    assert texts["a photo of a hardhat"] == "Helmet" and texts["a photo of a head"] == "Person without helmet"
    assert texts["a photo of a person with helmet"] == "Person with helmet"
    assert len(texts) == len(queries)  # no duplicates
    assert {label for _, label in queries} == set(config.class_names)
    # An interactive query replaces them all and is labelled like Gemini labels it.
    from backend.detectors.gemini.client import best_label

    query = "  workers   without a helmet "
    assert build_queries(config, query) == [("workers without a helmet", best_label(config, query))]
    assert build_queries(config, "a dog") == [("a dog", "Person with helmet")]  # nothing matches: the first label
    assert build_queries(config, template="")[0] == ("Person with helmet", "Person with helmet")


# --- real forward passes ------------------------------------------------------------------------------

def test_owlv2_detect_shapes_labels_and_square_frame(owlv2):
    image = make_images(1, seed=3, size=(160, 96))[0].image
    det = owlv2.detect(image, "sha", RECT)
    assert isinstance(det, Detections) and det.source == "owlvit" and det.image_size == (160, 96)
    assert len(det) > 0 and det.masks is None
    assert set(det.labels) <= set(CLASSES)
    assert np.all(det.xyxy[:, [0, 2]] <= 160) and np.all(det.xyxy[:, [1, 3]] <= 96) and np.all(det.xyxy >= 0)
    assert np.all(det.xyxy[:, 2] > det.xyxy[:, 0]) and np.all(det.xyxy[:, 3] > det.xyxy[:, 1])
    assert np.all(np.diff(det.scores) <= 1e-9)  # best first
    assert det.meta["counts"]["raw"] == (64 // 16) ** 2 and det.meta["latency_s"] >= 0
    assert owlv2.square_frame  # OWLv2 pads to a square: boxes are in max(w, h) units

    # The frame maths, against the raw model output: box i is yolo_to_xyxy(raw_i, 160, 160), clipped.
    from backend.detectors.owlvit import OwlVitDetector, build_queries

    plain = OwlVitDetector(owlv2.options, merge_iou=None, nms_iou=None)
    _, boxes = plain._forward(image, [t for t, _ in build_queries(RECT)])
    expected = np.clip(np.array([geometry.yolo_to_xyxy(b, 160, 160) for b in boxes]), 0, [160, 96, 160, 96])
    sized = (expected[:, 2] - expected[:, 0] >= 1) & (expected[:, 3] - expected[:, 1] >= 1)
    got = plain.detect(image, "", RECT)
    assert len(got) == int(sized.sum())
    for box in got.xyxy:
        assert np.min(np.abs(expected - box).max(axis=1)) < 1e-3


def test_owlvit_v1_stretches_the_frame(tiny_models):
    from backend.detectors.owlvit import OwlVitDetector, OwlVitOptions

    det_v1 = OwlVitDetector(OwlVitOptions(model=str(tiny_models["owlvit"]), threshold=0.0, merge_iou=None, nms_iou=None))
    assert not det_v1.square_frame
    image = make_images(1, seed=4, size=(128, 64))[0].image
    from backend.detectors.owlvit import build_queries

    scores, boxes = det_v1._forward(image, [t for t, _ in build_queries(RECT)])
    det = det_v1.detect(image, "", RECT)
    expected = np.clip(np.array([geometry.yolo_to_xyxy(b, 128, 64) for b in boxes]), 0, [128, 64, 128, 64])
    sized = (expected[:, 2] - expected[:, 0] >= 1) & (expected[:, 3] - expected[:, 1] >= 1)
    assert len(det) == int(sized.sum())
    for box in det.xyxy:
        assert np.min(np.abs(expected - box).max(axis=1)) < 1e-3
    best = scores.max(axis=1)[sized]
    assert np.allclose(np.sort(det.scores)[::-1], np.sort(best)[::-1], atol=1e-5)


def test_masks_from_sam_best_of_three(tiny_models):
    import torch

    from backend.detectors.owlvit import OwlVitDetector, OwlVitOptions

    det_sam = OwlVitDetector(OwlVitOptions(model=str(tiny_models["owlv2"]), sam_model=str(tiny_models["sam"]), threshold=0.0,
                                           max_objects=5))
    image = make_images(1, seed=5, size=(120, 80))[0].image
    det = det_sam.detect(image, "", BRUSH)
    assert det.masks is not None and det.masks.shape == (len(det), 80, 120) and det.masks.dtype == bool
    assert all(m.any() for m in det.masks)  # an empty SAM mask would have fallen back to the box
    assert len(det.meta["mask_predicted_iou"]) == len(det) and det.meta["mask_model"] == "sam"
    assert det_sam.model_name.endswith("+sam")

    # Best of multimask: the kept mask is the candidate with the highest predicted IoU.
    seg = det_sam.segmenter
    boxes = np.array([[5.0, 5.0, 60.0, 40.0], [30.0, 20.0, 110.0, 75.0]])
    masks, iou = seg.segment(image, boxes)
    with torch.no_grad():
        inputs = seg.processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
        out = seg.model(**inputs, multimask_output=True)
    best = out.iou_scores[0].argmax(-1)
    assert np.allclose(iou, out.iou_scores[0].max(-1).values.numpy(), atol=1e-5)
    full = seg.processor.post_process_masks([out.pred_masks[0]], inputs["original_sizes"], inputs["reshaped_input_sizes"])[0]
    for i in range(2):
        assert np.array_equal(masks[i], full[i, int(best[i])].numpy())


def test_mask_area_filter_and_box_fallback_without_sam(tiny_models, owlv2):
    from backend.detectors.owlvit import OwlVitDetector, OwlVitOptions

    image = make_images(1, seed=6, size=(96, 96))[0].image
    none_kept = OwlVitDetector(OwlVitOptions(model=str(tiny_models["owlv2"]), sam_model=str(tiny_models["sam"]), threshold=0.0,
                                             max_objects=4, min_mask_area=1.0)).detect(image, "", BRUSH)
    assert len(none_kept) == 0 and none_kept.masks.shape == (0, 96, 96)
    assert none_kept.meta["mask_area_dropped"] == min(4, none_kept.meta["counts"]["after_nms"]) >= 1

    boxed = owlv2.detect(image, "", BRUSH)  # no SAM configured: the filled box stands in
    assert boxed.masks is not None and boxed.meta["mask_fallbacks"] == len(boxed)
    for box, mask in zip(boxed.xyxy, boxed.masks):
        assert np.array_equal(mask, geometry.box_to_mask(box, 96, 96))


# --- the post-processing pipeline on known raw outputs -----------------------------------------------

def _scripted(detector, monkeypatch, scores: np.ndarray, boxes_xyxy: np.ndarray, frame: int = 100):
    """Make the model "see" ``boxes_xyxy`` (pixels of a frame x frame image) with ``scores`` (Q, T)."""
    cxcywh = np.array([geometry.xyxy_to_yolo(b, frame, frame) for b in boxes_xyxy])
    monkeypatch.setattr(detector, "_forward", lambda image, texts: (np.asarray(scores, dtype=float), cxcywh))


def test_pipeline_threshold_merge_nms_softnms_agnostic_cap(tiny_models, monkeypatch):
    from PIL import Image

    from backend.detectors.owlvit import OwlVitDetector, OwlVitOptions, build_queries

    config = ProjectConfig.parse(label_config(("Car", "Person")))
    assert [label for _, label in build_queries(config)] == ["Car", "Person"]
    image = Image.new("RGB", (100, 100))
    boxes = np.array([
        [10, 10, 50, 50],    # Car 0.9
        [10, 10, 50, 51],    # Car 0.8: IoU 0.98 with the first -> merged
        [10, 20, 50, 60],    # Car 0.7: IoU 0.6 with the first -> NMS at 0.5 drops it, Soft-NMS decays it
        [12, 12, 52, 52],    # Person 0.6: same place, other label -> kept unless class-agnostic NMS
        [70, 70, 90, 90],    # Car 0.05: below the threshold
    ], dtype=float)
    scores = np.array([[0.9, 0.1], [0.8, 0.1], [0.7, 0.1], [0.1, 0.6], [0.05, 0.01]])
    base = OwlVitOptions(model=str(tiny_models["owlv2"]), threshold=0.1)

    def run(**changes):
        det = OwlVitDetector(base, **changes)
        _scripted(det, monkeypatch, scores, boxes)
        return det.detect(image, "", config)

    raw = run(merge_iou=None, nms_iou=None)
    assert raw.labels == ["Car", "Car", "Car", "Person"] and len(raw) == 4  # threshold dropped the 0.05 box, best first
    merged = run(merge_iou=0.9, nms_iou=None)
    assert len(merged) == 3 and merged.meta["counts"]["after_merge"] == 3
    car = merged.xyxy[merged.labels.index("Car")]
    assert car[3] == pytest.approx(51, abs=1e-6)  # the merged box covers both
    nms = run(merge_iou=0.9, nms_iou=0.5)
    assert sorted(nms.labels) == ["Car", "Person"]
    soft = run(merge_iou=0.9, nms_iou=None, soft_nms_sigma=0.5)
    assert len(soft) == 3  # Soft-NMS keeps the overlapping Car ...
    lower = [i for i, (label, b) in enumerate(zip(soft.labels, soft.xyxy)) if label == "Car" and b[1] == pytest.approx(20)]
    assert soft.scores[lower[0]] < 0.7  # ... with a lower score
    strict = run(merge_iou=0.9, nms_iou=None, soft_nms_sigma=0.05)  # strong decay below the threshold drops it
    assert len(strict) == 2
    agnostic = run(merge_iou=0.9, nms_iou=0.5, agnostic_nms_iou=0.5)
    assert agnostic.labels == ["Car"]
    capped = run(merge_iou=None, nms_iou=None, max_objects=2)
    assert capped.scores.tolist() == pytest.approx([0.9, 0.8])


def test_missing_weights_are_never_downloaded(tmp_path, monkeypatch):
    from backend.detectors.owlvit import ModelNotAvailable, OwlVitDetector, OwlVitOptions

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    with pytest.raises(ModelNotAvailable, match="never downloaded"):
        OwlVitDetector(OwlVitOptions(model="google/owlv2-base-patch16-ensemble"))
    with pytest.raises(ModelNotAvailable, match="does not exist"):
        OwlVitDetector(OwlVitOptions(model=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match="config.json"):
        OwlVitDetector(OwlVitOptions(model=str(tmp_path / "empty")))


def test_options_from_env(monkeypatch, tiny_models):
    from backend.detectors.owlvit import DEFAULT_MODEL, OwlVitOptions

    monkeypatch.delenv("OWLVIT_MODEL", raising=False)
    monkeypatch.delenv("SAM_MODEL", raising=False)
    monkeypatch.delenv("OWLVIT_THRESHOLD", raising=False)
    assert OwlVitOptions.from_env() == OwlVitOptions(model=DEFAULT_MODEL)
    monkeypatch.setenv("OWLVIT_MODEL", str(tiny_models["owlv2"]))
    monkeypatch.setenv("SAM_MODEL", str(tiny_models["sam"]))
    monkeypatch.setenv("OWLVIT_THRESHOLD", "0.3")
    opts = OwlVitOptions.from_env(threshold=None, max_objects=7)
    assert (opts.model, opts.sam_model, opts.threshold, opts.max_objects) == (str(tiny_models["owlv2"]), str(tiny_models["sam"]),
                                                                              0.3, 7)


def test_interactive_query_labels_every_box(owlv2):
    image = make_images(1, seed=8)[0].image
    det = owlv2.detect(image, "", RECT, query="a blue person")
    assert det.meta["queries"] == ["a blue person"]
    assert len(det) and set(det.labels) == {"Person"}
