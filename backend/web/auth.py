"""Who may call what: HTTP Basic on every route but /health, a shared secret on /webhook.

Label Studio sends Basic auth (when set on the ML backend) on /setup, /predict and the
START_TRAINING webhook, but never on project event webhooks; those carry the shared secret as
an ``X-Webhook-Secret`` header (set on the LS webhook with PATCH /api/webhooks/{id}) or as a
``?token=`` in the webhook URL. Comparisons are constant-time.
"""

from __future__ import annotations

import hmac

from flask import Request, Response, jsonify, request

from backend.core.settings import Settings
from backend.web.state import current_settings

WEBHOOK_HEADER = "X-Webhook-Secret"
OPEN_ROUTES = {"/health", "/openapi.json"}
WEBHOOK_ROUTES = {"/webhook"}
# Routes that change state accept the webhook secret as well as Basic auth, so they are never open
# when only WEBHOOK_SECRET is configured.
STATE_ROUTES = {"/webhook", "/train", "/prelabel", "/models/rollback"}


def _equal(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


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


def webhook_ok(request: Request, settings: Settings) -> bool:
    """True when the webhook secret matches (header or URL token), or Basic auth matches.

    With neither a secret nor Basic auth configured the route is open (a warning is logged at start).
    """
    secret = settings.webhook_secret.get_secret_value()
    if secret:
        given = request.headers.get(WEBHOOK_HEADER) or request.args.get("token") or ""
        if _equal(given, secret):
            return True
        return settings.basic_auth_enabled and request.authorization is not None and basic_auth_ok(request, settings)
    return basic_auth_ok(request, settings)


def require_credentials() -> Response | None:
    """``before_request`` hook: a 401 unless the route is open or the request carries its credentials.

    Label Studio's webhooks cannot answer a Basic challenge, so ``/webhook`` gets no ``WWW-Authenticate``.
    """
    if request.path in OPEN_ROUTES:
        return None
    settings = current_settings()
    ok = webhook_ok(request, settings) if request.path in STATE_ROUTES else basic_auth_ok(request, settings)
    if ok:
        return None
    response = jsonify(error="unauthorized", message="missing or wrong credentials")
    response.status_code = 401
    if request.path not in WEBHOOK_ROUTES:
        response.headers["WWW-Authenticate"] = 'Basic realm="ml-backend"'
    return response
