"""A small fake Label Studio API for worker tests (Flask on 127.0.0.1, a free port).

Implements exactly what ``backend.core.label_studio`` (through label-studio-sdk) and an image loader use:

- ``POST /api/token/refresh/``  ``{"refresh": PAT}`` -> ``{"access": JWT}`` (a PAT is a JWT refresh token)
- ``GET /api/projects/<id>/``   project with ``label_config``
- ``GET /api/tasks/?project=&fields=all&page=&page_size=&query=``  ``{"tasks", "total", ...}``;
  a page past the end answers 404 like Label Studio; ``query`` filters on ``total_annotations``,
  ``cancelled_annotations`` and ``total_predictions`` (``greater`` / ``equal`` / ``less``)
- ``GET /api/predictions/?project=&task=``, ``POST /api/predictions/``  stored predictions (drafts);
  ``PATCH /api/predictions/<id>/``  a new ``score`` (the re-score job)
- ``GET /data/upload/<pid>/<file>``  uploaded images (auth required, like Label Studio)

Auth: ``Authorization: Token <legacy_token>`` or ``Bearer <access token from refresh>``.
Tests mutate ``projects``/``tasks``/``files`` directly or through the helpers, can make the server
answer 5xx (``fail_with``) or stop it (``stop``) to simulate an outage, and read ``requests_log``.

    with FakeLabelStudio() as ls:
        pid = ls.add_project(label_config(...))
        tid = ls.add_task(pid, png_bytes, result=[...], predictions=[...])
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import time
import uuid
from typing import Any

import jwt
from flask import Flask, Response, jsonify, request
from werkzeug.serving import WSGIRequestHandler, make_server


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs) -> None:  # keep test output clean
        pass

_SECRET = "fake-label-studio-signing-secret-0123456789"


#: Data Manager ``filter:tasks:<column>`` values the fake understands. ``total_annotations`` counts skips too
#: (as this fake always has: backend.core.label_studio filters cancelled-only tasks itself).
_FILTER_COLUMNS = {
    "filter:tasks:total_annotations": lambda t: len(t["annotations"]),
    "filter:tasks:cancelled_annotations": lambda t: len([a for a in t["annotations"] if a["was_cancelled"]]),
    "filter:tasks:total_predictions": lambda t: len(t["predictions"]),
}
_FILTER_OPERATORS = {"greater": lambda a, b: a > b, "equal": lambda a, b: a == b, "less": lambda a, b: a < b}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


class FakeLabelStudio:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, access_ttl: int = 300):
        self.projects: dict[int, dict] = {}
        self.tasks: dict[int, dict] = {}
        self.files: dict[str, bytes] = {}
        self.legacy_token = uuid.uuid4().hex
        self.access_ttl = access_ttl
        self.requests_log: list[dict] = []
        self.refresh_count = 0
        self.failure_status: int | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.pat = jwt.encode(
            {"token_type": "refresh", "exp": int(time.time()) + 86400, "jti": uuid.uuid4().hex, "user_id": 1},
            _SECRET,
            algorithm="HS256",
        )
        self._access_tokens: set[str] = set()
        self.app = self._make_app()
        self._server = make_server(host, port, self.app, threaded=True, request_handler=_QuietHandler)
        self.port = self._server.server_port
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self) -> FakeLabelStudio:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-ls",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: connections are then refused (Label Studio down)."""
        if self._thread is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread = None

    def __enter__(self) -> FakeLabelStudio:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_with(self, status: int | None) -> None:
        """Answer every API call with this HTTP status (None: behave again)."""
        self.failure_status = status

    # --- data helpers ----------------------------------------------------------------------------

    def next_id(self) -> int:
        with self._lock:
            return next(self._ids)

    def add_project(self, label_config: str, title: str = "fake", project_id: int | None = None) -> int:
        pid = project_id or self.next_id()
        self.projects[pid] = {"id": pid, "title": title, "label_config": label_config, "created_at": _now()}
        return pid

    def add_file(self, project: int, content: bytes, name: str | None = None) -> str:
        name = name or f"{uuid.uuid4().hex[:8]}.png"
        path = f"/data/upload/{project}/{name}"
        self.files[path] = content
        return path

    def add_task(
        self,
        project: int,
        image: bytes | str | None,
        result: list | None = None,
        predictions: list[dict] | None = None,
        was_cancelled: bool = False,
        data_key: str = "image",
        extra_annotations: list[dict] | None = None,
    ) -> int:
        """A task with an image (bytes are uploaded; a str is used as the URL as is).

        ``result`` (when not None) becomes one annotation; ``predictions`` are dicts with
        ``result``, ``model_version`` and optional ``score``.
        """
        tid = self.next_id()
        url = self.add_file(project, image) if isinstance(image, bytes) else image
        task = {
            "id": tid,
            "project": project,
            "data": {data_key: url} if url is not None else {},
            "meta": {},
            "created_at": _now(),
            "updated_at": _now(),
            "annotations": [],
            "predictions": [],
            "is_labeled": False,
        }
        self.tasks[tid] = task
        for ann in extra_annotations or []:
            self.add_annotation(tid, **ann)
        if result is not None:
            self.add_annotation(tid, result, was_cancelled=was_cancelled)
        for pred in predictions or []:
            self.add_prediction(tid, **pred)
        return tid

    def add_annotation(self, task_id: int, result: list, was_cancelled: bool = False, updated_at: str | None = None) -> int:
        aid = self.next_id()
        stamp = updated_at or _now()
        self.tasks[task_id]["annotations"].append({
            "id": aid, "task": task_id, "project": self.tasks[task_id]["project"], "result": result,
            "was_cancelled": was_cancelled, "ground_truth": False, "created_at": stamp, "updated_at": stamp,
            "completed_by": 1, "lead_time": 1.0,
        })
        self.tasks[task_id]["is_labeled"] = True
        return aid

    def update_annotation(self, task_id: int, annotation_id: int, result: list) -> None:
        for ann in self.tasks[task_id]["annotations"]:
            if ann["id"] == annotation_id:
                ann["result"] = result
                ann["updated_at"] = _now()

    def add_prediction(self, task_id: int, result: list, model_version: str = "fake", score: float | None = None) -> int:
        pid = self.next_id()
        self.tasks[task_id]["predictions"].append({
            "id": pid, "task": task_id, "project": self.tasks[task_id]["project"], "result": result,
            "model_version": model_version, "score": score, "created_at": _now(), "updated_at": _now(),
            "model": None, "model_run": None,
        })
        return pid

    # --- HTTP ------------------------------------------------------------------------------------

    def _authorized(self) -> bool:
        header = request.headers.get("Authorization", "")
        if header == f"Token {self.legacy_token}":
            return True
        if header.startswith("Bearer "):
            token = header[7:]
            try:
                claims = jwt.decode(token, _SECRET, algorithms=["HS256"])
            except jwt.InvalidTokenError:
                return False
            return claims.get("token_type") == "access" and token in self._access_tokens
        return False

    def _make_app(self) -> Flask:
        app = Flask("fake_label_studio")
        fake = self

        @app.before_request
        def _log_and_guard():
            fake.requests_log.append({
                "method": request.method, "path": request.path, "args": request.args.to_dict(),
                "authorization": request.headers.get("Authorization"),
            })
            if fake.failure_status is not None:
                return jsonify({"detail": "simulated failure"}), fake.failure_status
            if request.path == "/api/token/refresh/":
                return None
            if not fake._authorized():
                return jsonify({"detail": "Authentication credentials were not provided."}), 401
            return None

        @app.post("/api/token/refresh/")
        def refresh():
            body = request.get_json(silent=True) or {}
            if body.get("refresh") != fake.pat:
                return jsonify({"detail": "Token is invalid or expired", "code": "token_not_valid"}), 401
            fake.refresh_count += 1
            access = jwt.encode(
                {"token_type": "access", "exp": int(time.time()) + fake.access_ttl, "jti": uuid.uuid4().hex, "user_id": 1},
                _SECRET, algorithm="HS256",
            )
            fake._access_tokens.add(access)
            return jsonify({"access": access})

        @app.get("/api/projects/<int:pid>/")
        def project(pid: int):
            if pid not in fake.projects:
                return jsonify({"detail": "Not found."}), 404
            return jsonify(fake.projects[pid])

        @app.get("/api/tasks/")
        def tasks():
            pid = request.args.get("project", type=int)
            page = request.args.get("page", 1, type=int)
            size = request.args.get("page_size", 100, type=int)
            items = [t for t in fake.tasks.values() if t["project"] == pid]
            query = request.args.get("query")
            if query:
                filters = (json.loads(query).get("filters") or {}).get("items") or []
                for f in filters:
                    column = _FILTER_COLUMNS.get(f.get("filter"))
                    compare = _FILTER_OPERATORS.get(f.get("operator"))
                    if column and compare:
                        items = [t for t in items if compare(column(t), f.get("value", 0))]
            items.sort(key=lambda t: t["id"])
            start = (page - 1) * size
            if page > 1 and start >= len(items):
                return jsonify({"detail": "Invalid page."}), 404
            chunk = items[start:start + size]
            full = request.args.get("fields") == "all"
            out = []
            for t in chunk:
                item = {k: v for k, v in t.items() if full or k not in ("annotations", "predictions")}
                item["total_annotations"] = len([a for a in t["annotations"] if not a["was_cancelled"]])
                item["cancelled_annotations"] = len([a for a in t["annotations"] if a["was_cancelled"]])
                item["total_predictions"] = len(t["predictions"])
                out.append(item)
            return jsonify({
                "tasks": out,
                "total": len(items),
                "total_annotations": sum(len(t["annotations"]) for t in items),
                "total_predictions": sum(len(t["predictions"]) for t in items),
            })

        @app.get("/api/predictions/")
        def list_predictions():
            pid = request.args.get("project", type=int)
            tid = request.args.get("task", type=int)
            return jsonify([p for t in fake.tasks.values() if (pid is None or t["project"] == pid)
                            and (tid is None or t["id"] == tid) for p in t["predictions"]])

        @app.post("/api/predictions/")
        def create_prediction():
            body = request.get_json(silent=True) or {}
            task = int(body["task"])
            if task not in fake.tasks:
                return jsonify({"detail": "Not found."}), 404
            pred_id = fake.add_prediction(task, body.get("result") or [], body.get("model_version") or "", body.get("score"))
            return jsonify(next(p for p in fake.tasks[task]["predictions"] if p["id"] == pred_id)), 201

        @app.patch("/api/predictions/<int:pred_id>/")
        def update_prediction(pred_id: int):  # Label Studio's PredictionAPI is a ModelViewSet: PATCH updates fields
            body = request.get_json(silent=True) or {}
            for t in fake.tasks.values():
                for p in t["predictions"]:
                    if p["id"] == pred_id:
                        p.update({k: body[k] for k in ("score", "result", "model_version") if k in body})
                        return jsonify(p)
            return jsonify({"detail": "Not found."}), 404

        @app.get("/data/upload/<path:rest>")
        def upload(rest: str):
            path = f"/data/upload/{rest}"
            if path not in fake.files:
                return jsonify({"detail": "Not found."}), 404
            content = fake.files[path]
            mime = ("image/png" if content[:4] == b"\x89PNG"
                    else "image/jpeg" if content[:2] == b"\xff\xd8"
                    else "application/octet-stream")
            return Response(content, mimetype=mime)

        return app

    def api_calls(self, path_prefix: str = "/api/") -> list[dict]:
        return [r for r in self.requests_log if r["path"].startswith(path_prefix)]


def as_prediction(result: list, model_version: str, score: float | None = None) -> dict[str, Any]:
    return {"result": result, "model_version": model_version, "score": score}
