"""Which imported tasks are drafted at once: ``PRELABEL_ON_IMPORT`` and its per-project override.

Drafting an import is a spending decision (every draft may be a paid Gemini call), so the
deployment says ``all`` (every task of a ``TASKS_CREATED``, the default), ``none`` (nothing: Label
Studio still asks ``/predict`` when an annotator opens a task without a draft) or ``sample:N`` (N tasks
of each import, the others on demand). A project overrides it with one attribute on the root
``<View>`` of its label config, which Label Studio keeps as it is (docs/label-studio.md#label-config-attributes-of-this-backend)::

    <View prelabel_on_import="sample:200"> ... </View>

The project's value wins. A project value that does not parse drafts nothing (a typo must not spend
money) and says why in the webhook answer and the import status.

N counts per import, not per event: Label Studio 1.23.2 cuts the ``TASKS_CREATED`` of an import into events
of ``WEBHOOK_BATCH_SIZE`` (5,000) tasks, one after the other (webhooks/utils.py
``emit_webhooks_for_instance_sync``, its flag ``fflag_fix_back_plt_843_webhook_memory_improvement`` is
stale = always on; docs/label-studio.md#webhook-events). :func:`decide_import` keeps the count of the import
whose chunks are arriving in Redis (``keys.prelabel_import``): a full chunk (``LS_WEBHOOK_BATCH_SIZE`` tasks)
followed within ``PRELABEL_IMPORT_WINDOW_S`` by one with higher task ids continues the same import. The
total is unknown until the last chunk, so each full chunk gets half of what is left (rounded up) and the last
chunk the rest: never more than N per import, spread over all of it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Literal

import redis as redis_lib
from defusedxml import ElementTree
from defusedxml.common import DefusedXmlException

from backend.core import keys

log = logging.getLogger(__name__)

#: The label-config attribute (on the root ``<View>``) that overrides PRELABEL_ON_IMPORT for a project.
ATTRIBUTE = "prelabel_on_import"
_SAMPLE = re.compile(r"sample:(\d{1,9})")


class BadPolicy(ValueError):
    """A value that is not ``all``, ``none`` or ``sample:N``; the message says what is accepted."""


@dataclass(frozen=True)
class Policy:
    """A parsed policy: ``mode`` and, for ``sample``, how many tasks of an import are drafted."""

    mode: Literal["all", "none", "sample"]
    n: int = 0

    def __str__(self) -> str:
        return f"sample:{self.n}" if self.mode == "sample" else self.mode


def parse(value: str, what: str = "PRELABEL_ON_IMPORT") -> Policy:
    """``all`` | ``none`` | ``sample:N`` (N >= 1), case and surrounding spaces ignored; else :class:`BadPolicy`."""
    text = str(value).strip().lower()
    if text in ("all", "none"):
        return Policy(text)  # type: ignore[arg-type]
    match = _SAMPLE.fullmatch(text)
    if match and int(match.group(1)) >= 1:
        return Policy("sample", int(match.group(1)))
    raise BadPolicy(f"{what} must be 'all', 'none' or 'sample:N' with N a whole number >= 1 "
                    f"(e.g. sample:100), not {str(value)[:60]!r}")


def project_value(label_config: str | None) -> str | None:
    """The raw ``prelabel_on_import`` of the config's root ``<View>``; None when absent or unreadable."""
    if not isinstance(label_config, str) or not label_config.strip():
        return None
    try:
        root = ElementTree.fromstring(label_config)
    except (ElementTree.ParseError, DefusedXmlException, ValueError):
        return None  # /setup reports a broken config; here it simply sets no policy
    return root.attrib.get(ATTRIBUTE)


@dataclass(frozen=True)
class Decision:
    """What one import gets: the policy applied, where it came from, the tasks to draft and the rest."""

    policy: Policy
    source: Literal["deployment", "project", "project (invalid)"]
    chosen: list[dict] | None  # None = every task of the project (an event without a task list)
    skipped: list[dict] = field(default_factory=list)
    error: str = ""

    def summary(self) -> dict:
        out = {"policy": str(self.policy), "source": self.source, "skipped_by_policy": len(self.skipped)}
        return {**out, "error": self.error} if self.error else out


def effective(label_config: str | None, deployment: str) -> tuple[Policy, str, str]:
    """(policy, source, error): the project's attribute when set, else the deployment's setting."""
    raw = project_value(label_config)
    if raw is None:
        return parse(deployment), "deployment", ""
    try:
        return parse(raw, f"{ATTRIBUTE} on the label config's <View>"), "project", ""
    except BadPolicy as exc:
        log.warning("pre-labeling: %s; nothing of this import is drafted until it is fixed", exc)
        return Policy("none"), "project (invalid)", str(exc)


def _rank(project: str, task: dict) -> str:
    """A task's place in the project's fixed pseudo-random order (same ids, same order, every time)."""
    return hashlib.sha256(f"{project}:{task.get('id')}".encode()).hexdigest()


def _import_order(item: tuple[int, dict]) -> tuple[int, int]:
    position, task = item
    tid = str(task.get("id", ""))
    return (int(tid), position) if tid.isdigit() else (1 << 62, position)


def sample(project: str, tasks: list[dict], n: int) -> list[dict]:
    """``n`` tasks spread over the whole import, deterministically.

    The tasks are put in import order (by id) and cut into ``n`` runs of (nearly) equal length; from
    each run the task with the lowest hash of (project, id) is taken. So a redelivered or re-ordered
    event picks the same tasks, the sample covers the start, the middle and the end of the import
    (an import sorted by time or by site is still represented), and within a run nothing favours the
    first task. The result keeps the order of ``tasks``.
    """
    if n >= len(tasks):
        return list(tasks)
    ordered = [task for _, task in sorted(enumerate(tasks), key=_import_order)]
    picked: set[int] = set()
    for k in range(n):
        run = ordered[k * len(ordered) // n:(k + 1) * len(ordered) // n]
        picked.add(id(min(run, key=lambda task: _rank(project, task))))
    return [task for task in tasks if id(task) in picked]


def decide(project: str, tasks: list[dict] | None, label_config: str | None, deployment: str) -> Decision:
    """The tasks of one ``TASKS_CREATED`` to draft now, under the project's or the deployment's policy.

    Without a task list (an older sender) only ``all`` drafts anything: sampling needs the ids, and
    ``POST /prelabel`` drafts the whole project when asked.
    """
    policy, source, error = effective(label_config, deployment)
    if tasks is None:
        return Decision(policy, source, None if policy.mode == "all" else [], [], error)
    if policy.mode == "all":
        return Decision(policy, source, list(tasks), [], error)
    chosen = sample(project, tasks, policy.n) if policy.mode == "sample" else []
    kept = {id(task) for task in chosen}
    return Decision(policy, source, chosen, [task for task in tasks if id(task) not in kept], error)


def _str(value: bytes | str) -> str:
    """A Redis reply as text (backend.core.queue.text, which this module cannot import: settings imports it)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _task_ids(tasks: list[dict]) -> list[int]:
    return [int(t["id"]) for t in tasks if str(t.get("id", "")).isdigit()]


def decide_import(redis: redis_lib.Redis, project: str, tasks: list[dict] | None, label_config: str | None,
                  deployment: str, chunk_size: int, window_s: float) -> Decision:
    """:func:`decide` for one ``TASKS_CREATED``, with ``sample:N`` counted over every chunk of the same import."""
    decision = decide(project, tasks, label_config, deployment)
    ids = _task_ids(tasks or [])
    if decision.policy.mode != "sample" or not tasks or not ids:
        return decision
    key = keys.prelabel_import(project)
    previous = {_str(k): _str(v) for k, v in redis.hgetall(key).items()}
    continued = previous.get("full") == "1" and min(ids) > int(previous.get("last_id") or 0)
    used = int(previous.get("drafted") or 0) if continued else 0
    left = max(decision.policy.n - used, 0)
    full = len(tasks) >= chunk_size  # more chunks of this import may follow
    chosen = sample(project, tasks, (left + 1) // 2 if full else left) if left else []
    pipe = redis.pipeline()
    pipe.hset(key, mapping={"drafted": used + len(chosen), "last_id": max(ids), "full": "1" if full else "0"})
    pipe.expire(key, max(1, int(window_s)))
    pipe.execute()
    kept = {id(task) for task in chosen}
    return Decision(decision.policy, decision.source, chosen, [t for t in tasks if id(t) not in kept], decision.error)
