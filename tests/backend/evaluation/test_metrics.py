"""backend.evaluation.metrics: COCO-style metrics, truth readers, the report; and the geometry it added."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

from backend.core import geometry
from backend.core.detections import Detections
from backend.detectors.yolo import MAX_DET
from backend.evaluation.metrics import SIZES, best_ious, coco_eval, detection_metrics, evaluate
from backend.evaluation.report import write_report
from backend.evaluation.truth import TruthError, load_truth
from tests.synthetic import Box, crafted_brush_rle, label_config, ls_result, make_images, perturb

CLASSES = ["Car", "Person", "Sign"]


def det(boxes, labels, scores=None, size=(100, 100), masks=None, source="x"):
    n = len(labels)
    return Detections(np.array(boxes, dtype=float).reshape(n, 4), list(labels),
                      np.linspace(0.9, 0.5, n) if scores is None else np.array(scores, dtype=float), size, source, "", masks)


def synthetic_pairs(n=12, seed=0, shift=0.0, masks=False):
    pairs = []
    for im in make_images(n, seed=seed, max_objects=3):
        boxes = np.array([b.xyxy for b in im.boxes], dtype=float).reshape(-1, 4)
        labels = [b.label for b in im.boxes]
        gm = pm = None
        if masks:
            gm = np.stack([geometry.box_to_mask(b, im.width, im.height) for b in boxes]) if len(boxes) else \
                np.zeros((0, im.height, im.width), bool)
            pm = np.stack([geometry.box_to_mask(b + shift, im.width, im.height) for b in boxes]) if len(boxes) else gm
        truth = det(boxes, labels, np.ones(len(labels)), im.image.size, gm, "human")
        pairs.append((det(boxes + shift, labels, None, im.image.size, pm), truth))
    return pairs


# --- geometry added for COCO / YOLO polygons / RLE ------------------------------------------------

def test_geometry_coco_polygon_rle_round_trips():
    box = np.array([3.5, 4.0, 20.25, 31.0])
    assert geometry.xyxy_to_coco(box) == [3.5, 4.0, 16.75, 27.0]
    assert np.allclose(geometry.coco_to_xyxy(geometry.xyxy_to_coco(box)), box)
    pts = np.array([[1, 2], [9, 2], [9, 7], [1, 7]], dtype=float)
    assert geometry.polygon_to_coco(pts) == [1, 2, 9, 2, 9, 7, 1, 7]
    assert np.array_equal(geometry.coco_to_polygon(geometry.polygon_to_coco(pts)), pts)
    assert np.array_equal(geometry.points_to_xyxy(pts), [1, 2, 9, 7])
    assert np.allclose(geometry.yolo_points_to_pixels([0.1, 0.5, 1.0, 0.25], 200, 100), [[20, 50], [200, 25]])
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:12, 7:30] = True
    mask[20:25, 2:5] = True
    rle = geometry.mask_to_rle(mask)
    assert rle["size"] == [30, 40] and isinstance(rle["counts"], str)
    json.dumps(rle)
    assert np.array_equal(geometry.rle_to_mask(rle), mask)
    # Uncompressed RLE (column-major run lengths, as COCO's iscrowd annotations use).
    flat = mask.flatten(order="F").astype(int)
    runs, value, count = [], 0, 0
    for v in flat:
        if v == value:
            count += 1
        else:
            runs.append(count)
            value, count = v, 1
    runs.append(count)
    assert np.array_equal(geometry.rle_to_mask({"size": [30, 40], "counts": runs}), mask)
    assert np.array_equal(geometry.coco_segmentation_to_mask([geometry.polygon_to_coco(pts)], 40, 30),
                          geometry.polygon_to_mask(pts, 40, 30))
    assert np.array_equal(geometry.ls_brush_to_mask(mask2rle(mask.astype(np.uint8) * 255), 40, 30), mask)
    with pytest.raises(geometry.BrushMaskError, match="declares"):
        geometry.ls_brush_to_mask(mask2rle(mask.astype(np.uint8) * 255), 41, 30)


# --- metrics --------------------------------------------------------------------------------------

def test_perfect_predictions_score_one():
    pairs = synthetic_pairs()
    m = evaluate(pairs, CLASSES, latencies=[0.2] * len(pairs), wall_seconds=2.0)
    c = m["coco"]
    assert (c["map50_95"], c["map50"], c["map75"]) == (1.0, 1.0, 1.0)
    assert m["gate"]["map50"] == 1.0 and m["gate"]["map50_95"] == 1.0
    assert m["gate"]["precision"] == 1.0 and m["gate"]["recall"] == 1.0
    assert m["iou"]["mean"] == 1.0 and m["iou"]["recall50"] == 1.0 and m["iou"]["counts"][-1] == m["n_gt"]
    assert all(row["ap50_95"] == 1.0 for row in m["per_class"].values() if row["n_gt"])
    assert sum(m["sizes"][s]["n_gt"] for s in SIZES) == m["n_gt"]
    assert m["speed"]["images_per_second"] == pytest.approx(len(pairs) / 2.0) and m["speed"]["latency_p50_s"] == 0.2
    assert m["masks"] is None
    assert m["pr_curve"]["precision"][0] == 1.0 and len(m["pr_curve"]["recall"]) == 101


def test_shifted_predictions_score_less_and_the_gate_figures_are_cocos():
    m = evaluate(synthetic_pairs(shift=3.0), CLASSES)
    assert 0 < m["coco"]["map50_95"] < 1 and m["iou"]["mean"] < 1
    # one evaluation: the gate's figures are pycocotools' own
    assert m["gate"]["map50_95"] == m["coco"]["map50_95"] and m["gate"]["map50"] == m["coco"]["map50"]

    rng = np.random.default_rng(7)
    pairs = []
    for im in make_images(20, seed=3, max_objects=3):
        truth = det([b.xyxy for b in im.boxes], [b.label for b in im.boxes], np.ones(len(im.boxes)), im.image.size)
        drafts = perturb(im.boxes, rng, im.width, im.height, jitter=0.08, drop=0.2, extra=0.5)
        drafted = det([b.xyxy for b, _ in drafts], [b.label for b, _ in drafts], [s for _, s in drafts], im.image.size)
        pairs.append((drafted, truth))
    m = evaluate(pairs, CLASSES)
    assert m["gate"]["map50_95"] == m["coco"]["map50_95"] and m["gate"]["map50"] == m["coco"]["map50"]
    assert 0 < m["coco"]["map50"] < 1
    assert detection_metrics(pairs, CLASSES).map50_95 == m["coco"]["map50_95"]


# --- the gate's figures on known boxes ---------------------------------------------------------------

GT = det([[0, 0, 10, 10], [20, 20, 40, 40], [50, 50, 60, 70]], ["Car", "Car", "Person"], [1, 1, 1], source="human")


def test_gate_figures_of_perfect_predictions():
    m = detection_metrics([(det(GT.xyxy, GT.labels, [0.9, 0.8, 0.7]), GT)], CLASSES)
    assert (m.map50, m.map50_95, m.precision, m.recall, m.tp50) == (1.0, 1.0, 1.0, 1.0, 3)


def test_gate_figures_of_misses_false_positives_and_wrong_class():
    pred = det([[0, 0, 10, 10], [20, 20, 40, 40], [80, 80, 90, 90]], ["Car", "Person", "Car"], [0.9, 0.8, 0.95])
    m = detection_metrics([(pred, GT)], CLASSES)
    assert m.tp50 == 1 and m.precision == pytest.approx(1 / 3) and m.recall == pytest.approx(1 / 3)
    # Car: ranked FP (0.95) then TP (0.9): precision 0.5 up to recall 0.5, then nothing -> AP = 51/101 * 0.5
    assert m.per_class["Car"]["ap50"] == pytest.approx(0.5 * 51 / 101, abs=1e-6)
    assert m.per_class["Person"]["ap50"] == 0.0  # its only prediction is in the wrong place
    assert m.per_class["Sign"]["ap50"] is None  # no ground truth: left out of the mean
    assert m.map50 == pytest.approx((0.5 * 51 / 101 + 0.0) / 2, abs=1e-6)


def test_gate_figures_at_iou_thresholds_and_with_duplicates():
    shifted = det([[1, 1, 10, 10]], ["Car"], [0.9])  # IoU 0.81 with the true box
    m = detection_metrics([(shifted, det([[0, 0, 10, 10]], ["Car"], [1]))], CLASSES)
    assert m.map50 == 1.0 and m.map50_95 == pytest.approx(0.7)  # TP at 0.50 ... 0.80: 7 of 10 thresholds
    dup = det([[0, 0, 10, 10], [0, 0, 10, 10]], ["Car", "Car"], [0.9, 0.8])
    m = detection_metrics([(dup, det([[0, 0, 10, 10]], ["Car"], [1]))], CLASSES)
    assert m.tp50 == 1 and m.precision == 0.5 and m.map50 == 1.0  # the duplicate ranks below the match


def test_score_threshold_only_affects_precision_recall():
    m = detection_metrics([(det(GT.xyxy, GT.labels, [0.9, 0.2, 0.1]), GT)], CLASSES, score_threshold=0.5)
    assert m.map50 == 1.0 and m.recall == pytest.approx(1 / 3) and m.precision == 1.0


def test_gate_figures_of_empty_cases():
    empty = det([], [], [])
    assert detection_metrics([(empty, empty)], CLASSES).map50 == 0.0
    m = detection_metrics([(empty, GT)], CLASSES)
    assert (m.precision, m.recall, m.map50) == (0.0, 0.0, 0.0)
    m = detection_metrics([(det([[0, 0, 5, 5]], ["Car"]), empty)], CLASSES)
    assert m.precision == 0.0 and m.n_gt == 0


def test_crowded_images_count_every_box_the_detector_serves():
    """COCOeval's default keeps 100 boxes per image and class; the evaluation keeps the detector's MAX_DET."""
    n = 150
    boxes = [[(i % 15) * 20, (i // 15) * 20, (i % 15) * 20 + 15, (i // 15) * 20 + 15] for i in range(n)]
    truth = det(boxes, ["Car"] * n, np.ones(n), (300, 200))
    pred = det(boxes, ["Car"] * n, np.linspace(0.99, 0.5, n), (300, 200))
    assert MAX_DET >= n
    m = detection_metrics([(pred, truth)], CLASSES)
    assert m.map50 == 1.0 and m.recall == 1.0 and m.tp50 == n
    assert detection_metrics([(pred, truth)], CLASSES, max_det=100).map50 < 0.7  # what COCO's default would report
    assert evaluate([(pred, truth)], CLASSES)["coco"]["max_det"] == MAX_DET


def test_iou_histogram_and_size_buckets():
    gt = det([[0, 0, 10, 10], [0, 0, 50, 50], [0, 0, 100, 100], [60, 60, 70, 70]], ["Car", "Car", "Person", "Sign"], [1, 1, 1, 1],
             (200, 200))
    pred = det([[0, 0, 10, 10], [0, 0, 50, 25], [0, 0, 100, 100]], ["Car", "Car", "Car"], [0.9, 0.8, 0.7], (200, 200))
    best, idx = best_ious(pred, gt)
    assert best.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])  # other labels never count
    assert idx.tolist() == [0, 1, -1, -1]
    m = evaluate([(pred, gt)], CLASSES)
    assert m["sizes"]["small"]["n_gt"] == 2 and m["sizes"]["medium"]["n_gt"] == 1 and m["sizes"]["large"]["n_gt"] == 1
    assert m["sizes"]["small"]["recall50"] == 0.5 and m["sizes"]["large"]["recall50"] == 0.0
    assert m["iou"]["counts"][0] == 2 and m["iou"]["counts"][10] == 1 and m["iou"]["counts"][-1] == 1
    assert m["per_class"]["Person"]["ap50"] == 0.0 and m["per_class"]["Car"]["ap50"] == 1.0


def test_mask_metrics():
    perfect = evaluate(synthetic_pairs(masks=True), CLASSES)
    mk = perfect["masks"]
    assert mk["segm_map50_95"] == 1.0 and mk["instance_miou"] == 1.0 and mk["instance_dice"] == 1.0
    assert mk["semantic_miou"] == 1.0 and mk["semantic_dice"] == 1.0 and mk["n_matched"] == perfect["n_gt"]
    shifted = evaluate(synthetic_pairs(masks=True, shift=2.0), CLASSES)["masks"]
    assert shifted["instance_miou"] < 1 and shifted["instance_dice"] < 1 and shifted["segm_map50_95"] < 1
    assert shifted["instance_dice"] > shifted["instance_miou"]  # Dice >= IoU for any overlap


def test_empty_cases():
    empty = det([], [], [], (50, 50))
    truth = det([[0, 0, 10, 10]], ["Car"], [1], (50, 50))
    m = evaluate([(empty, truth)], CLASSES)
    assert m["coco"]["map50_95"] == 0.0 and m["coco"]["note"] == "no predictions" and m["iou"]["mean"] == 0.0
    m = evaluate([(truth, empty)], CLASSES)
    assert m["coco"]["note"] == "no ground-truth objects" and m["gate"]["precision"] == 0.0
    assert coco_eval([], CLASSES)["map50"] == 0.0


def test_report_files(tmp_path):
    m = evaluate(synthetic_pairs(masks=True, shift=1.0), CLASSES, latencies=[0.1, 0.2, 0.3], wall_seconds=1.0)
    report = write_report(m, tmp_path / "rep", title="Synthetic", about={"source": "test"})
    text = report.read_text()
    assert text.startswith("# Synthetic") and "mAP50-95 (pycocotools)" in text and "## Masks" in text and "## Speed" in text
    for name in ("iou_histogram", "pr_curve", "per_class_ap", "sizes", "latency"):
        png = tmp_path / "rep" / "plots" / f"{name}.png"
        assert f"plots/{name}.png" in text
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width >= 400
    saved = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert saved["about"] == {"source": "test"} and saved["coco"]["map50_95"] == m["coco"]["map50_95"]


# --- truth readers --------------------------------------------------------------------------------

def test_load_coco_boxes_polygons_and_rle(tmp_path):
    mask = np.zeros((40, 60), dtype=bool)
    mask[10:20, 5:25] = True
    coco = {
        "images": [{"id": 7, "file_name": "a.png", "width": 60, "height": 40},
                   {"id": 8, "file_name": "b.png", "width": 60, "height": 40}],
        "categories": [{"id": 3, "name": "Person"}, {"id": 1, "name": "Car"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 1, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},
            {"id": 2, "image_id": 7, "category_id": 3, "bbox": [5, 10, 20, 10], "area": 200, "iscrowd": 0,
             "segmentation": geometry.mask_to_rle(mask)},
            {"id": 3, "image_id": 8, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": [[0, 0, 5, 0, 5, 5]]},
        ],
    }
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    truth = load_truth(tmp_path / "coco.json")
    assert truth.kind == "coco" and truth.classes == ["Car", "Person"] and len(truth.images) == 2
    a, b = truth.images
    assert a.path == tmp_path / "a.png" and b.path is None
    assert a.truth.labels == ["Car", "Person"] and np.allclose(a.truth.xyxy[0], [5, 10, 25, 20])
    assert np.array_equal(a.truth.masks[1], mask) and truth.has_masks
    assert len(b.truth) == 0  # crowd regions are not objects to find


def test_load_yolo_boxes_and_polygons(tmp_path):
    root = tmp_path / "ds"
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "images" / "val" / "x.jpg")
    Image.new("RGB", (200, 100)).save(root / "images" / "val" / "y.jpg")
    (root / "labels" / "val" / "x.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.05 0.1\n")
    (root / "data.yaml").write_text("path: .\nval: images/val\nnames:\n  0: Car\n  1: Person\n")
    truth = load_truth(root)
    assert truth.kind == "yolo" and truth.classes == ["Car", "Person"]
    assert [i.name for i in truth.images] == ["images/val/x.jpg", "images/val/y.jpg"]
    x = truth.images[0].truth
    assert x.labels == ["Person", "Car"] and np.allclose(x.xyxy[0], [80, 30, 120, 70]) and x.image_size == (200, 100)
    assert len(truth.images[1].truth) == 0
    (root / "labels" / "val" / "x.txt").write_text("0 0.1 0.1 0.5 0.1 0.5 0.5 0.1 0.5\n")
    seg = load_truth(root / "data.yaml").images[0].truth
    assert np.allclose(seg.xyxy[0], [20, 10, 100, 50]) and seg.masks is not None and seg.masks[0].sum() > 3000
    with pytest.raises(TruthError):
        load_truth(root, split="test")


def test_label_studio_truth_refuses_a_brush_rle_bomb(tmp_path):
    """An export region whose RLE declares 4 G values is skipped before the SDK allocates them."""
    bomb = {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": 640, "original_height": 480,
            "value": {"format": "rle", "rle": crafted_brush_rle(2**32 - 1), "brushlabels": ["Car"]}}
    box = ls_result([Box("Person", (10, 20, 110, 220))], 640, 480, from_name="box")[0]
    tasks = [{"id": 1, "data": {"image": "https://example.com/a.png"},
              "annotations": [{"id": 11, "result": [bomb, box], "was_cancelled": False}]}]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    xml = label_config(CLASSES, tag="BrushLabels")
    rect = label_config(CLASSES)
    xml = xml.replace("</View>", rect[rect.index("<RectangleLabels"):].replace('name="label"', 'name="box"'))
    tracemalloc.start()
    try:
        truth = load_truth(tmp_path / "export.json", label_config=xml)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert truth.images[0].truth.labels == ["Person"]
    assert peak < 64 * 1024 * 1024, f"{peak} bytes traced"


def test_load_label_studio_export(tmp_path):
    images = make_images(2, seed=5)
    docroot = tmp_path / "files"
    (docroot / "site").mkdir(parents=True)
    images[0].image.save(docroot / "site" / "a.png")
    w, h = images[0].width, images[0].height
    mask = np.zeros((h, w), dtype=bool)
    mask[10:30, 20:50] = True
    brush = {"from_name": "label", "to_name": "image", "type": "brushlabels", "original_width": w, "original_height": h,
             "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": ["Car"]}}
    tasks = [
        {"id": 1, "data": {"image": "/data/local-files/?d=site/a.png"},
         "annotations": [{"id": 11, "result": ls_result(images[0].boxes, w, h), "was_cancelled": False,
                          "updated_at": "2026-01-01"}]},
        {"id": 2, "data": {"image": "https://example.com/b.png"},
         "annotations": [{"id": 12, "result": [], "was_cancelled": True}]},
        {"id": 3, "data": {"image": "https://example.com/c.png"},
         "annotations": [{"id": 13, "result": [brush], "was_cancelled": False, "updated_at": "2026-01-01"}]},
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    xml = label_config(CLASSES, tag="BrushLabels")
    rect_xml = label_config(CLASSES)
    truth = load_truth(tmp_path / "export.json", document_root=docroot, label_config=None)
    assert truth.kind == "label-studio" and len(truth.images) == 2  # the skipped task is not truth
    first = truth.images[0]
    assert first.path == docroot / "site" / "a.png" and first.name == "site/a.png"
    assert first.truth.labels == [b.label for b in images[0].boxes]
    assert np.allclose(first.truth.xyxy, [b.xyxy for b in images[0].boxes], atol=1e-6)
    assert truth.images[1].url == "https://example.com/c.png" and truth.images[1].path is None
    both = load_truth(tmp_path / "export.json", label_config=xml.replace("</View>", rect_xml[rect_xml.index("<RectangleLabels"):]
                                                                     .replace('name="label"', 'name="box"')))
    brushed = both.images[1].truth
    assert np.array_equal(brushed.masks[0], mask) and np.allclose(brushed.xyxy[0], [20, 10, 50, 30])
