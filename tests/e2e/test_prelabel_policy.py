"""A real Label Studio 1.23.2 accepts and keeps ``prelabel_on_import`` on the root ``<View>`` (project create
and update), and sends the config with it in ``TASKS_CREATED``, where the backend reads the project's policy
(docs/label-studio.md#label-config-attributes-of-this-backend). No backend is needed: the webhook goes to a
small recording server."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from backend.core import prelabel_policy as pp
from tests.live import wait_for
from tests.synthetic import label_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


class _Recorder(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet
        pass


def test_label_studio_keeps_the_attribute_and_sends_it_with_tasks_created(ls_api):
    config = label_config(("Car", "Person")).replace("<View>", '<View prelabel_on_import="sample:2">', 1)
    assert pp.project_value(config) == "sample:2"
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    project = None
    try:
        response = ls_api.post("/api/projects/", json={"title": "prelabel policy", "label_config": config})
        assert response.status_code == 201, response.text
        project = response.json()["id"]
        assert pp.project_value(ls_api.get(f"/api/projects/{project}/").json()["label_config"]) == "sample:2"

        changed = config.replace('prelabel_on_import="sample:2"', 'prelabel_on_import="none"')
        response = ls_api.patch(f"/api/projects/{project}/", json={"label_config": changed})
        assert response.status_code == 200, response.text
        assert pp.project_value(ls_api.get(f"/api/projects/{project}/").json()["label_config"]) == "none"

        hook = ls_api.post("/api/webhooks/", json={"project": project, "url": f"http://127.0.0.1:{server.server_port}/webhook",
                                                   "send_payload": True, "send_for_all_actions": False,
                                                   "actions": ["TASKS_CREATED"]})
        assert hook.status_code == 201, hook.text
        tasks = [{"image": f"https://example.com/{i}.jpg"} for i in range(3)]
        assert ls_api.post(f"/api/projects/{project}/import", json=tasks).status_code == 201
        events = wait_for(lambda: [e for e in _Recorder.received if e.get("action") == "TASKS_CREATED"], timeout=60,
                          message="TASKS_CREATED at the recording server")
        sent = events[0]
        assert len(sent["tasks"]) == 3
        decision = pp.decide(str(project), sent["tasks"], sent["project"]["label_config"], "all")
        assert (str(decision.policy), decision.source, decision.chosen) == ("none", "project", [])
    finally:
        server.shutdown()
        if project is not None:
            ls_api.delete(f"/api/projects/{project}/")


def test_a_large_import_arrives_as_several_events_and_sample_n_counts_over_all_of_them(ls_api, redis15, project_id):
    """Label Studio 1.23.2 cuts the TASKS_CREATED of an import into events of WEBHOOK_BATCH_SIZE (5,000) tasks:
    5,003 tasks come as 5,000 + 3, and ``sample:6`` on them drafts 6 tasks in all (not 6 per event)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    project = None
    try:
        response = ls_api.post("/api/projects/", json={"title": "chunked import", "label_config": label_config(("Car",))})
        assert response.status_code == 201, response.text
        project = response.json()["id"]
        hook = ls_api.post("/api/webhooks/", json={"project": project, "url": f"http://127.0.0.1:{server.server_port}/webhook",
                                                   "send_payload": True, "send_for_all_actions": False,
                                                   "actions": ["TASKS_CREATED"]})
        assert hook.status_code == 201, hook.text
        tasks = [{"image": f"https://example.com/{i}.jpg"} for i in range(5003)]
        assert ls_api.post(f"/api/projects/{project}/import", json=tasks).status_code == 201

        def events():
            mine = [e for e in _Recorder.received if e.get("action") == "TASKS_CREATED" and e["project"]["id"] == project]
            return mine if sum(len(e["tasks"]) for e in mine) == 5003 else None

        sent = wait_for(events, timeout=120, message="5,003 tasks in TASKS_CREATED events at the recording server")
        assert [len(e["tasks"]) for e in sent] == [5000, 3]  # one import, two events
        chosen = [pp.decide_import(redis15, str(project_id), e["tasks"], e["project"]["label_config"], "sample:6",
                                   chunk_size=5000, window_s=120).chosen for e in sent]
        assert [len(c) for c in chosen] == [3, 3]
    finally:
        server.shutdown()
        if project is not None:
            ls_api.delete(f"/api/projects/{project}/")
