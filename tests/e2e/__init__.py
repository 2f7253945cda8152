"""End-to-end tests against a real Label Studio 1.23.2 and the backend started by scripts/run.sh."""
