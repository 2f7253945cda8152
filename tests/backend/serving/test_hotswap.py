"""Hot-swap in one process: a promoted version replaces the served model without a restart."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
import redis

from backend.core.keys import Keys, model_current
from backend.core.registry import ModelRegistry
from backend.core.settings import Settings
from backend.serving.hotswap import ModelHolder
from tests.live import wait_for
from tests.models import make_checkpoint


@pytest.fixture
def project() -> str:
    return str(900000 + uuid.uuid4().int % 99999)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return [make_checkpoint(root / f"m{i}.pt", ["Car", "Person"], seed=i) for i in range(2)]


@pytest.fixture
def holder_and_registry(tmp_path, redis_url):
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, hotswap_poll_seconds=0.2)
    registry = ModelRegistry(settings.model_dir, redis.Redis.from_url(redis_url))
    holder = ModelHolder(settings, registry)
    yield holder, registry
    holder.stop()


def test_no_model_until_one_is_promoted(holder_and_registry, project):
    holder, _ = holder_and_registry
    assert holder.get(project) is None
    assert holder.version(project) is None


def test_promotion_is_picked_up_without_a_request(holder_and_registry, checkpoints, project):
    holder, registry = holder_and_registry
    v1 = registry.add_version(project, checkpoints[0], {"classes": ["Car", "Person"]})
    registry.promote(project, v1.version)
    first = holder.get(project)
    assert first is not None and first.version == "v0001"

    v2 = registry.add_version(project, checkpoints[1], {"classes": ["Car", "Person"]})
    registry.promote(project, v2.version)
    # The background watcher loads v0002 while v0001 keeps serving; nobody calls get() meanwhile.
    assert wait_for(lambda: holder.loaded().get(project) == "v0002")
    assert holder.get(project).version == "v0002"
    assert holder.version(project) == "v0002"


def test_unloadable_version_keeps_the_old_model(holder_and_registry, checkpoints, project, tmp_path):
    holder, registry = holder_and_registry
    v1 = registry.add_version(project, checkpoints[0], {})
    registry.promote(project, v1.version)
    assert holder.get(project).version == "v0001"
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    v2 = registry.add_version(project, broken, {})
    registry.promote(project, v2.version)
    time.sleep(1.0)  # several watcher rounds
    assert holder.get(project).version == "v0001"
    assert holder.loaded()[project] == "v0001"


def test_version_does_not_load_synchronously(holder_and_registry, checkpoints, project):
    holder, registry = holder_and_registry
    v1 = registry.add_version(project, checkpoints[0], {})
    registry.promote(project, v1.version)
    # /setup asks for the version: it answers from the registry and the load happens in the background.
    assert holder.version(project) == "v0001"
    assert wait_for(lambda: holder.loaded().get(project) == "v0001")


def test_fixed_model_from_settings(tmp_path, redis_url, checkpoints):
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, yolo_model=str(checkpoints[0]))
    holder = ModelHolder(settings, ModelRegistry(settings.model_dir, None))
    assert holder.get("5").version == "custom-m0"
    assert holder.version("123.456") == "custom-m0"


def test_stop_ends_the_watcher_threads(holder_and_registry, checkpoints, project):
    holder, registry = holder_and_registry
    registry.promote(project, registry.add_version(project, checkpoints[0], {"classes": ["Car", "Person"]}).version)
    assert holder.get(project) is not None
    threads = [holder._thread, holder._listener]
    assert all(t is not None and t.is_alive() for t in threads)
    holder.stop()
    holder.join(timeout=10)
    assert not any(t.is_alive() for t in threads)



def test_per_project_state_is_bounded_for_10000_project_ids(tmp_path, redis_url, checkpoints):
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, hotswap_poll_seconds=0.2, model_cache_size=3)
    registry = ModelRegistry(settings.model_dir, redis.Redis.from_url(redis_url))
    holder = ModelHolder(settings, registry)
    base = 700000 + uuid.uuid4().int % 99999 * 20000
    served = str(base)
    registry.promote(served, registry.add_version(served, checkpoints[0], {"classes": ["Car", "Person"]}).version)
    try:
        first = holder.get(served)
        assert first is not None and holder.loaded() == {served: "v0001"}
        for i in range(1, 10_001):  # /setup for ever new project ids
            assert holder.version(str(base + i)) is None
            if i % 1000 == 0:
                assert len(holder._load_locks) <= 3 and len(holder._models) <= 3
        assert len(holder._load_locks) <= 3 and len(holder._models) <= 3 and len(holder._failed) <= 3
        assert served not in holder.loaded(), "the least recently asked project was dropped"
        again = holder.get(served)  # and is loaded again when it is asked for
        assert again is not None and again.version == "v0001" and holder.loaded()[served] == "v0001"
    finally:
        holder.stop()


def test_model_path_checkpoints_are_a_bounded_lru(tmp_path, redis_url, checkpoints):
    settings = Settings(model_dir=tmp_path / "models", redis_url=redis_url, model_cache_size=2)
    settings.model_dir.mkdir(parents=True)
    for name in ("a", "b", "c"):
        (settings.model_dir / f"{name}.pt").write_bytes(checkpoints[0].read_bytes())
    holder = ModelHolder(settings, ModelRegistry(settings.model_dir, redis.Redis.from_url(redis_url)))
    try:
        a = holder.for_path("a.pt")
        holder.for_path("b.pt")
        assert holder.for_path("a.pt") is a  # a hit: a is now the most recently used
        holder.for_path("c.pt")
        assert sorted(p.name for p in holder._by_path) == ["a.pt", "c.pt"]
        assert holder.for_path("a.pt") is a
    finally:
        holder.stop()


def test_a_project_whose_versions_are_removed_stops_being_served(holder_and_registry, checkpoints, project):
    """After a deleted project's cleanup removes its models, no process keeps serving the loaded one."""
    holder, registry = holder_and_registry
    v1 = registry.add_version(project, checkpoints[0], {"classes": ["Car", "Person"]})
    registry.promote(project, v1.version)
    assert holder.get(project).version == "v0001"
    shutil.rmtree(registry.model_dir / project)  # what worker.jobs.cleanup does after the grace period
    registry.redis.delete(model_current(project))
    assert wait_for(lambda: project not in holder.loaded())  # the watcher drops it without a request
    assert holder.get(project) is None and holder.version(project) is None


# --- preloading a candidate before its promotion ------------------------------------------------------

def _subscribed(holder) -> bool:
    """The holder's listener is on the candidate channel (it starts with the first request)."""
    return holder._listener is not None and holder._listener.is_alive() and \
        holder.registry.redis.pubsub_numsub(Keys.CANDIDATES_CHANNEL)[0][1] >= 1


def test_a_preloaded_candidate_is_promoted_without_loading(holder_and_registry, checkpoints, project, monkeypatch):
    holder, registry = holder_and_registry
    registry.promote(project, registry.add_version(project, checkpoints[0], {}).version)
    assert holder.get(project).version == "v0001"
    assert wait_for(lambda: _subscribed(holder))
    v2 = registry.add_version(project, checkpoints[1], {})

    preload = registry.preload(project, v2.version, timeout=30)
    assert registry.candidate_acks(project, v2.version)[holder.process_id] == "loaded"
    assert preload["loaded"] >= 1 and not preload["timed_out"]
    assert holder.candidates() == {project: "v0002"} and holder.loaded()[project] == "v0001"
    candidate = holder._candidates[project][0]

    def no_loading(*_args):
        raise AssertionError("the promotion loaded a model: it should have been preloaded")

    monkeypatch.setattr(holder, "_load", no_loading)
    registry.promote(project, v2.version)
    assert wait_for(lambda: holder.loaded().get(project) == "v0002")
    assert holder.get(project) is candidate and holder.candidates() == {}


def test_a_candidate_never_promoted_is_dropped_and_serving_is_untouched(holder_and_registry, checkpoints, project):
    holder, registry = holder_and_registry
    registry.promote(project, registry.add_version(project, checkpoints[0], {}).version)
    served = holder.get(project)
    assert wait_for(lambda: _subscribed(holder))
    v2 = registry.add_version(project, checkpoints[1], {})
    assert registry.preload(project, v2.version, timeout=30)["loaded"] >= 1
    assert holder.candidates() == {project: "v0002"}
    # the training crashed (or lost its compare-and-swap): nobody promotes v0002
    holder.candidate_ttl = 0.5
    assert wait_for(lambda: holder.candidates() == {})  # the watcher drops it by itself
    assert holder.get(project) is served and holder.loaded()[project] == "v0001"
    # a later promotion of it still works, by loading it then
    registry.promote(project, v2.version)
    assert wait_for(lambda: holder.loaded().get(project) == "v0002")


def test_a_candidate_of_a_project_not_served_here_is_acknowledged_without_loading(holder_and_registry, checkpoints,
                                                                                   project):
    holder, registry = holder_and_registry
    registry.promote(project, registry.add_version(project, checkpoints[0], {}).version)
    assert holder.get(project) is not None and wait_for(lambda: _subscribed(holder))
    other = str(int(project) + 1)
    v1 = registry.add_version(other, checkpoints[1], {})
    assert registry.preload(other, v1.version, timeout=30)["timed_out"] is False
    assert registry.candidate_acks(other, v1.version)[holder.process_id] == "skipped"
    assert holder.candidates() == {}
    assert registry.preload(other, v1.version, timeout=0)["listeners"] == 0  # 0: promote at once, announce nothing
