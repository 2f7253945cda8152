"""``lsb export``: ``lsb detect`` results -> Label Studio tasks, a YOLO dataset, or a COCO json.

    lsb export ls   drafts/ --out tasks.json --document-root /data/files      # /data/local-files/?d=<rel>
    lsb export ls   drafts/ --out tasks.json --url-prefix gs://bucket/photos   # gs://bucket/photos/<name>
    lsb export yolo drafts/ --out dataset/                                     # dataset/<hash>/data.yaml
    lsb export coco drafts/ --out drafts.coco.json

``ls``: one task per image, ``data.<image key>`` = the image's URL, one prediction per task written
by the backend's own control models (RectangleLabels / PolygonLabels / BrushLabels of the label
config, ``--label-config`` or the one stored in the results) with ``model_version``
``<source>:<model>`` unless ``--model-version``. Local images need ``--document-root`` (Label Studio's
``LOCAL_FILES_DOCUMENT_ROOT``; the image must be under it) or ``--url-prefix`` (the image's name,
relative to the detect input folder, is appended: cloud storage mirrors of that folder). Images
that came from URLs keep their URL.

``yolo``: built by :func:`worker.training.dataset.build_dataset` exactly like a training dataset (same
classes order, split by a stable hash, data.yaml with an absolute ``path:``, manifest.json), into
``<out>/<dataset hash>/``. ``coco``: images (``file_name`` = the image's name, or the URL),
categories in label order (ids from 1), one annotation per object with ``bbox``, ``area``,
``score`` and, for masks, ``segmentation`` polygons (RLE when the outline cannot be a polygon).
``--min-score`` drops low-scoring objects in every format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np

from backend.control_models import CONTROL_MODELS
from backend.core import geometry
from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig, UnsupportedConfig
from backend.core.label_studio import AnnotatedTask
from worker.cli import common, results
from worker.training.dataset import NotEnoughData, build_dataset


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="detect results -> Label Studio tasks JSON, YOLO dataset, COCO json",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=["ls", "yolo", "coco"])
    p.add_argument("results", type=Path, help="folder written by lsb detect")
    p.add_argument("--out", required=True, type=Path, help="tasks/COCO JSON file, or the YOLO dataset folder")
    p.add_argument("--label-config", metavar="XML", help="label config (default: the one stored in the results)")
    p.add_argument("--document-root", type=Path, help="ls: Label Studio's LOCAL_FILES_DOCUMENT_ROOT")
    p.add_argument("--url-prefix", help="ls: cloud URL the images are mirrored under, e.g. s3://bucket/photos")
    p.add_argument("--model-version", help="ls: model_version of the predictions (default <source>:<model>)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop objects scoring below this")
    p.add_argument("--val-fraction", type=float, help="yolo: share of images in val (default TRAIN_VAL_FRACTION)")
    common.common_flags(p)
    p.set_defaults(run=run)


def _load(args) -> tuple[list[tuple[Path, dict]], ProjectConfig, str]:
    docs = results.iter_results(args.results)
    if not docs:
        raise common.CLIError(f"no complete lsb detect results (*.json) under {args.results}")
    if args.label_config:
        xml = Path(args.label_config).read_text()
    else:
        xml = next((d.get("label_config") for _, d in docs if d.get("label_config")), "")
    try:
        config = ProjectConfig.parse(xml)
    except UnsupportedConfig as exc:
        raise common.CLIError(f"label config: {exc}") from None
    return docs, config, xml


def _detections(doc: dict, min_score: float) -> Detections:
    det = results.from_json(doc)
    return det.filter(det.scores >= min_score) if len(det) else det


def image_url(doc: dict, document_root: Path | None, url_prefix: str | None) -> str:
    """The URL Label Studio should load the image from (see the module docstring)."""
    image = doc["image"]
    if image.get("url"):
        return image["url"]
    if url_prefix:
        return url_prefix.rstrip("/") + "/" + quote(str(image["name"]).lstrip("/"), safe="/")
    if document_root:
        path = Path(image["path"]).resolve()
        root = document_root.resolve()
        if not path.is_relative_to(root):
            raise common.CLIError(f"{path} is not under --document-root {root}")
        return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix(), safe="/")
    raise common.CLIError("local images need --document-root (Label Studio local files) or --url-prefix (cloud storage)")


def regions(config: ProjectConfig, detections: Detections, tags: tuple[str, ...] | None = None) -> list[dict]:
    """Label Studio regions through the backend's control models (as the /predict route writes them)."""
    out: list[dict] = []
    for control in config.controls:
        if tags is not None and control.tag not in tags:
            continue
        out.extend(CONTROL_MODELS[control.tag](control).regions(detections))
    return out


def to_tasks(docs: list[tuple[Path, dict]], config: ProjectConfig, *, document_root: Path | None = None,
             url_prefix: str | None = None, model_version: str | None = None, min_score: float = 0.0) -> list[dict]:
    tasks = []
    for _, doc in docs:
        det = _detections(doc, min_score)
        result = regions(config, det)
        score = sum(r["score"] for r in result) / len(result) if result else 0.0
        version = model_version or f"{doc.get('source')}:{doc.get('model')}"
        tasks.append({
            "data": {config.image_key: image_url(doc, document_root, url_prefix)},
            "predictions": [{"model_version": version, "score": round(score, 6), "result": result}],
        })
    return tasks


def to_coco(docs: list[tuple[Path, dict]], config: ProjectConfig, min_score: float = 0.0) -> dict:
    categories = [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(config.class_names)]
    cid = {c["name"]: c["id"] for c in categories}
    images, annotations = [], []
    for image_id, (_, doc) in enumerate(docs, start=1):
        det = _detections(doc, min_score)
        width, height = det.image_size
        images.append({"id": image_id, "file_name": doc["image"].get("url") or doc["image"]["name"],
                       "width": width, "height": height, "sha256": doc["image"].get("sha256")})
        for k, label in enumerate(det.labels):
            if label not in cid:
                continue
            bbox = geometry.xyxy_to_coco(det.xyxy[k])
            ann = {"id": len(annotations) + 1, "image_id": image_id, "category_id": cid[label],
                   "bbox": [round(v, 3) for v in bbox], "area": round(bbox[2] * bbox[3], 3), "iscrowd": 0,
                   "score": round(float(det.scores[k]), 6)}
            if det.masks is not None:
                mask = det.masks[k]
                polygon = geometry.mask_to_polygon(mask, tolerance=0.5)
                filled = geometry.polygon_to_mask(polygon, width, height) if polygon is not None else None
                # A polygon only when it describes the mask well (one part, no holes); else exact RLE.
                if filled is not None and (filled ^ mask).sum() <= 0.02 * max(int(mask.sum()), 1) + 2 * len(polygon):
                    ann["segmentation"] = [geometry.polygon_to_coco(np.round(polygon, 2))]
                else:
                    ann["segmentation"] = geometry.mask_to_rle(mask)
                ann["area"] = int(mask.sum())
            annotations.append(ann)
    return {"info": {"description": "lsb export coco", "version": "1.0"}, "licenses": [], "images": images,
            "annotations": annotations, "categories": categories}


class _LocalImages:
    """The ImageSource build_dataset expects, reading the detect results' images."""

    def __init__(self, images: common.Images, by_url: dict[str, common.ImageItem]):
        self.images = images
        self.by_url = by_url

    def load(self, url: str, task_id: int | None = None):
        return self.images.load(self.by_url[url])


def to_yolo(docs: list[tuple[Path, dict]], config: ProjectConfig, out: Path, s, min_score: float = 0.0,
            val_fraction: float | None = None, quiet: bool = False):
    tasks, by_url = [], {}
    box_tags = ("RectangleLabels",) if any(c.tag == "RectangleLabels" for c in config.controls) else None
    for i, (_, doc) in enumerate(docs, start=1):
        image = doc["image"]
        item = common.ImageItem(image["name"], Path(image["path"]) if image.get("path") else None, image.get("url"))
        key = image.get("url") or image["path"]
        by_url[key] = item
        # Boxes from the rectangle controls when there are any (exact), else from the masks' outlines.
        result = regions(config, _detections(doc, min_score), box_tags)
        tasks.append(AnnotatedTask(id=i, data={config.image_key: key}, annotation_id=i,
                                   annotation_updated_at=str(image.get("sha256") or ""), result=result))
    updates = {"train_val_fraction": val_fraction} if val_fraction is not None else {}
    if updates:
        s = s.model_copy(update=updates)
    images = common.Images(s)
    try:
        return build_dataset("export", tasks, config, s, loader=_LocalImages(images, by_url), out_dir=out, max_image_side=1 << 30)
    finally:
        images.close()


def run(args: argparse.Namespace) -> int:
    docs, config, _ = _load(args)
    out: Path = args.out
    if args.format == "ls":
        tasks = to_tasks(docs, config, document_root=args.document_root, url_prefix=args.url_prefix,
                         model_version=args.model_version, min_score=args.min_score)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(tasks, indent=1))
        common.print_json({"format": "ls", "tasks": len(tasks), "regions": sum(len(t["predictions"][0]["result"]) for t in tasks),
                           "out": str(out.resolve()), "label_config": "import with the same label config"})
    elif args.format == "coco":
        coco = to_coco(docs, config, args.min_score)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(coco))
        common.print_json({"format": "coco", "images": len(coco["images"]), "annotations": len(coco["annotations"]),
                           "categories": [c["name"] for c in coco["categories"]], "out": str(out.resolve())})
    else:
        try:
            dataset = to_yolo(docs, config, out, common.settings(), args.min_score, args.val_fraction, args.quiet)
        except NotEnoughData as exc:
            raise common.CLIError(f"yolo export: {exc}") from None
        common.print_json({"format": "yolo", "data_yaml": str(dataset.data_yaml), "root": str(dataset.root),
                           "counts": {k: v for k, v in dataset.counts.items() if k != "errors"}, "classes": dataset.classes})
    return 0
