"""Training on drafts (worker.training.drafts): unannotated tasks' stored predictions as pseudo-labels.

Through the fake Label Studio and the real image loader: which tasks are listed, which prediction and
regions are kept, the share cap, and that drafts never reach the held-out split.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from backend.core.geometry import xyxy_to_yolo
from backend.core.label_config import ProjectConfig
from backend.core.label_studio import DraftedTask, StoredPrediction, fetch_drafted_tasks, fetch_project
from tests.synthetic import Box, draft_result, label_config, make_images
from tests.worker_fixtures import CLASSES, make_settings, populate
from worker.jobs.training import _draft_selection
from worker.training.dataset import build_dataset, load_dataset, task_fraction
from worker.training.drafts import draft_cap, latest_prediction, select_drafts

CONFIG = ProjectConfig.parse(label_config(CLASSES))
VERSION = "gemini:gemini-2.5-flash"


def _draft(im, score: float = 0.9, version: str = VERSION, region_score: float | None = None) -> dict:
    """A stored prediction of ``im``'s true boxes (what the Gemini drafter would store)."""
    regions = draft_result([(b, region_score if region_score is not None else score) for b in im.boxes], im.width,
                           im.height, source="gemini")
    return {"result": regions, "model_version": version, "score": score}


def _add_drafted(fake_ls, pid: int, n: int, seed: int = 100, **draft) -> tuple[list, list[int]]:
    images = make_images(n, seed=seed, classes=CLASSES, max_objects=2)
    return images, [fake_ls.add_task(pid, im.encode(), predictions=[_draft(im, **draft)]) for im in images]


def _build(fake_ls, tmp_path, pid: int, **overrides):
    settings = make_settings(tmp_path, fake_ls, **overrides)
    snapshot = fetch_project(pid, settings)
    selection = select_drafts(fetch_drafted_tasks(pid, settings), VERSION, settings.train_draft_min_score)
    return build_dataset(str(pid), snapshot.tasks, CONFIG, settings, drafts=selection), selection


def test_only_unannotated_tasks_with_drafts_are_listed_and_predict_is_never_triggered(fake_ls, tmp_path):
    pid, images, human_ids = populate(fake_ls, n=3, predictions=lambda i, im: [_draft(im)])
    _, drafted_ids = _add_drafted(fake_ls, pid, 2)
    fake_ls.add_task(pid, images[0].encode())  # no annotation, no draft
    skipped = fake_ls.add_task(pid, images[1].encode(), result=[], was_cancelled=True, predictions=[_draft(images[1])])
    listed = fetch_drafted_tasks(pid, make_settings(tmp_path, fake_ls))
    assert [t.id for t in listed] == drafted_ids and skipped not in [t.id for t in listed]
    assert all(t.predictions and t.predictions[0].model_version == VERSION for t in listed)
    # only the task list (filtered to tasks holding a prediction), never GET /api/tasks/<id>
    assert not [r for r in fake_ls.requests_log if re.fullmatch(r"/api/tasks/\d+/?", r["path"])]
    queries = [r["args"].get("query", "") for r in fake_ls.api_calls("/api/tasks/")]
    assert any("total_predictions" in q for q in queries)


def test_drafts_train_unannotated_tasks_and_never_enter_val(fake_ls, tmp_path):
    pid, _, human_ids = populate(fake_ls, n=12)
    images, drafted_ids = _add_drafted(fake_ls, pid, 5)
    ds, selection = _build(fake_ls, tmp_path, pid)
    c = ds.counts
    assert (c["human_tasks"], c["draft_tasks"], c["tasks"]) == (12, 5, 12)
    assert c["drafts"]["listed"] == 5 and c["drafts"]["used"] == 5 and c["drafts"]["cap"] == 12 - c["val"]
    drafts = [i for i in ds.items if i.source == "draft"]
    assert sorted(i.task_id for i in drafts) == drafted_ids and all(i.split == "train" for i in drafts)
    assert set(ds.val_ids) <= set(human_ids) and all(i.source == "human" for i in ds.val_items)
    assert c["train"] == 12 - c["val"] + 5 and c["drafts"]["share_of_train"] == round(5 / c["train"], 4)
    # a draft's label file holds its regions
    item = next(i for i in drafts if i.task_id == drafted_ids[0])
    im = images[0]
    lines = (ds.root / "labels" / "train" / f"{item.task_id}.txt").read_text().split("\n")
    got = sorted(tuple(float(v) for v in line.split()) for line in lines if line)
    want = sorted((float(CLASSES.index(b.label)), *xyxy_to_yolo(b.xyxy, im.width, im.height)) for b in im.boxes)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the manifest keeps the source; reopening keeps it
    assert {i.task_id: i.source for i in load_dataset(ds.root).items} == {i.task_id: i.source for i in ds.items}
    # the drafts are part of what the dataset is built from
    without = build_dataset(str(pid), fetch_project(pid, make_settings(tmp_path, fake_ls)).tasks, CONFIG,
                            make_settings(tmp_path, fake_ls))
    assert without.dataset_hash != ds.dataset_hash and without.counts["drafts"] == {"enabled": False}


def test_human_labels_win_over_drafts(fake_ls, tmp_path):
    """A task with an annotation never uses its drafts, even when a draft listing still holds it."""
    pid, images, human_ids = populate(fake_ls, n=8, predictions=lambda i, im: [_draft(im)])
    _add_drafted(fake_ls, pid, 2)
    settings = make_settings(tmp_path, fake_ls)
    snapshot = fetch_project(pid, settings)
    listed = fetch_drafted_tasks(pid, settings)
    assert not {t.id for t in listed} & set(human_ids)
    # annotated between the two listings: the draft listing still holds the task, the annotation wins
    raced = snapshot.tasks[0]
    wrong = StoredPrediction(99, VERSION, 0.9, draft_result([(Box("Person", (1, 1, 40, 40)), 0.9)], 128, 96), "2099")
    stale = DraftedTask(raced.id, raced.data, (wrong,))
    selection = select_drafts([*listed, stale], VERSION, 0.5)
    ds = build_dataset(str(pid), snapshot.tasks, CONFIG, settings, drafts=selection)
    item = next(i for i in ds.items if i.task_id == raced.id)
    assert item.source == "human" and item.labels == [b.label for b in images[0].boxes]
    assert ds.counts["draft_tasks"] == 2 and ds.counts["drafts"]["annotated"] == 1
    assert ds.counts["human_tasks"] == 8


def test_low_score_regions_are_dropped(fake_ls, tmp_path):
    pid, _, _ = populate(fake_ls, n=10)
    im = make_images(1, seed=7, classes=CLASSES, max_objects=1)[0]
    box = im.boxes[0]
    far = Box(box.label, (0.0, 0.0, 20.0, 20.0))
    mixed = draft_result([(box, 0.9), (far, 0.3)], im.width, im.height)
    mixed_id = fake_ls.add_task(pid, im.encode(), predictions=[{"result": mixed, "model_version": VERSION, "score": 0.6}])
    # regions without their own score take the prediction's: 0.2 drops them all, so the task is not used
    unscored = [{k: v for k, v in r.items() if k != "score"} for r in draft_result([(box, 0.0)], im.width, im.height)]
    low_id = fake_ls.add_task(pid, im.encode(), predictions=[{"result": unscored, "model_version": VERSION, "score": 0.2}])
    ok_id = fake_ls.add_task(pid, im.encode(), predictions=[{"result": unscored, "model_version": VERSION, "score": 0.8}])
    ds, selection = _build(fake_ls, tmp_path, pid)
    items = {i.task_id: i for i in ds.items}
    assert items[mixed_id].labels == [box.label] and np.allclose(items[mixed_id].boxes, [box.xyxy], atol=0.01)
    assert low_id not in items and ok_id in items and items[ok_id].source == "draft"
    assert selection.low_score_regions == 2 and selection.skipped == {"no_region_above_min_score": 1}
    assert ds.counts["drafts"]["low_score_regions"] == 2
    # a lower threshold keeps them
    ds_low, _ = _build(fake_ls, tmp_path, pid, train_draft_min_score=0.1)
    assert low_id in {i.task_id for i in ds_low.items} and len(next(i for i in ds_low.items if i.task_id == mixed_id).labels) == 2


def test_the_current_version_is_preferred_else_the_newest():
    old = StoredPrediction(1, VERSION, 0.9, [], "2026-01-01T00:00:00Z")
    newer = StoredPrediction(2, "gemini:gemini-2.5-flash+yolo:v0001", 0.9, [], "2026-02-01T00:00:00Z")
    assert latest_prediction([old, newer], VERSION) is old
    assert latest_prediction([old, newer], "yolo:v0009") is newer and latest_prediction([], VERSION) is None


@pytest.mark.parametrize("share, expected", [(0.5, 1.0), (0.25, 1 / 3), (0.0, 0.0)])
def test_the_share_cap_limits_drafts_in_training(fake_ls, tmp_path, share, expected):
    """At most ``share`` of the training images are drafts, first in split-hash order; a broken one gives its place."""
    pid, _, _ = populate(fake_ls, n=10)
    _, drafted_ids = _add_drafted(fake_ls, pid, 12)
    ranked = sorted(drafted_ids, key=lambda t: (task_fraction(str(pid), t), t))
    fake_ls.files[fake_ls.tasks[ranked[0]]["data"]["image"]] = b"not an image"  # the first in line fails to load
    ds, _ = _build(fake_ls, tmp_path, pid, train_draft_max_share=share)
    human_train = ds.counts["human_tasks"] - ds.counts["val"]
    cap = draft_cap(human_train, share)
    assert human_train == 6 and cap == int(expected * human_train + 1e-9)
    assert ds.counts["draft_tasks"] == cap == ds.counts["drafts"]["cap"]
    assert ds.counts["draft_tasks"] <= share * ds.counts["train"] + 1e-9
    assert sorted(i.task_id for i in ds.items if i.source == "draft") == sorted(ranked[1:cap + 1])
    assert ds.counts["drafts"]["skipped_tasks"] == ({"decode_error": 1} if cap else {})
    assert ds.counts["drafts"]["over_cap"] == (12 - cap - 1 if cap else 12)


def test_train_drafts_off_uses_none(fake_ls, tmp_path):
    """With TRAIN_DRAFTS=false the job reads no draft at all (worker.jobs.training._draft_selection)."""
    pid, _, _ = populate(fake_ls, n=4)
    _add_drafted(fake_ls, pid, 3)
    settings = make_settings(tmp_path, fake_ls, train_drafts=False)
    before = len(fake_ls.api_calls("/api/tasks/"))
    assert _draft_selection(settings, str(pid), None, None) is None
    assert len(fake_ls.api_calls("/api/tasks/")) == before
    on = _draft_selection(make_settings(tmp_path, fake_ls), str(pid), None, None)
    assert on is not None and len(on.drafts) == 3
