"""Fixtures for tests of the image loader's network guard (import them into a test module)."""

from __future__ import annotations

import ipaddress

import pytest
import urllib3

from backend.core import images


@pytest.fixture(autouse=True)
def public_foreign(monkeypatch):
    """127.0.0.2 plays a public internet host; every other loopback address stays private."""
    real = images._is_public
    monkeypatch.setattr(images, "_is_public", lambda ip: ip == ipaddress.ip_address("127.0.0.2") or real(ip))


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
