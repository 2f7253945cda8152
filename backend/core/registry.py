"""Model registry: promoted YOLO checkpoints on (shared) disk, the current version in Redis.

Layout, one folder per project and version, each written elsewhere then renamed into place so a
reader never sees a half-written version::

    MODEL_DIR/<project>/<version>/model.pt        the checkpoint
    MODEL_DIR/<project>/<version>/model.onnx ...  optional faster exports
    MODEL_DIR/<project>/<version>/meta.json       parent, metrics, dataset hash, classes, times
    MODEL_DIR/<project>/current.json              the current version (survives a Redis flush)

The current version lives in Redis (``lsb:model:<project>:current``) and every change is announced
on the ``lsb:models`` channel, so every serving process on every host switches within a second.
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

from backend.core.files import write_json_atomic
from backend.core.keys import Keys, model_current, project_key

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
META = "meta.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


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
        """The promoted version name; Redis first, the on-disk pointer when Redis is away."""
        project = project_key(project)
        if self.redis is not None:
            try:
                value = self.redis.get(model_current(project))
                if value:
                    return value.decode() if isinstance(value, bytes) else str(value)
            except redis_lib.RedisError:
                log.warning("redis unavailable; reading the current version from disk")
        pointer = self.model_dir / project / "current.json"
        try:
            return json.loads(pointer.read_text())["version"]
        except (OSError, ValueError, KeyError):
            return None

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
        return sorted(p.name for p in self.model_dir.iterdir() if p.is_dir() and p.name.isdigit())

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

    def promote(self, project: str | int, version: str) -> VersionInfo:
        """Make ``version`` current everywhere: disk pointer, Redis key, pub/sub notice."""
        project = project_key(project)
        info = self.get(project, version)
        if info is None:
            raise KeyError(f"no complete version {version} for project {project}")
        write_json_atomic(self.model_dir / project / "current.json", {"version": version, "promoted_at": time.time()})
        if self.redis is not None:
            self.redis.set(model_current(project), version)
            self.redis.publish(Keys.MODELS_CHANNEL, json.dumps({"project": project, "version": version}))
        log.info("promoted project %s version %s", project, version)
        return info

    def rollback(self, project: str | int, version: str | None = None) -> VersionInfo:
        """Serve an earlier version: the named one, or the one before the current."""
        project = project_key(project)
        if version is None:
            names = [v.version for v in self.versions(project)]
            current = self.current_version(project)
            earlier = names[: names.index(current)] if current in names else names[:-1]
            if not earlier:
                raise KeyError(f"project {project} has no version before {current}")
            version = earlier[-1]
        return self.promote(project, version)

    def prune(self, project: str | int, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` versions, never the current one."""
        project = project_key(project)
        current = self.current_version(project)
        infos = self.versions(project)
        doomed = [v for v in infos[:-keep] if v.version != current] if keep > 0 else []
        for info in doomed:
            shutil.rmtree(info.path, ignore_errors=True)
        return [v.version for v in doomed]


def describe(info: VersionInfo | None) -> dict[str, Any] | None:
    """JSON-safe view of a version for routes and job results."""
    if info is None:
        return None
    data = asdict(info)
    data["path"] = str(info.path)
    return data
