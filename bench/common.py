"""Shared pieces of the benchmark suite: statistics, timing, result rows, the report, fixtures.

Every benchmark module exposes ``NAME``, ``TITLE`` and ``run(ctx) -> Result``. A result is a list
of :class:`Row` (a figure, its baseline measured in the same run, the ratio, the goal and whether it
was met) plus the method, notes and parameters; :func:`write_report` turns results into
BENCHMARKS.md, keeping the sections of benchmarks that were not run this time.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var" / "bench"
CACHE = VAR / "cache"
BENCH_REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
CLASSES = ("Car", "Person", "Sign")
# Training children run with OpenMP threads that sleep instead of spin when they wait: on a shared
# 2-core host the default spin-wait made training 4-7x slower (see the training benchmark's rows).
TRAIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def setup_environment() -> None:
    """Offline Ultralytics for this process and every child (PROTOCOL.md section 3)."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(VAR / "ultralytics"))
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("CI", "true")  # OpenVINO telemetry opt-out
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


# --- statistics --------------------------------------------------------------------------------------

def percentile(samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in 0..100."""
    if not samples:
        return float("nan")
    data = sorted(samples)
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class Stats:
    n: int
    median: float
    min: float
    max: float
    mean: float
    p95: float
    p99: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> "Stats":
        samples = [float(s) for s in samples]
        if not samples:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(len(samples), statistics.median(samples), min(samples), max(samples), statistics.fmean(samples),
                   percentile(samples, 95), percentile(samples, 99))

    @property
    def p50(self) -> float:
        return self.median

    def spread(self, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        """``median (min–max, n=N)`` in the given unit."""
        return f"{fmt(self.median * scale, digits)}{unit} ({fmt(self.min * scale, digits)}–{fmt(self.max * scale, digits)}, n={self.n})"


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``n`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return [timed(fn)[0] for _ in range(n)]


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


# --- results -----------------------------------------------------------------------------------------

@dataclass
class Row:
    """One figure. ``status``: "met", "MISSED" or "" (information only, no goal)."""

    metric: str
    value: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    status: str = ""
    note: str = ""


def goal_row(metric: str, value: str, achieved: float, goal: float, higher_is_better: bool, goal_text: str,
             baseline: str = "", ratio_text: str = "", note: str = "") -> Row:
    ok = achieved >= goal if higher_is_better else achieved <= goal
    if isinstance(achieved, float) and math.isnan(achieved):
        ok = False
    return Row(metric, value, baseline, ratio_text, goal_text, "met" if ok else "MISSED", note)


@dataclass
class Result:
    name: str
    title: str
    rows: list[Row] = field(default_factory=list)
    method: str = ""
    notes: list[str] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)
    quick: bool = False
    seconds: float = 0.0
    command: str = ""
    load: str = ""
    error: str = ""

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    @property
    def missed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "MISSED"]


@dataclass
class Context:
    """What every benchmark gets: mode, a private work folder, the benchmark Redis, a logger."""

    quick: bool
    workdir: Path
    redis_url: str = BENCH_REDIS_URL
    verbose: bool = True
    on_partial: Callable[["Result"], None] | None = None
    _started: float = field(default_factory=time.monotonic)

    def partial(self, result: "Result") -> None:
        """Write the figures measured so far (long benchmarks call this after each step)."""
        if self.on_partial is not None:
            self.on_partial(result)

    def log(self, message: str) -> None:
        if self.verbose:
            print(f"[bench {time.monotonic() - self._started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def tmp(self, name: str) -> Path:
        path = self.workdir / f"{name}-{uuid.uuid4().hex[:6]}"
        path.mkdir(parents=True)
        return path

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)


def project_id() -> str:
    """A project id nobody else uses in the benchmark Redis (keys are per project)."""
    return str(700000000 + uuid.uuid4().int % 99999999)


# --- machine -----------------------------------------------------------------------------------------

def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "not installed"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine() -> dict[str, str]:
    try:
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
        memory = f"{mem / 1024 / 1024:.1f} GiB"
    except Exception:
        memory = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        commit = f"{commit}{' + uncommitted changes' if dirty else ''}"
    except Exception:
        commit = "unknown"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu_model(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _version("torch"),
        "ultralytics": _version("ultralytics"),
        "onnxruntime": _version("onnxruntime"),
        "openvino": _version("openvino"),
        "google-genai": _version("google-genai"),
        "gunicorn": _version("gunicorn"),
        "commit": commit,
    }


# --- report ------------------------------------------------------------------------------------------

_SECTION = re.compile(r"<!-- bench:(?P<name>[a-z_]+) -->\n(?P<body>.*?)<!-- /bench:(?P=name) -->\n", re.S)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row]) -> str:
    lines = ["| metric | value | baseline (same run) | ratio | goal | status |", "|---|---|---|---|---|---|"]
    for r in rows:
        value = r.value + (f" — {r.note}" if r.note else "")
        status = {"met": "met", "MISSED": "**MISSED**"}.get(r.status, "")
        lines.append(f"| {_cell(r.metric)} | {_cell(value)} | {_cell(r.baseline)} | {_cell(r.ratio)} | {_cell(r.goal)} | {status} |")
    return "\n".join(lines)


def render_section(result: Result) -> str:
    mode = "quick (smoke-test sizes: figures are NOT representative)" if result.quick else "full"
    parts = [f"## {result.title}", ""]
    if result.error:
        parts += [f"**The benchmark failed:** `{_cell(result.error)}`", ""]
    if result.rows:
        parts += [_table(result.rows), ""]
    if result.notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in result.notes] + [""]
    if result.method:
        parts += [f"Method: {result.method}", ""]
    if result.params:
        parts += ["Parameters: " + ", ".join(f"`{k}={v}`" for k, v in result.params.items()), ""]
    parts += [f"Reproduce: `{result.command}` — mode: {mode}; took {result.seconds:.0f} s; "
              f"load average (1/5/15 min) at the start: {result.load}.", ""]
    return f"<!-- bench:{result.name} -->\n" + "\n".join(parts) + f"<!-- /bench:{result.name} -->\n"


def _summary(sections: dict[str, str], order: list[str]) -> str:
    lines = ["| benchmark | metric | value | ratio | goal | status |", "|---|---|---|---|---|---|"]
    for name in order:
        body = sections.get(name, "")
        title = re.search(r"^## (.+)$", body, re.M)
        for line in body.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) == 6 and cells[5] in ("met", "**MISSED**"):
                lines.append(f"| {title.group(1) if title else name} | {cells[0]} | {cells[1]} | {cells[3]} | {cells[4]} | {cells[5]} |")
    return "\n".join(lines)


def write_report(path: Path, results: list[Result], order: list[str], info: dict[str, str], argv: str,
                 total_seconds: float) -> None:
    """BENCHMARKS.md: summary of every goal, then one section per benchmark.

    Sections of benchmarks not run this time are kept from the existing file, so
    ``python -m bench --only NAME`` refreshes one section only.
    """
    old = path.read_text() if path.exists() else ""
    sections = {m.group("name"): m.group(0) for m in _SECTION.finditer(old)}
    for result in results:
        sections[result.name] = render_section(result)
    machine_lines = "\n".join(f"| {k} | {_cell(v)} |" for k, v in info.items())
    header = f"""# Benchmarks

Generated by `python -m bench` (`make bench`); do not edit by hand. Every figure is measured against a
baseline measured in the same run; timings are medians over repeats with (min–max), latencies are
percentiles over all requests. Goals come from issue 5; a missed goal is marked **MISSED** and
explained in its section. Last run: `{argv}` ({total_seconds / 60:.1f} min), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.

## Machine

| | |
|---|---|
{machine_lines}

The machine is shared: other processes (other engineers' tests) may run at the same time; each
section states the load average when it started. Two cores: wherever the backend and its load
generator run together they share them, as they would on a 2-core production host.

## Summary of goals

{_summary(sections, [n for n in order if n in sections])}

"""
    body = "".join(sections[name] + "\n" for name in order if name in sections)
    body += "".join(sections[name] + "\n" for name in sections if name not in order)
    path.write_text(header + body.rstrip() + "\n")


def write_json(path: Path, results: list[Result], info: dict[str, str]) -> None:
    data = {"machine": info, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=2, default=str))


# --- fixtures: images, checkpoints, servers ----------------------------------------------------------

def synthetic(n: int, seed: int, size: tuple[int, int] = (320, 240), max_objects: int = 3):
    from tests.synthetic import make_images

    return make_images(n, seed=seed, size=size, max_objects=max_objects)


def write_yolo_dataset(root: Path, train, val, classes: Sequence[str] = CLASSES) -> Path:
    """A YOLO detection dataset (images/, labels/, data.yaml with an absolute path) from synthetic images."""
    from backend.core.geometry import xyxy_to_yolo

    for split, items in (("train", train), ("val", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, item in enumerate(items):
            item.image.save(root / "images" / split / f"{i:05d}.jpg", quality=95)
            lines = []
            for box in item.boxes:
                cx, cy, w, h = xyxy_to_yolo(box.xyxy, item.width, item.height)
                lines.append(f"{list(classes).index(box.label)} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    names = "\n".join(f"  {i}: {c}" for i, c in enumerate(classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
    return data


def train_in_subprocess(data_yaml: Path, out_json: Path, log_path: Path, *, epochs: int | None = None,
                        time_min: float | None = None, imgsz: int | None = None, batch: int | None = None,
                        extra: dict | None = None, data_dir: Path | None = None, env: dict | None = None,
                        nice: int = 0) -> dict:
    """Run ``bench.train_child`` (worker.training.trainer.train at the given settings) in a child process.

    Returns its JSON result plus ``wall_s`` and ``peak_rss_mb`` (the child's ru_maxrss, from wait4).
    """
    cmd = [sys.executable, "-m", "bench.train_child", "--data", str(data_yaml), "--out", str(out_json),
           "--data-dir", str(data_dir or out_json.parent)]
    if epochs is not None:
        cmd += ["--epochs", str(epochs)]
    if time_min is not None:
        cmd += ["--time-min", str(time_min)]
    if imgsz is not None:
        cmd += ["--imgsz", str(imgsz)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    if extra:
        cmd += ["--extra", json.dumps(extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **(env or {})}
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"training child failed ({proc.returncode}); log {log_path}:\n{log_path.read_text()[-2000:]}")
    result = json.loads(out_json.read_text())
    result["wall_s"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024.0
    return result


def trained_checkpoint(ctx: Context) -> Path:
    """A small detector trained on synthetic shapes at imgsz 320, cached under var/bench/cache.

    Inference benchmarks need a model that finds a realistic handful of boxes (a random one finds
    none, or thousands). Full: 96 train / 24 held-out images, 30 epochs, nbs = batch (about 2 min
    on an idle machine); quick: 48 images, 4 epochs (finds nothing: a smoke test only).
    Cached by those parameters and the Ultralytics version, so only the first run pays.
    """
    import hashlib

    params = {"n": ctx.pick(120, 48), "time_min": None, "epochs": ctx.pick(30, 4), "imgsz": 320,
              "ultralytics": _version("ultralytics"), "v": 1}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    target = CACHE / f"checkpoint-{key}" / "model.pt"
    if target.is_file():
        return target
    ctx.log(f"training the shared benchmark checkpoint once ({params}); cached at {target}")
    work = ctx.tmp("ckpt")
    items = synthetic(params["n"], seed=101)
    cut = int(len(items) * 0.8)
    data = write_yolo_dataset(work / "data", items[:cut], items[cut:])
    result = train_in_subprocess(data, work / "result.json", work / "train.log", epochs=params["epochs"],
                                 time_min=params["time_min"], imgsz=320, data_dir=work, env=TRAIN_ENV)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(result["checkpoint"], tmp)
    os.replace(tmp, target)
    (target.parent / "train.json").write_text(json.dumps(result, indent=2, default=str))
    return target


class Backend:
    """The backend under gunicorn (tests.live.gunicorn) with a fake Label Studio serving its images."""

    def __init__(self, url: str, log_path: Path, ls, env: dict[str, str]):
        self.url = url
        self.log_path = log_path
        self.ls = ls
        self.env = env

    def worker_pids(self) -> list[int]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", text)]
        import psutil

        return [p for p in dict.fromkeys(pids) if psutil.pid_exists(p)]


@contextmanager
def backend(ctx: Context, name: str, workers: int = 1, threads: int = 8, ls=None, **settings: Any) -> Iterator[Backend]:
    """Start gunicorn as deployed (gunicorn.conf.py) against the benchmark Redis; ``settings`` become env vars."""
    from tests.fake_label_studio import FakeLabelStudio
    from tests.live import base_env, gunicorn

    work = ctx.tmp(name)
    own_ls = ls is None
    ls = ls or FakeLabelStudio().start()
    try:
        env = base_env(REDIS_URL=ctx.redis_url, MODEL_DIR=work / "models", DATA_DIR=work / "data",
                       LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.pat,
                       YOLO_CONFIG_DIR=os.environ.get("YOLO_CONFIG_DIR", str(VAR / "ultralytics")),
                       **{k.upper(): str(v) for k, v in settings.items()})
        log_path = work / "gunicorn.log"
        with gunicorn(env, log_path, workers=workers, threads=threads) as url:
            yield Backend(url, log_path, ls, env)
    finally:
        if own_ls:
            ls.stop()


def label_config() -> str:
    from tests.synthetic import label_config as make

    return make(CLASSES)


def upload_tasks(ls, project: int, images) -> list[dict]:
    """Upload images to the fake Label Studio; the tasks as Label Studio sends them to /predict."""
    tasks = []
    for i, item in enumerate(images):
        url = ls.add_file(project, item.encode("PNG"))
        tasks.append({"id": 10_000 + len(ls.files) * 10 + i, "data": {"image": url}, "project": project})
    return tasks


def predict_body(tasks: list[dict], project: str) -> dict:
    return {"tasks": tasks, "project": f"{project}.1700000000", "label_config": label_config(), "params": {}}


def oracle():
    """The fake Gemini's eyes: finds the synthetic shapes by colour (~15 ms of CPU per call)."""
    from tests.fake_gemini import Oracle
    from tests.synthetic import colour

    return Oracle(colors={c: colour(c) for c in CLASSES})


FIXED_OBJECTS = [
    {"box_2d": [120, 80, 430, 390], "label": "Car"},
    {"box_2d": [500, 550, 880, 760], "label": "Person"},
    {"box_2d": [90, 700, 600, 840], "label": "Sign"},
]


def fixed_answer(latency: float = 0.0):
    """A fake Gemini responder answering three boxes after ``latency`` seconds, whatever the image.

    Throughput benchmarks use it instead of :func:`oracle`: the fake runs on the same two cores as
    the backend, and the real Gemini's work happens on Google's machines, so the fake must cost
    next to nothing (~2 ms of CPU per call, decoding the request) for the figures to be about the backend.
    """
    from tests import fake_gemini as fg

    answer = fg.boxes(FIXED_OBJECTS)
    return lambda request: fg.delayed(answer, latency) if latency else answer


def register_version(ctx: Context, model_dir: Path, project: str, checkpoint: Path, promote: bool = True,
                     exports: dict[str, Path] | None = None):
    from backend.core.registry import ModelRegistry

    registry = ModelRegistry(model_dir, ctx.redis())
    info = registry.add_version(project, checkpoint, {"classes": list(CLASSES), "imgsz": 320}, extra_files=exports)
    if promote:
        registry.promote(project, info.version)
    return registry, info


def cleanup_redis(ctx: Context, project: str) -> None:
    """Drop the benchmark project's keys from the benchmark Redis."""
    try:
        client = ctx.redis()
        for key in client.scan_iter(match=f"lsb:*{project}*", count=500):
            client.delete(key)
    except Exception:
        pass


def new_workdir() -> Path:
    VAR.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="run-", dir=VAR))


# --- load generation -----------------------------------------------------------------------------

def start_load(url: str, path: str, out: Path, rate: float, duration: float, bodies: list | None = None,
               threads: int = 16, timeout: float = 30.0, start_at: float = 0.0) -> subprocess.Popen:
    """``bench.loadgen`` in its own process (see there); read its records with :func:`finish_load`."""
    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--path", path, "--rate", str(rate),
           "--duration", str(duration), "--threads", str(threads), "--timeout", str(timeout), "--out", str(out)]
    if bodies is not None:
        body_file = out.with_suffix(".bodies.json")
        body_file.write_text(json.dumps(bodies))
        cmd += ["--bodies", str(body_file)]
    if start_at:
        cmd += ["--start-at", str(start_at)]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def finish_load(proc: subprocess.Popen, out: Path, timeout: float = 120.0) -> list[dict]:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(10)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


def gemini_state_reset(ctx: Context) -> None:
    """Forget Gemini's cached answers, breaker and spend counters in the benchmark Redis (global keys),
    so figures never depend on an earlier run."""
    try:
        client = ctx.redis()
        for pattern in ("lsb:gemini:answer*", "lsb:gemini:breaker*", "lsb:gemini:spend*"):
            for key in client.scan_iter(match=pattern, count=500):
                client.delete(key)
    except Exception:
        pass


def verified_exports(ctx: Context, checkpoint: Path, fresh: bool = False) -> tuple[dict[str, Path], dict]:
    """ONNX and OpenVINO exports of ``checkpoint`` that passed ``worker.training.exporter``'s check (cached beside it)."""
    from worker.training.exporter import export_and_check

    out = checkpoint.parent / "exports"
    report_file = out / "report.json"
    if not fresh and report_file.is_file():
        report = json.loads(report_file.read_text())
        exports = {fmt: Path(report["checks"][fmt]["path"]) for fmt in report["passed"]}
        if all(p.exists() for p in exports.values()):
            return exports, report
    if out.exists():
        shutil.rmtree(out)
    samples = [item.image for item in synthetic(8, seed=4242)]
    report = export_and_check(checkpoint, out, samples, 320)
    meta = report.to_meta()
    report_file.write_text(json.dumps(meta, indent=2, default=str))
    return report.passed, meta
