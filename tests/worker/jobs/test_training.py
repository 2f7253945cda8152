"""worker.jobs.training.run_training in-process: fake Label Studio, real Redis, real (tiny) training."""

from __future__ import annotations

import json

import pytest

from backend.core import keys
from backend.core.label_studio import LabelStudioUnavailable
from backend.core.registry import ModelRegistry
from tests.synthetic import draft_result, perturb
from tests.worker_fixtures import good_model, make_settings, populate
from worker.jobs.training import run_training, train_project


def _drafts(i, im):
    import numpy as np

    rng = np.random.default_rng(i)
    return [
        {"result": draft_result([(b, 0.9) for b in im.boxes], im.width, im.height), "model_version": "gemini-2.5-flash"},
        {"result": draft_result(perturb(im.boxes, rng, im.width, im.height, jitter=0.02, drop=0.5), im.width, im.height,
                                source="yolo"), "model_version": "lsb-yolo-v0001"},
    ]


@pytest.mark.slow
def test_first_training_promotes_then_skip_then_gate(fake_ls, tmp_path, redis15, project_id):
    pid, _, ids = populate(fake_ls, n=20, project=project_id, predictions=_drafts)
    settings = make_settings(tmp_path, fake_ls)
    redis15.set(keys.train_events(pid), 7)
    redis15.set(keys.train_force(pid), "1")

    result = run_training(pid, settings=settings, redis=redis15)  # label config read from Label Studio
    assert result["status"] == "promoted" and result["promoted"] and result["version"] == "v0001"
    assert result["force"] is True and result["events_consumed"] == 7  # coalesced force flag collected
    assert result["current_metrics"] is None and "map50_95" in result["candidate_metrics"]
    assert result["counts"]["images"] == 20 and result["counts"]["val"] >= 4
    assert set(result["durations"]) >= {"wait_lock", "fetch", "dataset", "train", "evaluate", "publish", "total"}
    registry = ModelRegistry(settings.model_dir, redis15)
    info = registry.current(pid)
    assert info.version == "v0001" and info.classes == ["Car", "Person"]
    assert info.meta["dataset_hash"] == result["dataset_hash"] and info.meta["parent"] is None
    dq = info.meta["draft_quality"]
    assert set(dq) == {"gemini", "yolo"} and dq["gemini"]["precision"] == 1.0 and dq["gemini"]["recall"] == 1.0
    assert dq["yolo"]["recall"] < 1.0 and dq["gemini"]["n"] == result["counts"]["val"]
    stored = json.loads(redis15.get(keys.quality(pid)))
    assert stored["sources"] == dq and stored["version"] == "v0001" and stored["model"]["version"] == "v0001"
    review = stored["evaluation"]  # worker.training.review, from the gate's own predictions
    n_val = result["counts"]["val"]
    assert review["version"] == "v0001" and review["tasks"] == n_val and review["compared_tasks"] == n_val
    assert set(review["side_by_side"]) == {"yolo", "gemini"} and review["side_by_side"]["gemini"]["map50"] == 1.0
    assert set(review["per_class"]) == {"Car", "Person"} and set(review["per_class"]["Car"]) == {"yolo", "gemini"}
    confusion = review["confusion"]
    assert confusion["rows"][-1] == "background" and confusion["columns"][-1] == "missed"
    assert sum(map(sum, confusion["matrix"][:-1])) == review["side_by_side"]["yolo"]["n_gt"]  # every true box counted once
    assert len(review["label_errors"]) <= 20 and all(c["link"].endswith(f"/projects/{pid}/data?task={c['task_id']}")
                                                     for c in review["label_errors"])
    assert json.loads(redis15.get(keys.train_last(pid)))["status"] == "promoted"
    assert redis15.get(keys.train_running(pid)) is None and redis15.get(keys.train_events(pid)) == b"0"
    assert not list((tmp_path / "data" / "candidates").glob("*.pt"))  # the registry holds the only copy

    # nothing changed: a non-forced run does not train
    skipped = run_training(pid, settings=settings, redis=redis15)
    assert skipped["status"] == "skipped" and "no annotation changed" in skipped["reason"] and skipped["version"] == "v0001"

    # a changed annotation trains again, and the gate keeps the current model (gain must exceed 1.0)
    task = fake_ls.tasks[ids[0]]
    fake_ls.update_annotation(ids[0], task["annotations"][-1]["id"], task["annotations"][-1]["result"][:1])
    strict = make_settings(tmp_path, fake_ls, promote_min_gain=1.0)
    rejected = run_training(pid, settings=strict, redis=redis15)
    assert rejected["status"] == "rejected" and not rejected["promoted"] and rejected["version"] == "v0001"
    assert rejected["current_metrics"] is not None and rejected["candidate_metrics"] is not None
    assert registry.current_version(pid) == "v0001" and [v.version for v in registry.versions(pid)] == ["v0001"]
    meta = registry.current(pid).meta
    assert meta["last_challenger"]["reason"] == rejected["reason"]
    assert rejected["rejected_checkpoint"] and (tmp_path / "data" / "candidates" / str(pid)).is_dir()
    assert json.loads(redis15.get(keys.train_last(pid)))["status"] == "rejected"


def test_fine_tunes_current_and_prunes(fake_ls, tmp_path, redis15, project_id, monkeypatch):
    """With a promoted model, training fine-tunes it; prune keeps KEEP_VERSIONS versions."""
    good = good_model()
    pid, _, _ = populate(fake_ls, n=12, project=project_id, seed=4)
    settings = make_settings(tmp_path, fake_ls, keep_versions=1, promote_min_gain=-1.0)  # always promote
    registry = ModelRegistry(settings.model_dir, redis15)
    registry.promote(pid, registry.add_version(pid, good["checkpoint"], {"classes": ["Car", "Person"]}).version)
    result = run_training(pid, force=True, settings=settings, redis=redis15, train_overrides={"epochs": 1})
    assert result["fine_tuned"] and result["status"] == "promoted" and result["version"] == "v0002"
    assert result["parent"] == "v0001" and result["pruned"] == ["v0001"]
    assert [v.version for v in registry.versions(pid)] == ["v0002"]
    assert registry.current(pid).meta["parent_metrics"]["map50_95"] == result["current_metrics"]["map50_95"]


def test_label_studio_down_and_not_enough_data(fake_ls, tmp_path, redis15, project_id):
    pid, _, _ = populate(fake_ls, n=1, project=project_id)
    settings = make_settings(tmp_path, fake_ls)
    skipped = run_training(pid, settings=settings, redis=redis15)
    assert skipped["status"] == "skipped" and "at least 2" in skipped["reason"]
    fake_ls.stop()
    with pytest.raises(LabelStudioUnavailable, match="unreachable"):
        run_training(pid, settings=settings, redis=redis15)
    assert redis15.get(keys.train_running(pid)) is None  # the lock is released on failure


def test_train_project_outside_rq_records_failure(fake_ls, tmp_path, redis15, project_id, monkeypatch):
    pid, _, _ = populate(fake_ls, n=2, project=project_id)
    settings = make_settings(tmp_path, fake_ls)
    monkeypatch.setattr("worker.jobs.training.get_settings", lambda: settings)
    monkeypatch.setattr("worker.jobs.training.connect_patient", lambda url, **kw: redis15)
    fake_ls.fail_with(502)
    with pytest.raises(LabelStudioUnavailable):
        train_project(str(pid))
    last = json.loads(redis15.get(keys.train_last(pid)))
    assert last["status"] == "failed" and "502" in last["error"]


def test_promotion_exports_verified_fast_formats_that_the_server_then_uses(fake_ls, tmp_path, redis15, project_id):
    from backend.serving.hotswap import ModelHolder

    pid, _, _ = populate(fake_ls, n=12, project=project_id)
    settings = make_settings(tmp_path, fake_ls, export_formats="onnx")
    result = run_training(pid, settings=settings, redis=redis15)
    assert result["status"] == "promoted"
    info = ModelRegistry(settings.model_dir, redis15).current(pid)
    assert info.meta["exports"] == {"onnx": "model.onnx"} and info.export("onnx").is_file()
    holder = ModelHolder(settings, ModelRegistry(settings.model_dir, redis15))
    try:
        served = holder.get(pid)
        assert served.version == "v0001" and served.format == "onnx"
    finally:
        holder.stop()


@pytest.mark.slow
def test_an_int8_export_failing_its_map_check_is_kept_out_with_the_reason_in_the_meta(fake_ls, tmp_path, redis15,
                                                                                       project_id):
    pid, _, _ = populate(fake_ls, n=12, project=project_id)
    settings = make_settings(tmp_path, fake_ls, export_formats="", export_int8=True, export_int8_max_drop=-1.0,
                             model_preload_timeout=5.0)
    result = run_training(pid, settings=settings, redis=redis15)
    assert result["status"] == "promoted" and result["preload"]["timed_out"] is False
    info = ModelRegistry(settings.model_dir, redis15).current(pid)
    check = info.meta["export_checks"]["openvino_int8"]
    assert info.meta["exports"] == {} and check["ok"] is False and check["map50_95"] is not None
    assert "below the .pt's" in check["reason"] and check["map50_95_pt"] == result["candidate_metrics"]["map50_95"]


@pytest.mark.slow
def test_first_training_says_when_it_started_from_random_init(fake_ls, tmp_path, redis15, project_id):
    """YOLO_BASE_MODEL's weights cannot be had (downloads off, nothing installed): the training still runs, from
    the yaml, and says so in its result, in /train/status and in lsb_base_model_fallback_total."""
    from prometheus_client import REGISTRY

    from backend.core.queue import training_status

    pid, _, _ = populate(fake_ls, n=12, project=project_id)
    settings = make_settings(tmp_path, fake_ls, yolo_base_model="yolov8n.pt", yolo_base_download_timeout=0)
    before = REGISTRY.get_sample_value("lsb_base_model_fallback_total", {"reason": "download_disabled"}) or 0.0
    result = run_training(pid, settings=settings, redis=redis15)
    assert result["status"] == "promoted" and not result["fine_tuned"]
    base = result["base_model"]
    assert (base["requested"], base["used"], base["pretrained"], base["reason"], base["fallback"]) == \
        ("yolov8n.pt", "yolov8n.yaml", False, "download_disabled", True)
    assert training_status(redis15, pid)["base_model"] == base
    assert ModelRegistry(settings.model_dir, redis15).current(pid).meta["train"]["base_model"] == base
    assert REGISTRY.get_sample_value("lsb_base_model_fallback_total", {"reason": "download_disabled"}) == before + 1
