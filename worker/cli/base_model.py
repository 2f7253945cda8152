"""``lsb base-model``: the pretrained weights a project's first training starts from, for hosts without network.

    lsb base-model install yolo11n.pt                 # copied in by hand: checked, then MODEL_DIR/base/yolo11n.pt
    lsb base-model install weights.pt --name yolo11n.pt
    lsb base-model install yolo11n.pt --dir /app/weights   # what the Dockerfile's ARG YOLO_BASE_WEIGHTS runs
    lsb base-model status                             # where YOLO_BASE_MODEL's weights are (never downloads)

``install`` loads the file with Ultralytics' restricted loader (torch weights_only and its allow-list of
model classes) and refuses anything that is not a detection checkpoint; it then writes it atomically
with a ``.sha256`` beside it, under the same file lock the worker's download takes. Training loads the
file like any checkpoint: install only weights you trust (official Ultralytics releases, your own).
The name must be YOLO_BASE_MODEL's for training to use it (README, Pretrained start).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli import common
from worker.training.base_model import BASE_FOLDER, NotACheckpoint, checksum_path, install, is_intact


def add_parser(sub) -> None:
    p = sub.add_parser("base-model", help="install or inspect the pretrained weights first trainings start from",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    inst = actions.add_parser("install", help="check a weights file and keep it where training looks")
    inst.add_argument("file", type=Path, help="an Ultralytics detection checkpoint (.pt)")
    inst.add_argument("--name", help="file name to install as (default: the file's own; training looks for YOLO_BASE_MODEL)")
    inst.add_argument("--dir", type=Path, help="target folder (default: MODEL_DIR/base)")
    common.common_flags(inst)
    inst.set_defaults(run=run_install)
    status = actions.add_parser("status", help="where YOLO_BASE_MODEL's weights are found (no download)")
    common.common_flags(status)
    status.set_defaults(run=run_status)


def run_install(args: argparse.Namespace) -> int:
    s = common.settings()
    folder = args.dir or Path(s.model_dir) / BASE_FOLDER
    try:
        info = install(args.file, folder, args.name)
    except NotACheckpoint as exc:
        raise common.CLIError(str(exc)) from None
    except OSError as exc:
        raise common.CLIError(f"could not write to {folder}: {exc}", 1) from None
    common.print_json({**info, "yolo_base_model": s.yolo_base_model,
                       "used_by_training": Path(info["path"]).name == s.yolo_base_model})
    return 0


def run_status(args: argparse.Namespace) -> int:
    s = common.settings()
    name = Path(s.yolo_base_model).name
    places = {"model_dir": Path(s.model_dir) / BASE_FOLDER / name}
    if s.yolo_base_bundled_dir:
        places["bundled"] = Path(s.yolo_base_bundled_dir) / name
    found = {where: {"path": str(path), "exists": path.is_file(), "checksum": checksum_path(path).is_file(),
                     "intact": is_intact(path)} for where, path in places.items()}
    common.print_json({"yolo_base_model": s.yolo_base_model, "local_file": Path(s.yolo_base_model).is_file(),
                       "download_timeout": s.yolo_base_download_timeout, "places": found})
    return 0
