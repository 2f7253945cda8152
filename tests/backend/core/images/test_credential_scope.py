"""Label Studio's token goes only to its media paths; any other path on its host is fetched without it.

The fake Label Studio records the Authorization header of every request. Paths are matched after
percent-decoding, and a path that is not canonical (dot segments, ``//``, backslashes) never
counts as media, whatever it resolves to.
"""

from __future__ import annotations

import pytest

from backend.core.images import ImageError
from backend.core.images.label_studio_auth import is_media_path
from tests.backend.core.images.helpers import LEGACY, encode, reason_of, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")

TOKEN = f"Token {LEGACY}"

MEDIA = ["/data/upload/1/a.png", "/data/upload/12/a%20b.png", "/data/local-files/", "/data/local-files",
         "/tasks/7/presign/", "/tasks/7/presign"]
NOT_MEDIA = [
    "/api/users", "/api/projects", "/api/projects/1/export", "/", "", "data/upload/1/a.png",
    "/data/upload/", "/data/uploads/1/a.png", "/data/upload", "/tasks/x/presign/", "/tasks/7/presign/extra",
    "/api/data/upload/1/a.png", "/tasks/7/presign/../../../api/users",
    # dot segments, literal and encoded once, twice, mixed; Tomcat-style "..;"
    "/data/upload/../../api/users", "/data/upload/1/../../../api/users", "/data/upload/./../api/users",
    "/data/upload/%2e%2e/%2e%2e/api/users", "/data/upload/%2E%2E/%2E%2E/api/users", "/data/upload/.%2e/.%2e/api/users",
    "/data/upload/%252e%252e/%252e%252e/api/users", "/data/upload/%25252e%25252e/api/users",
    "/data/upload/..;/..;/api/users", "/data/upload/..%3b/api/users",
    # encoded slashes and backslashes, empty segments, control characters
    "/data/upload/..%2f..%2fapi/users", "/data/upload/%2fapi/users", "/data/upload/1\\..\\..\\api\\users",
    "/data/upload/1%5c..%5c..%5capi/users", "//data/upload/1/a.png", "/data//upload/1/a.png",
    "/data/upload//../api/users", "/data/upload/1/a.png%00", "/data/upload/1/a%0a.png",
]


@pytest.mark.parametrize("path", MEDIA)
def test_media_paths(path):
    assert is_media_path(path)
    assert is_media_path("/ls" + path, "/ls") and is_media_path("/ls" + path, "/ls/")
    assert not is_media_path(path, "/ls"), "outside LABEL_STUDIO_URL's base path"


@pytest.mark.parametrize("path", NOT_MEDIA)
def test_other_paths_and_normalisation_tricks_are_not_media(path):
    assert not is_media_path(path)
    assert not is_media_path("/ls" + path, "/ls")


def test_token_goes_to_media_paths_only(make_loader, ls):
    """Label Studio open here (it answers without credentials), so every fetch succeeds and the
    recorded headers show exactly where the token went."""
    image = (encode(red_blue()), "image/png")
    for path in ("/data/upload/1/a.png", "/data/local-files/?d=images/a.png", "/api/users", "/api/projects",
                 "/api/projects/1/export?exportType=JSON", "/user/account/"):
        ls.files[path] = image
    ls.presign_location = lambda uri: "/data/upload/1/a.png"
    loader = make_loader(label_studio_api_key=LEGACY)
    for url in ("/data/upload/1/a.png", "/data/local-files/?d=images/a.png", "/api/users", f"{ls.url}/api/projects",
                "/api/projects/1/export?exportType=JSON", "/user/account/"):
        assert loader.load(url).width == 40, url
    loader._cache = None
    assert loader.load("s3://bucket/a.png", task_id=7).width == 40
    seen = [(path.split("?")[0], headers.get("Authorization")) for _, path, headers in ls.requests]
    assert seen == [("/data/upload/1/a.png", TOKEN), ("/data/local-files/", TOKEN), ("/api/users", None),
                    ("/api/projects", None), ("/api/projects/1/export", None), ("/user/account/", None),
                    ("/tasks/7/presign/", TOKEN), ("/data/upload/1/a.png", TOKEN)]


@pytest.mark.parametrize("path", [p for p in NOT_MEDIA if p.startswith("/data/upload/") or p.startswith("/tasks/")])
def test_normalisation_tricks_reach_label_studio_without_the_token(make_loader, ls, path):
    """Fetched (not refused), anonymously: Label Studio answers 401 or 404, never with its API."""
    ls.auth = {TOKEN}
    reason = reason_of(make_loader(label_studio_api_key=LEGACY), path)
    assert reason in ("http_error", "not_found")
    assert ls.requests, "the URL was fetched, without credentials"
    assert ls.auth_headers() == [None] * len(ls.requests)


def test_an_api_path_without_the_token_fails_with_the_reason(make_loader, ls):
    ls.auth = {TOKEN}
    with pytest.raises(ImageError) as info:
        make_loader(label_studio_api_key=LEGACY).load("/api/users")
    assert info.value.reason == "http_error" and "only to media paths" in info.value.message
    assert ls.auth_headers() == [None]


def test_a_label_studio_under_a_base_path(make_loader, ls):
    ls.files["/ls/data/upload/1/a.png"] = ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    loader = make_loader(label_studio_url=f"{ls.url}/ls", label_studio_api_key=LEGACY)
    assert loader.load("/data/upload/1/a.png").width == 40  # relative: under the base path
    assert loader.load(f"{ls.url}/data/upload/1/a.png").width == 40  # the same host, outside the base path
    assert [(p, h.get("Authorization")) for _, p, h in ls.requests] == [("/ls/data/upload/1/a.png", TOKEN),
                                                                          ("/data/upload/1/a.png", None)]
