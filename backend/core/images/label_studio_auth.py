"""The ``Authorization`` header for Label Studio media, PAT refresh included.

Credentials go only to the Label Studio origin; which requests get this header is decided by
:mod:`backend.core.images.download` (only while a redirect chain that started on Label Studio stays
there).
"""

from __future__ import annotations

import threading
from typing import Any

from backend.core.images.errors import ImageError


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
