"""Settings: read from the environment, and documented in the README table."""

from __future__ import annotations

from backend.core.settings import Settings, configuration_table
from tests.paths import ROOT

README = ROOT / "README.md"


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


def test_readme_documents_every_variable():
    readme = README.read_text()
    for line in configuration_table().splitlines()[2:]:
        variable = line.split("|")[1].strip()
        assert variable in readme, f"{variable} is missing from the README's configuration table"
