"""Where things are, for every test module whatever its depth under tests/."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
#: Requests a real Label Studio 1.23.2 sent to an ML backend, recorded once (the protocol's fixtures).
RECORDED_REQUESTS = FIXTURES / "ls-1.23.2-requests.json"
#: The Redis every test uses (db 15 by default; ``TEST_REDIS_URL`` moves it). Subprocesses get it as REDIS_URL.
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
