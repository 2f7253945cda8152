"""Check an installed environment: nothing missing, and one OpenCV, the headless one.

``make install`` and the Docker image install the locks with ``pip install --no-deps`` (the locks pin
the whole tree), so pip neither resolves nor checks anything; this script does it afterwards:

- ``pip check`` passes, except for the one requirement the locks leave out on purpose: Ultralytics'
  ``opencv-python`` (the GUI build, which needs libGL), served by ``opencv-python-headless``, which
  label-studio-sdk requires and which provides the same ``cv2`` module;
- no GUI OpenCV distribution is installed (they all write the same ``cv2/`` folder), and ``cv2``
  imports and says it is headless.

Usage: ``python scripts/check_env.py`` with the environment's own interpreter. Exit status 1 and the
reasons on stderr when something is wrong.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

#: GUI OpenCV builds: they need libGL and share cv2/ with the headless build.
GUI_OPENCV = ("opencv-python", "opencv-contrib-python")
#: A requirement on the GUI build is met by the headless build (same cv2 module and version line).
SUBSTITUTES = {"opencv-python": "opencv-python-headless"}


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pip_check_problems(output: str) -> list[str]:
    """The lines of ``pip check`` output that are real problems (the substituted requirement left out)."""
    problems = []
    for line in output.splitlines():
        line = line.strip()
        if not line or line.startswith("No broken requirements"):
            continue
        match = re.match(r"^\S+ \S+ requires ([A-Za-z0-9_.\-]+), which is not installed\.$", line)
        if match and match.group(1).lower() in SUBSTITUTES and _installed(SUBSTITUTES[match.group(1).lower()]):
            continue
        problems.append(line)
    return problems


def opencv_problems() -> list[str]:
    problems = [f"{name} {_installed(name)} is installed: remove it (it needs libGL and overwrites the headless cv2)"
                for name in GUI_OPENCV if _installed(name)]
    if not _installed("opencv-python-headless"):
        return [*problems, "opencv-python-headless is not installed"]
    try:
        import cv2  # not at module level: only this check loads OpenCV's native library
        import cv2.version  # (same)
    except ImportError as exc:
        return [*problems, f"import cv2 failed: {exc}"]
    if not cv2.version.headless:
        problems.append(f"cv2 {cv2.version.opencv_version} is not the headless build")
    return problems


def main() -> int:
    pip = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    problems = pip_check_problems(pip.stdout) + opencv_problems()
    for problem in problems:
        print(f"check_env: {problem}", file=sys.stderr)
    if not problems:
        print("check_env: dependencies complete; one OpenCV, headless")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
