"""``lsb eval``: score a drafting source, a YOLO version, or saved drafts against human labels.

    lsb eval --truth coco.json --source owlvit --out report/
    lsb eval --truth dataset/ --split val --source yolo --project 3 --version v0004 --out report/
    lsb eval --truth export.json --document-root /data/files --source gemini --label-config lc.xml --out report/
    lsb eval --truth coco.json --predictions drafts/ --out report/          # lsb detect results, no model run

Truth: a COCO json (images under ``--images``, default the json's folder), a YOLO dataset folder
or data.yaml (``--split`` val/train/test/all), or a Label Studio JSON export (latest non-skipped
annotation per task; ``/data/local-files/?d=`` images under ``--document-root``, others by file name
under ``--images`` or fetched by URL). The classes are the truth's; the detectors get a label
config built from them unless ``--label-config``/``--labels`` is given (its labels must be the
truth's names). YOLO runs at ``--threshold`` (default 0.001, like the training gate, so mAP sees
the whole ranking); precision/recall are counted at ``--pr-threshold`` (default: the served
threshold for YOLO, 0 otherwise). Writes ``report.md``, ``metrics.json`` and ``plots/*.png``
(:mod:`backend.evaluation.metrics`); prints the headline metrics as JSON. The report also holds the
confusion matrix with "missed" and "background" (:mod:`backend.evaluation.confusion`), label-error
candidates (:mod:`backend.evaluation.label_errors`; with a Label Studio export as truth each one is a task
with a link to it in Label Studio, ``--label-studio-url`` or LABEL_STUDIO_URL; else named by image) and,
with ``--compare DIR``, the two sources side by side on the images both have, overall and per class.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from backend.core.detections import Detections
from backend.core.label_config import ProjectConfig
from backend.evaluation.label_errors import label_errors
from backend.evaluation.truth import TruthError, load_truth
from worker.cli import common, results


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a drafting source / YOLO version against human labels -> Markdown report",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--truth", required=True, type=Path,
                   help="COCO json, YOLO dataset folder/data.yaml, or Label Studio export JSON")
    p.add_argument("--images", type=Path, help="folder holding the truth's images (COCO file_name / export basenames)")
    p.add_argument("--split", default="val", help="YOLO dataset split: train, val, test or all (default val)")
    p.add_argument("--document-root", type=Path,
                   help="Label Studio export: LOCAL_FILES_DOCUMENT_ROOT for /data/local-files/ URLs")
    p.add_argument("--predictions", type=Path, help="score these lsb detect results instead of running a source")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.add_argument("--title", help="report title")
    p.add_argument("--pr-threshold", type=float, help="score threshold for precision/recall")
    p.add_argument("--workers", type=int, help="images in flight at once")
    p.add_argument("--compare", type=Path, metavar="DIR",
                   help="saved lsb detect results of another source (e.g. Gemini drafts): "
                        "a side-by-side table on the images both have")
    p.add_argument("--compare-threshold", type=float, default=0.0, help="score threshold of --compare for precision/recall")
    p.add_argument("--error-score", type=float, default=0.5,
                   help="label-error candidates: the model's minimum score to contradict a label (default 0.5)")
    p.add_argument("--max-errors", type=int, default=50, help="label-error candidates listed (default 50)")
    p.add_argument("--label-studio-url", help="label-error links to the tasks in Label Studio (default LABEL_STUDIO_URL); "
                                             "needs a Label Studio export as --truth (task ids; the project from the "
                                             "export, else --project)")
    common.add_config_args(p)
    common.add_source_args(p, required=False)
    common.common_flags(p)
    p.set_defaults(run=run)


def _sha(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def _match_predictions(truth_images, folder: Path) -> tuple[list[tuple[Detections, Detections]], list[float], list[str]]:
    """Pair saved results with truth images: by sha256 of the file, then path, then name, then unique basename."""
    docs = [doc for _, doc in results.iter_results(folder)]
    if not docs:
        raise common.CLIError(f"no complete lsb detect results under {folder}")
    by_sha = {d["image"].get("sha256"): d for d in docs if d["image"].get("sha256")}
    by_path = {str(Path(d["image"]["path"]).resolve()): d for d in docs if d["image"].get("path")}
    by_name = {d["image"]["name"]: d for d in docs}
    basenames: dict[str, list[dict]] = {}
    for d in docs:
        basenames.setdefault(Path(d["image"]["name"]).name, []).append(d)
    pairs, latencies, missing = [], [], []
    for t in truth_images:
        doc = by_sha.get(_sha(t.path)) or (by_path.get(str(t.path.resolve())) if t.path else None) or by_name.get(t.name)
        if doc is None and len(basenames.get(Path(t.name).name, [])) == 1:
            doc = basenames[Path(t.name).name][0]
        if doc is None:
            missing.append(t.name)
            continue
        det = results.from_json(doc)
        pairs.append((det, t.truth))
        if (doc.get("meta") or {}).get("latency_s") is not None:
            latencies.append(float(doc["meta"]["latency_s"]))
    return pairs, latencies, missing


def _link_target(truth, args: argparse.Namespace) -> tuple[str, int | str | None, str]:
    """(Label Studio URL, project, note) for the label-error links; the URL is "" when no link can be made.

    Only a Label Studio export names tasks; COCO and YOLO truth name images, which have no task page.
    """
    url = (args.label_studio_url if args.label_studio_url is not None else common.settings().label_studio_url).strip()
    projects = {t.project for t in truth.images if t.project is not None}
    project = next(iter(projects)) if len(projects) == 1 else args.project
    if not any(t.task_id is not None for t in truth.images):
        return "", None, "no links: the truth is not a Label Studio export, candidates are named by image"
    if not url:
        return "", project, "no links: set LABEL_STUDIO_URL or --label-studio-url"
    if not project:
        return "", None, "no links: the export names no single project, give --project"
    return url, project, f"links open the task in {url.rstrip('/')}/projects/{project}/data"


def _act_on(metrics: dict, pairs: list[tuple[Detections, Detections]], truth, args: argparse.Namespace,
            pr_threshold: float) -> None:
    """Adds the confusion matrix, label-error candidates and (``--compare``) the side-by-side figures to ``metrics``."""
    from backend.evaluation.confusion import confusion_matrix  # heavy: supervision, kept out of lsb --help
    from worker.training.review import source_figures  # heavy: pycocotools and the YOLO detector, kept out of lsb --help

    image_of = {id(t.truth): t for t in truth.images}
    metrics["confusion"] = confusion_matrix(pairs, truth.classes, score_threshold=pr_threshold)
    url, project, note = _link_target(truth, args)
    items = []
    for p, g in pairs:
        t = image_of.get(id(g))
        items.append((t.task_id if t is not None and t.task_id is not None else (t.name if t else "?"), p, g))
    metrics["label_errors"] = label_errors(items, args.error_score, project=project or "", label_studio_url=url,
                                           limit=args.max_errors)
    metrics["label_error_links"] = note
    if not args.compare:
        return
    other, _, _ = _match_predictions(truth.images, args.compare)
    common_truth = {id(g) for _, g in other} & {id(g) for _, g in pairs}
    if not common_truth:
        raise common.CLIError(f"--compare {args.compare}: no image in common with the evaluated predictions")
    mine = [(p, g) for p, g in pairs if id(g) in common_truth]
    theirs = [(p, g) for p, g in other if id(g) in common_truth]
    names = [mine[0][0].source or "evaluated", theirs[0][0].source or "compared"]
    if names[0] == names[1]:
        names = [f"{names[0]} (evaluated)", f"{names[1]} (compared)"]
    metrics["side_by_side"] = {names[0]: source_figures(mine, truth.classes, pr_threshold),
                               names[1]: source_figures(theirs, truth.classes, args.compare_threshold)}


def run(args: argparse.Namespace) -> int:
    from backend.evaluation.metrics import evaluate  # heavy: pycocotools, kept out of lsb --help
    from backend.evaluation.report import write_report  # heavy: imports metrics (pycocotools)

    if not args.predictions and not args.source:
        raise common.CLIError("give --source gemini|yolo|owlvit (run a detector) or --predictions DIR (saved lsb detect results)")
    xml_override = Path(args.label_config).read_text() if args.label_config else None
    try:
        truth = load_truth(args.truth, images_root=args.images, split=args.split, label_config=xml_override,
                           document_root=args.document_root)
    except TruthError as exc:
        raise common.CLIError(str(exc)) from None
    about = {"truth": f"{truth.kind} {truth.origin} ({len(truth.images)} images)", "classes": ", ".join(truth.classes)}
    failures: list[dict] = []
    wall = None
    if args.predictions:
        pairs, latencies, missing = _match_predictions(truth.images, args.predictions)
        about["predictions"] = str(args.predictions)
        failures.extend({"image": name, "error": "no saved result"} for name in missing)
        pr_threshold = args.pr_threshold if args.pr_threshold is not None else 0.0
        sources = {(d.source, d.model) for d, _ in pairs}
        about["source"] = ", ".join(f"{s} {m}".strip() for s, m in sorted(sources))
    else:
        s = common.settings()
        if args.document_root:
            s = s.model_copy(update={"local_files_document_root": str(args.document_root)})
        if args.label_config or args.labels:
            config, _ = common.load_config(args)
        else:  # the truth's classes; masks asked for when the truth has masks
            config = ProjectConfig.parse(common.config_from_labels(truth.classes, "brush" if truth.has_masks else args.tag))
        if args.source == "yolo" and args.threshold is None:
            args.threshold = 0.001
        source = common.make_source(args, s, config)
        pr_threshold = args.pr_threshold
        if pr_threshold is None:
            pr_threshold = config.score_threshold(s.yolo_score_threshold) if source.name == "yolo" else 0.0
        about.update(source=f"{source.name} {source.model}", **{f"source {k}": v for k, v in source.info.items() if k != "cost"})
        images = common.Images(s)
        latencies: list[float] = []
        pairs = []

        def one(t):
            if t.path is None and not t.url:
                raise FileNotFoundError(f"image {t.name} not found (use --images / --document-root)")
            loaded = images.load(common.ImageItem(t.name, t.path, t.url))
            started = time.perf_counter()
            det = source.detect(loaded, config)
            return det, time.perf_counter() - started

        started = time.perf_counter()
        try:
            for t, out, error in common.parallel(one, truth.images, args.workers or source.workers, f"eval ({source.name})",
                                                 args.quiet):
                if error is not None:
                    failures.append({"image": t.name, "error": f"{type(error).__name__}: {error}"})
                    continue
                det, seconds = out
                pairs.append((det, t.truth))
                latencies.append(seconds)
        finally:
            source.close()
            images.close()
        wall = time.perf_counter() - started
    if not pairs:
        raise common.CLIError("no image could be evaluated: " + "; ".join(f"{f['image']}: {f['error']}" for f in failures[:5]),
                              code=1)
    metrics = evaluate(pairs, truth.classes, latencies=latencies, wall_seconds=wall, score_threshold=pr_threshold)
    _act_on(metrics, pairs, truth, args, pr_threshold)
    if failures:
        about["failed images"] = len(failures)
    report = write_report(metrics, args.out, title=args.title or "Draft quality", about=about)
    summary = {"report": str(report.resolve()), "images": metrics["n_images"], "failed": len(failures),
               "map50_95": metrics["coco"]["map50_95"], "map50": metrics["coco"]["map50"],
               "precision": metrics["gate"]["precision"], "recall": metrics["gate"]["recall"],
               "mean_iou": metrics["iou"]["mean"],
               "masks": metrics["masks"] and {k: metrics["masks"][k] for k in ("segm_map50", "instance_miou", "instance_dice")},
               "images_per_second": (metrics["speed"] or {}).get("images_per_second")}
    if failures:
        summary["failures"] = failures[:20]
    common.print_json(summary)
    return 1 if failures else 0
