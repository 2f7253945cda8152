"""The one exception the image package raises, with a stable reason code."""

from __future__ import annotations


class ImageError(Exception):
    """Why an image could not be used. ``reason`` is a stable code for metrics and task notes:
    forbidden_url, not_found, too_large, timeout, http_error, not_an_image, unsupported_format,
    decode_error, bomb. ``message`` is human-readable and never contains credentials."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
