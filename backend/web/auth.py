"""Who may call what: with any credential configured, every route but /health and /openapi.json needs one.

Two credentials, each optional: HTTP Basic auth (``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``) and the shared
``WEBHOOK_SECRET``, given as an ``X-Webhook-Secret`` header or a ``?token=`` query parameter. A request
passes when it carries any configured one; with neither configured every route is open (a warning is
logged at start). Label Studio sends only Basic auth, on /setup, /predict, /versions and the
START_TRAINING webhook, and drops a ``?token=`` written into the model URL (it joins route names onto
the URL); its event webhooks carry no Basic auth, so they carry the secret (header set on the webhook
with PATCH /api/webhooks/{id}, or ``?token=`` in the webhook URL, which it keeps). See
docs/label-studio.md#authentication. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac

from flask import Request, Response, jsonify, request

from backend.core.settings import Settings
from backend.web.state import current_settings

WEBHOOK_HEADER = "X-Webhook-Secret"
OPEN_ROUTES = {"/health", "/openapi.json"}
# Label Studio's event webhooks cannot answer a Basic challenge: their 401 has no WWW-Authenticate.
WEBHOOK_ROUTES = {"/webhook"}


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def credentials_configured(settings: Settings) -> bool:
    """True when Basic auth or the webhook secret is set: then every route but the open ones is closed."""
    return settings.basic_auth_enabled or bool(settings.webhook_secret.get_secret_value())


def basic_auth_ok(request: Request, settings: Settings) -> bool:
    """True when Basic auth is off or the request carries the configured user and password."""
    if not settings.basic_auth_enabled:
        return True
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user_ok = _equal(auth.username or "", settings.basic_auth_user)
    pass_ok = _equal(auth.password or "", settings.basic_auth_pass.get_secret_value())
    return user_ok and pass_ok


def credentials_ok(request: Request, settings: Settings) -> bool:
    """True when no credential is configured, or the request carries one that is (the secret, else Basic).

    The secret is compared first (a missing one as ""), then Basic auth only if configured and sent.
    """
    if not credentials_configured(settings):
        return True
    secret = settings.webhook_secret.get_secret_value()
    if secret:
        given = request.headers.get(WEBHOOK_HEADER) or request.args.get("token") or ""
        if _equal(given, secret):
            return True
    return settings.basic_auth_enabled and request.authorization is not None and basic_auth_ok(request, settings)


def require_credentials() -> Response | None:
    """``before_request`` hook: a 401 unless the route is open or the request carries a configured credential."""
    if request.path in OPEN_ROUTES or credentials_ok(request, current_settings()):
        return None
    response = jsonify(error="unauthorized", message="missing or wrong credentials")
    response.status_code = 401
    if request.path not in WEBHOOK_ROUTES:
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
    return response
