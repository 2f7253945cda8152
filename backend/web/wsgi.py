"""Gunicorn entry point: ``gunicorn -c gunicorn.conf.py backend.web.wsgi:app``."""

from backend.web.app import create_app

app = create_app()
