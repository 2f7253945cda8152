"""Re-score requests: one waiting job per project, the promotion hook obeys PREDICTION_SCORE and never raises."""

from __future__ import annotations

from rq import Queue

from backend.core import keys
from backend.core.queue import PRELABEL_QUEUE, queue_name
from backend.core.rank_queue import RANK_FUNC, rank_after_promotion, ranking_started, request_ranking
from backend.core.settings import Settings


def test_requests_coalesce_until_the_job_starts_then_queue_a_follow_up(redis15, project_id, qprefix):
    first = request_ranking(redis15, project_id, reason="promotion")
    assert first["status"] == "queued"
    assert request_ranking(redis15, project_id)["job_id"] == first["job_id"]
    queue = Queue(queue_name(PRELABEL_QUEUE), connection=redis15)
    (job,) = queue.get_jobs()
    assert (job.id, job.func_name, job.args) == (first["job_id"], RANK_FUNC, (str(project_id),))
    ranking_started(redis15, project_id, first["job_id"])
    assert redis15.get(keys.rank_pending(project_id)) is None
    job.delete()  # gone (finished and expired): a new request queues a new job
    follow_up = request_ranking(redis15, project_id)
    assert follow_up["status"] == "queued" and follow_up["job_id"] != first["job_id"]
    redis15.delete(keys.rank_pending(project_id))


def test_the_promotion_hook_follows_the_setting_and_swallows_errors(redis15, project_id, qprefix):
    assert rank_after_promotion(redis15, project_id, Settings(prediction_score="confidence")) is None
    assert redis15.get(keys.rank_pending(project_id)) is None
    assert rank_after_promotion(redis15, project_id, Settings(prediction_score="usefulness"))["status"] == "queued"
    redis15.delete(keys.rank_pending(project_id))
    assert rank_after_promotion(redis15, "not a project", Settings()) is None  # logged, the training still succeeds
