"""The three dependency locks are split as documented, and have no known vulnerability.

Three locks, each on top of the one before (``-r``): ``requirements.txt`` is the runtime (what the
Docker image installs), ``requirements-owlvit.txt`` the optional OWL-ViT/SAM source,
``requirements-dev.txt`` tests, lint, fuzzing and bench (``make install``). The fast tests check, as
text and against the installed metadata, that no test/lint/fuzz package ships in the runtime lock, that
no lock re-pins a package of another (so overlapping pins are identical), and that each lock is closed
under the dependencies of what it pins.

The audit runs ``pip-audit -r <each lock> --no-deps --disable-pip`` (which does not follow ``-r``
includes, so each lock is named) from its own venv (``.venv-audit``, the
one ``make audit`` uses; created here when missing), so the audited environment is never changed.

pip-audit reads advisories from PyPI's per-release JSON API (``https://pypi.org/pypi/<name>/<version>/json``).
Where that endpoint is not reachable (on the project's build machines it answers 404, while package
downloads work), pip-audit marks every package "not found on PyPI" and still prints "No known
vulnerabilities found"; this test then skips and says why, instead of passing on an audit that checked
nothing. A partial audit (some packages skipped) fails.

A vulnerability that cannot be fixed yet is accepted only by listing it in ``ACCEPTED`` with the
reason; anything else fails the test with the advisory ids and the versions that fix them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
AUDIT_VENV = ROOT / ".venv-audit"
PIP_AUDIT_VERSION = "2.10.1"

#: {("package", "advisory id"): "why it is accepted, and until when"}
ACCEPTED: dict[tuple[str, str], str] = {}

RUNTIME = ROOT / "requirements.txt"
OWLVIT = ROOT / "requirements-owlvit.txt"
DEV = ROOT / "requirements-dev.txt"
#: Each lock and the one it builds on (its only ``-r`` include).
INCLUDES = {RUNTIME: None, OWLVIT: RUNTIME, DEV: OWLVIT}
#: Tests, lint and fuzzing tools, and what only the OWL-ViT/SAM source needs: never in the image's lock.
# safetensors is not here: nncf (the INT8 export, a runtime need of the worker) requires it.
NOT_RUNTIME = {"pytest", "pytest-timeout", "hypothesis", "schemathesis", "ruff", "import-linter", "grimp",
               "transformers", "tokenizers", "huggingface-hub"}
#: Ignored by ``pip freeze`` (so never pinned) although some packages require them.
INSTALLER_PACKAGES = {"pip", "setuptools", "wheel"}
#: Marker environments the locks must be complete for (make install uses --no-deps): the first and
#: the current 3.11 release, and this interpreter.
SUPPORTED_PYTHONS = [{"python_full_version": "3.11.0"}, {"python_full_version": "3.11.2"}, {}]
#: Requirements met by another pinned package (scripts/check_env.py: same module, installed with --no-deps).
SUBSTITUTES = {"opencv-python": "opencv-python-headless"}
#: OpenCV builds with a GUI: they need libGL and share the cv2/ folder with the headless build.
GUI_OPENCV = {"opencv-python", "opencv-contrib-python"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _includes(lock: Path) -> list[str]:
    return [line.split(None, 1)[1].strip() for line in lock.read_text().splitlines() if line.startswith("-r ")]


def _effective_pins(lock: Path) -> dict[str, str]:
    """What ``pip install -r lock`` installs: its pins and those of the locks it includes."""
    pins = {}
    for name in _includes(lock):
        pins |= _effective_pins(lock.parent / name)
    return pins | _pins(lock)


def _direct_dependencies(requirements_in: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in requirements_in.read_text().splitlines())
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def _pip_audit() -> str:
    """The pip-audit executable: the audit venv's, else one on PATH, else a new audit venv."""
    candidate = AUDIT_VENV / "bin" / "pip-audit"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("pip-audit")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "venv", str(AUDIT_VENV)], check=True, timeout=120)
    subprocess.run([str(AUDIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q", f"pip-audit=={PIP_AUDIT_VERSION}"],
                   check=True, timeout=600)
    return str(candidate)


def _pins(requirements: Path) -> dict[str, str]:
    """The pins written in one lock file (its ``-r`` includes not followed), by normalised name."""
    pins = {}
    for line in requirements.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[_normalise(match.group(1))] = match.group(2)
    return pins


@pytest.mark.slow
def test_no_known_vulnerabilities_in_the_locked_requirements(tmp_path):
    report = tmp_path / "audit.json"
    proc = subprocess.run(
        [_pip_audit(), *[arg for lock in INCLUDES for arg in ("-r", lock.name)],
         "--no-deps", "--disable-pip", "--progress-spinner", "off", "-f", "json", "-o", str(report)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )
    assert proc.returncode in (0, 1) and report.exists(), \
        f"pip-audit could not run:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(report.read_text())
    dependencies = data["dependencies"]

    audited = {re.sub(r"[-_.]+", "-", d["name"]).lower(): d for d in dependencies}
    pins = _effective_pins(DEV)
    assert set(pins) <= set(audited), f"not audited: {sorted(set(pins) - set(audited))}"
    skipped = {name: d.get("skip_reason") for name, d in audited.items() if d.get("skip_reason")}
    if len(skipped) == len(audited):
        pytest.skip("no advisory data: PyPI's per-release JSON API (pip-audit's source) is not reachable from here, "
                    f"so every package was skipped (e.g. {next(iter(skipped.values()))}); run `make audit` where it is")
    assert not skipped, f"pip-audit could not audit: {skipped}"

    found = {(name, v["id"]): v for name, d in audited.items() for v in d.get("vulns", [])}
    unaccepted = {key: v for key, v in found.items() if key not in ACCEPTED}
    details = "\n".join(
        f"{name}=={audited[name]['version']}: {vid} (aliases {v.get('aliases')}), fixed in {v.get('fix_versions')}"
        for (name, vid), v in sorted(unaccepted.items()))
    assert not unaccepted, f"known vulnerabilities in the locks:\n{details}"
    stale = set(ACCEPTED) - set(found)
    assert not stale, f"accepted advisories no longer reported; remove them from ACCEPTED: {sorted(stale)}"


# --- the split --------------------------------------------------------------------------------------

def test_each_lock_builds_on_the_one_before():
    for lock, base in INCLUDES.items():
        assert _includes(lock) == ([base.name] if base else []), f"{lock.name} must include exactly {base and base.name}"
        assert _pins(lock), f"{lock.name} pins nothing"


def test_no_lock_repins_a_package_of_another():
    """Overlapping pins are identical because each package is pinned in exactly one lock."""
    seen: dict[str, tuple[str, str]] = {}
    for lock in INCLUDES:
        for name, version in _pins(lock).items():
            if name in seen:
                other, other_version = seen[name]
                assert version == other_version, f"{name}: {other_version} in {other}, {version} in {lock.name}"
                pytest.fail(f"{name}=={version} is pinned in both {other} and {lock.name}: keep it in {other} only")
            seen[name] = (lock.name, version)


def test_runtime_lock_has_no_test_lint_fuzz_or_owlvit_package():
    runtime = _pins(RUNTIME)
    assert not NOT_RUNTIME & set(runtime), sorted(NOT_RUNTIME & set(runtime))
    direct = {_normalise(r.name) for r in _direct_dependencies(ROOT / "requirements.in")}
    assert not NOT_RUNTIME & direct, sorted(NOT_RUNTIME & direct)
    assert {"transformers", "huggingface-hub"} <= set(_pins(OWLVIT))
    assert {"pytest", "pytest-timeout", "hypothesis", "schemathesis", "ruff", "import-linter"} <= set(_pins(DEV))


def test_every_direct_dependency_is_pinned_by_its_lock():
    for lock in INCLUDES:
        pins = _effective_pins(lock)
        for requirement in _direct_dependencies(lock.with_suffix(".in")):
            name = _normalise(requirement.name)
            assert name in pins, f"{requirement.name} ({lock.with_suffix('.in').name}) is not pinned in {lock.name}"
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"{lock.name} pins {name}=={pins[name]}, {lock.with_suffix('.in').name} asks {requirement}"


@pytest.mark.parametrize("lock", list(INCLUDES), ids=lambda path: path.name)
def test_lock_is_closed_under_dependencies(lock):
    """Installing a lock needs nothing it does not pin (read from the installed packages' metadata).

    The runtime lock above all: it must not lean on a package that only the dev lock or the OWL-ViT
    extra brings. ``make install`` installs all three locks, so their pins are what is installed here.
    """
    pins = _effective_pins(lock)
    wrong = {name: (version, _installed_version(name)) for name, version in pins.items() if _installed_version(name) != version}
    assert not wrong, f"the venv does not match {lock.name} (pinned, installed); run make install: {wrong}"
    missing = {}
    pending = [(name, frozenset()) for name in pins]
    done = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        for spec in metadata.requires(name) or []:
            requirement = Requirement(spec)
            # Every Python 3.11 the README allows, not only this one: Debian 12's python3 is 3.11.2, where
            # redis needs async-timeout (python_full_version < "3.11.3").
            wanted = [{"extra": extra, **python} for extra in (extras or {""}) for python in SUPPORTED_PYTHONS]
            if requirement.marker and not any(requirement.marker.evaluate(env) for env in wanted):
                continue
            dependency = _normalise(requirement.name)
            if dependency in INSTALLER_PACKAGES:
                continue
            if dependency in SUBSTITUTES and SUBSTITUTES[dependency] in pins:
                substitute = SUBSTITUTES[dependency]
                assert requirement.specifier.contains(pins[substitute], prereleases=True), \
                    f"{name} asks {requirement}; {substitute}=={pins[substitute]} stands in for it and does not match"
                continue
            if dependency not in pins:
                missing.setdefault(dependency, set()).add(name)
            else:
                pending.append((dependency, frozenset(requirement.extras)))
    assert not missing, f"required but not pinned in {lock.name} (or a lock it includes): {missing}"


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# --- one OpenCV, headless ------------------------------------------------------------------------------

def test_locks_pin_one_opencv_and_it_is_headless():
    """Ultralytics asks for opencv-python (GUI, libGL), label-studio-sdk for opencv-python-headless; both
    write cv2/, and the one installed last won (a cv2 that needs libGL). The locks keep the headless one."""
    for lock in INCLUDES:
        assert not GUI_OPENCV & set(_pins(lock)), f"{lock.name} pins {sorted(GUI_OPENCV & set(_pins(lock)))}"
    assert "opencv-python-headless" in _pins(RUNTIME)


def test_installed_cv2_is_headless_and_needs_no_libgl():
    """What make install left: no GUI OpenCV distribution, and cv2's native module links no libGL."""
    import cv2.version  # not at module level: OpenCV's native library, loaded by this test only

    installed = {name for name in GUI_OPENCV if _installed_version(name)}
    assert not installed, f"installed: {sorted(installed)}; run make install (it removes them)"
    assert cv2.version.headless, f"cv2 {cv2.version.opencv_version} is not the headless build"
    module = Path(cv2.__file__).parent
    natives = sorted(module.glob("cv2*.so"))
    assert natives, f"no native module under {module}"
    needed = subprocess.run(["ldd", str(natives[0])], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "libGL" not in needed and "not found" not in needed, needed


def test_check_env_accepts_the_substitute_and_nothing_else():
    """scripts/check_env.py (make install, the Docker build) lets through only Ultralytics' opencv-python."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_env  # scripts/ is not a package: importable only with its folder on sys.path
    finally:
        sys.path.pop(0)
    output = ("ultralytics 8.4.190 requires opencv-python, which is not installed.\n"
              "torch 2.14.1 requires sympy, which is not installed.\n"
              "foo 1.0 has requirement bar<2, but you have bar 3.0.\n")
    assert check_env.pip_check_problems(output) == [
        "torch 2.14.1 requires sympy, which is not installed.", "foo 1.0 has requirement bar<2, but you have bar 3.0."]
    assert check_env.pip_check_problems("No broken requirements found.\n") == []


def test_check_env_passes_on_this_environment():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_env.py")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
