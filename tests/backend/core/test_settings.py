"""Settings: read from the environment, and documented in the README table."""

from __future__ import annotations

import re

from backend.core.settings import Settings, configuration_table
from tests.paths import ROOT

README = ROOT / "README.md"
#: Read by the process, not by Settings: gunicorn's config and the scripts make run uses (run.sh sources redis.sh).
PROCESS_FILES = [ROOT / "gunicorn.conf.py", ROOT / "scripts" / "run.sh", ROOT / "scripts" / "redis.sh"]
#: The system's own variables, which the scripts only extend or pass on.
SYSTEM_VARIABLES = {"PATH", "PYTHONPATH", "HOME", "TMPDIR"}


def test_environment_is_read(monkeypatch):
    monkeypatch.setenv("GEMINI_MODEL", "gemini-2.5-flash-lite")
    monkeypatch.setenv("GOOGLE_API_KEY", "k-123")
    monkeypatch.setenv("ROUTING", "auto")
    monkeypatch.setenv("TRAIN_EPOCHS", "7")
    settings = Settings()
    assert settings.gemini_model == "gemini-2.5-flash-lite"
    assert settings.gemini_api_key.get_secret_value() == "k-123" and settings.gemini_enabled
    assert settings.routing == "auto" and settings.train_epochs == 7


def test_secrets_do_not_show_in_repr(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "very-secret-key")
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", "very-secret-pat")
    text = repr(Settings()) + str(Settings().model_dump())
    assert "very-secret-key" not in text and "very-secret-pat" not in text


def _configuration_rows() -> set[str]:
    """The first cells of the table rows in the README's Configuration section."""
    text = README.read_text()
    section = text[text.index("\n## Configuration"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return {match.strip() for match in re.findall(r"^\|([^|]+)\|", section, re.M)}


def test_readme_documents_every_variable():
    rows = _configuration_rows()
    for line in configuration_table().splitlines()[2:]:
        variable = line.split("|")[1].strip()
        assert variable in rows, f"{variable} is missing from the README's configuration table"


def _process_variables() -> set[str]:
    """Environment variables gunicorn.conf.py and the run scripts read: os.environ.get("X"), _int("X"),
    ${X:-...}, ${X:+...}, ${X-...}."""
    names = set()
    for path in PROCESS_FILES:
        text = path.read_text()
        names |= set(re.findall(r"""os\.environ\.get\(\s*["']([A-Z][A-Z0-9_]*)["']""", text))
        names |= set(re.findall(r"""_int\(\s*["']([A-Z][A-Z0-9_]*)["']""", text))
        names |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):?[-+=]", text))
    return names - SYSTEM_VARIABLES


def test_readme_documents_the_process_variables():
    """PORT, WORKERS, THREADS and everything else gunicorn.conf.py and scripts/run.sh read have a row."""
    variables = _process_variables()
    assert {"PORT", "WORKERS", "THREADS", "BIND", "VENV", "VAR_DIR", "STOP_TIMEOUT", "REDIS_PERSIST"} <= variables
    rows = _configuration_rows()
    missing = {name for name in variables if f"`{name}`" not in rows}
    assert not missing, f"not in the README's configuration tables: {sorted(missing)}"
