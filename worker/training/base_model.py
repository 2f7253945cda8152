"""Where a project's first training starts: pretrained weights when they can be had, else a yaml (random init).

A project's first training has no model of its own to fine-tune: it starts from ``YOLO_BASE_MODEL``.
Starting from COCO-pretrained weights learns far more from a few dozen images than random init, so
the worker obtains them once and keeps them where every later training, and every worker host that
shares ``MODEL_DIR``, finds them. :func:`obtain_base_model` looks, in order, at:

1. ``YOLO_BASE_MODEL`` itself when it is a local file (used as given) or a model yaml (random init, as asked);
2. ``MODEL_DIR/base/<name>`` whose ``<name>.sha256`` matches (a file that does not match is discarded);
3. ``YOLO_BASE_BUNDLED_DIR/<name>`` with a matching checksum (read-only: the image bakes weights there,
   Dockerfile ``ARG YOLO_BASE_WEIGHTS``);
4. Ultralytics' own download (``attempt_download_asset``, official weights names only), run in a child
   process that is killed after ``YOLO_BASE_DOWNLOAD_TIMEOUT`` seconds (0 = never download), checked
   with Ultralytics' restricted loader and renamed into ``MODEL_DIR/base/`` with its checksum.

Without weights the training falls back to the yaml of the same stem (``yolo11n.pt`` -> ``yolo11n.yaml``,
random init) and says so: a warning, ``lsb_base_model_fallback_total{reason}`` and the ``base_model``
field of the training result (``/train/status``). Nothing here may stop a training: any error is a fallback.

Concurrency: writers (download, ``lsb base-model install``) hold ``MODEL_DIR/base/.<name>.lock`` (flock,
across hosts) and publish by atomic rename, weights first, checksum second. A reader that finds a
mismatch re-checks under the lock before discarding, so it never deletes a file a writer is publishing.

Trust: checking a checkpoint here uses Ultralytics' restricted loader (torch ``weights_only`` plus its
allow-list of model classes), which refuses a pickle naming anything else; training then loads the file
like any checkpoint. The checksum guards the bytes on disk, not where they came from: install only
weights you trust (docs/ultralytics.md#pretrained-weights).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.core import ultralytics_env
from backend.core.file_lock import LockTimeout, file_lock
from backend.core.files import copy_atomic, write_atomic
from backend.core.metrics import BASE_MODEL_FALLBACKS

log = logging.getLogger(__name__)

#: Where obtained and installed weights live, under MODEL_DIR.
BASE_FOLDER = "base"
#: Why the base model is what it is. The first four give pretrained weights; ``model_yaml`` is random init
#: as asked; the others are fallbacks (the ``reason`` label of lsb_base_model_fallback_total).
PRETRAINED_REASONS = ("local_file", "cached", "bundled", "downloaded")
FALLBACK_REASONS = ("download_disabled", "not_downloadable", "offline", "timeout", "invalid_download", "busy", "error")
#: Exit codes of the download child.
EXIT_UNREACHABLE, EXIT_INVALID = 3, 4
#: Seconds the download child gets to exit after SIGKILL (it cannot refuse; this only bounds the reap).
REAP_S = 5.0
#: Seconds beyond the download deadline a second worker waits for the first one's download.
LOCK_SLACK_S = 30.0
#: Age after which a download's staging folder is a leftover of a killed worker.
STALE_STAGING_S = 24 * 3600.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]


class NotACheckpoint(ValueError):
    """The file is not an Ultralytics detection checkpoint that the restricted loader accepts."""


@dataclass(frozen=True)
class BaseModel:
    """What a first training starts from, and why (stored in the training result as ``base_model``)."""

    requested: str  # YOLO_BASE_MODEL as configured
    used: str  # what YOLO() is given: a .pt path or a model yaml
    pretrained: bool
    reason: str  # one of PRETRAINED_REASONS, "model_yaml" or one of FALLBACK_REASONS
    detail: str = ""

    @property
    def fallback(self) -> bool:
        return self.reason in FALLBACK_REASONS

    def to_status(self) -> dict:
        return {**asdict(self), "fallback": self.fallback}


# --- checksums -------------------------------------------------------------------------------------

def sha256_of(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(weights: Path) -> Path:
    """``<weights>.sha256``, in ``sha256sum`` format, so ``sha256sum -c`` checks it by hand too."""
    return weights.with_name(f"{weights.name}.sha256")


def is_intact(weights: Path) -> bool:
    """The weights file exists and its bytes match the checksum stored beside it."""
    try:
        recorded = checksum_path(weights).read_text().split()
        return weights.is_file() and bool(recorded) and recorded[0] == sha256_of(weights)
    except OSError:
        return False


def _publish(source: Path, target: Path, *, move: bool) -> str:
    """Put ``source`` at ``target`` atomically, then its checksum; the caller holds the target's lock."""
    if move:
        os.replace(source, target)  # same folder tree, same file system: atomic
    else:
        copy_atomic(source, target)
    digest = sha256_of(target)
    write_atomic(checksum_path(target), f"{digest}  {target.name}\n")
    return digest


def _lock_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.lock"


# --- checking and installing ---------------------------------------------------------------------

def describe_checkpoint(path: Path | str) -> dict:
    """Load ``path`` with Ultralytics' restricted loader; its task and classes, or :class:`NotACheckpoint`."""
    ultralytics_env.prepare()
    import torch  # heavy: with ultralytics below, only when checking weights
    from ultralytics.nn.tasks import guess_model_task, torch_safe_load  # heavy: see above

    try:
        ckpt, _ = torch_safe_load(str(path), safe_only=True)
    except Exception as exc:  # a damaged file surfaces as TypeError, KeyError, EOFError...: all one answer
        raise NotACheckpoint(f"{path} is not a loadable Ultralytics checkpoint: {type(exc).__name__}: {exc}") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    names = getattr(model, "names", None)
    if not isinstance(model, torch.nn.Module) or not names:
        raise NotACheckpoint(f"{path} holds no Ultralytics model (no 'model' with class names)")
    task = guess_model_task(model)
    if task != "detect":
        raise NotACheckpoint(f"{path} is a {task} model; training needs a detection model")
    classes = list(names.values()) if isinstance(names, dict) else list(names)
    return {"task": task, "classes": len(classes), "ultralytics": ckpt.get("version")}


def install(source: Path | str, folder: Path | str, name: str | None = None) -> dict:
    """Check ``source`` (:func:`describe_checkpoint`) and copy it to ``folder/<name>`` with its checksum."""
    source = Path(source)
    if not source.is_file():
        raise NotACheckpoint(f"{source} is not a file")
    name = name or source.name
    if Path(name).name != name or not name.endswith(".pt"):
        raise NotACheckpoint(f"the installed name must be a bare .pt file name, not {name!r}")
    info = describe_checkpoint(source)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    with file_lock(_lock_path(folder, name)):
        digest = _publish(source, target, move=False)
    log.info("installed base weights %s (sha256 %s)", target, digest)
    return {"path": str(target), "sha256": digest, **info}


# --- the download, bounded -------------------------------------------------------------------------

def _remove_stale_staging(folder: Path) -> None:
    """Staging folders a killed worker left behind (a live download's is younger than its deadline)."""
    for stale in folder.glob(".download-*"):
        try:
            if time.time() - stale.stat().st_mtime > STALE_STAGING_S:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            continue


def _child_command(name: str, staging: Path) -> list[str]:
    """The download child: this module's ``__main__`` (:func:`_download_child`) in a fresh interpreter."""
    return [sys.executable, "-m", "worker.training.base_model", name, str(staging)]


def _download(name: str, folder: Path, timeout: float) -> tuple[str, str]:
    """Download ``name`` into ``folder`` in a child process killed at ``timeout``: (reason, detail).

    A child, not a thread: a thread stuck in a socket read cannot be stopped, a process can, and the
    kill also ends the stalled connection. It runs in its own session and is killed as a group.
    """
    _remove_stale_staging(folder)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=folder))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.Popen(_child_command(name, staging), cwd=staging, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: nothing it started outlives it
            except ProcessLookupError:  # it ended just now
                pass
            proc.communicate(timeout=REAP_S)
            return "timeout", f"no {name} within YOLO_BASE_DOWNLOAD_TIMEOUT={timeout:g}s"
        last = (output or b"").decode(errors="replace").strip().splitlines()[-1:] or [""]
        detail = last[0][-300:]
        if proc.returncode == 0 and (staging / name).is_file():
            digest = _publish(staging / name, folder / name, move=True)
            return "downloaded", f"sha256 {digest}"
        if proc.returncode == EXIT_UNREACHABLE:
            return "offline", detail
        if proc.returncode == EXIT_INVALID:
            return "invalid_download", detail
        return "error", f"download child exited with {proc.returncode}: {detail}"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download_child(name: str, folder: str) -> int:
    """In the child: Ultralytics' own download to an absolute path, then the restricted-load check."""
    ultralytics_env.prepare()  # YOLO_OFFLINE=1: a failed first attempt raises at once instead of retrying
    from ultralytics.utils.downloads import attempt_download_asset  # heavy: this child exists to run it

    target = Path(folder) / name
    try:
        attempt_download_asset(str(target))  # an absolute path: never into the working directory
    except Exception as exc:
        print(f"download failed: {type(exc).__name__}: {exc}", flush=True)
        return EXIT_UNREACHABLE
    if not target.is_file():
        print(f"download failed: Ultralytics produced no {name}", flush=True)
        return EXIT_UNREACHABLE
    try:
        describe_checkpoint(target)
    except NotACheckpoint as exc:
        print(str(exc), flush=True)
        return EXIT_INVALID
    return 0


# --- the choice ------------------------------------------------------------------------------------

def _fallback(requested: str, reason: str, detail: str) -> BaseModel:
    used = f"{Path(requested).stem}.yaml"
    log.warning("YOLO_BASE_MODEL %s: no pretrained weights (%s: %s); training starts from %s (random init)",
                requested, reason, detail, used)
    BASE_MODEL_FALLBACKS.labels(reason=reason).inc()
    return BaseModel(requested, used, False, reason, detail)


def _check_stored(weights: Path, timeout: float) -> str:
    """``intact``, ``absent`` or ``discarded``: a mismatch is re-checked under the writers' lock, then removed."""
    if is_intact(weights):
        return "intact"
    if not weights.exists() and not checksum_path(weights).exists():
        return "absent"
    with file_lock(_lock_path(weights.parent, weights.name), timeout=timeout):
        if is_intact(weights):  # a writer was publishing it
            return "intact"
        log.warning("discarding %s: its bytes do not match %s", weights, checksum_path(weights).name)
        weights.unlink(missing_ok=True)
        checksum_path(weights).unlink(missing_ok=True)
        return "discarded"


def _official_names() -> frozenset[str]:
    ultralytics_env.prepare()
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES  # heavy: imports ultralytics (training does anyway)

    return GITHUB_ASSETS_NAMES


def obtain_base_model(settings) -> BaseModel:
    """The start of a first training, following the order in the module docstring. Never raises."""
    requested = str(settings.yolo_base_model or "yolo11n.yaml")
    path = Path(requested)
    if path.suffix != ".pt":
        return BaseModel(requested, requested, False, "model_yaml")
    if path.is_file():
        return BaseModel(requested, requested, True, "local_file")
    if path.name != requested:
        return _fallback(requested, "not_downloadable", "a path to a file that does not exist")
    timeout = float(settings.yolo_base_download_timeout)
    folder = Path(settings.model_dir) / BASE_FOLDER
    weights = folder / requested
    try:
        stored = _check_stored(weights, timeout + LOCK_SLACK_S) if folder.is_dir() else "absent"
        if stored == "intact":
            return BaseModel(requested, str(weights), True, "cached")
        discarded = f" (a corrupt {weights} was discarded)" if stored == "discarded" else ""
        bundled = Path(settings.yolo_base_bundled_dir) / requested if settings.yolo_base_bundled_dir else None
        if bundled is not None and is_intact(bundled):
            return BaseModel(requested, str(bundled), True, "bundled")
        if timeout <= 0:
            return _fallback(requested, "download_disabled",
                             f"YOLO_BASE_DOWNLOAD_TIMEOUT=0; install weights with lsb base-model install{discarded}")
        if requested not in _official_names():
            return _fallback(requested, "not_downloadable", f"not an official Ultralytics weights name{discarded}")
        folder.mkdir(parents=True, exist_ok=True)
        with file_lock(_lock_path(folder, requested), timeout=timeout + LOCK_SLACK_S):
            if is_intact(weights):  # another worker downloaded it while this one waited
                return BaseModel(requested, str(weights), True, "cached")
            reason, detail = _download(requested, folder, timeout)
        if reason == "downloaded":
            log.info("downloaded base weights %s (%s)", weights, detail)
            return BaseModel(requested, str(weights), True, reason, detail)
        return _fallback(requested, reason, detail + discarded)
    except LockTimeout as exc:
        return _fallback(requested, "busy", str(exc))
    except Exception as exc:  # an unwritable MODEL_DIR, a full disk...: the training still runs, from the yaml
        log.exception("looking for base weights %s failed", requested)
        return _fallback(requested, "error", f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":  # the download child: python -m worker.training.base_model NAME FOLDER
    sys.exit(_download_child(sys.argv[1], sys.argv[2]))
