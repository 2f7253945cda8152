"""The visible status of an import, on a real Redis; and end to end: a webhook import with
PRELABEL_ON_IMPORT=sample:10 / none, drafted by a real rq worker against the fake Label Studio and the
fake Gemini HTTP server."""

from __future__ import annotations

import pytest

from backend.core import import_status
from backend.core import prelabel_policy as pp
from backend.core.metrics import GEMINI_COST
from backend.web.webhook import handle_event
from tests import fake_gemini as fg
from tests.live import base_env, rq_worker, wait_for
from tests.synthetic import label_config, make_images
from tests.worker_fixtures import make_settings, settings_env


def tasks(*ids: int) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


def test_counts_follow_each_task_once_whatever_the_repeats(redis15, project_id):
    imported = tasks(*range(1, 9))
    decision = pp.decide(str(project_id), imported, None, "sample:3")
    for _ in range(2):  # a redelivery counts nothing twice
        import_status.record_import(redis15, project_id, imported, decision)
    status = import_status.read(redis15, project_id)
    assert (status["imported"], status["queued"], status["skipped_policy"], status["tasks"]) == (8, 3, 5, 8)
    assert status["last_import"]["policy"] == "sample:3" and status["last_import"]["drafted_now"] == "3"

    tally = import_status.JobTally(redis15, project_id)
    chosen = decision.chosen
    tally.batch(chosen[:2], chosen[2:])
    tally.batch(chosen[:2], chosen[2:])  # an RQ retry of the same batch
    status = import_status.read(redis15, project_id)
    assert (status["drafted"], status["failed"], status["queued"], status["skipped_policy"]) == (2, 1, 0, 5)

    # POST /prelabel or lsb push later: the skipped tasks are queued, then drafted; the count moves
    import_status.mark_queued(redis15, project_id, decision.skipped)
    assert import_status.read(redis15, project_id)["skipped_policy"] == 0
    tally.batch(decision.skipped + chosen[2:], [])
    tally.not_in_project(tasks(99), [])
    status = import_status.read(redis15, project_id)
    assert (status["drafted"], status["failed"], status["not_in_project"], status["imported"], status["tasks"]) == (
        8, 0, 1, 8, 9)


def test_the_job_is_charged_what_this_process_spent_on_gemini_since_its_last_batch(redis15, project_id):
    tally = import_status.JobTally(redis15, project_id)
    GEMINI_COST.labels(model="test-import-status").inc(0.25)
    assert tally.batch(tasks(1), []) == pytest.approx(0.25)
    assert tally.batch(tasks(2), []) == 0.0  # nothing spent since
    GEMINI_COST.labels(model="test-import-status").inc(0.5)
    tally.batch(tasks(3), [])
    assert import_status.read(redis15, project_id)["spent_usd"] == pytest.approx(0.75)


def test_batched_tasks_and_their_reservation_until_the_batch_settles(redis15, project_id):
    imported = tasks(*range(1, 6))
    import_status.record_import(redis15, project_id, imported, pp.decide(str(project_id), imported, None, "all"))
    import_status.batch_submitted(redis15, project_id, imported[:4], 0.004)  # one batch of 4; task 5 drafted at once
    import_status.JobTally(redis15, project_id).batch(imported[4:], [])
    status = import_status.read(redis15, project_id)
    assert (status["queued"], status["batched"], status["drafted"], status["tasks"]) == (0, 4, 1, 5)
    assert status["reserved_usd"] == pytest.approx(0.004)

    assert import_status.mark(redis15, project_id, [1, 2, "3"], "drafted") == 3  # stored as the results come
    assert import_status.mark(redis15, project_id, [1], "drafted") == 0  # a resumed poll counts nothing twice
    import_status.mark(redis15, project_id, [4], "failed")
    import_status.batch_settled(redis15, project_id, 0.004, 0.0015)
    status = import_status.read(redis15, project_id)
    assert (status["batched"], status["drafted"], status["failed"], status["tasks"]) == (0, 4, 1, 5)
    assert status["reserved_usd"] == pytest.approx(0.0) and status["spent_usd"] == pytest.approx(0.0015)


def test_an_unknown_project_reads_as_zeros(redis15, project_id):
    status = import_status.read(redis15, str(project_id))
    assert status == {"project": str(project_id), "imported": 0, "skipped_policy": 0, "queued": 0, "batched": 0, "drafted": 0,
                      "failed": 0, "not_in_project": 0, "tasks": 0, "spent_usd": 0.0, "reserved_usd": 0.0, "updated_at": None,
                      "last_import": None}


# --- end to end ------------------------------------------------------------------------------------

CLASSES = ("Car", "Person")
OUTPUT_TOKENS = 100  # every fake answer costs 300 input + 100 output tokens


def _answer(request: fg.FakeRequest) -> fg.Answer:
    return fg.boxes([{"box_2d": [100, 100, 600, 600], "label": "Car"}], prompt_tokens=300, output_tokens=OUTPUT_TOKENS)


def test_an_import_of_50_with_sample_10_drafts_exactly_10_and_says_so(tmp_path, redis15, project_id, qprefix, fake_ls):
    """50 tasks imported under sample:10 (deployment), then 6 under a project's `none`: a real worker drafts 10."""
    settings = make_settings(tmp_path, fake_ls, prelabel_on_import="sample:10")
    images = make_images(56, seed=4, size=(48, 32), max_objects=1)
    lsid = fake_ls.add_project(label_config(CLASSES), project_id=project_id)
    ids = [fake_ls.add_task(lsid, im.encode()) for im in images]
    with fg.FakeGemini(responder=_answer) as gemini:
        env = base_env(**settings_env(settings), LSB_QUEUE_PREFIX=qprefix, GEMINI_API_KEY=fg.DEFAULT_KEY,
                       GEMINI_BASE_URL=gemini.base_url, GEMINI_CACHE_TTL="1", GEMINI_DAILY_BUDGET_USD="0",
                       GEMINI_BREAKER_FAILURES="1000", ROUTING="gemini")
        with rq_worker(env, [qprefix + "prelabel"], tmp_path / "worker.log"):
            project = {"id": project_id, "label_config": fake_ls.projects[lsid]["label_config"]}
            body = {"action": "TASKS_CREATED", "project": project,
                    "tasks": [{"id": tid, "data": fake_ls.tasks[tid]["data"]} for tid in ids[:50]]}
            answer = handle_event(body, redis15, settings).body
            assert answer["policy"] == {"policy": "sample:10", "source": "deployment", "skipped_by_policy": 40}
            assert answer["prelabel"]["tasks"] == 10

            # the project says none in its label config: nothing of its next import is queued, whatever the deployment
            quiet = label_config(CLASSES).replace("<View>", '<View prelabel_on_import="none">', 1)
            assert quiet != label_config(CLASSES)
            none = handle_event({"action": "TASKS_CREATED", "project": {"id": project_id, "label_config": quiet},
                                 "tasks": [{"id": tid, "data": fake_ls.tasks[tid]["data"]} for tid in ids[50:]]},
                                redis15, settings).body
            assert none["prelabel_job"] is None and none["policy"]["source"] == "project"

            wait_for(lambda: import_status.read(redis15, project_id)["drafted"] == 10, timeout=120, message="10 drafts counted",
                     on_timeout=lambda: (tmp_path / "worker.log").read_text()[-3000:])
    drafted = [tid for tid in ids if fake_ls.tasks[tid]["predictions"]]
    assert len(drafted) == 10 and all(len(fake_ls.tasks[tid]["predictions"]) == 1 for tid in drafted)
    assert set(drafted) == {t["id"] for t in pp.sample(str(project_id), body["tasks"], 10)}
    assert len(gemini.calls) == 10  # no money spent on the skipped tasks

    status = import_status.read(redis15, project_id)
    cost = (300 * settings.gemini_price_input_per_m + OUTPUT_TOKENS * settings.gemini_price_output_per_m) / 1e6
    assert (status["imported"], status["drafted"], status["skipped_policy"], status["queued"], status["failed"]) == (
        56, 10, 46, 0, 0)
    assert status["spent_usd"] == pytest.approx(10 * cost, rel=1e-6)
    assert status["last_import"] == {"at": pytest.approx(status["last_import"]["at"]), "tasks": "6", "policy": "none",
                                     "source": "project", "drafted_now": "0"}
