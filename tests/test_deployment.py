"""The deployment files agree with each other and with scripts/run.sh, and run.sh really runs.

No Docker engine is needed: docker-compose.yml and the Dockerfile are checked as text against the
commands scripts/run.sh runs; run.sh itself is started for real (marked slow).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import termios
import threading
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.live import free_port
from tests.paths import TEST_REDIS_URL

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)  # the venv running the tests is the one run.sh should use
RUN_SH = ROOT / "scripts" / "run.sh"
REDIS_SH = ROOT / "scripts" / "redis.sh"
BOOTSTRAP_SH = ROOT / "scripts" / "bootstrap.sh"
CI_RUN = ROOT / ".ci" / "run"

GUNICORN_ARGS = ["-c", "gunicorn.conf.py", "backend.web.wsgi:app"]
WORKER_QUEUES = ["training", "prelabel"]
DEV_ONLY_PACKAGES = {"tests", "bench"}  # top-level packages the image does not need


# --- helpers -------------------------------------------------------------------------------------

def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    """Active KEY=value entries of .env.example."""
    entries = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line.strip())
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?msg} substitution."""

    def sub(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        value = values.get(name)
        if op in (":-", ":?") and not value or op in ("-", "?") and value is None:
            return arg if op.endswith("-") else ""
        return value or ""

    return re.sub(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}", sub, text)


def dockerfile() -> str:
    # Join continuation lines so each instruction is one line.
    return re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())


def dockerfile_instruction(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile().splitlines() if line.split(None, 1)[:1] == [name]]


def run_sh_command(executable: str) -> list[str]:
    """The arguments run.sh passes to ``$VENV/bin/<executable>``, up to the output redirection."""
    text = RUN_SH.read_text().replace("\\\n", " ")
    match = re.search(r'^\s*(?:\w+="[^"]*"\s+)*"\$VENV/bin/' + re.escape(executable) + r'"(.*?)\s[<>]', text, re.M)
    assert match, f"scripts/run.sh does not start $VENV/bin/{executable}"
    # Queue names carry the optional test prefix (worker/queue.py: LSB_QUEUE_PREFIX).
    return [arg.replace("${QUEUE_PREFIX}", "") for arg in shlex.split(match.group(1))]


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


# --- docker-compose.yml and .env.example -------------------------------------------------------------

def test_compose_services_and_their_references_exist():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"label-studio", "redis", "backend", "worker", "rq-dashboard", "prometheus", "grafana"}
    assert {name for name, service in services.items() if service.get("profiles")} == {"prometheus", "grafana"}
    declared_volumes = set(doc.get("volumes") or {})
    defaults = env_example()
    for name, service in services.items():
        for target, spec in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if isinstance(spec, dict) and spec.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target} to be healthy, which has no healthcheck"
        for volume in service.get("volumes") or []:
            source = interpolate(volume if isinstance(volume, str) else volume["source"], defaults).split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing path {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"
        for entry in service.get("env_file") or []:
            path, required = (entry, True) if isinstance(entry, str) else (entry["path"], entry.get("required", True))
            if required:
                assert (ROOT / path).is_file(), f"{name}: env_file {path} does not exist"
            else:  # .env is not committed: its template must be
                assert (ROOT / f"{path}.example").is_file(), f"{name}: optional {path} has no {path}.example"
        if "build" in service:
            context = service["build"] if isinstance(service["build"], str) else service["build"].get("context", ".")
            assert (ROOT / context / "Dockerfile").is_file()
    # Every declared volume is used somewhere.
    used = {interpolate(v, defaults).split(":")[0]
            for s in services.values() for v in s.get("volumes") or [] if isinstance(v, str)}
    assert declared_volumes <= used, declared_volumes - used


def test_compose_settings():
    services = compose()["services"]
    ls = services["label-studio"]
    assert ls["image"] == "heartexlabs/label-studio:1.23.2"
    ls_env = ls["environment"]
    for key, value in {
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true", "LOCAL_FILES_DOCUMENT_ROOT": "/label-studio/files",
        "ML_BLOCK_LOCAL_IP": "false", "SSRF_PROTECTION_ENABLED": "false", "SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false", "LATEST_VERSION_CHECK": "false",
    }.items():
        assert ls_env[key] == value, key
    assert services["redis"]["image"].startswith("redis:7")
    assert "--appendonly" in services["redis"]["command"] and "yes" in services["redis"]["command"]
    for name in ("backend", "worker"):
        service = services[name]
        env = service["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["LABEL_STUDIO_URL"] == "http://label-studio:8080"
        assert env["MODEL_DIR"] == "/data/models" and env["DATA_DIR"] == "/data/cache"
        assert env["LOCAL_FILES_DOCUMENT_ROOT"] == ls_env["LOCAL_FILES_DOCUMENT_ROOT"]
        mounts = {m.split(":")[1]: m for m in (interpolate(v, env_example()) for v in service["volumes"])}
        assert mounts["/data/models"].startswith("models:") and mounts["/data/cache"].startswith("cache:")
        media = mounts[ls_env["LOCAL_FILES_DOCUMENT_ROOT"]]
        assert media.endswith(":ro"), "the backend only reads Label Studio's media"
        assert media.split(":")[0] in [interpolate(v, env_example()).split(":")[0] for v in ls["volumes"]], \
            "backend and Label Studio share the media volume"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["healthcheck"] == {"disable": True}, "the image's HTTP healthcheck cannot pass in the worker"
    assert services["backend"]["environment"]["PORT"] == "9090", "a PORT in .env must not move the container's port"
    assert str(services["backend"]["ports"][0]).endswith(":9090")
    dashboard = services["rq-dashboard"]
    assert dashboard["environment"]["RQ_DASHBOARD_REDIS_URL"] == "redis://redis:6379/0"
    assert "9181" in str(dashboard["ports"])


def _compose_command(service: dict, values: dict[str, str]) -> list[str]:
    command = service["command"]
    command = shlex.split(command) if isinstance(command, str) else command
    return [interpolate(arg, values) for arg in command]


@pytest.mark.parametrize("prefix", ["", "staging-"])
def test_compose_worker_listens_where_the_backend_enqueues(prefix, monkeypatch):
    """Both containers get LSB_QUEUE_PREFIX from the same ${LSB_QUEUE_PREFIX}; the worker's queue
    names are the ones backend/core/queue.py computes from it (a prefix in .env once left the worker
    listening on queues nobody filled)."""
    from backend.core.queue import PRELABEL_QUEUE, TRAINING_QUEUE, queue_name

    services = compose()["services"]
    values = {**env_example(), "LSB_QUEUE_PREFIX": prefix}
    for name in ("backend", "worker"):
        assert interpolate(services[name]["environment"]["LSB_QUEUE_PREFIX"], values) == prefix, name
    monkeypatch.setenv("LSB_QUEUE_PREFIX", prefix)
    command = _compose_command(services["worker"], values)
    assert command[-2:] == [queue_name(TRAINING_QUEUE), queue_name(PRELABEL_QUEUE)]
    assert command[-2:] == [prefix + queue for queue in WORKER_QUEUES]


def test_compose_backend_and_worker_share_the_prometheus_directory():
    """Jobs' Gemini calls and trainings reach /metrics: one multiprocess directory for every process,
    on one volume, and one PID namespace, since prometheus_client names its files by pid."""
    doc = compose()
    services = doc["services"]
    paths = {services[name]["environment"].get("PROMETHEUS_MULTIPROC_DIR") for name in ("backend", "worker")}
    assert len(paths) == 1 and None not in paths, paths
    (path,) = paths
    mounts = {}
    for name in ("backend", "worker"):
        mounts[name] = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == path]
        assert len(mounts[name]) == 1, f"{name} does not mount {path}"
        assert not [m for m in services[name].get("tmpfs") or [] if m.split(":")[0] == path], f"{name}: a private tmpfs"
    assert mounts["backend"] == mounts["worker"], mounts
    volume = doc["volumes"][mounts["backend"][0]]
    assert volume["driver_opts"]["type"] == "tmpfs", "fresh metrics at every start"
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile()).group(1)
    assert f"uid={uid}" in volume["driver_opts"]["o"], "the image's user must be able to write there"
    assert services["worker"]["pid"] == "service:backend"
    assert "backend" in services["worker"]["depends_on"]


def test_compose_rq_dashboard_reads_our_rq_version():
    """rq-dashboard 0.9.0 (registries read with rq 2/3's get_job_count(cleanup=...)) on the rq and redis
    pins of requirements.txt: a prebuilt image's rq is whatever was current when it was built."""
    dashboard = compose()["services"]["rq-dashboard"]
    assert "image" not in dashboard or not dashboard["image"].startswith("eoranged/"), "eoranged/rq-dashboard predates rq 2"
    inline = dashboard["build"]["dockerfile_inline"]
    assert "rq-dashboard==0.9.0" in inline and "-c /tmp/requirements.txt" in inline
    assert "six==" in inline, "rq_dashboard.web imports six, which rq-dashboard 0.9.0 does not declare"
    assert "COPY requirements.txt /tmp/requirements.txt" in inline
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M))
    assert pins["rq"].split(".")[0] == "3", "the assertion in the dashboard's build expects rq 3"
    assert "rq.VERSION.split('.')[0] == '3'" in inline
    assert "$" not in inline, "compose would interpolate it"


def test_every_compose_variable_is_in_env_example():
    text = (ROOT / "docker-compose.yml").read_text()
    referenced = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
    referenced |= set(re.findall(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)", text))
    assert referenced, "expected ${VAR} references in docker-compose.yml"
    missing = referenced - set(env_example())
    assert not missing, f"add to .env.example: {sorted(missing)}"


def test_env_example_names_are_known_and_load():
    """No typos: every name in .env.example is a setting, a compose variable or a run.sh knob."""
    from backend.core.settings import Settings

    setting_names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        setting_names |= set(getattr(alias, "choices", None) or [name.upper()])
    compose_vars = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    run_knobs = {"PORT", "WORKERS", "THREADS", "BIND"}
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, re.M))
    unknown = names - setting_names - compose_vars - run_knobs
    assert not unknown, unknown
    entries = env_example()
    for key in ("GEMINI_API_KEY", "LABEL_STUDIO_API_KEY"):
        assert entries[key] == "", f"{key} must be empty in the template"
    for key in ("WEBHOOK_SECRET", "BASIC_AUTH_PASS"):  # placeholders the backend refuses to start with
        assert entries[key].startswith("replace-with-"), f"{key} needs a placeholder"
    assert entries["BASIC_AUTH_USER"], "Label Studio authenticates to /setup and /predict with Basic auth only"

    # The file is sourced by run.sh (bash): as is, the settings refuse both placeholders by name; with
    # the secrets filled in, it gives valid settings.
    def load(fill_in: str) -> subprocess.CompletedProcess:
        code = "from backend.core.settings import Settings; Settings()"
        return subprocess.run(
            ["bash", "-c", f'set -euo pipefail; set -a; . ./.env.example; {fill_in} set +a; exec "{sys.executable}" -c "{code}"'],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )

    refused = load("")
    assert refused.returncode != 0
    for key in ("WEBHOOK_SECRET", "BASIC_AUTH_PASS"):
        assert f"{key} is still the placeholder from .env.example" in refused.stderr, refused.stderr
    filled = load("WEBHOOK_SECRET=hook-0123456789abcdef; BASIC_AUTH_PASS=pass-0123456789abcdef;")
    assert filled.returncode == 0, filled.stderr


# --- Dockerfile ----------------------------------------------------------------------------------------

def test_dockerfile_runs_what_run_sh_runs():
    assert dockerfile().startswith("# syntax") or "FROM python:3.11-slim" in dockerfile()
    assert dockerfile_instruction("FROM") == ["python:3.11-slim"]
    cmd = json.loads(dockerfile_instruction("CMD")[-1])
    assert cmd == ["gunicorn", *GUNICORN_ARGS]
    assert run_sh_command("gunicorn") == GUNICORN_ARGS
    services = compose()["services"]
    assert services["backend"].get("command", cmd) == cmd

    worker_cmd = _compose_command(services["worker"], {**env_example(), "LSB_QUEUE_PREFIX": ""})
    assert worker_cmd[:2] == ["rq", "worker"]
    assert worker_cmd[worker_cmd.index("--url") + 1] == services["worker"]["environment"]["REDIS_URL"]
    run_args = run_sh_command("rq")
    assert run_args[:3] == ["worker", "--url", "$REDIS_URL"]
    assert worker_cmd[4:] == run_args[3:] == ["--with-scheduler", *WORKER_QUEUES]
    assert "rq worker --url \"$REDIS_URL\" --with-scheduler training prelabel" in dockerfile()


def test_only_the_training_worker_sleeps_its_openmp_threads():
    """PASSIVE for training beside serving (6x faster steps), OpenMP's default for serving (2x faster predicts)."""
    text = RUN_SH.read_text()
    assert not re.search(r"^\s*export\s+OMP_WAIT_POLICY", text, re.M), "run.sh must not set it for gunicorn too"
    assert re.search(r'^\s*OMP_WAIT_POLICY="\$WORKER_OMP_WAIT_POLICY" "\$VENV/bin/rq" worker', text, re.M)
    assert 'WORKER_OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"' in text
    services = compose()["services"]
    assert services["worker"]["environment"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "OMP_WAIT_POLICY" not in services["backend"]["environment"]
    assert "OMP_WAIT_POLICY" not in " ".join(dockerfile_instruction("ENV"))


def test_dockerfile_healthcheck_user_and_env():
    (health,) = dockerfile_instruction("HEALTHCHECK")
    assert "/health" in health and '"python"' in health and "curl" not in health
    assert "PORT" in health and "9090" in health
    assert dockerfile_instruction("EXPOSE") == ["9090"]
    users = dockerfile_instruction("USER")
    assert users and users[-1] not in ("root", "0")
    env = " ".join(dockerfile_instruction("ENV"))
    for pair in ("YOLO_OFFLINE=1", "YOLO_AUTOINSTALL=0", "YOLO_CONFIG_DIR=/app/var/ultralytics",
                 "MODEL_DIR=/data/models", "DATA_DIR=/data/cache"):
        assert pair in env
    assert not [line for line in dockerfile_instruction("RUN") if "apt-get" in line], \
        "no system packages: the one OpenCV is the headless wheel (no libGL)"
    assert "libgl1" not in dockerfile() and "libglib2.0-0" not in dockerfile()
    assert dockerfile_instruction("WORKDIR") == ["/app"]


def test_dockerfile_installs_with_no_deps_and_checks_the_result():
    """Like make install: pip never resolves (it would bring back Ultralytics' GUI OpenCV), then
    scripts/check_env.py fails the build on a missing dependency or a non-headless cv2."""
    installs = [line for line in dockerfile_instruction("RUN") if "pip install" in line]
    commands = [cmd.strip() for line in installs for cmd in line.split("&&") if "pip install" in cmd]
    assert commands and all("--no-deps" in cmd for cmd in commands), commands
    text = dockerfile()
    assert "COPY scripts/check_env.py" in text
    assert text.index("pip install --no-deps -r /tmp/requirements-cpu.txt") < text.index("python /tmp/check_env.py")


def test_dockerfile_runs_the_lsb_command_as_the_service_user():
    text = dockerfile()
    assert "RUN lsb --help" in text, "the build does not check that `lsb` starts"
    assert text.index("pip install --no-deps .") < text.index("USER app") < text.index("RUN lsb --help")


def test_dockerfile_copies_every_package():
    copied = {src.rstrip("/") for line in dockerfile_instruction("COPY") for src in line.split()[:-1] if not src.startswith("--")}
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} - DEV_ONLY_PACKAGES
    assert {"backend", "worker"} <= packages
    assert packages <= copied, f"not copied into the image: {packages - copied}"
    assert {"gunicorn.conf.py", "label_config.xml", "scripts", "requirements.txt", "pyproject.toml"} <= copied
    assert "requirements-dev.txt" not in copied, "tests, lint and fuzzing stay out of the image"


def test_dockerfile_can_bake_checked_base_weights_where_the_worker_looks():
    """ARG YOLO_BASE_WEIGHTS: `lsb base-model install` checks the file and writes it with its checksum to the
    folder YOLO_BASE_BUNDLED_DIR names, outside the /data volumes (which would hide it); empty = nothing baked."""
    from backend.core.settings import Settings

    text = dockerfile()
    assert "YOLO_BASE_WEIGHTS=" in dockerfile_instruction("ARG")  # empty by default: no weights needed to build
    env = " ".join(dockerfile_instruction("ENV"))
    assert "YOLO_BASE_BUNDLED_DIR=/app/weights" in env and "yolo_base_bundled_dir" in Settings.model_fields
    (bake,) = [line for line in dockerfile_instruction("RUN") if "base-model install" in line]
    assert bake.startswith("--mount=type=bind,target=/tmp/context ")
    assert 'if [ -n "$YOLO_BASE_WEIGHTS" ]; then' in bake
    assert 'lsb base-model install "/tmp/context/$YOLO_BASE_WEIGHTS" --dir /app/weights' in bake
    assert "YOLO_CONFIG_DIR=/tmp/yolo-build" in bake, "root must not own the service's Ultralytics config folder"
    baked = text.index('lsb base-model install "')
    assert text.index("pip install --no-deps .") < text.index("ARG YOLO_BASE_WEIGHTS") < baked < text.index("USER app")


def test_dockerfile_installs_the_lsb_command_without_resolving_again():
    """`pip install --no-deps .` after the code is copied: the entry point, nothing beyond the lock."""
    installs = [line for line in dockerfile_instruction("RUN") if "pip install --no-deps ." in line]
    assert installs, "the image does not install the lsb command"
    text = dockerfile()
    assert text.index("COPY pyproject.toml") < text.index("pip install --no-deps .")
    assert text.index("COPY worker/") < text.index("pip install --no-deps .")
    assert 'lsb = "worker.cli.__main__:main"' in (ROOT / "pyproject.toml").read_text()


def test_dockerfile_installs_cpu_torch_and_the_rest_of_the_lock():
    """The runtime lock only; the OWL-ViT extra behind a build argument; never the dev lock."""
    text = dockerfile()
    pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M))
    assert f"torch=={pins['torch']}" in text and f"torchvision=={pins['torchvision']}" in text
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert "requirements-dev" not in text.replace("requirements-dev.txt, which the image never installs", "")
    assert "ARG WITH_OWLVIT=false" in text
    assert re.search(r'if \[ "\$WITH_OWLVIT" = true \]; then extra=requirements-owlvit\.txt; else extra=; fi', text)
    assert "cat requirements.txt $extra" in text
    (pattern,) = re.findall(r"grep -vE '([^']+)'", text)
    assert re.match(pattern, "-r requirements.txt"), "the extra's `-r requirements.txt` would bring back the CUDA torch"
    extra_pins = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (ROOT / "requirements-owlvit.txt").read_text(), re.M))
    assert "transformers" in extra_pins and not [n for n in extra_pins if re.match(pattern, f"{n}=={extra_pins[n]}")]
    kept = [name for name in pins if not re.match(pattern, f"{name}=={pins[name]}")]
    dropped = set(pins) - set(kept)
    assert {"torch", "torchvision", "triton"} <= dropped
    assert not [n for n in kept if re.match(r"(torch|torchvision|triton|cuda-|nvidia-(?!ml-py))", n)], kept
    assert "nvidia-ml-py" not in pins or "nvidia-ml-py" in kept, "Ultralytics needs nvidia-ml-py"
    assert {"ultralytics", "gunicorn", "rq", "flask"} <= {n.lower() for n in kept}


# --- scripts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [RUN_SH, CI_RUN, REDIS_SH, BOOTSTRAP_SH], ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "set -euo pipefail" in script.read_text()


def test_ci_runs_make_test():
    """CI takes the README's fresh-machine path: bootstrap.sh, make install, make test (which starts Redis)."""
    lines = [line.strip() for line in CI_RUN.read_text().splitlines()]
    assert "make install" in lines
    assert "make test" in lines
    assert any("bash scripts/bootstrap.sh" in line for line in lines)
    assert not any("redis-server --daemonize" in line for line in lines), "make test starts Redis, as make run does"
    readme = ROOT / "README.md"
    if readme.is_file():
        assert "make test" in readme.read_text(), "the README's test command is what CI runs"


def test_make_run_and_make_test_start_redis_with_the_same_script():
    assert '. "$ROOT/scripts/redis.sh"' in RUN_SH.read_text()
    assert re.search(r"^\s*redis_ensure \"\$REDIS_URL\"", RUN_SH.read_text(), re.M)
    assert "redis_stop_started" in RUN_SH.read_text()
    result = subprocess.run(["make", "-n", "-o", ".venv/.requirements.stamp", "redis"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"bash scripts/redis.sh '{TEST_REDIS_URL}'" in result.stdout


def _tool_dir(tmp_path: Path, *, without: tuple[str, ...] = (), fake: dict[str, str] | None = None) -> Path:
    """A PATH of its own: links to the real tools the scripts use, minus ``without``, plus fake scripts."""
    import shutil

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = fake or {}
    for name, body in fake.items():  # written first, as new files: never through a link to the real tool
        (bin_dir / name).write_text("#!/bin/sh\n" + body)
        (bin_dir / name).chmod(0o755)
    for tool in ("bash", "cat", "dirname", "id", "ln", "mkdir", "rm", "sleep", "sed", "grep", "python3", "redis-server"):
        real = shutil.which(tool)
        if real and tool not in without and tool not in fake:
            (bin_dir / tool).symlink_to(real)
    return bin_dir


def _kill_pidfile(pidfile: Path) -> None:
    if pidfile.is_file():
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def test_make_redis_starts_a_private_redis_when_none_answers(tmp_path):
    """`make redis` (run by make test) starts redis-server on the test URL's port through scripts/redis.sh."""
    import shutil

    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/15"
    var_dir = tmp_path / "var"
    pidfile = var_dir / "run" / f"redis-{port}.pid"
    try:
        result = subprocess.run(
            ["make", "-o", f"{VENV}/.requirements.stamp", "redis", f"VENV={VENV}", f"TEST_REDIS_URL={url}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, "VAR_DIR": str(var_dir)})
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"starting redis-server on 127.0.0.1:{port}" in result.stdout
        assert redis_answers(url)
        assert pidfile.is_file()
        again = subprocess.run(["bash", str(REDIS_SH), url], cwd=ROOT, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "VENV": str(VENV), "VAR_DIR": str(var_dir)})
        assert again.returncode == 0 and f"Redis answers at {url}" in again.stdout, again.stdout + again.stderr
    finally:
        _kill_pidfile(pidfile)


def test_redis_sh_installs_redis_server_with_apt_when_root(tmp_path):
    """No redis-server on PATH and root: apt-get installs it (a stand-in apt-get that links the real
    binary and records its arguments), then the server is started."""
    import shutil

    real = shutil.which("redis-server")
    if not real:
        pytest.skip("redis-server is not installed")
    if os.getuid() != 0:
        pytest.skip("the install branch runs as root only")
    calls = tmp_path / "apt-calls"
    bin_dir = _tool_dir(tmp_path, without=("redis-server",), fake={
        "apt-get": f'echo "$@" >> {calls}\ncase "$*" in *install*) ln -sf {real} "$(dirname "$0")/redis-server";; esac\n',
    })
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    var_dir = tmp_path / "var"
    try:
        result = subprocess.run([str(bin_dir / "bash"), str(REDIS_SH), url], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, env={"PATH": str(bin_dir), "VENV": str(VENV), "VAR_DIR": str(var_dir)})
        assert result.returncode == 0, result.stdout + result.stderr
        lines = calls.read_text().splitlines()
        assert lines[0].endswith("update -qq") and "install" in lines[1] and "redis-server" in lines[1], lines
        assert redis_answers(url)
    finally:
        _kill_pidfile(var_dir / "run" / f"redis-{port}.pid")


def test_redis_sh_without_root_says_what_to_install(tmp_path):
    bin_dir = _tool_dir(tmp_path, without=("redis-server",), fake={"id": "echo 1000\n", "apt-get": "exit 99\n"})
    url = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run([str(bin_dir / "bash"), str(REDIS_SH), url], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={"PATH": str(bin_dir), "VENV": str(VENV), "VAR_DIR": str(tmp_path / "var")})
    assert result.returncode == 1
    assert "apt-get install redis-server" in result.stderr and "scripts/bootstrap.sh" in result.stderr, result.stderr


def test_redis_sh_does_not_start_a_server_for_a_remote_url(tmp_path):
    result = subprocess.run(["bash", str(REDIS_SH), "redis://192.0.2.1:6379/0"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**os.environ, "VENV": str(VENV), "VAR_DIR": str(tmp_path / "var")})
    assert result.returncode == 1 and "not a local URL" in result.stderr, result.stdout + result.stderr


def test_bootstrap_installs_only_what_is_missing(tmp_path):
    """On a machine without make and redis-server, bootstrap.sh asks apt-get for exactly those two
    (this Python has venv and ensurepip); without root it prints the command instead."""
    calls = tmp_path / "apt-calls"
    browser = {"chromium": "exit 0\n", "chromedriver": "exit 0\n"}  # present: the browser tests' packages
    bin_dir = _tool_dir(tmp_path, without=("redis-server",), fake={"apt-get": f'echo "$@" >> {calls}\n', **browser})
    env = {"PATH": str(bin_dir), "PYTHON": sys.executable}
    result = subprocess.run([str(bin_dir / "bash"), str(BOOTSTRAP_SH)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    if os.getuid() == 0:
        assert result.returncode == 0, result.stdout + result.stderr
        install = [line for line in calls.read_text().splitlines() if "install" in line]
        assert install and install[0].split()[-2:] == ["make", "redis-server"], install
    (bin_dir / "id").unlink()  # the link to the real id goes; a new file takes its name
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "id").chmod(0o755)
    result = subprocess.run([str(bin_dir / "bash"), str(BOOTSTRAP_SH)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1 and "apt-get install -y make redis-server" in result.stderr, result.stderr
    for name in browser:  # without them, Debian's chromium and chromium-driver are asked for too
        (bin_dir / name).unlink()
    result = subprocess.run([str(bin_dir / "bash"), str(BOOTSTRAP_SH)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 1 and "apt-get install -y make redis-server chromium chromium-driver" in result.stderr, \
        result.stderr


def test_make_dry_run():
    result = subprocess.run(
        ["make", "-n", "run", "lint", "test", "test-fast", "bench", "install", "lock", "audit", "clean"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "scripts/run.sh" in out
    assert re.search(r"\.venv/bin/pytest -q(\s|$)", out)
    assert '-m "not slow"' in out
    assert ".venv/bin/python -m bench" in out
    assert "pip-audit -r requirements.txt -r requirements-owlvit.txt -r requirements-dev.txt" in out
    for lock in ("requirements.txt", "requirements-owlvit.txt", "requirements-dev.txt"):
        assert f"-r {lock.replace('.txt', '.in')}" in out and f"> {lock}.new" in out, f"make lock does not write {lock}"


def _make_n(*targets: str) -> str:
    """`make -n` of the targets, with the venv taken as up to date (only their own recipes)."""
    result = subprocess.run(["make", "-n", "-o", ".venv/.requirements.stamp", "-o", "redis", *targets],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_make_install_installs_the_dev_lock_and_test_runs_lint_first():
    result = subprocess.run(["make", "-n", "-W", "requirements.txt", "install"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pip install --progress-bar off --no-deps -r requirements-dev.txt" in result.stdout
    assert "pip install --progress-bar off --no-deps -e ." in result.stdout
    assert "scripts/check_env.py" in result.stdout, "make install checks what --no-deps does not"
    # A venv that still holds the GUI OpenCV loses it, and the headless one is laid again.
    assert "pip uninstall -y opencv-python" in result.stdout and "--force-reinstall" in result.stdout
    dev = (ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements-owlvit.txt" in dev.splitlines(), "make install installs the OWL-ViT extra too"
    lint = _make_n("lint")
    assert ".venv/bin/ruff check ." in lint and ".venv/bin/lint-imports" in lint
    test = _make_n("test").splitlines()
    ruff = next(i for i, line in enumerate(test) if ".venv/bin/ruff check ." in line)
    pytest_line = next(i for i, line in enumerate(test) if re.search(r"\.venv/bin/pytest -q(\s|$)", line))
    assert ruff < pytest_line, "make test runs make lint first"


def test_make_lint_fails_when_either_tool_fails(tmp_path):
    """Both tools run; a violation found by either one fails `make lint` (stand-ins for ruff/lint-imports)."""
    for ruff_rc, imports_rc in ((0, 0), (1, 0), (0, 1)):
        for name, rc in (("ruff", ruff_rc), ("lint-imports", imports_rc)):
            tool = tmp_path / name
            tool.write_text(f"#!/bin/sh\necho {name} ran\nexit {rc}\n")
            tool.chmod(0o755)
        result = subprocess.run(["make", "-o", ".venv/.requirements.stamp", "lint", f"BIN={tmp_path}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert "ruff ran" in result.stdout and "lint-imports ran" in result.stdout, result.stdout + result.stderr
        assert (result.returncode == 0) == (ruff_rc == imports_rc == 0), (ruff_rc, imports_rc, result.stderr)


def test_ruff_is_configured_for_the_whole_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]
    assert config["line-length"] == 130
    assert {"E", "F", "W", "I"} <= set(config["lint"]["select"]), "E includes E501 (line length)"
    assert "E501" not in config["lint"].get("ignore", [])
    assert {".venv*", "var", "build"} <= set(config["extend-exclude"])


# --- label_config.xml --------------------------------------------------------------------------------------

def test_label_config_parses_and_validates():
    from label_studio_sdk.label_interface import LabelInterface

    from backend.core.label_config import ProjectConfig

    xml = (ROOT / "label_config.xml").read_text()
    config = ProjectConfig.parse(xml)
    assert config.image_key == "image" and config.prompt_control == "prompt"
    (control,) = config.controls
    assert (control.name, control.tag, control.score_threshold) == ("label", "RectangleLabels", 0.3)
    specs = {label.value: label for label in control.labels}
    assert specs["Person with helmet"].hint == "construction worker wearing a hard hat"
    assert specs["Person with helmet"].predicted_values == ("person_with_helmet",)
    assert specs["Person without helmet"].hint == "construction worker NOT wearing a hard hat / helmet"
    assert specs["Person without helmet"].predicted_values == ("person_without_helmet", "head")
    assert specs["Helmet"].hint == "a hard hat / safety helmet"
    assert specs["Helmet"].predicted_values == ("helmet", "hardhat")
    assert config.match_label("hardhat") == "Helmet" and config.match_label("head") == "Person without helmet"

    interface = LabelInterface(xml)
    interface.validate()
    prompt = interface.get_control("prompt")
    assert prompt.tag == "TextArea" and prompt.attr["editable"] == "true" and prompt.attr["perRegion"] == "false"
    assert "Ask the model" in prompt.attr["placeholder"]
    prediction = {
        "model_version": "test", "score": 0.9,
        "result": [
            {"from_name": "label", "to_name": "image", "type": "rectanglelabels", "original_width": 640,
             "original_height": 480, "image_rotation": 0, "score": 0.9,
             "value": {"x": 10, "y": 10, "width": 20, "height": 30, "rotation": 0, "rectanglelabels": [label]}}
            for label in specs
        ],
    }
    assert interface.validate_prediction(prediction, return_errors=True) == []


# --- gunicorn.conf.py ------------------------------------------------------------------------------------

def load_gunicorn_conf(monkeypatch, **env) -> dict:
    for key in ("PORT", "WORKERS", "THREADS", "BIND"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return runpy.run_path(str(ROOT / "gunicorn.conf.py"))


def test_gunicorn_conf_defaults_and_env(monkeypatch):
    from gunicorn.config import Config

    conf = load_gunicorn_conf(monkeypatch)
    assert (conf["bind"], conf["workers"], conf["threads"]) == ("0.0.0.0:9090", 2, 8)
    conf = load_gunicorn_conf(monkeypatch, PORT="9191", WORKERS="3", THREADS="4")
    assert (conf["bind"], conf["workers"], conf["threads"]) == ("0.0.0.0:9191", 3, 4)
    assert conf["worker_class"] == "gthread" and conf["timeout"] == 120 and conf["graceful_timeout"] == 10
    fmt = conf["access_log_format"]
    assert "%(U)s" in fmt and not {"%(r)s", "%(q)s", "%(f)s"} & set(re.findall(r"%\(\w\)s", fmt))
    assert conf["accesslog"] == "-"
    cfg = Config()  # gunicorn's own validators accept every value
    for name, value in conf.items():
        if name in cfg.settings:
            cfg.set(name, value)
    assert cfg.worker_class_str == "gthread" and cfg.threads == 4


def test_gunicorn_child_exit_marks_process_dead(monkeypatch, tmp_path):
    conf = load_gunicorn_conf(monkeypatch)
    for name in ("gauge_livesum_4242.db", "gauge_liveall_4242.db", "counter_4242.db", "gauge_livesum_7.db"):
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    conf["child_exit"](None, type("Worker", (), {"pid": 4242})())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_4242.db", "gauge_livesum_7.db"]
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    conf["child_exit"](None, type("Worker", (), {"pid": 7})())  # no-op without the variable
    assert (tmp_path / "gauge_livesum_7.db").exists()


def test_gunicorn_access_log_has_no_query_string(tmp_path):
    """A real gunicorn with this config logs the path of /webhook?token=... but not the token."""
    (tmp_path / "tinyapp.py").write_text(
        "def app(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
        "    return [b'ok']\n"
    )
    port = free_port()
    env = {**os.environ, "PORT": str(port), "WORKERS": "1", "THREADS": "2", "PYTHONPATH": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    proc = subprocess.Popen(
        [str(VENV / "bin" / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py"), "tinyapp:app"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/webhook?token=s3cr3t-token"
        request = urllib.request.Request(url, headers={"Referer": url})
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    assert response.status == 200
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "gunicorn did not start"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=20)
    assert '"GET /webhook HTTP/1.1" 200' in output, output
    assert "s3cr3t" not in output


# --- scripts/run.sh, for real --------------------------------------------------------------------------

def _descendants(pid: int):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _is_rq_worker(proc) -> bool:
    try:
        cmd = proc.cmdline()
    except Exception:
        return False
    return "worker" in cmd and any(Path(arg).name == "rq" for arg in cmd)


def _is_gunicorn(proc) -> bool:
    try:
        return any(Path(arg).name == "gunicorn" for arg in proc.cmdline()[:2])
    except Exception:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ctrl-c", "sigterm-own-redis"])
def test_run_sh_serves_and_stops_cleanly(mode, tmp_path):
    """run.sh starts gunicorn and an rq worker, /health answers, and a signal stops every child.

    ctrl-c: run.sh on a pseudo-terminal that gets a real ^C (SIGINT to the terminal's foreground
    process group), with the test Redis (TEST_REDIS_URL; its queues carry a per-run prefix).
    sigterm-own-redis: SIGTERM to the script only (systemd, docker), with REDIS_URL on a free local
    port, so run.sh starts its own redis-server and must stop it again; the worker is busy with a
    long job, so the warm stop must turn into a cold one after STOP_TIMEOUT.
    """
    import psutil
    import redis
    from rq import Queue, Worker

    if not (ROOT / "backend" / "web" / "wsgi.py").is_file():
        pytest.skip("backend/web/wsgi.py does not exist yet")
    if mode == "ctrl-c":
        redis_url = TEST_REDIS_URL
        if not redis_answers(redis_url):
            pytest.skip(f"no Redis at {redis_url}")
    else:
        if not any((Path(d) / "redis-server").is_file() for d in os.environ.get("PATH", "").split(os.pathsep)):
            pytest.skip("redis-server is not installed")
        redis_url = f"redis://127.0.0.1:{free_port()}/0"

    port = free_port()
    var_dir = tmp_path / "var"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PROMETHEUS_", "GEMINI_", "GOOGLE_", "LABEL_STUDIO_", "BASIC_AUTH_"))}
    env.pop("YOLO_CONFIG_DIR", None)
    env.update({
        "PORT": str(port), "WORKERS": "2", "THREADS": "2", "REDIS_URL": redis_url, "VENV": str(VENV),
        "VAR_DIR": str(var_dir), "ENV_FILE": str(tmp_path / "no.env"),
        "MODEL_DIR": str(tmp_path / "models"), "DATA_DIR": str(tmp_path / "data"), "WEBHOOK_SECRET": "test-secret",
        # Busy worker: cold stop after 3 s. Idle: the warm stop has 8 s (gunicorn workers that loaded
        # torch can take a few seconds to exit on a loaded machine).
        "STOP_TIMEOUT": "8" if mode == "ctrl-c" else "3",
        # The worker must listen where the backend enqueues (worker/queue.py prefixes queue names).
        "LSB_QUEUE_PREFIX": f"deploytest{port}-" if mode == "ctrl-c" else "",
    })
    chunks: list[bytes] = []
    if mode == "ctrl-c":  # a terminal of its own: run.sh is its session leader and foreground job
        master, slave = os.openpty()
        proc = subprocess.Popen(
            ["bash", str(RUN_SH)], cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)

        def read_terminal():
            while True:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO once every holder of the terminal is gone
                    return
                if not data:
                    return
                chunks.append(data)
    else:
        master = None
        proc = subprocess.Popen(
            ["bash", str(RUN_SH)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )

        def read_terminal():
            chunks.extend(iter(lambda: proc.stdout.read1(65536), b""))
    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    log = lambda: b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")  # noqa: E731
    children: list = []
    redis_pidfile = var_dir / "run" / f"redis-{redis_url.rsplit(':', 1)[1].split('/')[0]}.pid"  # scripts/redis.sh
    own_redis_pid = None
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"run.sh exited with {proc.returncode}:\n{log()}"
            assert time.monotonic() < deadline, f"/health did not answer within 120 s:\n{log()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)

        if mode != "ctrl-c":
            assert redis_pidfile.is_file(), log()
            own_redis_pid = int(redis_pidfile.read_text().strip())
            assert psutil.pid_exists(own_redis_pid)

        children = _descendants(proc.pid)
        workers = [p for p in children if _is_rq_worker(p)]
        assert workers, f"no rq worker among {[p.cmdline() for p in children]}"
        assert len([p for p in children if _is_gunicorn(p)]) >= 3, "gunicorn master and 2 workers"
        # The worker registered in Redis on both queues.
        connection = redis.Redis.from_url(redis_url)
        worker_pids = {p.pid for p in workers}
        deadline = time.monotonic() + 20
        while not [w for w in Worker.all(connection=connection) if w.pid in worker_pids]:
            assert time.monotonic() < deadline, f"the rq worker did not register:\n{log()}"
            time.sleep(0.5)
        (registered,) = [w for w in Worker.all(connection=connection) if w.pid in worker_pids]
        assert registered.queue_names() == [env["LSB_QUEUE_PREFIX"] + q for q in WORKER_QUEUES]
        assert "Gemini key not set: serving with the YOLO fallback only" in log()
        prom_dirs = list((var_dir / "run").glob("prometheus.*"))
        assert len(prom_dirs) == 1, prom_dirs

        if mode != "ctrl-c":  # a job that would outlive any warm stop
            job = Queue(WORKER_QUEUES[0], connection=connection).enqueue("time.sleep", 600, job_timeout=900)
            deadline = time.monotonic() + 30
            while job.get_status(refresh=True) != "started":
                assert time.monotonic() < deadline, f"the job did not start:\n{log()}"
                time.sleep(0.2)
            children = _descendants(proc.pid)  # now with the work horse

        if mode == "ctrl-c":
            os.write(master, b"\x03")  # the terminal turns it into SIGINT for its foreground group
        else:
            proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        _, alive = psutil.wait_procs([*children, psutil.Process(proc.pid)], timeout=15)
        assert not alive, f"still running {time.monotonic() - started:.1f} s after the signal: {alive}\n{log()}"
        assert proc.wait(timeout=5) == 0, log()
        reader.join(timeout=5)
        assert "[run] stopped" in log()
        assert f"[run] got SIG{'INT' if mode == 'ctrl-c' else 'TERM'}" in log(), log()
        # rq saw its one stop signal (a warm stop), also when it was idle on Redis.
        assert "warm shut down requested" in log(), log()
        if mode != "ctrl-c":
            assert "[run] cold stop" in log() and "cold shut down" in log(), log()
        if own_redis_pid:
            deadline = time.monotonic() + 5
            while psutil.pid_exists(own_redis_pid) and psutil.Process(own_redis_pid).status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, "run.sh did not stop the redis-server it started"
                time.sleep(0.1)
            assert not redis_answers(redis_url)
        else:  # the warm shutdown deregistered the worker
            assert not [w for w in Worker.all(connection=connection) if w.pid in worker_pids], "worker still registered"
        connection.close()
        assert not list((var_dir / "run").glob("prometheus.*")), "the Prometheus folder is removed at exit"
    finally:
        if master is not None:
            os.close(master)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        if own_redis_pid and psutil.pid_exists(own_redis_pid):
            try:
                psutil.Process(own_redis_pid).kill()
            except psutil.Error:
                pass
