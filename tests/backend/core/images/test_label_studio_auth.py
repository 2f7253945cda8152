"""Label Studio credentials: legacy token, PAT exchange and refresh, clear errors, never leaked."""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
from PIL import Image

from backend.core.images import ImageError
from tests.backend.core.images.helpers import LEGACY, PAT, SECRET, close, encode, red_blue

# Every test here sees 127.0.0.2 as a public host (tests/network_fixtures.py, registered by tests/conftest.py).
pytestmark = pytest.mark.usefixtures("public_foreign")


def test_ls_upload_with_legacy_token(make_loader, ls):
    data = encode(red_blue())
    ls.auth = {f"Token {LEGACY}"}
    ls.files["/data/upload/1/a.png"] = (data, "image/png")
    loader = make_loader(label_studio_api_key=LEGACY)
    for url in ("/data/upload/1/a.png", f"{ls.url}/data/upload/1/a.png"):
        loaded = loader.load(url, 1)
        assert (loaded.width, loaded.height) == (40, 20) and loaded.image.mode == "RGB"
        assert loaded.sha256 == hashlib.sha256(data).hexdigest() and loaded.data == data
        assert close(loaded.image.getpixel((0, 0)), (255, 0, 0))
    assert ls.auth_headers()[0] == f"Token {LEGACY}"
    assert ls.refreshes == 0


def test_ls_upload_with_pat_refreshes_once_and_after_401(make_loader, ls):
    ls.auth = set()
    for i in range(12):
        ls.files[f"/data/upload/1/{i}.png"] = (encode(Image.new("RGB", (8, 8), (i, 0, 0))), "image/png")
    loader = make_loader(label_studio_api_key=PAT)
    with ThreadPoolExecutor(8) as pool:
        loaded = list(pool.map(lambda i: loader.load(f"/data/upload/1/{i}.png", 1), range(12)))
    assert [im.image.getpixel((0, 0))[0] for im in loaded] == list(range(12))
    assert ls.refreshes == 1, "one exchange of the PAT for the whole pool"
    gets = [h for m, _, h in ls.requests if m == "GET"]
    assert all(h["Authorization"].startswith("Bearer ") and PAT not in h["Authorization"] for h in gets)
    refresh = next(h for m, p, h in ls.requests if m == "POST")
    assert "Authorization" not in refresh

    ls.auth.clear()  # LS no longer accepts the cached access token (revoked / clock skew)
    ls.files["/data/upload/1/new.png"] = (encode(red_blue()), "image/png")
    assert loader.load("/data/upload/1/new.png", 1).width == 40
    assert ls.refreshes == 2
    assert ls.auth_headers()[-2] != ls.auth_headers()[-1]  # 401, then the new token


def test_expired_pat_is_a_clear_error(make_loader, ls):
    expired = jwt.encode({"token_type": "refresh", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256")
    ls.auth = set()
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    with pytest.raises(ImageError) as info:
        make_loader(label_studio_api_key=expired).load("/data/upload/1/a.png")
    assert info.value.reason == "http_error" and "API key" in info.value.message
    assert expired not in str(info.value)


def test_ls_login_redirect_names_the_key(make_loader, ls):
    ls.redirects["/data/upload/1/a.png"] = "/user/login/?next=/data/upload/1/a.png"
    ls.files["/user/login/"] = (b"<html>login</html>", "text/html")
    with pytest.raises(ImageError) as info:
        make_loader().load("/data/upload/1/a.png")
    assert info.value.reason == "http_error" and "LABEL_STUDIO_API_KEY" in info.value.message


def test_logs_and_errors_never_contain_credentials(make_loader, ls, foreign, caplog):
    caplog.set_level(logging.DEBUG)
    ls.auth = set()
    ls.files["/data/upload/1/a.png"] = (encode(red_blue()), "image/png")
    ls.redirects["/data/upload/1/moved.png"] = f"{foreign.url}/missing.png?sig=1"
    messages = []
    loader = make_loader(label_studio_api_key=PAT)
    loader.load("/data/upload/1/a.png")
    for url in ("/data/upload/1/moved.png", "/data/upload/1/none.png", "http://169.254.169.254/"):
        with pytest.raises(ImageError) as info:
            loader.load(url)
        messages.append(str(info.value))
    access = [h.split()[1] for h in ls.auth]
    legacy = make_loader(label_studio_api_key=LEGACY)
    with pytest.raises(ImageError) as info:
        legacy.load("/data/upload/1/b.png")  # 401 for the legacy key here
    messages.append(str(info.value))
    text = caplog.text + "\n".join(messages)
    assert caplog.text
    for secret in (PAT, LEGACY, *access):
        assert secret not in text
