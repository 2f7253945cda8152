"""Logging set-up: one line per event, and no secret ever reaches a log line."""

from __future__ import annotations

import logging
import re

from backend.core.settings import Settings


class RedactSecrets(logging.Filter):
    """Replaces configured secret values and credential-looking fragments with ``***``."""

    _PATTERNS = [
        re.compile(r"(?i)(authorization['\"]?\s*[:=]?\s*['\"]?(?:bearer|token|basic)\s+)[^\s'\"]+"),
        re.compile(r"(?i)([?&](?:token|key|api_key|access_token)=)[^&\s'\"]+"),
        re.compile(r"(?i)(x-goog-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+"),
    ]

    def __init__(self, secrets: list[str]):
        super().__init__()
        # Longest first: a secret that contains another must not be left half-replaced.
        self.secrets = sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        for pattern in self._PATTERNS:
            text = pattern.sub(r"\1***", text)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = self.redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def secrets_of(settings: Settings) -> list[str]:
    return [
        settings.gemini_api_key.get_secret_value(),
        settings.label_studio_api_key.get_secret_value(),
        settings.basic_auth_pass.get_secret_value(),
        settings.webhook_secret.get_secret_value(),
    ]


def configure_logging(settings: Settings) -> None:
    """Root logging with the redaction filter on every handler (idempotent)."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    redactor = RedactSecrets(secrets_of(settings))
    for handler in root.handlers:
        handler.filters = [f for f in handler.filters if not isinstance(f, RedactSecrets)]
        handler.addFilter(redactor)
    for noisy in ("httpx", "urllib3", "google_genai"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
