"""Session fixtures of the end-to-end tests: a real Label Studio 1.23.2 and the backend as run.sh starts it.

Everything is started once per session and stopped at the end:

- ``ls_venv``: Label Studio 1.23.2 in its own venv (``$LS_VENV``, default
  ``~/.cache/lsb/ls-venv-1.23.2``), created under a file lock on first use (a few minutes) and reused
  whenever ``$LS_VENV/bin/label-studio`` exists.
- ``label_studio``: ``label-studio start`` on a free loopback port with a temporary data dir and
  the environment docs/label-studio.md#a-real-label-studio-for-tests gives. The data dir is a copy of a migrated template
  kept in ``~/.cache/lsb`` (``LSB_CACHE_DIR``): the first start ever applies ~400 migrations (about a
  minute), a copy starts in seconds. Project ids start at a random base (the SQLite sequence is moved
  before the start), so the backend's Redis keys (``lsb:train:<project>:...``) never collide with
  another run sharing the test Redis.
- ``ls_token``: a Personal Access Token of the Label Studio admin. Label Studio 1.23 disables legacy
  tokens for new organisations, so the test logs in with the form (session + CSRF) and creates a PAT
  with ``POST /api/token/``; it is a JWT refresh token that the SDK (and the backend) exchange at
  ``/api/token/refresh/`` for 5-minute access tokens. The backend gets it as LABEL_STUDIO_API_KEY.
- ``gemini``: a :class:`~tests.fake_gemini.FakeGemini` answering through an
  :class:`~tests.fake_gemini.Oracle` that knows every synthetic image the tests upload.
- ``base_model``: a small YOLO checkpoint pre-trained on the synthetic site-safety shapes, cached in
  ``~/.cache/lsb`` (built in a background process on first use). It is the backend's
  YOLO_BASE_MODEL, so the first retraining fine-tunes it for a few epochs and YOLO's fallback drafts
  hold real boxes (a random-init model needs minutes before any box scores above the 0.3 threshold).
- ``backend``: ``bash scripts/run.sh`` (gunicorn + one rq worker) with PORT/BIND, the test Redis
  (TEST_REDIS_URL, db 15) with a per-run LSB_QUEUE_PREFIX (so no other test's worker or queue
  clean-up touches its jobs), temporary MODEL_DIR/DATA_DIR/VAR_DIR, no .env file, the LS URL + PAT,
  the fake Gemini, Basic auth + WEBHOOK_SECRET, ROUTING=auto and the default training recipe with a 3-minute
  budget; its output goes to a file.
  It is stopped with SIGINT at the end (like Ctrl-C) and must stop cleanly.

On a failing test the tails of the Label Studio, run.sh and base-model logs are added to the report.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from backend.core import keys
from tests.fake_gemini import DEFAULT_KEY, Answer, FakeGemini, Oracle
from tests.live import free_port, wait_for
from tests.synthetic import colour

ROOT = Path(__file__).resolve().parents[2]
LS_VERSION = "1.23.2"
LS_VENV = Path(os.environ.get("LS_VENV") or Path.home() / ".cache" / "lsb" / f"ls-venv-{LS_VERSION}")
CACHE_DIR = Path(os.environ.get("LSB_CACHE_DIR") or Path.home() / ".cache" / "lsb")
LS_USER = "e2e-admin@example.com"
LS_PASSWORD = "e2e-only-Passw0rd"  # a throwaway Label Studio on a loopback port
#: label_config.xml's labels, in config order (= the YOLO class list).
CLASSES = ("Person with helmet", "Person without helmet", "Helmet")
LOG_TAIL_CHARS = 8000

#: Log lines left out of a failing report: the tests' own polling, which would push out what explains it.
LOG_NOISE = re.compile(r'"GET /api/(predictions|tasks|ml)/?\?[^"]*" 200 |"GET /(health|train/status)[^"]*" 200 ')
#: name -> log file; their tails are attached to failing reports.
LOGS: dict[str, Path] = {}
#: step -> seconds; printed in the terminal summary.
TIMINGS: dict[str, float] = {}


# --- small helpers -------------------------------------------------------------------------------

def tail(path: Path | None, chars: int = LOG_TAIL_CHARS) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars))
            return fh.read().decode(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


@contextlib.contextmanager
def file_lock(path: Path, what: str):
    """An exclusive ``flock`` on ``path`` (other pytest runs on this machine wait for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[e2e] waiting for another run that prepares {what} ({path})", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None, what: str) -> requests.Response:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before answering {url}")
        try:
            response = requests.get(url, timeout=3)
            if response.status_code == 200:
                return response
            last = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.3)
    raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s (last: {last})")


def stop_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group we started (``start_new_session``), SIGKILL what is left."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --- reports -------------------------------------------------------------------------------------

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for name, path in list(LOGS.items()):
            text = "\n".join(line for line in tail(path, 20 * LOG_TAIL_CHARS).splitlines() if not LOG_NOISE.search(line))
            report.sections.append((f"{name} log (last {LOG_TAIL_CHARS} characters of {path}, polling left out)",
                                    text[-LOG_TAIL_CHARS:]))


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "e2e durations (s)")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name:<48} {seconds:8.1f}")


# --- Label Studio ----------------------------------------------------------------------------------

def ensure_ls_venv(venv: Path = LS_VENV) -> Path:
    """The Label Studio venv; created once (under a lock) when ``bin/label-studio`` is missing."""
    exe = venv / "bin" / "label-studio"
    if exe.exists():
        return venv
    with file_lock(venv.parent / f".{venv.name}.lock", "the Label Studio venv"):
        if not exe.exists():
            python = shutil.which("python3") or sys.executable
            started = time.monotonic()
            print(f"\n[e2e] creating {venv} with label-studio=={LS_VERSION} (takes a few minutes)", flush=True)
            subprocess.run([python, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"label-studio=={LS_VERSION}"],
                           check=True)
            TIMINGS["create the Label Studio venv"] = time.monotonic() - started
    if not exe.exists():
        raise RuntimeError(f"{exe} is missing after installing label-studio=={LS_VERSION}")
    return venv


def ls_env(data_dir: Path) -> dict[str, str]:
    """Label Studio's environment (docs/label-studio.md), nothing inherited that it could misread."""
    drop_prefixes = ("LABEL_STUDIO_", "DJANGO_", "POSTGRE_", "REDIS_")
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "USERNAME", "PASSWORD", "USER_TOKEN", "PORT", "HOST", "DEBUG"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop_prefixes) and k not in drop}
    env.update(
        ML_BLOCK_LOCAL_IP="false",
        SSRF_PROTECTION_ENABLED="false",
        SENTRY_DSN="",
        FRONTEND_SENTRY_DSN="",
        COLLECT_ANALYTICS="false",
        LATEST_VERSION_CHECK="false",
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir),
        PYTHONUNBUFFERED="1",
    )
    return env


def start_label_studio(venv: Path, data_dir: Path, port: int, log_path: Path) -> subprocess.Popen:
    cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--host", "127.0.0.1",
           "--internal-host", "127.0.0.1", "-p", str(port), "--data-dir", str(data_dir),
           "--username", LS_USER, "--password", LS_PASSWORD]
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, env=ls_env(data_dir), cwd=data_dir.parent, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def template_dir() -> Path:
    who = hashlib.sha1(f"{LS_USER}\0{LS_PASSWORD}".encode()).hexdigest()[:8]
    return CACHE_DIR / f"ls-{LS_VERSION}-template-{who}"


def ensure_ls_template(venv: Path) -> Path:
    """A migrated data dir with the admin user and no token, made by one real start (cached)."""
    template = template_dir()
    if (template / ".complete").exists():
        return template
    with file_lock(CACHE_DIR / f".{template.name}.lock", "the Label Studio template database"):
        if (template / ".complete").exists():
            return template
        work = Path(tempfile.mkdtemp(prefix="lsb-e2e-template-"))
        try:
            data, log_path, port = work / "data", work / "label-studio.log", free_port()
            started = time.monotonic()
            print("\n[e2e] first Label Studio start on this machine: migrating a template database", flush=True)
            proc = start_label_studio(venv, data, port, log_path)
            try:
                wait_http(f"http://127.0.0.1:{port}/health", 420, proc, "Label Studio (template)")
            except BaseException:
                print(tail(log_path), flush=True)
                raise
            finally:
                stop_group(proc)
            TIMINGS["Label Studio first start (template)"] = time.monotonic() - started
            (data / ".env").unlink(missing_ok=True)  # its SECRET_KEY: every run generates its own
            staging = CACHE_DIR / f".{template.name}.{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(data, staging)
            (staging / ".complete").write_text(json.dumps({"label_studio": LS_VERSION, "user": LS_USER}))
            shutil.rmtree(template, ignore_errors=True)
            os.replace(staging, template)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return template


def set_id_base(db: Path, table: str, base: int) -> None:
    """Next ``table`` row gets id ``base + 1`` (Django's SQLite tables use AUTOINCREMENT)."""
    con = sqlite3.connect(db)
    try:
        with con:
            updated = con.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = ?", (base, table)).rowcount
            if not updated:
                con.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, base))
    finally:
        con.close()


@dataclass
class LabelStudioServer:
    url: str
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen
    user: str = LS_USER
    password: str = LS_PASSWORD

    def log(self) -> str:
        return tail(self.log_path, 10**7)


@pytest.fixture(scope="session")
def ls_venv() -> Path:
    return ensure_ls_venv()


@pytest.fixture(scope="session")
def label_studio(ls_venv, tmp_path_factory) -> LabelStudioServer:
    template = ensure_ls_template(ls_venv)
    root = tmp_path_factory.mktemp("label-studio")
    data = root / "data"
    shutil.copytree(template, data)
    (data / ".complete").unlink(missing_ok=True)
    # SystemRandom: Ultralytics seeds the global `random` (seed 0) in every training, so after the suite's
    # training tests a plain randint gave the same project id in every run, and the previous run's webhook
    # dedupe keys for that id (same task ids 1..16) made this run's TASKS_CREATED a "duplicate".
    set_id_base(data / "label_studio.sqlite3", "project", random.SystemRandom().randint(100_000, 9_000_000))
    port = free_port()
    log_path = root / "label-studio.log"
    LOGS["label-studio"] = log_path
    started = time.monotonic()
    proc = start_label_studio(ls_venv, data, port, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 240, proc, "Label Studio")
    except BaseException:
        stop_group(proc)
        raise
    TIMINGS["Label Studio start"] = time.monotonic() - started
    yield LabelStudioServer(url, port, data, log_path, proc)
    started = time.monotonic()
    stop_group(proc)
    TIMINGS["Label Studio stop"] = time.monotonic() - started


def create_pat(base_url: str, user: str, password: str) -> str:
    """Log in with the form (session + CSRF) and create a Personal Access Token (``POST /api/token/``)."""
    session = requests.Session()
    response = session.get(f"{base_url}/user/login/", timeout=30)
    response.raise_for_status()
    response = session.post(
        f"{base_url}/user/login/",
        data={"email": user, "password": password, "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")},
        headers={"Referer": f"{base_url}/user/login/"}, allow_redirects=False, timeout=30,
    )
    if response.status_code != 302:
        raise RuntimeError(f"Label Studio login as {user} failed: HTTP {response.status_code}")
    headers = {"X-CSRFToken": session.cookies.get("csrftoken", ""), "Referer": f"{base_url}/"}
    response = session.post(f"{base_url}/api/token/", headers=headers, timeout=30)
    if response.status_code == 409:  # one exists already (not in a fresh copy): revoke, then create
        for token in session.get(f"{base_url}/api/token/", timeout=30).json():
            session.post(f"{base_url}/api/token/blacklist/", json={"refresh": token["token"]}, headers=headers, timeout=30)
        response = session.post(f"{base_url}/api/token/", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["token"]


@pytest.fixture(scope="session")
def ls_token(label_studio) -> str:
    """A Personal Access Token (JWT refresh token) of the Label Studio admin."""
    return create_pat(label_studio.url, label_studio.user, label_studio.password)


class LSApi:
    """Plain HTTP to Label Studio with the PAT (exchanged for short-lived Bearer access tokens)."""

    def __init__(self, base_url: str, pat: str):
        self.base_url = base_url.rstrip("/")
        self.pat = pat
        self.session = requests.Session()
        self._access: str | None = None
        self._access_at = 0.0

    def access_token(self, refresh: bool = False) -> str:
        if refresh or self._access is None or time.monotonic() - self._access_at > 240:
            response = requests.post(f"{self.base_url}/api/token/refresh/", json={"refresh": self.pat}, timeout=30)
            response.raise_for_status()
            self._access, self._access_at = response.json()["access"], time.monotonic()
        return self._access

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 150)
        headers = dict(kwargs.pop("headers", None) or {})
        response = None
        for attempt in range(2):
            headers["Authorization"] = f"Bearer {self.access_token(refresh=attempt > 0)}"
            response = self.session.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)
            if response.status_code != 401:
                break
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("DELETE", path, **kwargs)


@pytest.fixture(scope="session")
def ls_api(label_studio, ls_token) -> LSApi:
    return LSApi(label_studio.url, ls_token)


@pytest.fixture(scope="session")
def ls_sdk(label_studio, ls_token):
    from label_studio_sdk import LabelStudio

    return LabelStudio(base_url=label_studio.url, api_key=ls_token)


# --- fake Gemini -----------------------------------------------------------------------------------

@dataclass
class GeminiFake:
    server: FakeGemini
    oracle: Oracle

    @property
    def calls(self):
        return self.server.calls

    def fail_with(self, answer: Answer) -> None:
        """Every call from now on gets ``answer`` (e.g. a 500): the backend must fall back to YOLO."""
        self.server.clear()
        self.server.responder = lambda request: answer

    def restore(self) -> None:
        self.server.responder = self.oracle


@pytest.fixture(scope="session")
def gemini() -> GeminiFake:
    oracle = Oracle({label: colour(label, CLASSES) for label in CLASSES})
    with FakeGemini(api_key=DEFAULT_KEY, responder=oracle) as server:
        yield GeminiFake(server, oracle)


# --- the YOLO base checkpoint ----------------------------------------------------------------------

#: How the cached base checkpoint is trained (the recipe of tests/worker_fixtures.good_model, with
#: label_config.xml's classes). Changing it (or tests/synthetic.py, or Ultralytics) makes a new one.
BASE_RECIPE = {"model": "yolov8n.yaml", "train_images": 40, "val_images": 8, "seed": 424242, "size": [128, 96],
               "max_objects": 2, "imgsz": 96, "epochs": 16, "batch": 4, "warmup_epochs": 0}


def base_images():
    """The recipe's synthetic images (train first, then val)."""
    from tests.synthetic import make_images

    recipe = BASE_RECIPE
    return make_images(recipe["train_images"] + recipe["val_images"], seed=recipe["seed"], classes=CLASSES,
                       size=tuple(recipe["size"]), max_objects=recipe["max_objects"])


def base_model_path() -> Path:
    """Keyed by the recipe, the Ultralytics version and the pixels and boxes it trains on (so an edit of
    tests/synthetic.py that changes nothing drawn keeps the cache, and one that does makes a new one)."""
    data = hashlib.sha1()
    for image in base_images():
        data.update(image.image.tobytes())
        data.update(repr([(box.label, [round(v, 3) for v in box.xyxy]) for box in image.boxes]).encode())
    digest = hashlib.sha1(json.dumps({
        "recipe": BASE_RECIPE, "classes": CLASSES, "ultralytics": importlib.metadata.version("ultralytics"),
        "data": data.hexdigest(),
    }, sort_keys=True).encode()).hexdigest()[:12]
    return CACHE_DIR / f"e2e-yolo-base-{digest}.pt"


def build_base_model(out: str | Path) -> None:
    """Train the base checkpoint into ``out`` (run in a subprocess by the ``base_model`` fixture)."""
    out = Path(out)
    with file_lock(out.with_name(f".{out.name}.lock"), "the YOLO base checkpoint"):
        if out.is_file():
            return
        from backend.core.ultralytics_env import prepare

        prepare()
        import torch
        from ultralytics import YOLO

        recipe = BASE_RECIPE
        work = Path(tempfile.mkdtemp(prefix="lsb-e2e-base-"))
        try:
            n_train = recipe["train_images"]
            images = base_images()
            for split, subset in (("train", images[:n_train]), ("val", images[n_train:])):
                (work / split / "images").mkdir(parents=True)
                (work / split / "labels").mkdir(parents=True)
                for i, im in enumerate(subset):
                    im.image.save(work / split / "images" / f"{i}.png")
                    lines = []
                    for box in im.boxes:
                        x0, y0, x1, y1 = box.xyxy
                        lines.append(f"{CLASSES.index(box.label)} {(x0 + x1) / 2 / im.width:.6f} {(y0 + y1) / 2 / im.height:.6f} "
                                     f"{(x1 - x0) / im.width:.6f} {(y1 - y0) / im.height:.6f}")
                    (work / split / "labels" / f"{i}.txt").write_text("\n".join(lines) + "\n")
            data = work / "data.yaml"
            data.write_text(f"path: {work}\ntrain: train/images\nval: val/images\nnames:\n"
                            + "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASSES)))
            threads = os.cpu_count() or 1

            def set_threads(_trainer) -> None:
                torch.set_num_threads(threads)

            model = YOLO(recipe["model"])
            model.add_callback("on_pretrain_routine_start", set_threads)
            model.add_callback("on_train_start", set_threads)
            model.train(data=str(data), epochs=recipe["epochs"], imgsz=recipe["imgsz"], batch=recipe["batch"],
                        nbs=recipe["batch"], warmup_epochs=recipe["warmup_epochs"], device="cpu", workers=0,
                        amp=False, plots=False, pretrained=False, project=str(work / "runs"), name="run",
                        exist_ok=True, verbose=False, seed=0)
            tmp = out.with_name(f".{out.name}.{os.getpid()}")
            shutil.copyfile(model.trainer.best, tmp)
            os.replace(tmp, out)
            print(f"[e2e] base checkpoint {out}: {model.trainer.metrics}", flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)


@dataclass
class BaseModel:
    path: Path
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float = 900) -> Path:
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the YOLO base checkpoint was not ready within {timeout:.0f} s:\n{tail(self.log_path)}")
            if self.proc.returncode != 0:
                pytest.fail(f"building the YOLO base checkpoint failed (status {self.proc.returncode}):\n{tail(self.log_path)}")
            TIMINGS.setdefault("build the YOLO base checkpoint (once, cached)", time.monotonic() - self.started)
        assert self.path.is_file(), f"no base checkpoint at {self.path}"
        return self.path


@pytest.fixture(scope="session")
def base_model(tmp_path_factory) -> BaseModel:
    path = base_model_path()
    if path.is_file():
        yield BaseModel(path)
        return
    log_path = tmp_path_factory.mktemp("base-model") / "build.log"  # shown by BaseModel.wait on failure
    print(f"\n[e2e] building the YOLO base checkpoint {path} in the background (once; cached)", flush=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from tests.e2e.conftest import build_base_model; build_base_model(sys.argv[1])",
             str(path)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
    yield BaseModel(path, proc, log_path)
    if proc.poll() is None:
        started = time.monotonic()
        stop_group(proc, timeout=5)
        TIMINGS["stop the unfinished base-checkpoint build"] = time.monotonic() - started


# --- the backend (scripts/run.sh) ------------------------------------------------------------------

def settings_env_names() -> set[str]:
    """Every environment variable backend.core.settings reads (they are all set here or dropped)."""
    from pydantic import AliasChoices

    from backend.core.settings import Settings

    names = set()
    for name, info in Settings.model_fields.items():
        names.add(name.upper())
        if isinstance(info.validation_alias, AliasChoices):
            names.update(str(choice).upper() for choice in info.validation_alias.choices)
    return names


def _cmdline(proc) -> str:
    try:
        return " ".join(proc.cmdline())
    except Exception:
        return ""


@dataclass
class Backend:
    url: str
    port: int
    auth: tuple[str, str]
    webhook_secret: str
    log_path: Path
    proc: subprocess.Popen
    model_dir: Path
    data_dir: Path
    env: dict[str, str]
    projects: set[int] = field(default_factory=set)
    initial_pids: dict[str, Any] = field(default_factory=dict)  # service_pids() once started

    # HTTP
    def get(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.get(f"{self.url}{path}", auth=self.auth, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 120)
        return requests.post(f"{self.url}{path}", auth=self.auth, **kwargs)

    def setup_version(self, project: int, label_config: str) -> str:
        """What ``/setup`` answers now: the model version Label Studio compares predictions with."""
        response = self.post("/setup", json={"project": f"{project}.{int(time.time())}", "schema": label_config})
        response.raise_for_status()
        return response.json()["model_version"]

    def train_status(self, project: int) -> dict:
        response = self.get("/train/status", params={"project": project})
        response.raise_for_status()
        return response.json()

    # logs
    def log(self) -> str:
        return tail(self.log_path, 10**8)

    def access(self, method: str, path: str, status: int | None = None, agent: str | None = None) -> list[str]:
        """gunicorn access-log lines of ``method path`` (optionally with that status / user agent)."""
        needle = f'"{method} {path} HTTP/'
        lines = [line for line in self.log().splitlines() if line.startswith("[web]") and needle in line]
        if status is not None:
            lines = [line for line in lines if re.search(rf'HTTP/[0-9.]+" {status} ', line)]
        if agent is not None:
            lines = [line for line in lines if agent in line]
        return lines

    def story(self, project: int | None = None) -> str:
        """What the backend did with events and jobs (webhooks, pre-labeling, training, errors): a timeout's explanation."""
        wanted = re.compile(r'"POST /(webhook|predict)|pre-label|prelabel|not in the project|training|Traceback|Error|'
                            r'ERROR|WARNING|failed')
        lines = [line for line in self.log().splitlines() if wanted.search(line)]
        if project is not None:
            lines = [line for line in lines if "project" not in line or str(project) in line]
        return "backend log, events and jobs (last 60):\n" + "\n".join(lines[-60:])

    # processes
    def service_pids(self) -> dict[str, Any]:
        """run.sh, the gunicorn master and workers, the rq worker (not its per-job work horses)."""
        import psutil

        root = psutil.Process(self.proc.pid)
        procs = root.children(recursive=True)
        gunicorn = [p for p in procs if "gunicorn" in _cmdline(p)]
        gunicorn_pids = {p.pid for p in gunicorn}
        masters = [p for p in gunicorn if p.ppid() not in gunicorn_pids]
        master_pids = {p.pid for p in masters}
        rq = [p for p in procs if re.search(r"\brq\b.*\bworker\b|^rq:", _cmdline(p))]
        rq_pids = {p.pid for p in rq}
        return {
            "run.sh": root.pid,
            "gunicorn master": sorted(master_pids),
            "gunicorn workers": sorted(p.pid for p in gunicorn if p.ppid() in master_pids),
            "rq worker": sorted(p.pid for p in rq if p.ppid() not in rq_pids),
        }


def _rq_worker_ready(redis_url: str, pids: set[int], prefix: str) -> bool:
    import redis as redis_lib
    from rq import Worker

    connection = redis_lib.Redis.from_url(redis_url)
    try:
        wanted = {f"{prefix}training", f"{prefix}prelabel"}
        return any(worker.pid in pids and wanted <= set(worker.queue_names()) for worker in Worker.all(connection=connection))
    finally:
        connection.close()


def cleanup_redis(redis_url: str, projects: set[int], queue_prefix: str | None = None) -> None:
    """Forget this run's projects and queues in the shared test Redis (and a Gemini breaker left open).

    Job hashes are left to expire (RQ's result/failure TTLs)."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    try:
        patterns = ["lsb:gemini:breaker:*"]
        for project in projects:
            patterns += keys.project_patterns(project)  # webhook dedupe and pre-labeling claims included
        if queue_prefix:
            patterns += [f"rq:queue:{queue_prefix}*", f"rq:*:{queue_prefix}*"]
            for name in (f"{queue_prefix}training", f"{queue_prefix}prelabel"):
                client.srem("rq:queues", f"rq:queue:{name}")
        for pattern in patterns:
            for key in client.scan_iter(pattern):
                client.delete(key)
    finally:
        client.close()


def stop_backend(backend: Backend, timeout: float = 45.0) -> list[str]:
    """SIGINT to run.sh (its Ctrl-C path) and wait; returns what went wrong (empty = clean stop)."""
    import psutil

    problems: list[str] = []
    try:
        family = psutil.Process(backend.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    started = time.monotonic()
    if backend.proc.poll() is None:
        os.kill(backend.proc.pid, signal.SIGINT)
        try:
            backend.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"scripts/run.sh did not exit within {timeout:.0f} s of SIGINT")
            with contextlib.suppress(ProcessLookupError):
                os.kill(backend.proc.pid, signal.SIGKILL)
            backend.proc.wait(10)
    else:
        problems.append(f"scripts/run.sh had already exited (status {backend.proc.returncode})")
    TIMINGS["backend stop (SIGINT to run.sh)"] = time.monotonic() - started
    leftovers = []
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{proc.pid} {_cmdline(proc)[:120]}")
                proc.kill()
    if leftovers:
        problems.append("processes left running after run.sh exited (killed now): " + "; ".join(leftovers))
    if backend.proc.returncode not in (0, None) and not problems:
        problems.append(f"scripts/run.sh exited with status {backend.proc.returncode} after SIGINT")
    return problems


@pytest.fixture(scope="session")
def backend(base_model, label_studio, ls_token, gemini, redis_url, tmp_path_factory) -> Backend:
    with running_backend(tmp_path_factory.mktemp("backend"), base_model, label_studio, ls_token, gemini, redis_url) as server:
        yield server


@contextlib.contextmanager
def running_backend(root: Path, base_model: BaseModel, label_studio: LabelStudioServer, ls_token: str, gemini: GeminiFake,
                    redis_url: str, extra_env: dict[str, str] | None = None, name: str = "scripts/run.sh (web + worker)"):
    """``scripts/run.sh`` with the e2e environment (plus ``extra_env``), stopped and its Redis state removed after."""
    port = free_port()
    user, password, secret = "label-studio", secrets.token_urlsafe(18), secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if k not in settings_env_names()}
    for var in ("LSB_TRAIN_RETRY_INTERVALS", "LSB_TRAIN_LOCK_TTL", "PROMETHEUS_MULTIPROC_DIR", "BIND"):
        env.pop(var, None)
    # Own RQ queues in the shared test Redis: other tests' workers and queue clean-ups never meet ours.
    queue_prefix = f"e2e{secrets.token_hex(4)}-"
    env.update({
        # scripts/run.sh and gunicorn.conf.py
        "VENV": sys.prefix, "ENV_FILE": str(root / "no.env"), "VAR_DIR": str(root / "var"),
        "PORT": str(port), "BIND": f"127.0.0.1:{port}", "WORKERS": "2", "THREADS": "8", "STOP_TIMEOUT": "10",
        "REDIS_URL": redis_url, "LSB_QUEUE_PREFIX": queue_prefix, "LOG_LEVEL": "INFO",
        "MODEL_DIR": str(root / "models"), "DATA_DIR": str(root / "data"),
        "LABEL_STUDIO_URL": label_studio.url, "LABEL_STUDIO_API_KEY": ls_token,
        "GEMINI_API_KEY": gemini.server.api_key, "GEMINI_BASE_URL": gemini.server.base_url,
        "GEMINI_TIMEOUT": "5", "GEMINI_TASK_DEADLINE": "4", "GEMINI_CACHE_TTL": "3600",
        "GEMINI_CONCURRENCY": "4",  # test_retrieve_many: a few hundred tasks outgrow LS's wait at a slow Gemini
        "BASIC_AUTH_USER": user, "BASIC_AUTH_PASS": password, "WEBHOOK_SECRET": secret,
        # The default training recipe (TRAIN_IMGSZ, TRAIN_BATCH, TRAIN_DRAFTS on, ...) from the pre-trained base
        # checkpoint, started by "Start Training" only (not by the annotation count). Only the time budget is
        # shorter than the default 5 minutes, so that the suite stays under 15 minutes; test_label_studio.py
        # checks that the promoted model still beats the drafts. ROUTING=auto: YOLO drafts once it measured better.
        "YOLO_BASE_MODEL": str(base_model.path), "TRAIN_TIME_LIMIT_MIN": "3", "ROUTING": "auto",
        "TRAIN_MIN_NEW_ANNOTATIONS": "1000", "TRAIN_VAL_MIN": "4", "TRAIN_JOB_TIMEOUT": "900",
        **(extra_env or {}),
    })
    log_path = root / "run.log"
    LOGS[name] = log_path
    cleanup_redis(redis_url, set())
    started = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Backend(f"http://127.0.0.1:{port}", port, (user, password), secret, log_path, proc,
                     root / "models", root / "data", env)
    try:
        wait_http(f"{server.url}/health", 120, proc, "scripts/run.sh (gunicorn)")

        def worker_ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"scripts/run.sh exited with status {proc.returncode}:\n{tail(log_path)}")
            return _rq_worker_ready(redis_url, set(server.service_pids()["rq worker"]), queue_prefix)

        wait_for(worker_ready, 90,
                 f"the rq worker started by scripts/run.sh to listen on {queue_prefix}training and {queue_prefix}prelabel",
                 on_timeout=lambda: tail(log_path))
    except BaseException:
        stop_backend(server)
        raise
    TIMINGS["backend start (scripts/run.sh)" if extra_env is None else f"backend start ({name})"] = time.monotonic() - started
    server.initial_pids = server.service_pids()
    try:
        yield server
    finally:
        problems = stop_backend(server)
        cleanup_redis(redis_url, server.projects, queue_prefix)
    if problems:
        pytest.fail("scripts/run.sh did not stop cleanly: " + " | ".join(problems) + f"\n{tail(log_path, 3000)}")
