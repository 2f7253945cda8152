"""backend.core.keys: the key layout is data, so the exact strings are pinned here."""

from __future__ import annotations

import pytest

from backend.core import keys
from backend.core.keys import Keys


def test_project_key():
    assert keys.project_key("2.1795306664") == "2"
    assert keys.project_key(7) == "7"
    for bad in ("../etc", "²", "1" * 19, ""):
        with pytest.raises(ValueError):
            keys.project_key(bad)


def test_project_key_is_canonical_decimal():
    """Label Studio reads ids as integers: "02", "002", 2 and "02.1795306664" are one project, one key."""
    for same in ("2", "02", "002", 2, " 2 ", "02.1795306664", "0000000000000000000002"):
        assert keys.project_key(same) == "2", same
    assert keys.train_running("02") == keys.train_running(2) == "lsb:train:2:running"
    assert keys.project_key("10") == "10" and keys.project_key("010.5") == "10"
    for bad in ("0", "00", "-2", "+2", "2.", ".2", "2.5.1", "2.x", "2a", "0x2", "2 3", "٢", "1_000", None, True, 2.0, [2]):
        with pytest.raises(ValueError, match="not a Label Studio project id"):
            keys.project_key(bad)


def test_project_keys_are_the_stored_strings():
    assert keys.train_pending("3.17") == "lsb:train:3:pending"
    assert keys.train_running(3) == "lsb:train:3:running"
    assert keys.train_force(3) == "lsb:train:3:force"
    assert keys.train_events(3) == "lsb:train:3:events"
    assert keys.train_last(3) == "lsb:train:3:last"
    assert keys.model_current(3) == "lsb:model:3:current"
    assert keys.quality(3) == "lsb:quality:3"
    assert Keys.MODELS_CHANNEL == "lsb:models"
    with pytest.raises(ValueError):
        keys.train_pending("3:*")  # a key is never built from an unchecked id


def test_gemini_keys_and_patterns():
    assert keys.gemini_answers() == "lsb:gemini:answer"
    assert keys.gemini_spend("test:x") == "test:x:spend"
    assert keys.gemini_breaker() == "lsb:gemini:breaker"
    assert Keys.ANSWER.format(prefix=keys.gemini_answers(), digest="ab") == "lsb:gemini:answer:ab"
    assert keys.gemini_patterns() == ["lsb:gemini:answer*", "lsb:gemini:breaker*", "lsb:gemini:spend*"]


def test_project_patterns_match_only_that_project():
    from fnmatch import fnmatchcase

    patterns = keys.project_patterns(12)
    mine = [keys.train_pending(12), keys.train_last(12), keys.model_current(12), keys.quality(12)]
    others = [keys.train_pending(123), keys.quality(112), "lsb:gemini:answer:12ab"]
    assert all(any(fnmatchcase(k, p) for p in patterns) for k in mine)
    assert not any(fnmatchcase(k, p) for k in others for p in patterns)
