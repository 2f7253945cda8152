"""Model registry: promoted YOLO checkpoints on (shared) disk, the current version in Redis.

Layout, one folder per project and version, each written elsewhere then renamed into place so a
reader never sees a half-written version::

    MODEL_DIR/<project>/<version>/model.pt        the checkpoint
    MODEL_DIR/<project>/<version>/model.onnx ...  optional faster exports
    MODEL_DIR/<project>/<version>/meta.json       parent, metrics, dataset hash, classes, times
    MODEL_DIR/<project>/current.json              the current version (survives a Redis flush)

The disk pointer ``current.json`` is the record of which version serves: it is written first, durably,
under the project's registry lock. Redis (``lsb:model:<project>:current``) holds a copy for the status
routes and dashboards, and every change is announced on the ``lsb:models`` channel so every serving
process on every host switches within a second. When the two disagree (Redis restored from an older
snapshot, flushed, or a Redis write that failed after the disk write) the disk wins and
:meth:`ModelRegistry.reconcile` rewrites Redis; the hot-swap poll calls it.

Promotion, rollback and pruning of one project are serialised by a file lock on
``MODEL_DIR/.locks/<project>.lock`` (:mod:`backend.core.file_lock`): a rollback never points at a
version a prune is deleting, and :meth:`ModelRegistry.promote` with ``expected=`` is a compare-and-swap,
so a training that started from v0002 does not promote over a rollback made while it ran.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_lib

from backend.core.file_lock import file_lock
from backend.core.files import write_json_atomic
from backend.core.keys import Keys, model_candidate_acks, model_current, project_key

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
META = "meta.json"
POINTER = "current.json"
LOCKS = ".locks"  # MODEL_DIR/.locks/<project>.lock: outside the version folders, a plain file (NFS-safe)
LOCK_TIMEOUT_S = 60.0
CANDIDATE_ACK_TTL_S = 3600  # the acks of a candidate only matter while its training waits
_VERSION_RE = re.compile(r"^v(\d{4,})$")
#: ``promote(expected=ANY)``: promote whatever is current (rollbacks, operators).
ANY = object()


class PromotionConflict(RuntimeError):
    """The current version changed since the caller read it (a rollback or another promotion)."""

    def __init__(self, project: str, expected: str | None, actual: str | None, version: str):
        self.project, self.expected, self.actual, self.version = project, expected, actual, version
        super().__init__(f"project {project}: the current version changed from {expected or 'none'} to "
                         f"{actual or 'none'} since this training started (a rollback or another promotion); "
                         f"{version} is kept unpromoted")


@dataclass
class VersionInfo:
    project: str
    version: str
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def classes(self) -> list[str]:
        return list(self.meta.get("classes", []))

    def export(self, fmt: str) -> Path | None:
        """Path of an exported model (``onnx``, ``openvino``) if the worker produced one."""
        name = self.meta.get("exports", {}).get(fmt)
        if not name:
            return None
        path = self.path / name
        return path if path.exists() else None


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


class ModelRegistry:
    """Read and change which checkpoint each project serves."""

    def __init__(self, model_dir: Path | str, redis: redis_lib.Redis | None):
        self.model_dir = Path(model_dir)
        self.redis = redis

    # --- reading ---------------------------------------------------------------------------------

    def current_version(self, project: str | int) -> str | None:
        """The promoted version name: the disk pointer (the record), Redis's copy only when there is none."""
        project = project_key(project)
        return self._disk_current(project) or self._redis_current(project)

    def _disk_current(self, project: str) -> str | None:
        try:
            version = json.loads((self.model_dir / project / POINTER).read_text())["version"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return version if isinstance(version, str) and _VERSION_RE.match(version) else None

    def _redis_current(self, project: str) -> str | None:
        try:
            return self._redis_copy(project)
        except redis_lib.RedisError:
            log.warning("redis unavailable; the current version comes from the disk pointer only")
            return None

    def _redis_copy(self, project: str) -> str | None:
        """Redis's copy of the pointer (raises RedisError)."""
        value = self.redis.get(model_current(project)) if self.redis is not None else None
        if not value:
            return None
        version = value.decode() if isinstance(value, bytes) else str(value)
        return version if _VERSION_RE.match(version) else None

    def reconcile(self, project: str | int) -> str | None:
        """Make Redis's copy of the current version agree with the disk pointer; returns the current version.

        The disk wins: it is written first and durably, so a Redis restored from an older snapshot, a
        flushed Redis or a Redis write that failed after the disk write all leave Redis behind, never
        ahead. Only when the disk has no pointer (MODEL_DIR restored without it) is Redis's version
        adopted, and then only if that version exists on disk.
        """
        project = project_key(project)
        disk = self._disk_current(project)
        try:
            cached = self._redis_copy(project)
        except redis_lib.RedisError:
            return disk  # Redis away: nothing to repair now, the next poll tries again (quietly: it polls often)
        if disk == cached or self.redis is None or not (self.model_dir / project).is_dir():
            return disk  # the common case: no lock, no write
        with self._locked(project):
            disk = self._disk_current(project)
            try:
                cached = self._redis_copy(project)
            except redis_lib.RedisError:
                return disk
            if disk is None and cached is not None and self.get(project, cached) is not None:
                log.warning("project %s: no current.json on disk, adopting Redis's %s", project, cached)
                self._write_pointer(project, cached)
                return cached
            if disk is not None and disk != cached:
                log.warning("project %s: Redis said %s, current.json says %s; the disk wins, Redis repaired",
                            project, cached, disk)
                self._set_redis(project, disk, announce=False)
            return disk

    def get(self, project: str | int, version: str) -> VersionInfo | None:
        project = project_key(project)
        path = self.model_dir / project / version
        if not _VERSION_RE.match(version) or not (path / CHECKPOINT).is_file():
            return None
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            meta = {}
        return VersionInfo(project, version, path, meta)

    def current(self, project: str | int) -> VersionInfo | None:
        version = self.current_version(project)
        return self.get(project, version) if version else None

    def versions(self, project: str | int) -> list[VersionInfo]:
        """Every complete version on disk, oldest first."""
        project = project_key(project)
        root = self.model_dir / project
        if not root.is_dir():
            return []
        names = sorted((p.name for p in root.iterdir() if _VERSION_RE.match(p.name)), key=lambda n: int(n[1:]))
        return [info for name in names if (info := self.get(project, name))]

    def projects(self) -> list[str]:
        if not self.model_dir.is_dir():
            return []
        # only canonical names: a folder "02" written before ids were normalised is not a project of its own
        return sorted(p.name for p in self.model_dir.iterdir() if p.is_dir() and _is_canonical(p.name))

    # --- writing (worker side) -------------------------------------------------------------------

    def add_version(self, project: str | int, checkpoint: Path, meta: dict[str, Any],
                    extra_files: dict[str, Path] | None = None) -> VersionInfo:
        """Copy a checkpoint (and optional exports) into a new version folder, atomically.

        The copy is written to a hidden staging folder, fsynced, then renamed: a crash at any
        point leaves either nothing or a complete version, never a partial one.
        """
        project = project_key(project)
        root = self.model_dir / project
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            shutil.copy2(checkpoint, staging / CHECKPOINT)
            exports: dict[str, str] = {}
            for fmt, src in (extra_files or {}).items():
                dest = staging / Path(src).name
                (shutil.copytree if Path(src).is_dir() else shutil.copy2)(src, dest)
                exports[fmt] = dest.name
            while True:
                version = self._next_version_name(root)
                meta = {**meta, "project": project, "version": version, "exports": exports, "created_at": time.time()}
                write_json_atomic(staging / META, meta)
                _fsync_tree(staging)
                try:
                    os.rename(staging, root / version)  # fails if a concurrent writer took the name
                    break
                except OSError:
                    if (root / version).exists():
                        continue
                    raise
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return VersionInfo(project, version, root / version, meta)

    @staticmethod
    def _next_version_name(root: Path) -> str:
        numbers = [int(m.group(1)) for p in root.iterdir() if (m := _VERSION_RE.match(p.name))]
        return f"v{max(numbers, default=0) + 1:04d}"

    def update_meta(self, project: str | int, version: str, **changes: Any) -> None:
        info = self.get(project, version)
        if info is None:
            raise KeyError(f"no version {version} for project {project}")
        write_json_atomic(info.path / META, {**info.meta, **changes})

    # --- preloading a candidate (every serving process loads it before the pointer moves) ------------

    def announce_candidate(self, project: str | int, version: str) -> int:
        """Ask every serving process to load ``version`` beside its current model; returns how many listen.

        Redis's PUBLISH answers with the number of subscribers that received the message: each of them
        acknowledges (:meth:`ack_candidate`), so the caller knows whom to wait for. 0 without Redis.
        """
        project = project_key(project)
        if self.redis is None:
            return 0
        try:
            return int(self.redis.publish(Keys.CANDIDATES_CHANNEL, json.dumps({"project": project, "version": version})))
        except redis_lib.RedisError as exc:
            log.warning("project %s: candidate %s not announced (%s); serving processes load it on promotion",
                        project, version, exc)
            return 0

    def ack_candidate(self, project: str | int, version: str, process: str, state: str) -> None:
        """One serving process's answer to a candidate: ``loaded``, ``skipped`` (project not served) or ``failed``."""
        if self.redis is None:
            return
        key = model_candidate_acks(project, version)
        try:
            self.redis.hset(key, process, state)
            self.redis.expire(key, CANDIDATE_ACK_TTL_S)
        except redis_lib.RedisError as exc:
            log.warning("project %s: could not acknowledge candidate %s: %s", project, version, exc)

    def candidate_acks(self, project: str | int, version: str) -> dict[str, str]:
        if self.redis is None:
            return {}
        try:
            raw = self.redis.hgetall(model_candidate_acks(project, version))
        except redis_lib.RedisError:
            return {}
        return {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}

    def preload(self, project: str | int, version: str, timeout: float, poll: float = 0.05) -> dict[str, Any]:
        """Announce a candidate and wait (at most ``timeout`` s) until every listener acknowledged it."""
        started = time.monotonic()
        listeners = self.announce_candidate(project, version) if timeout > 0 else 0
        acks = self.candidate_acks(project, version)
        while len(acks) < listeners and time.monotonic() - started < timeout:
            time.sleep(poll)
            acks = self.candidate_acks(project, version)
        states = list(acks.values())
        return {"listeners": listeners, "loaded": states.count("loaded"), "skipped": states.count("skipped"),
                "failed": states.count("failed"), "timed_out": len(acks) < listeners,
                "waited_s": round(time.monotonic() - started, 3)}

    def promote(self, project: str | int, version: str, expected: str | None | object = ANY) -> VersionInfo:
        """Make ``version`` current everywhere: disk pointer, Redis copy, pub/sub notice.

        ``expected``: compare-and-swap, promote only if the current version is still this one (``None``:
        still no version), else raise :class:`PromotionConflict` and change nothing.
        """
        project = project_key(project)
        if self.get(project, version) is None:  # checked again under the lock; this one spares a folder
            raise KeyError(f"no complete version {version} for project {project}")
        with self._locked(project):
            if expected is not ANY and (actual := self.current_version(project)) != expected:
                raise PromotionConflict(project, expected if isinstance(expected, str) else None, actual, version)
            return self._promote_locked(project, version)

    def _promote_locked(self, project: str, version: str) -> VersionInfo:
        info = self.get(project, version)
        if info is None:
            raise KeyError(f"no complete version {version} for project {project}")
        self._write_pointer(project, version)
        self._set_redis(project, version, announce=True)
        log.info("promoted project %s version %s", project, version)
        return info

    def _write_pointer(self, project: str, version: str) -> None:
        write_json_atomic(self.model_dir / project / POINTER, {"version": version, "promoted_at": time.time()})

    def _set_redis(self, project: str, version: str, announce: bool) -> None:
        """Copy the pointer to Redis (and announce it); a failure here is repaired by :meth:`reconcile`."""
        if self.redis is None:
            return
        try:
            self.redis.set(model_current(project), version)
            if announce:
                self.redis.publish(Keys.MODELS_CHANNEL, json.dumps({"project": project, "version": version}))
        except redis_lib.RedisError as exc:
            log.warning("project %s: %s is current on disk but Redis was not told (%s); the hot-swap poll "
                        "reads the disk and repairs Redis", project, version, exc)

    def rollback(self, project: str | int, version: str | None = None) -> VersionInfo:
        """Serve an earlier version: the named one, or the one before the current (under the registry lock,
        so a concurrent prune cannot delete it in between)."""
        project = project_key(project)
        if not (self.model_dir / project).is_dir():
            raise KeyError(f"project {project} has no versions")
        with self._locked(project):
            if version is None:
                names = [v.version for v in self.versions(project)]
                current = self.current_version(project)
                earlier = names[: names.index(current)] if current in names else names[:-1]
                if not earlier:
                    raise KeyError(f"project {project} has no version before {current}")
                version = earlier[-1]
            return self._promote_locked(project, version)

    def prune(self, project: str | int, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one (under the registry lock)."""
        project = project_key(project)
        if keep <= 0 or not (self.model_dir / project).is_dir():
            return []
        with self._locked(project):
            current = self.current_version(project)
            doomed = [v for v in self.versions(project)[:-keep] if v.version != current]
            for info in doomed:  # renamed first, so no reader ever lists a half-deleted version
                trash = info.path.with_name(f".deleting-{info.version}-{os.getpid()}")
                os.rename(info.path, trash)
                shutil.rmtree(trash, ignore_errors=True)
        return [v.version for v in doomed]

    def lock_path(self, project: str | int) -> Path:
        return self.model_dir / LOCKS / f"{project_key(project)}.lock"

    def _locked(self, project: str):
        """The project's registry lock (promote, rollback, prune, repairs): across threads, processes, hosts."""
        return file_lock(self.lock_path(project), timeout=LOCK_TIMEOUT_S)


def _is_canonical(name: str) -> bool:
    try:
        return project_key(name) == name
    except ValueError:
        return False


def describe(info: VersionInfo | None) -> dict[str, Any] | None:
    """JSON-safe view of a version for routes and job results."""
    if info is None:
        return None
    data = asdict(info)
    data["path"] = str(info.path)
    return data
