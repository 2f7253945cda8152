"""Fixtures of the image package's tests: two fake servers on loopback and a loader factory.

"Label Studio" runs on 127.0.0.1 and a "foreign host" on 127.0.0.2. The loader refuses loopback
addresses, so these tests treat 127.0.0.2 as if it were a public internet address (``public_foreign``
patches the address classifier); everything on 127.0.0.1 other than the Label Studio port stays
private, as do 169.254.169.254, ::1, localhost.
"""

from __future__ import annotations

import pytest

from backend.core.images import ImageLoader
from backend.core.settings import Settings
from tests.backend.core.images.helpers import LEGACY, FakeServer


@pytest.fixture(scope="module")
def servers():
    ls, foreign = FakeServer("127.0.0.1"), FakeServer("127.0.0.2")
    yield ls, foreign
    ls.httpd.shutdown()
    foreign.httpd.shutdown()


@pytest.fixture
def ls(servers) -> FakeServer:
    servers[0].reset()
    return servers[0]


@pytest.fixture
def foreign(servers) -> FakeServer:
    servers[1].reset()
    return servers[1]


@pytest.fixture
def make_loader(tmp_path, ls):
    loaders: list[ImageLoader] = []

    def make(**overrides) -> ImageLoader:
        values = dict(label_studio_url=ls.url, label_studio_api_key=LEGACY, data_dir=tmp_path / "data",
                      image_allowed_hosts="127.0.0.2", image_allow_private=False, image_fetch_timeout=5.0,
                      image_max_bytes=5_000_000, image_max_pixels=50_000_000, local_files_document_root="")
        values.update(overrides)
        loader = ImageLoader(Settings(**values))
        loaders.append(loader)
        return loader

    yield make
    for loader in loaders:
        loader.close()
