"""backend.web.auth: with any credential configured (Basic auth or the webhook secret), every route but
/health and /openapi.json needs one of them."""

from __future__ import annotations

import base64
import hmac as real_hmac

import pytest
from flask import Flask, request
from pydantic import ValidationError

from backend.core.settings import Settings
from backend.web import auth, state

REAL_COMPARE = real_hmac.compare_digest


def make_settings(user: str = "", password: str = "", secret: str = "") -> Settings:
    # Every auth field given explicitly, so variables in the environment cannot leak in.
    return Settings(basic_auth_user=user, basic_auth_pass=password, webhook_secret=secret)


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


APP = Flask(__name__)


def check_basic(settings: Settings, **request_kwargs) -> bool:
    with APP.test_request_context("/predict", method="POST", **request_kwargs):
        return auth.basic_auth_ok(request, settings)


def check_credentials(settings: Settings, path: str = "/webhook", **request_kwargs) -> bool:
    with APP.test_request_context(path, method="POST", **request_kwargs):
        return auth.credentials_ok(request, settings)


# --- Basic auth ----------------------------------------------------------------------------------

class TestBasicAuth:
    @pytest.mark.parametrize("user, password", [("", ""), ("u", ""), ("", "p")])
    def test_off_unless_user_and_password_are_both_set(self, user, password):
        settings = make_settings(user, password)
        assert settings.basic_auth_enabled is False
        assert check_basic(settings) is True
        assert check_basic(settings, headers=basic("x", "y")) is True
        assert check_basic(settings, headers={"Authorization": "Bearer abc"}) is True

    def test_right_credentials(self):
        assert check_basic(make_settings("u", "p"), headers=basic("u", "p")) is True

    @pytest.mark.parametrize(
        "headers",
        [
            {},                                          # missing
            basic("u", "wrong"),                         # wrong password
            basic("wrong", "p"),                         # wrong user
            basic("U", "p"),                             # user is case-sensitive
            basic("u", "p "),                            # no trimming
            basic("", ""),
            basic("u", ""),
            {"Authorization": "Bearer p"},               # another scheme
            {"Authorization": "Basic !!!not-base64!!!"},  # malformed
            {"Authorization": "Basic"},
            {"Authorization": ""},
        ],
    )
    def test_rejected(self, headers):
        assert check_basic(make_settings("u", "p"), headers=headers) is False

    def test_non_ascii_credentials(self):
        settings = make_settings("jürgen", "pässwörd")
        assert check_basic(settings, headers=basic("jürgen", "pässwörd")) is True
        assert check_basic(settings, headers=basic("jürgen", "passwort")) is False

    def test_password_with_colon(self):
        settings = make_settings("u", "a:b:c")
        assert check_basic(settings, headers=basic("u", "a:b:c")) is True
        assert check_basic(settings, headers=basic("u", "a")) is False


# --- webhook -------------------------------------------------------------------------------------

class TestCredentials:
    def test_open_without_secret_and_basic_auth(self):
        settings = make_settings()
        assert check_credentials(settings) is True
        assert check_credentials(settings, headers={auth.WEBHOOK_HEADER: "anything"}) is True

    def test_secret_in_header(self):
        settings = make_settings(secret="s3cret")
        assert check_credentials(settings, headers={"X-Webhook-Secret": "s3cret"}) is True
        assert check_credentials(settings, headers={"x-webhook-secret": "s3cret"}) is True  # header names are case-insensitive

    def test_secret_as_url_token(self):
        settings = make_settings(secret="s3cret")
        assert check_credentials(settings, path="/webhook?token=s3cret") is True
        assert check_credentials(settings, query_string={"token": "s3cret"}) is True

    @pytest.mark.parametrize(
        "kwargs",
        [
            {},
            {"headers": {"X-Webhook-Secret": "wrong"}},
            {"headers": {"X-Webhook-Secret": ""}},
            {"headers": {"X-Webhook-Secret": "s3cre"}},
            {"headers": {"X-Webhook-Secret": "s3cret2"}},
            {"headers": {"X-Other": "s3cret"}},
            {"path": "/webhook?token=wrong"},
            {"path": "/webhook?token="},
            {"path": "/webhook?secret=s3cret"},
            {"headers": {"Authorization": "Bearer s3cret"}},
        ],
    )
    def test_wrong_or_missing_secret(self, kwargs):
        assert check_credentials(make_settings(secret="s3cret"), **kwargs) is False

    def test_wrong_secret_but_valid_basic_auth(self):
        settings = make_settings("u", "p", "s3cret")
        assert check_credentials(settings, headers={**basic("u", "p"), "X-Webhook-Secret": "wrong"}) is True
        assert check_credentials(settings, headers=basic("u", "p")) is True  # START_TRAINING carries Basic only

    def test_wrong_secret_and_wrong_basic_auth(self):
        settings = make_settings("u", "p", "s3cret")
        assert check_credentials(settings, headers={**basic("u", "bad"), "X-Webhook-Secret": "wrong"}) is False
        assert check_credentials(settings, headers=basic("u", "bad")) is False
        assert check_credentials(settings) is False

    def test_right_secret_without_basic_auth_when_both_configured(self):
        settings = make_settings("u", "p", "s3cret")
        assert check_credentials(settings, headers={"X-Webhook-Secret": "s3cret"}) is True
        assert check_credentials(settings, path="/webhook?token=s3cret") is True

    def test_basic_credentials_are_ignored_when_basic_auth_is_off(self):
        settings = make_settings(secret="s3cret")
        assert check_credentials(settings, headers=basic("u", "p")) is False

    def test_no_secret_falls_back_to_basic_auth(self):
        settings = make_settings("u", "p")
        assert check_credentials(settings) is False
        assert check_credentials(settings, headers={"X-Webhook-Secret": "anything"}) is False
        assert check_credentials(settings, headers=basic("u", "p")) is True


# --- constant-time comparisons -------------------------------------------------------------------

@pytest.fixture
def compare_spy(monkeypatch):
    calls: list[tuple[bytes, bytes]] = []

    def spy(a, b):
        calls.append((a, b))
        return REAL_COMPARE(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    return calls


def test_basic_auth_uses_compare_digest_for_user_and_password(compare_spy):
    settings = make_settings("u", "p")
    assert check_basic(settings, headers=basic("u", "p")) is True
    assert (b"u", b"u") in compare_spy and (b"p", b"p") in compare_spy
    compare_spy.clear()
    # a wrong user still compares the password too (no early exit that would leak timing)
    assert check_basic(settings, headers=basic("x", "p")) is False
    assert (b"x", b"u") in compare_spy and (b"p", b"p") in compare_spy


def test_webhook_secret_uses_compare_digest(compare_spy):
    settings = make_settings(secret="s3cret")
    assert check_credentials(settings, headers={"X-Webhook-Secret": "guess"}) is False
    assert compare_spy == [(b"guess", b"s3cret")]
    compare_spy.clear()
    assert check_credentials(settings, path="/webhook?token=s3cret") is True
    assert compare_spy == [(b"s3cret", b"s3cret")]


def test_spy_result_is_what_decides(monkeypatch):
    """The functions trust compare_digest's answer (no separate == anywhere)."""
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: False)
    assert check_basic(make_settings("u", "p"), headers=basic("u", "p")) is False
    assert check_credentials(make_settings(secret="s"), headers={"X-Webhook-Secret": "s"}) is False
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: True)
    assert check_basic(make_settings("u", "p"), headers=basic("u", "wrong")) is True


# --- wired into an app: the before_request hook on every route -------------------------------------

PROTECTED = [("POST", "/setup"), ("POST", "/predict"), ("GET", "/versions"), ("GET", "/metrics"),
             ("GET", "/train/status"), ("GET", "/models"), ("POST", "/webhook"), ("POST", "/train"),
             ("POST", "/prelabel"), ("GET", "/prelabel/status"), ("POST", "/models/rollback")]


def hooked_app(settings: Settings):
    """The real hook (auth.require_credentials) in front of stand-ins for every route of the service."""
    app = Flask("auth-test")
    state.install(app, settings)
    app.before_request(auth.require_credentials)
    for method, path in [*PROTECTED, ("GET", "/health"), ("GET", "/openapi.json")]:
        app.add_url_rule(path, path, lambda: {"ok": True}, methods=[method])
    return app.test_client()


@pytest.mark.parametrize("method, path", PROTECTED)
def test_only_the_webhook_secret_configured_closes_every_route(method, path):
    """Before: with only WEBHOOK_SECRET set, /setup, /predict, /versions, /metrics, /models and /train/status were open."""
    client = hooked_app(make_settings(secret="s3cret"))
    for kwargs in ({}, {"headers": {"X-Webhook-Secret": "wrong"}}, {"query_string": {"token": "s3cre"}},
                   {"headers": basic("u", "s3cret")}):  # Basic is not configured: a Basic header opens nothing
        response = client.open(path, method=method, **kwargs)
        assert response.status_code == 401, (path, kwargs)
        assert ("WWW-Authenticate" in response.headers) is (path != "/webhook")
    assert client.open(path, method=method, headers={"X-Webhook-Secret": "s3cret"}).status_code == 200
    assert client.open(path, method=method, query_string={"token": "s3cret"}).status_code == 200


@pytest.mark.parametrize("method, path", PROTECTED)
def test_either_configured_credential_opens_every_route(method, path):
    client = hooked_app(make_settings("u", "p", "s3cret"))
    assert client.open(path, method=method).status_code == 401
    assert client.open(path, method=method, auth=("u", "p")).status_code == 200
    assert client.open(path, method=method, headers={"X-Webhook-Secret": "s3cret"}).status_code == 200
    assert client.open(path, method=method, query_string={"token": "s3cret"}).status_code == 200
    assert client.open(path, method=method, auth=("u", "s3cret")).status_code == 401


@pytest.mark.parametrize("settings", [make_settings(), make_settings(secret="s3cret"), make_settings("u", "p", "s3cret")])
def test_health_and_openapi_stay_open(settings):
    client = hooked_app(settings)
    assert client.get("/health").status_code == 200 and client.get("/openapi.json").status_code == 200


def test_nothing_configured_leaves_every_route_open():
    client = hooked_app(make_settings())
    assert all(client.open(path, method=method).status_code == 200 for method, path in PROTECTED)


# --- the .env.example placeholders ---------------------------------------------------------------

@pytest.mark.parametrize("field", ["webhook_secret", "basic_auth_pass"])
def test_the_env_example_placeholders_are_refused(field):
    """Before: WEBHOOK_SECRET=replace-with-a-long-random-string started a service anyone could call with it."""
    for placeholder in ("replace-with-a-long-random-string", "replace-with-another-long-random-string"):
        with pytest.raises(ValidationError, match=f"{field.upper()} is still the placeholder from .env.example"):
            Settings(**{field: placeholder})
    assert Settings(**{field: "a-real-secret-0123456789"}).model_dump()  # anything else loads
