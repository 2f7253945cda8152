"""Logging set-up: one line per event, and no secret ever reaches a log line."""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import quote

from gunicorn import glogging
from pydantic import ValidationError

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


#: Where the secrets come from when the settings do not load (gunicorn's master starts before they are checked).
SECRET_VARIABLES = ("GEMINI_API_KEY", "GOOGLE_API_KEY", "LABEL_STUDIO_API_KEY", "BASIC_AUTH_PASS", "WEBHOOK_SECRET")


def secrets_from_environment() -> list[str]:
    """Every configured secret, as the settings read it and as the environment spells it."""
    found = [os.environ.get(name, "") for name in SECRET_VARIABLES]
    try:
        found += secrets_of(Settings())
    except ValidationError:  # e.g. the .env.example placeholder: the app refuses to start, the master still logs
        pass
    return found


def spellings(secrets: list[str]) -> list[str]:
    """Each secret as it can appear in a request line: as is, percent-encoded, and as WSGI's latin-1 PATH_INFO."""
    out = []
    for secret in filter(None, secrets):
        out += [secret, quote(secret, safe=""), quote(secret), secret.encode().decode("latin-1")]
    return list(dict.fromkeys(out))


class GunicornLogger(glogging.Logger):
    """gunicorn's logger with :class:`RedactSecrets` on its error and access logs (``logger_class`` in gunicorn.conf.py).

    The access line holds what the caller chose (path, user agent): a request to ``/webhook/<secret>``
    would print the secret, since the path is logged and the secret may arrive as a path segment by
    mistake. The error log repeats malformed request lines. ``setup`` runs again on a reload (HUP).
    """

    def setup(self, cfg) -> None:
        super().setup(cfg)
        redactor = RedactSecrets(spellings(secrets_from_environment()))
        for logger in (self.error_log, self.access_log):
            logger.filters = [f for f in logger.filters if not isinstance(f, RedactSecrets)]
            logger.addFilter(redactor)


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
