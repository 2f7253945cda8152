"""Make Ultralytics safe to import and run with no network (see docs/ultralytics.md#no-network).

Call :func:`prepare` before the first ``import ultralytics`` in any process that trains or
predicts. It turns off every network path (DNS checks, analytics, pip auto-install, font and
weight downloads, platform callbacks) and keeps Ultralytics' settings in a private folder.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from backend.core.files import copy_atomic

# Export formats a promoted model is exported to and served from instead of its .pt, fastest on CPU
# first (``worker.training.exporter`` makes and verifies them, ``backend.detectors.yolo`` loads them).
EXPORT_FORMATS = ("openvino", "onnx")

_FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")
_done = False
_CPU_F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def _local_font() -> Path | None:
    """A TTF that ships with matplotlib, copied under the names Ultralytics would download."""
    try:
        import matplotlib  # heavy: matplotlib, only to locate its bundled font

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return path if path.is_file() else None
    except ImportError:
        return None


def prepare(config_dir: str | os.PathLike | None = None) -> Path:
    """Set the offline switches and return Ultralytics' private config folder."""
    global _done
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_AUTOINSTALL"] = "0"
    os.environ.setdefault("CI", "true")  # OpenVINO telemetry opt-out
    os.environ.pop("ULTRALYTICS_API_KEY", None)  # platform callbacks would upload checkpoints
    base = Path(config_dir or os.environ.get("YOLO_CONFIG_DIR") or Path(tempfile.gettempdir()) / "lsb-ultralytics")
    os.environ["YOLO_CONFIG_DIR"] = str(base)
    folder = base / "Ultralytics"
    folder.mkdir(parents=True, exist_ok=True)
    font = _local_font()
    for name in _FONT_NAMES:
        target = folder / name
        if font and not target.exists():
            copy_atomic(font, target)
    if not _done:
        from ultralytics.utils import SETTINGS  # heavy: ultralytics, only in processes that run it

        SETTINGS.update(
            sync=False, clearml=False, comet=False, dvc=False, mlflow=False,
            raytune=False, tensorboard=False, wandb=False,
        )
        _done = True
    return folder


def all_cores() -> int:
    """Every core of the machine (Ultralytics' ``select_device`` would leave one idle)."""
    return max(1, os.cpu_count() or 1)


def restore_torch_threads(threads: int = 0) -> None:
    """Set torch's intra-op threads to ``threads`` (default: every core), if they differ.

    Ultralytics' ``select_device`` lowers them to ``cpu_count - 1`` (1 on 2 cores) whenever a
    predictor, trainer, validator or exporter is set up: call this after each of those.
    """
    import torch  # heavy: only processes that already run Ultralytics call this

    wanted = threads or all_cores()
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def openvino_in_f32() -> None:
    """Make every OpenVINO ``Core`` of this process compile CPU models in f32 (idempotent).

    OpenVINO's CPU plugin runs in bf16 by default on CPUs that have it (AVX512-BF16, AMX): YOLO
    boxes then drift from the .pt's by a pixel or two (IoU ~0.95 measured on AMD EPYC), which
    fails the export check. Ultralytics builds its own ``Core`` when it loads an export and sets the
    precision hint only on Windows and ARM, so the hint goes on the ``Core`` class itself: the
    model is compiled once, in f32, instead of compiled in bf16 and then again.
    """
    import openvino as ov  # heavy, optional: openvino, only when an OpenVINO model is used

    if getattr(ov.Core, "lsb_cpu_f32", False):
        return

    class CoreF32(ov.Core):
        lsb_cpu_f32 = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.set_property("CPU", dict(_CPU_F32))

    ov.Core = CoreF32
