"""monitoring/: the Grafana dashboard asks only for metrics the service exports, and Prometheus
scrapes /metrics with the backend's own credentials (docs/monitoring.md).

Docker cannot run here: the compose profile is checked as text (tests/test_deployment.py) and the
Prometheus entry point is run for real with a stand-in for the prometheus binary.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Histogram

from backend.core import metrics
from backend.detectors.gemini.cost import money_gauges
from backend.serving import quality

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "lsb.json"
ENTRYPOINT = MONITORING / "prometheus" / "entrypoint.sh"


def exported_series() -> set[str]:
    """Every series name /metrics can carry: the module's counters and histograms, and the scrape-time gauges."""
    names: set[str] = set()
    for value in vars(metrics).values():
        if isinstance(value, Counter):
            names.add(f"{value._name}_total")
        elif isinstance(value, Histogram):
            names |= {f"{value._name}_{suffix}" for suffix in ("bucket", "sum", "count")}

    class OneProject:
        def projects(self):
            return ["1"]

    class StoredQuality:
        def get(self, key):
            return json.dumps({"sources": {"gemini": {"map50": 0.7}}, "model": {"version": "v0001", "map50": 0.8}})

    names |= {family.name for family in quality.gauges(StoredQuality(), OneProject())}
    names |= {family.name for family in money_gauges(None)}
    return names


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(doc: dict) -> list[str]:
    return [target["expr"] for panel in doc["panels"] for target in panel.get("targets", [])]


def test_every_query_asks_for_series_the_service_exports():
    exported = exported_series()
    assert {"lsb_predictions_total", "lsb_request_seconds_bucket", "lsb_draft_quality"} <= exported
    asked = {name for expr in queries(dashboard()) for name in re.findall(r"\blsb_[a-z0-9_]+", expr)}
    assert asked, "the dashboard asks for nothing"
    assert asked <= exported, f"not exported by the service: {sorted(asked - exported)}"


def test_the_dashboard_covers_the_loop_and_the_money():
    asked = " ".join(queries(dashboard()))
    for series in ("lsb_predictions_total", "lsb_gemini_cost_usd_total", "lsb_gemini_cache_total", "lsb_draft_quality",
                   "lsb_model_quality", "lsb_prediction_failures_total", "lsb_model_swaps_total", "lsb_webhooks_total",
                   "lsb_gemini_tier_cost_usd_total", "lsb_cost_per_1000_drafted_tasks_usd", "lsb_drafted_tasks"):
        assert series in asked, f"no panel shows {series}"


def test_panels_use_the_provisioned_data_source_and_do_not_overlap():
    source = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    doc = dashboard()
    assert doc["uid"] and doc["title"]
    taken: set[tuple[int, int]] = set()
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"]), panel["title"]
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
    assert len({p["id"] for p in doc["panels"]}) == len(doc["panels"])


def test_compose_mounts_what_grafana_provisions():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    grafana, prometheus = services["grafana"], services["prometheus"]
    assert grafana["profiles"] == prometheus["profiles"] == ["monitoring"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    mounts = dict(v.split(":")[:2][::-1] for v in grafana["volumes"] if v.startswith("./"))
    assert (ROOT / mounts["/var/lib/grafana/dashboards"] / Path(home).name).is_file()
    provider = yaml.safe_load((MONITORING / "grafana" / "provisioning" / "dashboards" / "lsb.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert prometheus["entrypoint"][-1] == "/etc/lsb/entrypoint.sh"
    assert "./monitoring/prometheus:/etc/lsb:ro" in prometheus["volumes"]
    for service in (grafana, prometheus):
        assert all(port.startswith("127.0.0.1:") for port in service["ports"]), service["ports"]


def run_entrypoint(tmp_path: Path, **env: str) -> tuple[dict, str]:
    """Run the entry point with a stand-in prometheus that prints its arguments; (config, its output)."""
    fake = tmp_path / "prometheus"
    fake.write_text('#!/bin/sh\necho "started with: $*"\n')
    fake.chmod(0o755)
    config = tmp_path / "prometheus.yml"
    base = {"PATH": os.environ["PATH"], "PROMETHEUS_BIN": str(fake), "LSB_PROMETHEUS_CONFIG": str(config)}
    out = subprocess.run(["sh", str(ENTRYPOINT)], env={**base, **env}, capture_output=True, text=True, timeout=30, check=True)
    assert f"--config.file={config}" in out.stdout
    return yaml.safe_load(config.read_text()), config.read_text() + out.stdout + out.stderr


def test_prometheus_scrapes_with_basic_auth_and_keeps_the_password_in_its_own_file(tmp_path):
    password = "p'ss w0rd: {x}"
    config, seen = run_entrypoint(tmp_path, BASIC_AUTH_USER="o'brien", BASIC_AUTH_PASS=password, WEBHOOK_SECRET="s3cret")
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["backend:9090"]
    assert job["basic_auth"]["username"] == "o'brien" and "params" not in job
    secret_file = Path(job["basic_auth"]["password_file"])
    assert secret_file.read_text() == password
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert password not in seen and "s3cret" not in seen


def test_prometheus_scrapes_with_the_webhook_secret_when_there_is_no_basic_auth(tmp_path):
    config, _ = run_entrypoint(tmp_path, WEBHOOK_SECRET="it's-a-secret")
    assert config["scrape_configs"][0]["params"] == {"token": ["it's-a-secret"]}


@pytest.mark.parametrize("env", [{}, {"BASIC_AUTH_USER": "only-a-user"}])
def test_prometheus_scrapes_without_credentials_when_none_is_set(tmp_path, env):
    config, _ = run_entrypoint(tmp_path, **env)
    job = config["scrape_configs"][0]
    assert "basic_auth" not in job and "params" not in job
