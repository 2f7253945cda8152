"""PRELABEL_ON_IMPORT: parsing, refusal at start, the per-project label-config override, the sample."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from backend.core import prelabel_policy as pp
from backend.core.label_config import ProjectConfig
from backend.core.settings import Settings, get_settings

CONFIG = ('<View{attrs}><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
          '<Label value="Car"/></RectangleLabels></View>')


def config(**attrs: str) -> str:
    return CONFIG.format(attrs="".join(f' {k}="{v}"' for k, v in attrs.items()))


def tasks(*ids: int) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in ids]


@pytest.mark.parametrize(("value", "expected"), [
    ("all", pp.Policy("all")), ("none", pp.Policy("none")), (" NONE ", pp.Policy("none")),
    ("sample:10", pp.Policy("sample", 10)), ("Sample:1", pp.Policy("sample", 1)),
])
def test_valid_values_parse(value, expected):
    assert pp.parse(value) == expected
    assert pp.parse(str(expected)) == expected  # str() round-trips (what Settings keeps)


@pytest.mark.parametrize("value", ["", "some", "sample", "sample:", "sample:0", "sample:-3", "sample:1.5",
                                   "sample: 10", "sample:10%", "all,none", "sample:9999999999"])
def test_invalid_values_are_refused_with_what_is_accepted(value):
    with pytest.raises(pp.BadPolicy, match=r"'all', 'none' or 'sample:N'"):
        pp.parse(value)


def test_an_invalid_setting_stops_the_service_at_start(monkeypatch):
    monkeypatch.setenv("PRELABEL_ON_IMPORT", "sample:ten")
    get_settings.cache_clear()
    try:
        with pytest.raises(ValidationError, match=r"PRELABEL_ON_IMPORT must be .*'sample:ten'"):
            get_settings()
        monkeypatch.setenv("PRELABEL_ON_IMPORT", " Sample:25 ")
        get_settings.cache_clear()
        assert get_settings().prelabel_on_import == "sample:25"  # normalised
    finally:
        get_settings.cache_clear()


def test_the_default_keeps_drafting_every_import(monkeypatch):
    monkeypatch.delenv("PRELABEL_ON_IMPORT", raising=False)
    assert Settings().prelabel_on_import == "all"
    decision = pp.decide("3", tasks(1, 2, 3), config(), Settings().prelabel_on_import)
    assert [t["id"] for t in decision.chosen] == [1, 2, 3] and decision.skipped == []


# --- the project's label config --------------------------------------------------------------------

def test_the_project_attribute_wins_over_the_deployment():
    for attr, deployment, expected in (("none", "all", "none"), ("all", "none", "all"), ("sample:2", "all", "sample:2")):
        policy, source, error = pp.effective(config(prelabel_on_import=attr), deployment)
        assert (str(policy), source, error) == (expected, "project", "")
    assert pp.effective(config(), "sample:7")[:2] == (pp.Policy("sample", 7), "deployment")
    assert pp.effective(None, "none")[:2] == (pp.Policy("none"), "deployment")  # an event without the config


def test_only_the_root_view_sets_it_and_the_config_still_parses():
    nested = ('<View><View prelabel_on_import="none"><Image name="image" value="$image"/></View>'
              '<RectangleLabels name="label" toName="image"><Label value="Car"/></RectangleLabels></View>')
    assert pp.project_value(nested) is None
    assert pp.project_value("<View") is None and pp.project_value("") is None  # broken: no policy, no crash
    with_attr = config(prelabel_on_import="sample:5")
    assert ProjectConfig.parse(with_attr).class_names == ["Car"]  # the SDK reads the config as before


def test_an_invalid_project_value_drafts_nothing_and_says_why():
    decision = pp.decide("3", tasks(1, 2), config(prelabel_on_import="sample:lots"), "all")
    assert decision.chosen == [] and [t["id"] for t in decision.skipped] == [1, 2]
    assert decision.source == "project (invalid)" and "sample:lots" in decision.error
    assert decision.summary()["error"] == decision.error


def test_an_event_without_tasks_drafts_the_project_only_under_all():
    assert pp.decide("3", None, config(), "all").chosen is None  # every task lacking a draft
    assert pp.decide("3", None, config(), "sample:5").chosen == []
    assert pp.decide("3", None, config(prelabel_on_import="none"), "all").chosen == []


# --- the sample ------------------------------------------------------------------------------------

def test_the_sample_is_deterministic_and_independent_of_the_order():
    imported = tasks(*range(101, 151))
    first = pp.decide("7", imported, config(), "sample:10")
    assert len(first.chosen) == 10 and len(first.skipped) == 40
    assert {t["id"] for t in first.chosen}.isdisjoint({t["id"] for t in first.skipped})
    shuffled = imported[:]
    random.Random(5).shuffle(shuffled)
    again = pp.decide("7", shuffled, config(), "sample:10")
    assert sorted(t["id"] for t in again.chosen) == sorted(t["id"] for t in first.chosen)
    other_project = pp.decide("8", imported, config(), "sample:10")
    assert {t["id"] for t in other_project.chosen} != {t["id"] for t in first.chosen}  # seeded by the project


def test_the_sample_is_spread_over_the_whole_import():
    ids = list(range(1, 1001))
    chosen = sorted(t["id"] for t in pp.sample("7", tasks(*ids), 10))
    assert len(chosen) == 10
    assert [(c - 1) // 100 for c in chosen] == list(range(10))  # one task in each tenth of the import
    assert chosen != ids[:10] and chosen != ids[::100]  # neither the first N nor every k-th
    # within a run the pick is not always the same position (not "every 100th task")
    assert len({(c - 1) % 100 for c in chosen}) > 3


def test_a_sample_as_large_as_the_import_drafts_all_and_keeps_the_order():
    imported = tasks(5, 3, 9)
    assert pp.sample("7", imported, 3) == imported and pp.sample("7", imported, 50) == imported
    assert [t["id"] for t in pp.sample("7", tasks(*range(1, 21)), 20)] == list(range(1, 21))


def _chunk(first: int, n: int) -> list[dict]:
    return [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"}} for i in range(first, first + n)]


def test_sample_n_counts_per_import_over_the_chunked_events_of_a_large_import(redis15, project_id):
    """Label Studio sends an import of 12 as events of 5, 5 and 2 (WEBHOOK_BATCH_SIZE=5): sample:4 drafts 4 in all."""
    def decide(tasks):
        return pp.decide_import(redis15, str(project_id), tasks, None, "sample:4", chunk_size=5, window_s=60)

    chosen = [decide(_chunk(1, 5)).chosen, decide(_chunk(6, 5)).chosen, decide(_chunk(11, 2)).chosen]
    assert [len(c) for c in chosen] == [2, 1, 1]  # half of what is left per full chunk, the rest in the last one
    assert all(t["id"] in range(1, 6) for t in chosen[0]) and all(t["id"] in range(6, 11) for t in chosen[1])
    # the next import (after a chunk that was not full) gets its own N, and so does an import that starts
    # over with lower ids after a full chunk
    assert len(decide(_chunk(13, 3)).chosen) == 3
    assert len(decide(_chunk(20, 5)).chosen) == 2
    assert len(decide(_chunk(2, 4)).chosen) == 4
    # other policies are per event, as before
    assert pp.decide_import(redis15, str(project_id), _chunk(30, 5), None, "all", 5, 60).chosen == _chunk(30, 5)
