"""Every Redis key and pub/sub channel of the project, as named templates (one place to read the layout).

``{project}`` is always the normalised Label Studio project id (:func:`project_key`). The strings are
data: changing one orphans what is stored under the old name, so keep them stable.

Training coordination, one set per project (:mod:`backend.core.queue`, :mod:`worker.training.lock`)::

    lsb:train:<p>:pending   "<rq job id> <unix time>"  the queued training (at most one)
    lsb:train:<p>:running   JSON {job_id, token, host, pid, since}; PX = lock TTL, renewed by a heartbeat
    lsb:train:<p>:force     "1": a coalesced request asked for force=True
    lsb:train:<p>:events    annotation changes since the last training started
    lsb:train:<p>:last      JSON result of the last finished (or failed) training
    lsb:train:<p>:history   list of the last 50 such results, newest first (the status page)
    lsb:train:<p>:labels_deleted   unix time of the last ANNOTATIONS_DELETED (flag on /train/status)

Webhook and project lifecycle (:mod:`backend.web.webhook`, :mod:`backend.core.prelabel_queue`, :mod:`worker.jobs.cleanup`)::

    lsb:webhook:<p>:seen:<sha256>   "1" with a TTL: one delivery of an event already handled (dedupe)
    lsb:prelabel:<p>:queued         hash task id (or "*" = all tasks) -> "<rq job id> <unix time>"
    lsb:prelabel:<p>:tasks          hash task id -> its pre-labeling state (:mod:`backend.core.import_status`)
    lsb:prelabel:<p>:status         hash: tasks per state, imported, spent_usd, the last import's policy
    lsb:prelabel:<p>:import         hash drafted, last_id, full: the sample:N count of the import whose chunks
                                    (TASKS_CREATED events) are arriving (:mod:`backend.core.prelabel_policy`; TTL)
    lsb:project:<p>:deleted         "<unix time> <cleanup job id>": PROJECT_DELETED seen, cleanup scheduled
    lsb:rank:<p>:pending            "<rq job id> <unix time>": a queued re-score of the drafts (:mod:`backend.core.rank_queue`)

Models and their quality (:mod:`backend.core.registry`, :mod:`backend.serving.quality`)::

    lsb:model:<p>:current   the served version name ("v0004")
    lsb:models              channel: {"project", "version"} on every promotion
    lsb:models:candidates   channel: {"project", "version"} of a version about to be promoted (preload it)
    lsb:model:<p>:candidate:<v>   hash serving process -> "loaded" | "skipped" | "failed" (acks, with a TTL)
    lsb:quality:<p>         JSON draft quality per source + the served model's val metrics

Gemini state shared by every replica, under a root prefix (tests and the bench use their own root)::

    lsb:gemini:answer:<sha256>          cached raw answer (:mod:`backend.detectors.gemini.cache`)
    lsb:gemini:spend:<YYYY-MM-DD>       USD spent that UTC day (:mod:`backend.detectors.gemini.cost`)
    lsb:gemini:breaker:failures|opened_at|trial   circuit breaker (:mod:`backend.detectors.gemini.breaker`)
    lsb:gemini:money                    hash usd:<tier>, tasks:<source>: lifetime spend and drafts (cost per 1,000)
    lsb:gemini:money:<p>                the same hash for one project's drafted tasks (the status page's money per project)

Gemini Batch API drafting (:mod:`worker.jobs.batch_drafting`, :mod:`backend.core.batch_queue`)::

    lsb:gbatch:<p>:<id>           hash: the batch's name at Google, label config, state, reserved/settled USD, its
                                  current poll job (poll_job, attempt, queue; compare-and-set), resumes
    lsb:gbatch:<p>:<id>:tasks     hash task id -> task JSON, the tasks still waiting for their result
    lsb:gbatch:<p>:<id>:done      hash task id -> "stored" | "failed <reason>" (HSETNX: the per-task claim)
    lsb:gbatch:<p>:<id>:lock      JSON {job, worker, host, pid, since}: the poll job reading the batch (one at a time;
                                  with a TTL; broken by the sweep when its holder is dead)
    lsb:gbatch:live               set of "<p>:<id>": batches not finished (resumed by the sweep,
                                  :func:`backend.core.batch_queue.sweep`)
    lsb:gbatch:sweep:<queue>      "<rq job id> <unix time>": the scheduled sweep of the live batches polled on that
                                  RQ queue (one at a time)

RQ's own keys (``rq:job:*``, ``rq:queue:*``) are RQ's business: read them through rq's public API only.
"""

from __future__ import annotations

import re


class Keys:
    """Key and channel templates; format them with the helpers below, never by hand."""

    TRAIN_PENDING = "lsb:train:{project}:pending"
    TRAIN_RUNNING = "lsb:train:{project}:running"
    TRAIN_FORCE = "lsb:train:{project}:force"
    TRAIN_EVENTS = "lsb:train:{project}:events"
    TRAIN_LAST = "lsb:train:{project}:last"
    TRAIN_HISTORY = "lsb:train:{project}:history"
    LABELS_DELETED = "lsb:train:{project}:labels_deleted"
    WEBHOOK_SEEN = "lsb:webhook:{project}:seen:{digest}"
    PRELABEL_QUEUED = "lsb:prelabel:{project}:queued"
    PRELABEL_TASKS = "lsb:prelabel:{project}:tasks"
    PRELABEL_STATUS = "lsb:prelabel:{project}:status"
    PRELABEL_IMPORT = "lsb:prelabel:{project}:import"
    PROJECT_DELETED = "lsb:project:{project}:deleted"
    RANK_PENDING = "lsb:rank:{project}:pending"
    MODEL_CURRENT = "lsb:model:{project}:current"
    QUALITY = "lsb:quality:{project}"
    MODELS_CHANNEL = "lsb:models"
    CANDIDATES_CHANNEL = "lsb:models:candidates"
    MODEL_CANDIDATE_ACKS = "lsb:model:{project}:candidate:{version}"

    GEMINI_ROOT = "lsb:gemini"
    GEMINI_ANSWERS = "{root}:answer"
    GEMINI_SPEND = "{root}:spend"
    GEMINI_BREAKER = "{root}:breaker"
    ANSWER = "{prefix}:{digest}"
    SPEND_DAY = "{prefix}:{day}"
    BREAKER_FAILURES = "{prefix}:failures"
    BREAKER_OPENED_AT = "{prefix}:opened_at"
    BREAKER_TRIAL = "{prefix}:trial"
    GEMINI_MONEY = "{root}:money"
    GEMINI_PROJECT_MONEY = "{root}:money:{project}"
    GBATCH = "lsb:gbatch:{project}:{batch}"
    GBATCH_TASKS = "lsb:gbatch:{project}:{batch}:tasks"
    GBATCH_DONE = "lsb:gbatch:{project}:{batch}:done"
    GBATCH_LIVE = "lsb:gbatch:live"
    GBATCH_LOCK = "lsb:gbatch:{project}:{batch}:lock"
    GBATCH_SWEEP = "lsb:gbatch:sweep:{queue}"

    #: SCAN patterns of everything stored for one project (cleanup in tests and the bench).
    PROJECT_PATTERNS = ("lsb:train:{project}:*", "lsb:model:{project}:*", "lsb:quality:{project}",
                        "lsb:webhook:{project}:*", "lsb:prelabel:{project}:*", "lsb:project:{project}:*",
                        "lsb:rank:{project}:*", "lsb:gbatch:{project}:*", "lsb:gemini:money:{project}")



#: A Label Studio project id as it arrives: ``2`` (webhooks, API) or ``"2.1795306664"`` (id.created_ts,
#: /setup and /predict). Leading zeros are allowed on input and dropped on output.
_PROJECT_RE = re.compile(r"(\d{1,40})(?:\.\d{1,40})?")
_MAX_DIGITS = 18  # a bigint; the id names folders and keys


def project_key(project: str | int) -> str:
    """The one normaliser of project ids: every key, lock, registry folder and job uses its answer.

    Label Studio parses ids as integers, so ``"02"``, ``"002"``, ``2`` and ``"2.1795306664"`` are all
    project 2 and all map to ``"2"``; keeping ``"02"`` would give the same project a second lock, key
    set and model folder. Anything else (signs, spaces inside, floats, bools, non-ASCII digits, 0) is
    refused with :class:`ValueError`.
    """
    if isinstance(project, bool) or not isinstance(project, str | int):
        raise ValueError(f"not a Label Studio project id: {type(project).__name__} {str(project)[:40]!r}")
    text = str(project).strip()
    match = _PROJECT_RE.fullmatch(text) if text.isascii() else None  # "²".isdigit() is True: ASCII only
    canonical = str(int(match.group(1))) if match else ""
    if not match or canonical == "0" or len(canonical) > _MAX_DIGITS:
        raise ValueError(f"not a Label Studio project id (want 2 or \"2.<created_ts>\"): {text[:40]!r}")
    return canonical


def _for(template: str, project: str | int) -> str:
    return template.format(project=project_key(project))


def train_pending(project: str | int) -> str:
    return _for(Keys.TRAIN_PENDING, project)


def train_running(project: str | int) -> str:
    return _for(Keys.TRAIN_RUNNING, project)


def train_force(project: str | int) -> str:
    return _for(Keys.TRAIN_FORCE, project)


def train_events(project: str | int) -> str:
    return _for(Keys.TRAIN_EVENTS, project)


def train_last(project: str | int) -> str:
    return _for(Keys.TRAIN_LAST, project)


def train_history(project: str | int) -> str:
    return _for(Keys.TRAIN_HISTORY, project)


def labels_deleted(project: str | int) -> str:
    return _for(Keys.LABELS_DELETED, project)


def webhook_seen(project: str | int, digest: str) -> str:
    return Keys.WEBHOOK_SEEN.format(project=project_key(project), digest=digest)


def prelabel_queued(project: str | int) -> str:
    return _for(Keys.PRELABEL_QUEUED, project)


def prelabel_tasks(project: str | int) -> str:
    return _for(Keys.PRELABEL_TASKS, project)


def prelabel_status(project: str | int) -> str:
    return _for(Keys.PRELABEL_STATUS, project)


def prelabel_import(project: str | int) -> str:
    return _for(Keys.PRELABEL_IMPORT, project)


def project_deleted(project: str | int) -> str:
    return _for(Keys.PROJECT_DELETED, project)


def rank_pending(project: str | int) -> str:
    return _for(Keys.RANK_PENDING, project)


def model_current(project: str | int) -> str:
    return _for(Keys.MODEL_CURRENT, project)


def model_candidate_acks(project: str | int, version: str) -> str:
    return Keys.MODEL_CANDIDATE_ACKS.format(project=project_key(project), version=version)


def quality(project: str | int) -> str:
    return _for(Keys.QUALITY, project)


def project_patterns(project: str | int) -> list[str]:
    """SCAN patterns matching every key of one project (and nothing of another)."""
    return [_for(pattern, project) for pattern in Keys.PROJECT_PATTERNS]


def gemini_answers(root: str = Keys.GEMINI_ROOT) -> str:
    return Keys.GEMINI_ANSWERS.format(root=root)


def gemini_spend(root: str = Keys.GEMINI_ROOT) -> str:
    return Keys.GEMINI_SPEND.format(root=root)


def gemini_money(root: str = Keys.GEMINI_ROOT) -> str:
    return Keys.GEMINI_MONEY.format(root=root)


def gemini_project_money(project: str | int, root: str = Keys.GEMINI_ROOT) -> str:
    return Keys.GEMINI_PROJECT_MONEY.format(root=root, project=project_key(project))


def gbatch(project: str | int, batch: str) -> str:
    return Keys.GBATCH.format(project=project_key(project), batch=batch)


def gbatch_tasks(project: str | int, batch: str) -> str:
    return Keys.GBATCH_TASKS.format(project=project_key(project), batch=batch)


def gbatch_done(project: str | int, batch: str) -> str:
    return Keys.GBATCH_DONE.format(project=project_key(project), batch=batch)


def gbatch_lock(project: str | int, batch: str) -> str:
    return Keys.GBATCH_LOCK.format(project=project_key(project), batch=batch)


def gbatch_live() -> str:
    return Keys.GBATCH_LIVE


def gbatch_sweep(queue: str) -> str:
    return Keys.GBATCH_SWEEP.format(queue=queue)


def gemini_breaker(root: str = Keys.GEMINI_ROOT) -> str:
    return Keys.GEMINI_BREAKER.format(root=root)


def gemini_patterns(root: str = Keys.GEMINI_ROOT) -> list[str]:
    """SCAN patterns of all shared Gemini state under ``root`` (cache, spend, breaker)."""
    return [f"{prefix}*" for prefix in (gemini_answers(root), gemini_breaker(root), gemini_spend(root))]
