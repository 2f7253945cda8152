"""backend.core.registry under concurrency: compare-and-swap promotion, rollback vs prune, disk vs Redis."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_lib

from backend.core import keys
from backend.core import registry as registry_mod
from backend.core.file_lock import file_lock
from backend.core.registry import ModelRegistry, PromotionConflict
from tests.worker_fixtures import ROOT


def _ckpt(tmp_path):
    path = tmp_path / "c.pt"
    if not path.exists():
        path.write_bytes(bytes(range(256)) * 8)
    return path


def _promoted(reg, tmp_path, project, n):
    for _ in range(n):
        reg.promote(project, reg.add_version(project, _ckpt(tmp_path), {}).version)


def test_promote_is_a_compare_and_swap_on_the_starting_version(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    first = reg.add_version(project_id, _ckpt(tmp_path), {})
    reg.promote(project_id, first.version, expected=None)  # nothing was current: the swap succeeds
    second = reg.add_version(project_id, _ckpt(tmp_path), {})
    with pytest.raises(PromotionConflict) as conflict:
        reg.promote(project_id, second.version, expected=None)  # it started when nothing was current
    assert (conflict.value.expected, conflict.value.actual) == (None, "v0001")
    assert "v0002 is kept unpromoted" in str(conflict.value)
    assert reg.current_version(project_id) == "v0001" and redis15.get(keys.model_current(project_id)) == b"v0001"
    assert reg.promote(project_id, second.version, expected="v0001").version == "v0002"
    reg.rollback(project_id)  # back to v0001 while a training that started from v0002 runs
    third = reg.add_version(project_id, _ckpt(tmp_path), {})
    with pytest.raises(PromotionConflict):
        reg.promote(project_id, third.version, expected="v0002")
    assert reg.current_version(project_id) == "v0001"


def _check_current_exists(reg, project, seen: list, errors: list) -> None:
    """Under the registry lock, so a consistent state is read: the current version must exist on disk."""
    with file_lock(reg.model_dir / ".locks" / f"{project}.lock"):  # the registry's own lock file
        current = reg.current_version(project)
        if current is not None and reg.get(project, current) is None:
            errors.append(current)
        seen.append(current)
    time.sleep(0.002)  # let the writers at the lock (flock is not fair)


def test_rollback_racing_prune_always_points_at_an_existing_version(tmp_path, redis15, project_id, monkeypatch):
    reg = ModelRegistry(tmp_path / "models", redis15)
    _promoted(reg, tmp_path, project_id, 4)
    real_write = registry_mod.write_json_atomic
    pause = threading.Event()

    def slow_write(path, doc, **kw):  # widen the window between choosing a version and pointing at it
        pause.wait(0.003)
        return real_write(path, doc, **kw)

    monkeypatch.setattr(registry_mod, "write_json_atomic", slow_write)
    errors: list[str] = []
    seen: list[str | None] = []
    crashed: list[Exception] = []
    stop = threading.Event()
    rng = random.Random(7)

    def rollbacks():
        for _ in range(150):
            names = [v.version for v in reg.versions(project_id)]
            try:
                reg.rollback(project_id, rng.choice([None, *names]))
            except KeyError:
                pass  # the named version was pruned before the rollback got the lock: refused, not dangling
            _check_current_exists(reg, project_id, seen, errors)

    def trainings_and_prunes():
        try:
            while not stop.is_set():
                try:
                    reg.promote(project_id, reg.add_version(project_id, _ckpt(tmp_path), {}).version)
                except KeyError:
                    pass  # the other writer's prune took it first (two trainings of one project: only in this test)
                reg.prune(project_id, keep=1)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            crashed.append(exc)

    def observer():
        while not stop.is_set():
            _check_current_exists(reg, project_id, seen, errors)

    threads = [threading.Thread(target=f) for f in (trainings_and_prunes, trainings_and_prunes, observer)]
    for thread in threads:
        thread.start()
    rollbacks()
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads) and not crashed, crashed
    assert not errors, f"current pointed at deleted versions: {sorted(set(errors))}"
    assert len(seen) >= 150
    current = reg.current_version(project_id)
    assert reg.get(project_id, current) is not None
    assert redis15.get(keys.model_current(project_id)).decode() == current  # Redis follows the disk


_CHILD = """
import random, sys
import redis
from backend.core.registry import ModelRegistry
model_dir, project, role, url = sys.argv[1:5]
reg = ModelRegistry(model_dir, redis.Redis.from_url(url))
rng = random.Random(role)
for i in range(60):
    if role == "rollback":
        names = [v.version for v in reg.versions(project)]
        try:
            reg.rollback(project, rng.choice([None, *names]))
        except KeyError:
            pass
    else:
        try:
            reg.promote(project, reg.add_version(project, sys.argv[5], {}).version)
        except KeyError:
            pass
        reg.prune(project, keep=1)
"""


def test_rollback_and_prune_in_separate_processes(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    _promoted(reg, tmp_path, project_id, 3)
    url = redis15.connection_pool.connection_kwargs
    redis_url = f"redis://{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}/{url.get('db', 15)}"
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path / "models"), str(project_id), role,
                                  redis_url, str(_ckpt(tmp_path))], cwd=ROOT, stderr=subprocess.PIPE)
                for role in ("rollback", "rollback", "train")]
    errors: list[str] = []
    seen: list[str | None] = []
    while any(c.poll() is None for c in children) and len(seen) < 100_000:
        _check_current_exists(reg, project_id, seen, errors)
    for child in children:
        _, err = child.communicate(timeout=120)
        assert child.returncode == 0, err.decode()[-2000:]
    assert not errors, f"current pointed at deleted versions: {sorted(set(errors))}"
    current = reg.current_version(project_id)
    assert reg.get(project_id, current) is not None


# --- disk pointer vs Redis copy ---------------------------------------------------------------------

def test_disk_pointer_wins_over_a_stale_redis_copy_and_reconcile_repairs_it(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    _promoted(reg, tmp_path, project_id, 3)
    redis15.set(keys.model_current(project_id), "v0001")  # Redis restored from an older snapshot
    assert reg.current_version(project_id) == "v0003"  # the disk is the record
    assert reg.reconcile(project_id) == "v0003"
    assert redis15.get(keys.model_current(project_id)) == b"v0003"
    redis15.delete(keys.model_current(project_id))  # flushed
    assert reg.current_version(project_id) == "v0003"
    assert reg.reconcile(project_id) == "v0003" and redis15.get(keys.model_current(project_id)) == b"v0003"
    # no pointer on disk (MODEL_DIR restored without it): Redis's version is adopted if it exists
    (tmp_path / "models" / str(project_id) / "current.json").unlink()
    redis15.set(keys.model_current(project_id), "v0002")
    assert reg.reconcile(project_id) == "v0002"
    assert json.loads((tmp_path / "models" / str(project_id) / "current.json").read_text())["version"] == "v0002"
    redis15.set(keys.model_current(project_id), "v0009")  # names no version: the disk's stays
    assert reg.reconcile(project_id) == "v0002" and redis15.get(keys.model_current(project_id)) == b"v0002"


def test_a_failed_redis_write_after_the_disk_write_is_repaired(tmp_path, redis15, project_id):
    reg = ModelRegistry(tmp_path / "models", redis15)
    _promoted(reg, tmp_path, project_id, 1)
    v2 = reg.add_version(project_id, _ckpt(tmp_path), {})
    down = ModelRegistry(tmp_path / "models", redis_lib.Redis.from_url("redis://127.0.0.1:1/15", socket_connect_timeout=0.2))
    assert down.promote(project_id, v2.version).version == "v0002"  # the disk took it; Redis did not
    assert redis15.get(keys.model_current(project_id)) == b"v0001"
    assert reg.current_version(project_id) == "v0002"
    assert reg.reconcile(project_id) == "v0002" and redis15.get(keys.model_current(project_id)) == b"v0002"
