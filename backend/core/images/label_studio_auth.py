"""The ``Authorization`` header for Label Studio media, PAT refresh included, and where it may go.

The token opens Label Studio's whole API, and task data chooses the URLs we fetch, so it goes only
to the paths where Label Studio serves media (:func:`is_media_path`): ``/data/upload/``,
``/data/local-files/`` and ``/tasks/<id>/presign/``, on the Label Studio origin. Any other path on
that host is fetched without it. :mod:`backend.core.images.download` applies the rule hop by hop.
"""

from __future__ import annotations

import re
import threading
from typing import Any
from urllib.parse import unquote

from backend.core.images.errors import ImageError

_MEDIA = re.compile(r"/data/upload/[^/].*|/data/local-files(/.*)?|/tasks/[0-9]+/presign/?", re.DOTALL)
_DOT_SEGMENTS = (".", "..")


def is_media_path(path: str, base: str = "") -> bool:
    """True if the URL path ``path`` is a Label Studio media path under its base path ``base``
    (the path of LABEL_STUDIO_URL, "" at the root).

    Matched after percent-decoding until stable, and only on canonical paths: a path with ``.`` or
    ``..`` segments (also ``..;``, ``%2e%2e``, ``%252e``), empty segments (``//``), backslashes or
    control characters never counts as media, whatever it would resolve to, because a proxy or
    server in front of Label Studio may resolve it differently (``/data/upload/../../api/users``).
    """
    decoded = path
    for _ in range(4):
        step = unquote(decoded)
        if step == decoded:
            break
        decoded = step
    else:
        return False  # still encoded after four rounds: no media URL is encoded that deep
    if not decoded.startswith("/") or "\\" in decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return False
    segments = decoded.split("/")[1:]
    if any(not s for s in segments[:-1]) or any(s.split(";", 1)[0] in _DOT_SEGMENTS for s in segments):
        return False
    base = base.rstrip("/")
    if base:
        if not decoded.startswith(base + "/"):
            return False
        decoded = decoded[len(base):]
    return _MEDIA.fullmatch(decoded) is not None


class LabelStudioAuth:
    """The ``Authorization`` value for Label Studio, computed by label-studio-sdk.

    The SDK's client decides Token (legacy key) vs Bearer (PAT = JWT refresh token), exchanges the
    PAT at /api/token/refresh/ and refreshes the 300 s access token when it expires, under a lock.
    We reuse that instead of re-implementing JWT handling; the SDK exposes the header only through
    ``_client_wrapper.get_headers()``. A 401 despite a fresh-looking token (clock skew, revoked
    token) drops the client so the next call refreshes.
    """

    def __init__(self, base_url: str, api_key: str, timeout: float) -> None:
        self._base_url, self._api_key, self._timeout = base_url, api_key, timeout
        self._lock = threading.Lock()
        self._client: Any = None
        self._http: Any = None

    def header(self) -> tuple[str, object]:
        """(header value, generation); pass the generation to :meth:`invalidate` after a 401."""
        import httpx  # lazy, like the SDK client below: only needed once an API key is set
        from label_studio_sdk import LabelStudio  # lazy: the SDK client costs ~0.5 s to import
        from label_studio_sdk.core.api_error import ApiError  # lazy, with the client

        try:
            with self._lock:
                if self._client is None:
                    if self._http is None:
                        self._http = httpx.Client(timeout=self._timeout, follow_redirects=False, trust_env=False)
                    # Trailing slash: the SDK urljoins "api/token/refresh/" onto the base URL.
                    self._client = LabelStudio(base_url=self._base_url + "/", api_key=self._api_key,
                                               httpx_client=self._http, timeout=self._timeout)
                client = self._client
            return client._client_wrapper.get_headers()["Authorization"], client
        except ApiError as exc:
            raise ImageError("http_error", f"Label Studio refused the API key (HTTP {exc.status_code}): "
                                           "check LABEL_STUDIO_API_KEY") from None
        except httpx.TimeoutException:
            raise ImageError("timeout", "Label Studio token refresh timed out") from None
        except (httpx.HTTPError, ValueError) as exc:
            raise ImageError("http_error", f"Label Studio token refresh failed ({type(exc).__name__})") from None

    def invalidate(self, generation: object) -> None:
        """Forget the client (and its access token) if no other thread replaced it already."""
        with self._lock:
            if self._client is generation:
                self._client = None

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
