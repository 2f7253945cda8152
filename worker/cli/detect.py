"""``lsb detect``: images through one drafting source -> one JSON and one annotated PNG per image.

    lsb detect photos/ --source gemini --label-config label_config.xml --out drafts/
    lsb detect a.jpg b.jpg https://host/c.jpg --source owlvit --labels "helmet,person" --out drafts/
    lsb detect @urls.txt --source yolo --project 3 --labels "Car,Person" --out drafts/ --workers 4

URLs are fetched under the service's rules (backend.core.images): only hosts in IMAGE_ALLOWED_HOSTS or
``--allowed-hosts``, never private addresses unless IMAGE_ALLOW_PRIVATE; gs:// and s3:// go through
Label Studio's presign endpoint (LABEL_STUDIO_URL).

Resumable: an image whose JSON exists and is complete (same source) is skipped; its PNG is redrawn
from the JSON if missing. Concurrent: ``--workers`` images at once (default: GEMINI_CONCURRENCY for
Gemini, 1 for the local models, which use every core already). Gemini goes through the service's
GeminiDetector: the same Redis answer cache (a re-run costs nothing) and the same cost ledger and
daily budget. The JSON schema is in :mod:`worker.cli.results`. Exit code 1 when an image failed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from backend.core.files import write_json_atomic
from worker.cli import common, results


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="draft boxes/masks for images: one JSON + annotated PNG per image",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="image files, folders (recursive), URLs, or @file listing them")
    p.add_argument("--out", required=True, type=Path, help="output folder (mirrors the input folder structure)")
    common.add_config_args(p)
    common.add_source_args(p)
    p.add_argument("--query", help="a free-text query instead of the labels (labelled with the best matching label)")
    p.add_argument("--workers", type=int, help="images in flight at once")
    p.add_argument("--no-png", action="store_true", help="skip the annotated PNGs")
    p.add_argument("--overwrite", action="store_true", help="redo images that already have a complete JSON")
    p.add_argument("--allowed-hosts", metavar="HOSTS",
                   help="http(s) image hosts to fetch from, comma-separated or '*' "
                        "(default IMAGE_ALLOWED_HOSTS; private addresses stay refused)")
    common.common_flags(p)
    p.set_defaults(run=run)


def _paths(out: Path, item: common.ImageItem) -> tuple[Path, Path]:
    stem = Path(item.name).with_suffix("")
    json_path = out / f"{stem.as_posix()}.json"
    return json_path, results.annotated_path(json_path)


def run(args: argparse.Namespace) -> int:
    s = common.settings()
    if args.allowed_hosts:
        s = s.model_copy(update={"image_allowed_hosts": args.allowed_hosts})
    config, xml = common.load_config(args)
    items = common.list_images(args.inputs)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    images = common.Images(s)

    todo: list[common.ImageItem] = []
    redraw: list[tuple[common.ImageItem, dict]] = []
    skipped = 0
    for item in items:
        json_path, png_path = _paths(out, item)
        doc = None if args.overwrite else results.read_result(json_path)
        if doc is not None and doc.get("source") == args.source:
            skipped += 1
            if not args.no_png and not png_path.exists():
                redraw.append((item, doc))
        else:
            todo.append(item)

    summary = {"images": len(items), "skipped": skipped, "done": 0, "failed": 0, "objects": 0, "redrawn": 0,
               "cost_usd": 0.0, "cached": 0, "tokens": 0, "out": str(out.resolve())}
    failures: list[dict] = []

    for item, doc in redraw:  # cheap: no detector needed
        try:
            loaded = images.load(item)
            results.annotate(loaded.image, results.from_json(doc), list(doc.get("labels") or [])).save(
                _paths(out, item)[1], compress_level=1)
            summary["redrawn"] += 1
        except Exception as exc:
            failures.append({"image": item.name, "error": f"redraw: {type(exc).__name__}: {exc}"})

    if todo:
        source = common.make_source(args, s, config)
        summary.update(source=source.name, model=source.model)
        workers = args.workers or source.workers

        def one(item: common.ImageItem) -> dict:
            loaded = images.load(item)
            started = time.perf_counter()
            detections = source.detect(loaded, config, args.query)
            detections.meta.setdefault("latency_s", round(time.perf_counter() - started, 3))
            doc = results.to_json(detections, {**item.ref, "sha256": loaded.sha256}, config.class_names, xml, args.query)
            json_path, png_path = _paths(out, item)
            if not args.no_png:  # the PNG first: a complete JSON then always has its picture
                png_path.parent.mkdir(parents=True, exist_ok=True)
                results.annotate(loaded.image, detections, config.class_names).save(png_path, compress_level=1)
            write_json_atomic(json_path, doc, indent=1)
            return doc

        started = time.perf_counter()
        try:
            for item, doc, error in common.parallel(one, todo, workers, f"detect ({source.name})", args.quiet):
                if error is not None:
                    failures.append({"image": item.name, "error": f"{type(error).__name__}: {error}"})
                    continue
                meta = doc.get("meta") or {}
                summary["done"] += 1
                summary["objects"] += len(doc["objects"])
                summary["cost_usd"] += float(meta.get("cost_usd") or 0.0)
                summary["cached"] += int(bool(meta.get("cached")))
                if not meta.get("cached"):
                    summary["tokens"] += sum(int(v or 0) for v in (meta.get("usage") or {}).values())
        finally:
            source.close()
        elapsed = time.perf_counter() - started
        summary["seconds"] = round(elapsed, 2)
        summary["images_per_second"] = round(summary["done"] / elapsed, 3) if elapsed > 0 else None
        cost = source.info.get("cost")
        if cost is not None:
            summary["gemini_spent_today_usd"] = round(cost.spent_today(), 6)
    summary["cost_usd"] = round(summary["cost_usd"], 6)
    summary["failed"] = len(failures)
    if failures:
        summary["failures"] = failures[:50]
    common.print_json(summary)
    return 1 if failures else 0
