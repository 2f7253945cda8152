"""The visible state of a project's pre-labeling: imported, skipped by policy, queued, batched, drafted, failed, spent.

A large import is drafted over hours, partly on purpose (``PRELABEL_ON_IMPORT=sample:N``), so the
numbers a user needs are kept in Redis as the work happens, per project and cumulative:

- ``lsb:prelabel:<p>:tasks`` holds each task's state (one of :data:`STATES`). Moving a task to the
  state it already has changes nothing, so a redelivered webhook, an RQ retry or a second ``lsb push``
  never counts a task twice, and the counts always add up to the number of tasks known.
- ``lsb:prelabel:<p>:status`` holds the count per state, ``imported`` (tasks first seen in a
  ``TASKS_CREATED``), ``spent_usd`` (Gemini spend of the pre-labeling jobs and settled batches),
  ``reserved_usd`` (charged against the budget for Gemini batches still running) and the last import's policy.

A task handed to a Gemini batch (``GEMINI_BULK_TIER=batch``) is ``batched`` until the batch's poll stores
its draft (``drafted``) or gives up on it (``failed``); the batch's estimate is ``reserved_usd`` from its
submission until its results settle it, when the billed amount moves to ``spent_usd``
(:func:`batch_submitted`, :func:`batch_settled`, written by :mod:`worker.jobs.batch_drafting`).

Writers: the webhook (:func:`record_import`), :mod:`backend.core.prelabel_queue` (:func:`mark_queued`),
the pre-labeling job (:class:`JobTally`) and the batch polls (:func:`mark`, :func:`batch_settled`).
Readers: ``GET /prelabel/status`` and the status page,
through :func:`read`. Each change is also counted in Prometheus (``lsb_prelabel_tasks_total{state}``,
``lsb_prelabel_cost_usd_total``).

A task stays ``queued`` while a job holds it; a job that failed for good (after its RQ retries) leaves
its tasks ``queued``, and ``POST /prelabel`` drafts them. Tasks skipped by the policy stay
``skipped_policy`` when Label Studio drafts them through ``/predict`` as an annotator opens them (that
route does not know which tasks were imported); a later pre-labeling run moves them on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import redis as redis_lib

from backend.core import keys
from backend.core.metrics import GEMINI_COST, PRELABEL_COST, PRELABEL_TASKS
from backend.core.prelabel_policy import Decision
from backend.core.queue import text

log = logging.getLogger(__name__)

STATES = ("skipped_policy", "queued", "batched", "drafted", "failed", "not_in_project")
CHUNK = 5_000  # task ids per script call: a 50,000-task import never blocks Redis for long

#: Move tasks (ARGV[3..]) to state ARGV[1]; ARGV[2] = "1": only tasks not seen before, counted as imported.
#: Returns how many tasks changed state.
_MOVE = """
local changed = 0
for i = 3, #ARGV do
  local old = redis.call('HGET', KEYS[1], ARGV[i])
  if (not old and ARGV[2] == '1') or (old ~= ARGV[1] and ARGV[2] ~= '1') then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    if old then redis.call('HINCRBY', KEYS[2], old, -1) end
    if not old and ARGV[2] == '1' then redis.call('HINCRBY', KEYS[2], 'imported', 1) end
    redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
    changed = changed + 1
  end
end
return changed
"""


def _ids(tasks: Iterable[dict | int | str]) -> list[str]:
    """Canonical task ids (``"12"``) of task objects or ids; anything without a usable id is left out."""
    out = []
    for task in tasks:
        tid = task.get("id") if isinstance(task, dict) else task
        if not isinstance(tid, bool) and isinstance(tid, int | str) and str(tid).isdigit():
            out.append(str(int(tid)))
    return list(dict.fromkeys(out))


def _move(redis: redis_lib.Redis, project: str | int, tasks: Iterable[dict | int | str], state: str,
          only_new: bool = False) -> int:
    if state not in STATES:
        raise ValueError(f"unknown pre-labeling state {state!r}")
    ids = _ids(tasks)
    tkey, skey = keys.prelabel_tasks(project), keys.prelabel_status(project)
    changed = 0
    for start in range(0, len(ids), CHUNK):
        changed += int(redis.eval(_MOVE, 2, tkey, skey, state, "1" if only_new else "0", *ids[start:start + CHUNK]))
    if changed:
        redis.hset(skey, "updated_at", repr(time.time()))
        PRELABEL_TASKS.labels(state).inc(changed)
        if only_new:
            PRELABEL_TASKS.labels("imported").inc(changed)
    return changed


def record_import(redis: redis_lib.Redis, project: str | int, tasks: list[dict] | None, decision: Decision) -> None:
    """A ``TASKS_CREATED``: its new tasks count as imported, queued or skipped by the policy."""
    if tasks is not None:
        chosen = {id(task) for task in decision.chosen or []}
        _move(redis, project, [t for t in tasks if id(t) in chosen], "queued", only_new=True)
        _move(redis, project, decision.skipped, "skipped_policy", only_new=True)
    redis.hset(keys.prelabel_status(project), mapping={
        "last_import_at": repr(time.time()), "last_import_tasks": "all" if tasks is None else str(len(tasks)),
        "last_import_policy": str(decision.policy), "last_import_source": decision.source,
        "last_import_drafted_now": "all" if decision.chosen is None else str(len(decision.chosen)),
        "last_import_error": decision.error})


def mark_queued(redis: redis_lib.Redis, project: str | int, tasks: list[dict]) -> None:
    """Tasks a pre-labeling job was just queued for (any caller: webhook, /predict overflow, lsb push)."""
    _move(redis, project, tasks, "queued")


def mark(redis: redis_lib.Redis, project: str | int, tasks: Iterable[dict | int | str], state: str) -> int:
    """Move tasks (objects or ids) to ``state``; returns how many changed (a task already there does not count)."""
    return _move(redis, project, tasks, state)


def batch_submitted(redis: redis_lib.Redis, project: str | int, tasks: Iterable[dict | int | str], reserved_usd: float) -> None:
    """Tasks handed to a Gemini batch, and the USD reserved for it against the budget."""
    _move(redis, project, tasks, "batched")
    redis.hincrbyfloat(keys.prelabel_status(project), "reserved_usd", reserved_usd)


def batch_settled(redis: redis_lib.Redis, project: str | int, reserved_usd: float, spent_usd: float) -> None:
    """A batch's reservation is released and what its results were billed is spent (called once per batch)."""
    pipe = redis.pipeline()
    pipe.hincrbyfloat(keys.prelabel_status(project), "reserved_usd", -reserved_usd)
    pipe.hincrbyfloat(keys.prelabel_status(project), "spent_usd", spent_usd)
    pipe.hset(keys.prelabel_status(project), "updated_at", repr(time.time()))
    pipe.execute()
    if spent_usd > 0:
        PRELABEL_COST.inc(spent_usd)


def _number(raw: dict, name: str) -> float:
    try:
        return float(raw.get(name) or 0)
    except ValueError:
        return 0.0


def read(redis: redis_lib.Redis, project: str | int) -> dict:
    """The project's pre-labeling status, for ``GET /prelabel/status`` and the status page.

    ``{"project", "imported", "skipped_policy", "queued", "batched", "drafted", "failed", "not_in_project", "tasks",
    "spent_usd", "reserved_usd", "updated_at", "last_import"}``; ``tasks`` is every task with a state, ``last_import`` is
    None before the first ``TASKS_CREATED`` (else its time, task count, policy, where the policy came
    from, how many tasks it drafted at once, and the project policy's error if it did not parse).
    """
    project = keys.project_key(project)
    raw = {text(k): text(v) for k, v in redis.hgetall(keys.prelabel_status(project)).items()}
    counts = {state: max(int(_number(raw, state)), 0) for state in STATES}
    last = None
    if "last_import_at" in raw:
        last = {"at": _number(raw, "last_import_at"), "tasks": raw.get("last_import_tasks"),
                "policy": raw.get("last_import_policy"), "source": raw.get("last_import_source"),
                "drafted_now": raw.get("last_import_drafted_now")}
        if raw.get("last_import_error"):
            last["error"] = raw["last_import_error"]
    return {"project": project, "imported": int(_number(raw, "imported")), **counts, "tasks": sum(counts.values()),
            "spent_usd": round(_number(raw, "spent_usd"), 6),
            "reserved_usd": round(max(_number(raw, "reserved_usd"), 0.0), 6), "updated_at": _number(raw, "updated_at") or None,
            "last_import": last}


def _gemini_usd_so_far() -> float:
    """USD this process has charged to Gemini since it started (the lsb_gemini_cost_usd_total samples)."""
    return sum(sample.value for family in GEMINI_COST.collect() for sample in family.samples
               if sample.name.endswith("_total"))


class JobTally:
    """What one pre-labeling job reports as it goes: each batch's drafted and failed tasks and their cost.

    The cost is what this process charged to Gemini since the previous batch: an RQ worker runs one job
    at a time in its work horse, so that is the job's own spend, whatever tier or cache it went through.
    Counting never fails a job: a Redis error here is logged and the drafts already stored stay stored.
    """

    def __init__(self, redis: redis_lib.Redis, project: str | int):
        self.redis = redis
        self.project = keys.project_key(project)
        self._usd = _gemini_usd_so_far()

    def _safely(self, what: str, *moves: tuple[list, str], spent: float = 0.0) -> None:
        try:
            for tasks, state in moves:
                _move(self.redis, self.project, tasks, state)
            if spent > 0:
                self.redis.hincrbyfloat(keys.prelabel_status(self.project), "spent_usd", spent)
        except redis_lib.RedisError as exc:
            log.warning("pre-labeling project %s: could not count %s in the import status: %s", self.project, what, exc)

    def not_in_project(self, requested: list[dict], own: list[dict]) -> None:
        """Tasks of the request that Label Studio does not list in the project (never drafted)."""
        kept = set(_ids(own))
        self._safely("tasks not in the project", ([t for t in _ids(requested) if t not in kept], "not_in_project"))

    def batch(self, drafted: list[dict], failed: list[dict]) -> float:
        """One batch done: ``drafted`` hold a current draft now (stored, or already there), ``failed`` got none.

        Returns the USD charged since the previous batch (also added to ``spent_usd``).
        """
        now = _gemini_usd_so_far()
        spent, self._usd = max(now - self._usd, 0.0), now
        if spent > 0:
            PRELABEL_COST.inc(spent)
        self._safely("a batch", (drafted, "drafted"), (failed, "failed"), spent=spent)
        return spent
