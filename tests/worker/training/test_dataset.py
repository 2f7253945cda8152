"""backend.core.label_studio (through label-studio-sdk against the fake LS) and worker.training.dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.core import label_studio
from backend.core.geometry import xyxy_to_ls, xyxy_to_yolo
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import (
    LabelStudioAuthError,
    LabelStudioNotConfigured,
    LabelStudioNotFound,
    LabelStudioUnavailable,
    fetch_project,
)
from tests.synthetic import crafted_brush_rle, label_config, ls_region, ls_result, make_images
from tests.worker_fixtures import CLASSES, make_settings, populate
from worker.training.dataset import NotEnoughData, build_dataset, dataset_hash, load_dataset, split_tasks

CONFIG = ProjectConfig.parse(label_config(CLASSES))


# --- annotations ---------------------------------------------------------------------------------

def test_fetch_with_pat_paginates_and_picks_latest_annotation(fake_ls, tmp_path, monkeypatch):
    monkeypatch.setattr(label_studio, "PAGE_SIZE", 3)
    pid, images, ids = populate(fake_ls, n=7)
    im = images[0]
    # an older annotation and a skip on the same task: the latest non-cancelled one wins
    fake_ls.add_annotation(ids[0], [], was_cancelled=True)
    fake_ls.tasks[ids[0]]["annotations"][0]["updated_at"] = "2000-01-01T00:00:00Z"
    newest = fake_ls.add_annotation(ids[0], ls_result(im.boxes[:1], im.width, im.height), updated_at="2099-01-01T00:00:00Z")
    skipped = fake_ls.add_task(pid, im.encode(), result=[], was_cancelled=True)
    fake_ls.add_task(pid, im.encode())  # never annotated
    fake_ls.add_prediction(ids[1], [ls_region(images[1].boxes[0], 128, 96, source="gemini")],
                           model_version="gemini-2.5-flash", score=0.8)
    settings = make_settings(tmp_path, fake_ls)
    snap = fetch_project(pid, settings)
    assert [t.id for t in snap.tasks] == ids
    assert skipped not in [t.id for t in snap.tasks] and snap.cancelled_only == 1
    assert snap.tasks[0].annotation_id == newest and len(snap.tasks[0].result) == 1
    assert snap.label_config == label_config(CLASSES)
    pred = snap.tasks[1].predictions[0]
    assert (pred.model_version, pred.source, pred.score) == ("gemini-2.5-flash", "gemini", 0.8)
    assert pred.region_source(pred.result[0]) == "gemini"
    pages = [r["args"].get("page") for r in fake_ls.api_calls("/api/tasks/")]
    assert pages == ["1", "2", "3", "4"]  # the 4th answers 404: the SDK's pager ends there
    assert all(r["args"].get("fields") == "all" for r in fake_ls.api_calls("/api/tasks/"))
    assert fake_ls.refresh_count == 1  # PAT exchanged once, then Bearer access tokens
    assert all(r["authorization"].startswith("Bearer ") for r in fake_ls.api_calls("/api/projects/"))


def test_fetch_with_legacy_token(fake_ls, tmp_path):
    pid, _, ids = populate(fake_ls, n=2)
    snap = fetch_project(pid, make_settings(tmp_path, fake_ls, api_key=fake_ls.legacy_token))
    assert [t.id for t in snap.tasks] == ids and fake_ls.refresh_count == 0
    assert fake_ls.api_calls("/api/tasks/")[0]["authorization"] == f"Token {fake_ls.legacy_token}"


def test_label_studio_errors_are_typed(fake_ls, tmp_path):
    pid, _, _ = populate(fake_ls, n=2)
    with pytest.raises(LabelStudioNotFound):
        fetch_project(pid + 1000, make_settings(tmp_path, fake_ls))
    with pytest.raises(LabelStudioAuthError, match="LABEL_STUDIO_API_KEY"):
        fetch_project(pid, make_settings(tmp_path, fake_ls, api_key="wrong-legacy-token"))
    with pytest.raises(LabelStudioNotConfigured):
        fetch_project(pid, make_settings(tmp_path, None))
    fake_ls.fail_with(503)
    with pytest.raises(LabelStudioUnavailable, match="503"):
        fetch_project(pid, make_settings(tmp_path, fake_ls))
    fake_ls.fail_with(None)
    settings = make_settings(tmp_path, fake_ls)
    fake_ls.stop()
    with pytest.raises(LabelStudioUnavailable, match="unreachable") as err:
        fetch_project(pid, settings)
    assert err.value.retryable


# --- split ---------------------------------------------------------------------------------------

def test_split_is_deterministic_and_bounded():
    ids = list(range(1, 101))
    train, val = split_tasks("5", ids, 0.2, 4)
    assert (train, val) == split_tasks("5", list(reversed(ids)), 0.2, 4)
    assert len(val) >= 20 and set(train) | set(val) == set(ids) and not set(train) & set(val)
    # growing the project keeps old val tasks in val
    _, val_more = split_tasks("5", ids + list(range(101, 201)), 0.2, 4)
    assert set(val) <= set(val_more)
    for n in (2, 3, 5, 9):
        tr, va = split_tasks("5", list(range(n)), 0.2, 4)
        assert tr and len(va) == min(4, n - 1)
    with pytest.raises(NotEnoughData):
        split_tasks("5", [1], 0.2, 4)


# --- building ------------------------------------------------------------------------------------

def test_build_dataset_end_to_end(fake_ls, tmp_path):
    pid, images, ids = populate(fake_ls, n=12)
    neg = make_images(1, seed=99, classes=CLASSES, max_objects=0)[0]  # no objects
    neg_id = fake_ls.add_task(pid, neg.encode(), result=[])
    missing_id = fake_ls.add_task(pid, "/data/upload/999/missing.png", result=ls_result(images[0].boxes, 128, 96))
    garbage_id = fake_ls.add_task(pid, b"this is not an image", result=ls_result(images[0].boxes, 128, 96))
    rotated_id = fake_ls.add_task(pid, images[1].encode(), result=[
        {**ls_region(images[1].boxes[0], 128, 96), "value": {**xyxy_to_ls(images[1].boxes[0].xyxy, 128, 96), "rotation": 30,
                                                             "rectanglelabels": [images[1].boxes[0].label]}}])
    settings = make_settings(tmp_path, fake_ls)
    snap = fetch_project(pid, settings)
    ds = build_dataset(str(pid), snap.tasks, CONFIG, settings)  # the real backend.core.images.ImageLoader

    c = ds.counts
    assert c["tasks"] == 16 and c["images"] == 14
    assert c["skipped_tasks"] == {"not_found": 1, "decode_error": 1}, c["skipped_tasks"]
    assert any(f"task {missing_id}: not_found" in e for e in c["errors"])
    assert c["negatives"] == 1 and c["converted_regions"] == {"rotated": 1}
    assert c["train"] + c["val"] == 14 and c["val"] >= 4 and c["train"] >= 1
    assert set(ds.val_ids) | set(ds.train_ids) == set(ids) | {neg_id, rotated_id}
    assert missing_id not in ds.val_ids + ds.train_ids and garbage_id not in ds.val_ids + ds.train_ids

    text = ds.data_yaml.read_text()
    data = json.loads(text)  # JSON is YAML
    assert data["path"] == str(ds.root) and ds.root.is_absolute() and "download" not in data
    assert data["names"] == list(CLASSES)
    neg_split = "val" if neg_id in ds.val_ids else "train"
    assert (ds.root / "labels" / neg_split / f"{neg_id}.txt").read_text() == ""

    # label files match the known boxes
    item = next(i for i in ds.items if i.task_id == ids[0])
    im = images[0]
    lines = (ds.root / "labels" / item.split / f"{ids[0]}.txt").read_text().split("\n")
    got = sorted(tuple(float(v) for v in line.split()) for line in lines if line)
    want = sorted((float(CLASSES.index(b.label)), *xyxy_to_yolo(b.xyxy, im.width, im.height)) for b in im.boxes)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert item.image_path.is_file() and item.image_path.is_relative_to(ds.root)

    # reopening from the manifest gives the same ground truth
    again = load_dataset(ds.root)
    assert again.val_ids == ds.val_ids and again.dataset_hash == ds.dataset_hash
    np.testing.assert_allclose(again.items[0].boxes, ds.items[0].boxes, atol=1e-2)

    # the hash moves only when labels or classes change
    assert dataset_hash(snap.tasks, CLASSES) == ds.dataset_hash
    fake_ls.update_annotation(ids[2], fake_ls.tasks[ids[2]]["annotations"][-1]["id"], [])
    snap2 = fetch_project(pid, settings)
    assert dataset_hash(snap2.tasks, CLASSES) != ds.dataset_hash
    assert dataset_hash(snap.tasks, list(reversed(CLASSES))) != ds.dataset_hash


def test_build_dataset_needs_two_usable_tasks(fake_ls, tmp_path):
    pid, _, _ = populate(fake_ls, n=1)
    settings = make_settings(tmp_path, fake_ls)
    with pytest.raises(NotEnoughData):
        build_dataset(str(pid), fetch_project(pid, settings).tasks, CONFIG, settings)
    assert not [p for p in (tmp_path / "data" / "datasets" / str(pid)).iterdir() if p.name.startswith(".staging")]


def test_a_brush_rle_bomb_fails_its_region_not_the_dataset(fake_ls, tmp_path):
    """A mask whose RLE header declares 4 G values is skipped and counted; its task keeps its boxes."""
    pid, images, ids = populate(fake_ls, n=4)
    config = ProjectConfig.parse(label_config(CLASSES).replace(
        "</View>", f'<BrushLabels name="brush" toName="image"><Label value="{CLASSES[0]}"/></BrushLabels></View>'))
    im = images[0]
    bomb = {"id": "bomb", "from_name": "brush", "to_name": "image", "type": "brushlabels", "original_width": im.width,
            "original_height": im.height, "value": {"format": "rle", "rle": crafted_brush_rle(2**32 - 1),
                                                    "brushlabels": [CLASSES[0]]}}
    bombed = fake_ls.add_task(pid, im.encode(), result=[*ls_result(im.boxes, im.width, im.height), bomb])
    settings = make_settings(tmp_path, fake_ls)
    ds = build_dataset(str(pid), fetch_project(pid, settings).tasks, config, settings)
    assert ds.counts["images"] == 5 and ds.counts["skipped_regions"] == {"bad_region": 1}
    item = next(i for i in ds.items if i.task_id == bombed)
    assert item.labels == [b.label for b in im.boxes]


def test_large_images_are_downscaled_with_labels_intact(fake_ls, tmp_path):
    pid, images, ids = populate(fake_ls, n=3, size=(1000, 500))
    settings = make_settings(tmp_path, fake_ls)
    ds = build_dataset(str(pid), fetch_project(pid, settings).tasks, CONFIG, settings, max_image_side=200)
    item = ds.items[0]
    assert (item.width, item.height) == (200, 100) and (item.orig_width, item.orig_height) == (1000, 500)
    from PIL import Image

    assert Image.open(item.image_path).size == (200, 100)
    gt = item.ground_truth(saved=True)
    src = images[ids.index(item.task_id)]
    np.testing.assert_allclose(gt.xyxy, np.array([b.xyxy for b in src.boxes]) / 5.0, atol=1e-6)
