"""Fixtures for tests of the image loader's network guard (registered by tests/conftest.py).

A module whose tests all need 127.0.0.2 as a public host says ``pytestmark = pytest.mark.usefixtures("public_foreign")``.
"""

from __future__ import annotations

import ipaddress

import pytest
import urllib3

from backend.core.images import ssrf


@pytest.fixture
def public_foreign(monkeypatch):
    """127.0.0.2 plays a public internet host; every other loopback address stays private."""
    real = ssrf.is_public
    monkeypatch.setattr(ssrf, "is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.2") or real(ip))


@pytest.fixture
def connections(monkeypatch) -> list[tuple]:
    """Every TCP connection urllib3 opens, to prove refused URLs never connect."""
    seen: list[tuple] = []
    real = urllib3.util.connection.create_connection

    def spy(address, *args, **kwargs):
        seen.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", spy)
    return seen
