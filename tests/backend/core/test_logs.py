"""backend.core.logs: no secret reaches a log line; logging set-up is idempotent."""

from __future__ import annotations

import io
import logging
import sys
from datetime import timedelta

import pytest
from gunicorn.config import Config

from backend.core.logs import GunicornLogger, RedactSecrets, configure_logging, secrets_of, spellings
from backend.core.settings import Settings

GEMINI_KEY = "AIzaFAKE-gemini-key-0123456789"
LS_KEY = "ls-personal-access-token-abcdef"
BASIC_PASS = "basic-pass-9876"
HOOK_SECRET = "hook-secret-5555"


def make_settings(**overrides) -> Settings:
    values = dict(
        GEMINI_API_KEY=GEMINI_KEY, label_studio_api_key=LS_KEY, basic_auth_user="admin",
        basic_auth_pass=BASIC_PASS, webhook_secret=HOOK_SECRET, log_level="INFO",
    )
    values.update(overrides)
    return Settings(**values)


def record(msg, *args, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("test", logging.INFO, __file__, 1, msg, args or None, exc_info)


def formatted(filter_: RedactSecrets, msg, *args, exc_info=None) -> str:
    rec = record(msg, *args, exc_info=exc_info)
    assert filter_.filter(rec) is True  # never drops a record
    return logging.Formatter("%(levelname)s %(message)s").format(rec)


@pytest.fixture
def redactor() -> RedactSecrets:
    return RedactSecrets(secrets_of(make_settings()))


# --- configured secrets --------------------------------------------------------------------------

class TestConfiguredSecrets:
    def test_secrets_of_lists_every_secret(self):
        assert sorted(secrets_of(make_settings())) == sorted([GEMINI_KEY, LS_KEY, BASIC_PASS, HOOK_SECRET])

    @pytest.mark.parametrize("secret", [GEMINI_KEY, LS_KEY, BASIC_PASS, HOOK_SECRET])
    def test_in_the_message(self, redactor, secret):
        out = formatted(redactor, f"calling with {secret} now")
        assert secret not in out
        assert out == "INFO calling with *** now"

    @pytest.mark.parametrize("secret", [GEMINI_KEY, LS_KEY, BASIC_PASS, HOOK_SECRET])
    def test_in_the_args(self, redactor, secret):
        out = formatted(redactor, "value %s and %d", secret, 3)
        assert secret not in out
        assert out == "INFO value *** and 3"

    def test_in_dict_args(self, redactor):
        out = formatted(redactor, "payload %(key)s", {"key": LS_KEY})
        assert out == "INFO payload ***"

    def test_args_are_consumed_once(self, redactor):
        rec = record("value %s", LS_KEY)
        redactor.filter(rec)
        assert rec.args is None
        assert rec.msg == "value ***"
        assert rec.getMessage() == "value ***"
        redactor.filter(rec)  # a second handler's filter sees the already clean record
        assert rec.getMessage() == "value ***"

    def test_clean_message_is_untouched(self, redactor):
        rec = record("nothing to hide here")
        redactor.filter(rec)
        assert rec.msg == "nothing to hide here" and rec.args is None
        rec = record("count %d", 5)
        redactor.filter(rec)
        assert rec.getMessage() == "count 5"

    def test_non_string_message(self, redactor):
        assert formatted(redactor, {"token": LS_KEY}) == "INFO {'token': '***'}"
        assert formatted(redactor, 42) == "INFO 42"

    def test_in_exception_text(self, redactor):
        try:
            raise RuntimeError(f"401 for key {GEMINI_KEY}")
        except RuntimeError:
            exc_info = sys.exc_info()
        out = formatted(redactor, "call failed", exc_info=exc_info)
        assert GEMINI_KEY not in out
        assert "RuntimeError: 401 for key ***" in out
        assert "Traceback" in out

    def test_in_precomputed_exception_text(self, redactor):
        rec = record("failed")
        rec.exc_text = f"Traceback...\nValueError: bad {HOOK_SECRET}"
        redactor.filter(rec)
        assert HOOK_SECRET not in rec.exc_text and rec.exc_text.endswith("bad ***")

    def test_short_and_empty_secrets_are_ignored(self):
        filter_ = RedactSecrets(["", "p", "abc", "abcd"])
        assert filter_.secrets == ["abcd"]
        assert filter_.redact("a pp abc abcd") == "a pp abc ***"

    def test_overlapping_secrets_leave_nothing_behind(self):
        for secrets in (["abcd", "abcdefgh"], ["abcdefgh", "abcd"]):
            assert RedactSecrets(secrets).redact("x abcdefgh y abcd") == "x *** y ***"

    def test_every_occurrence(self, redactor):
        assert redactor.redact(f"{LS_KEY}{LS_KEY} {LS_KEY}") == "****** ***"


# --- credential-looking fragments, whatever the configured secrets ---------------------------------

class TestPatterns:
    @pytest.fixture
    def plain(self) -> RedactSecrets:
        return RedactSecrets([])

    @pytest.mark.parametrize(
        "text, expected",
        [
            ("Authorization: Bearer xyz", "Authorization: Bearer ***"),
            ("authorization: bearer eyJhbGciOi.payload.sig", "authorization: bearer ***"),
            ("Authorization: Token abc123", "Authorization: Token ***"),
            ("Authorization: Basic dTpw", "Authorization: Basic ***"),
            ("Authorization Bearer xyz and more", "Authorization Bearer *** and more"),
            ("GET /data?token=abc", "GET /data?token=***"),
            ("GET /webhook?token=abc&x=1", "GET /webhook?token=***&x=1"),
            ("url ?a=1&token=abc def", "url ?a=1&token=*** def"),
            ("u?key=AIzaSy123&alt=json", "u?key=***&alt=json"),
            ("u?api_key=k1&access_token=k2", "u?api_key=***&access_token=***"),
            ("x-goog-api-key: AIzaSy123", "x-goog-api-key: ***"),
            ("X-Goog-Api-Key:AIzaSy123 next", "X-Goog-Api-Key:*** next"),
            ('{"x-goog-api-key": "AIzaSy123", "a": 1}', '{"x-goog-api-key": "***", "a": 1}'),
            ("{'x-goog-api-key': 'AIzaSy123'}", "{'x-goog-api-key': '***'}"),
            ("{'Authorization': 'Bearer xyz'}", "{'Authorization': 'Bearer ***'}"),
            ('{"authorization": "Token abc"}', '{"authorization": "Token ***"}'),
            ("nothing ?page=2 here", "nothing ?page=2 here"),
            ("tokenizer=abc", "tokenizer=abc"),
        ],
    )
    def test_redacted(self, plain, text, expected):
        assert plain.redact(text) == expected

    def test_through_a_logger_with_args(self, plain):
        out = formatted(plain, "headers=%s url=%s", {"Authorization": "Bearer xyz"}, "http://h/w?token=abc")
        assert "xyz" not in out and "abc" not in out


# --- configure_logging ---------------------------------------------------------------------------

@pytest.fixture
def clean_root(monkeypatch):
    """An isolated root logger, level and noisy loggers restored afterwards.

    Tests call :func:`no_handlers` first: pytest attaches its capture handler to the root logger
    after fixtures have run, so the list is emptied inside the test itself.
    """
    root = logging.getLogger()
    noisy = {name: logging.getLogger(name).level for name in ("httpx", "urllib3", "google_genai")}
    level = root.level
    monkeypatch.setattr(root, "handlers", [])
    yield root
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)


def no_handlers(root: logging.Logger) -> logging.Logger:
    root.handlers.clear()
    return root


def redactors(handler: logging.Handler) -> list[RedactSecrets]:
    return [f for f in handler.filters if isinstance(f, RedactSecrets)]


class TestConfigureLogging:
    def test_adds_one_handler_when_none(self, clean_root):
        no_handlers(clean_root)
        configure_logging(make_settings(log_level="debug"))
        assert len(clean_root.handlers) == 1
        assert isinstance(clean_root.handlers[0], logging.StreamHandler)
        assert clean_root.level == logging.DEBUG
        configure_logging(make_settings(log_level="WARNING"))
        assert len(clean_root.handlers) == 1
        assert clean_root.level == logging.WARNING

    def test_idempotent_one_filter_per_handler(self, clean_root):
        no_handlers(clean_root)
        first, second = logging.StreamHandler(io.StringIO()), logging.StreamHandler(io.StringIO())
        other = logging.Filter("keep-me")
        second.addFilter(other)
        clean_root.handlers.extend([first, second])
        for _ in range(3):
            configure_logging(make_settings())
        assert clean_root.handlers == [first, second]
        assert len(redactors(first)) == 1
        assert len(redactors(second)) == 1
        assert other in second.filters  # other filters are kept

    def test_reconfigure_uses_the_new_secrets(self, clean_root):
        no_handlers(clean_root)
        handler = logging.StreamHandler(io.StringIO())
        clean_root.handlers.append(handler)
        configure_logging(make_settings())
        configure_logging(make_settings(label_studio_api_key="rotated-token-1234"))
        (only,) = redactors(handler)
        assert "rotated-token-1234" in only.secrets
        assert LS_KEY not in only.secrets

    def test_end_to_end_no_secret_in_output(self, clean_root):
        no_handlers(clean_root)
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        clean_root.handlers.append(handler)
        configure_logging(make_settings())
        log = logging.getLogger("backend.test_logs")
        log.info("gemini key %s", GEMINI_KEY)
        log.warning("webhook from http://h/webhook?token=%s", HOOK_SECRET)
        log.info("headers %s", {"Authorization": f"Bearer {LS_KEY}", "x-goog-api-key": GEMINI_KEY})
        try:
            raise ValueError(f"basic {BASIC_PASS}")
        except ValueError:
            log.exception("failed")
        output = stream.getvalue()
        for secret in (GEMINI_KEY, LS_KEY, BASIC_PASS, HOOK_SECRET):
            assert secret not in output
        assert output.count("***") >= 5
        assert "ValueError: basic ***" in output

    def test_quiets_noisy_libraries(self, clean_root):
        configure_logging(make_settings(log_level="DEBUG"))
        for name in ("httpx", "urllib3", "google_genai"):
            assert logging.getLogger(name).level == logging.WARNING
        configure_logging(make_settings(log_level="ERROR"))
        assert logging.getLogger("httpx").level == logging.ERROR

    def test_filter_added_to_existing_handlers(self, clean_root):
        configure_logging(make_settings())  # pytest's own capture handler is there already
        assert clean_root.handlers
        assert all(len(redactors(h)) == 1 for h in clean_root.handlers)
        assert not any(type(h) is logging.StreamHandler and h.stream is sys.stderr for h in clean_root.handlers)


# --- gunicorn's logger (gunicorn.conf.py logger_class) -------------------------------------------------

class TestGunicornLogger:
    """Unit cases; tests/adversarial/test_auth_and_secrets.py drives a real gunicorn."""

    def access_line(self, monkeypatch, path: str, user_agent: str = "curl") -> str:
        monkeypatch.setenv("WEBHOOK_SECRET", HOOK_SECRET)
        monkeypatch.setenv("GEMINI_API_KEY", GEMINI_KEY)
        cfg = Config()
        cfg.set("accesslog", "-")
        cfg.set("access_log_format", '"%(m)s %(U)s %(H)s" %(s)s "%(a)s"')
        logger = GunicornLogger(cfg)
        stream = io.StringIO()
        for handler in logger.access_log.handlers:
            if getattr(handler, "_gunicorn", False):  # gunicorn's own handler, not pytest's capture
                handler.setStream(stream)
        environ = {"REQUEST_METHOD": "POST", "RAW_URI": path, "PATH_INFO": path, "QUERY_STRING": "",
                   "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": user_agent, "REMOTE_ADDR": "127.0.0.1"}
        response = type("Response", (), {"status": "404 NOT FOUND", "sent": 0, "headers": []})()
        logger.access(response, type("Request", (), {"headers": []})(), environ, timedelta(milliseconds=3))
        return stream.getvalue()

    def test_a_secret_in_the_path_or_the_user_agent_is_redacted(self, monkeypatch):
        """Before: the access line printed /webhook/<secret> (the path is logged, the query string is not)."""
        line = self.access_line(monkeypatch, f"/webhook/{HOOK_SECRET}", user_agent=f"agent {GEMINI_KEY}")
        assert line.strip() == '"POST /webhook/*** HTTP/1.1" 404 "agent ***"'

    def test_a_clean_line_is_untouched(self, monkeypatch):
        assert self.access_line(monkeypatch, "/predict").strip() == '"POST /predict HTTP/1.1" 404 "curl"'

    def test_spellings_cover_percent_encoding_and_latin1(self):
        assert spellings(["a b/ü", ""]) == ["a b/ü", "a%20b%2F%C3%BC", "a%20b/%C3%BC", "a b/Ã¼"]
