"""The evaluation report: ``report.md``, ``metrics.json`` and PNG plots in a folder.

Plots use matplotlib's Agg canvas directly: no display and no global backend switch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from backend.evaluation.metrics import SIZES

log = logging.getLogger(__name__)


def _figure(width: float = 6.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: matplotlib, only when plots are drawn
    from matplotlib.figure import Figure  # heavy: matplotlib, with the canvas above

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def plot_all(metrics: dict, folder: Path) -> dict[str, str]:
    """PNG plots into ``folder``; returns {name: file name}."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    fig = _figure()
    ax = fig.add_subplot(111)
    bins = metrics["iou"]["bins"]
    ax.bar(bins[:-1], metrics["iou"]["counts"], width=np.diff(bins), align="edge", color="#4c72b0", edgecolor="white")
    ax.axvline(0.5, color="#c44e52", linestyle="--", linewidth=1)
    ax.set_xlabel("IoU of the best same-label prediction, per true box (0 = missed)")
    ax.set_ylabel("true boxes")
    ax.set_title("IoU histogram")
    fig.tight_layout()
    fig.savefig(folder / "iou_histogram.png")
    files["iou_histogram"] = "iou_histogram.png"

    pr = metrics.get("pr_curve")
    if pr:
        fig = _figure()
        ax = fig.add_subplot(111)
        recall = [r for r, p in zip(pr["recall"], pr["precision"]) if p is not None]
        precision = [p for p in pr["precision"] if p is not None]
        ax.plot(recall, precision, color="#4c72b0")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title(f"Precision-recall at IoU 0.5 (mAP50 {metrics['coco']['map50']:.3f})")
        fig.tight_layout()
        fig.savefig(folder / "pr_curve.png")
        files["pr_curve"] = "pr_curve.png"

    per_class = metrics.get("per_class") or {}
    if per_class:
        names = list(per_class)
        fig = _figure(max(6.0, 0.6 * len(names) + 2), 3.6)
        ax = fig.add_subplot(111)
        x = np.arange(len(names))
        ax.bar(x - 0.2, [per_class[n]["ap50"] or 0 for n in names], 0.4, label="AP50", color="#4c72b0")
        ax.bar(x + 0.2, [per_class[n]["ap50_95"] or 0 for n in names], 0.4, label="AP50-95", color="#55a868")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.legend()
        ax.set_title("AP per class")
        fig.tight_layout()
        fig.savefig(folder / "per_class_ap.png")
        files["per_class_ap"] = "per_class_ap.png"

    sizes = metrics["sizes"]
    fig = _figure()
    ax = fig.add_subplot(111)
    x = np.arange(len(SIZES))
    ax.bar(x - 0.2, [sizes[s]["recall50"] or 0 for s in SIZES], 0.4, label="recall@0.5", color="#4c72b0")
    ax.bar(x + 0.2, [sizes[s]["map50_95"] or 0 for s in SIZES], 0.4, label="mAP50-95", color="#55a868")
    ax.set_xticks(x, [f"{s}\n(n={sizes[s]['n_gt']})" for s in SIZES])
    ax.set_ylim(0, 1.05)
    ax.legend()
    ax.set_title("By object size (small < 32², medium < 96² px)")
    fig.tight_layout()
    fig.savefig(folder / "sizes.png")
    files["sizes"] = "sizes.png"

    confusion = metrics.get("confusion")
    if confusion and confusion.get("classes"):
        files["confusion"] = _confusion_heatmap(confusion, folder)

    speed = metrics.get("speed") or {}
    if speed.get("latencies_s"):
        fig = _figure()
        ax = fig.add_subplot(111)
        ax.hist(speed["latencies_s"], bins=min(30, max(5, len(speed["latencies_s"]) // 2)), color="#8172b2")
        ax.set_xlabel("seconds per image (detector call)")
        ax.set_ylabel("images")
        ax.set_title("Latency")
        fig.tight_layout()
        fig.savefig(folder / "latency.png")
        files["latency"] = "latency.png"
    return files


def _confusion_heatmap(confusion: dict, folder: Path) -> str:
    """The confusion matrix as a heatmap, each true row normalised (counts written in the cells)."""
    matrix = np.asarray(confusion["matrix"], dtype=float)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    n = len(confusion["rows"])
    fig = _figure(max(4.5, 0.7 * n + 2.5), max(3.6, 0.6 * n + 1.8))
    ax = fig.add_subplot(111)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), confusion["columns"], rotation=30, ha="right")
    ax.set_yticks(range(n), confusion["rows"])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion (IoU > {confusion['iou_threshold']:g}, score ≥ {confusion['score_threshold']:g})")
    fig.tight_layout()
    fig.savefig(folder / "confusion.png")
    return "confusion.png"


def action_sections(metrics: dict, plots: dict[str, str]) -> list[str]:
    """Markdown for the sections people act on: confusion, sources side by side, label-error candidates."""
    lines: list[str] = []
    confusion = metrics.get("confusion")
    if confusion and confusion.get("classes"):
        lines += ["## Confusion matrix", "",
                  "Rows: the true class (\"background\": a prediction no true box matches); columns: the predicted "
                  "class (\"missed\": a true box no prediction matches).", "",
                  "| true \\ predicted | " + " | ".join(confusion["columns"]) + " |",
                  "|---" * (len(confusion["columns"]) + 1) + "|"]
        for name, row in zip(confusion["rows"], confusion["matrix"]):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
        lines.append("")
        if "confusion" in plots:
            lines += [f"![Confusion matrix](plots/{plots['confusion']})", ""]
    compared = metrics.get("side_by_side")
    if compared:
        lines += side_by_side_table(compared)
    errors = metrics.get("label_errors")
    if errors is not None:
        lines += ["## Label-error candidates", "",
                  "Annotations the model contradicts with high confidence, most confident first: open each and fix the "
                  "label if the model is right.", ""]
        if metrics.get("label_error_links"):
            lines += [f"_{metrics['label_error_links']}._", ""]
        if not errors:
            lines += ["None.", ""]
        else:
            lines += ["| task | kind | predicted | labeled | score | box (x1, y1, x2, y2 px) |", "|---|---|---|---|---|---|"]
            for c in errors:
                task = f"[{c['task_id']}]({c['link']})" if c.get("link") else str(c["task_id"])
                lines.append(f"| {task} | {c['kind']} | {c.get('predicted') or '–'} | {c.get('labeled') or '–'} | "
                             f"{_fmt(c['score'])} | {', '.join(f'{v:g}' for v in c['box'])} |")
            lines.append("")
    return lines


def side_by_side_table(compared: dict[str, dict]) -> list[str]:
    """One table of every source on the same images and truth: all classes, then each class, a row per source."""
    sources = list(compared)
    lines = ["## Sources side by side (same images, same truth)", "",
             "Precision and recall at IoU 0.5 over each source's predictions scoring at least its threshold ("
             + ", ".join(f"{s}: {_fmt(compared[s].get('score_threshold'))}" for s in sources)
             + f"); {_fmt(compared[sources[0]].get('n_images'))} images.", "",
             "| class | source | true | predicted ≥ threshold | AP50 | AP50-95 | precision | recall |",
             "|---|---|---|---|---|---|---|---|"]
    for s in sources:
        f = compared[s]
        kept = sum(row.get("n_kept") or 0 for row in (f.get("per_class") or {}).values())
        lines.append(f"| all | {s} | {_fmt(f.get('n_gt'))} | {kept} | {_fmt(f.get('map50'))} | "
                     f"{_fmt(f.get('map50_95'))} | {_fmt(f.get('precision'))} | {_fmt(f.get('recall'))} |")
    classes = list(dict.fromkeys(c for s in sources for c in (compared[s].get("per_class") or {})))
    for c in classes:
        for s in sources:
            row = (compared[s].get("per_class") or {}).get(c) or {}
            lines.append(f"| {c} | {s} | " + " | ".join(_fmt(row.get(k)) for k in
                                                         ("n_gt", "n_kept", "ap50", "ap50_95", "precision", "recall")) + " |")
    lines.append("")
    return lines


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_report(metrics: dict, folder: Path | str, *, title: str = "Draft quality", about: dict | None = None) -> Path:
    """``report.md``, ``metrics.json`` and ``plots/*.png`` in ``folder``; returns the report's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = plot_all(metrics, folder / "plots")
    (folder / "metrics.json").write_text(json.dumps({"about": about or {}, **metrics}, indent=1, default=str))
    c, g = metrics["coco"], metrics["gate"]
    lines = [f"# {title}", ""]
    for key, value in (about or {}).items():
        lines.append(f"- **{key}**: {value}")
    lines += ["", f"{metrics['n_images']} images, {metrics['n_gt']} true objects, {metrics['n_pred']} predictions"
              + (f" ({metrics['n_pred_unknown_label']} with labels outside the class list, ignored)"
                 if metrics["n_pred_unknown_label"] else "")
              + ".", ""]
    lines += ["## Boxes", "", "| metric | value |", "|---|---|",
              f"| mAP50-95 (pycocotools) | {_fmt(c['map50_95'])} |", f"| mAP50 | {_fmt(c['map50'])} |",
              f"| mAP75 | {_fmt(c['map75'])} |",
              f"| AR@{c.get('max_det', '')} (boxes per image) | {_fmt(c.get('ar_max_det'))} |",
              f"| precision @ score ≥ {g['score_threshold']:g}, IoU 0.5 | {_fmt(g['precision'])} |",
              f"| recall @ score ≥ {g['score_threshold']:g}, IoU 0.5 | {_fmt(g['recall'])} |",
              f"| mean best IoU per true box | {_fmt(metrics['iou']['mean'])} |", ""]
    if c.get("note"):
        lines += [f"Note: {c['note']}.", ""]
    lines += ["### By class", "",
              f"Precision and recall at IoU 0.5 over the predictions scoring at least {g['score_threshold']:g}.",
              "", f"| class | true | predicted | predicted ≥ {g['score_threshold']:g} | AP50 | AP50-95 | precision | recall |",
              "|---|---|---|---|---|---|---|---|"]
    for name, row in metrics["per_class"].items():
        lines.append(f"| {name} | {row['n_gt']} | {row['n_pred']} | {_fmt(row.get('n_kept'))} | {_fmt(row['ap50'])} | "
                     f"{_fmt(row['ap50_95'])} | {_fmt(row.get('precision'))} | {_fmt(row.get('recall'))} |")
    lines += ["", "### By object size", "", "| size | true | recall@0.5 | mean IoU | mAP50-95 |", "|---|---|---|---|---|"]
    for s in SIZES:
        row = metrics["sizes"][s]
        lines.append(f"| {s} | {row['n_gt']} | {_fmt(row['recall50'])} | {_fmt(row['mean_iou'])} | {_fmt(row['map50_95'])} |")
    lines.append("")
    captions = (("iou_histogram", "IoU histogram"), ("pr_curve", "Precision-recall"), ("per_class_ap", "AP per class"),
                ("sizes", "By size"))
    for key, caption in captions:
        if key in plots:
            lines.append(f"![{caption}](plots/{plots[key]})")
    lines.append("")
    lines += action_sections(metrics, plots)
    m = metrics.get("masks")
    if m:
        lines += ["## Masks", "", "| metric | value |", "|---|---|",
                  f"| segm mAP50-95 (pycocotools) | {_fmt(m['segm_map50_95'])} |", f"| segm mAP50 | {_fmt(m['segm_map50'])} |",
                  f"| instance mIoU (true objects matched at box IoU ≥ 0.5, n={m['n_matched']}) | {_fmt(m['instance_miou'])} |",
                  f"| instance Dice | {_fmt(m['instance_dice'])} |",
                  f"| semantic mIoU (per class, all pixels) | {_fmt(m['semantic_miou'])} |",
                  f"| semantic Dice | {_fmt(m['semantic_dice'])} |", ""]
    sp = metrics.get("speed")
    if sp:
        lines += ["## Speed", "", "| metric | value |", "|---|---|",
                  f"| images per second (wall) | {_fmt(sp['images_per_second'])} |",
                  (f"| latency mean / p50 / p90 / p95 / max (s) | {_fmt(sp['latency_mean_s'])} / {_fmt(sp['latency_p50_s'])} / "
                   f"{_fmt(sp['latency_p90_s'])} / {_fmt(sp['latency_p95_s'])} / {_fmt(sp['latency_max_s'])} |"),
                  f"| wall time (s) | {_fmt(sp['wall_s'])} |", ""]
        if "latency" in plots:
            lines += [f"![Latency](plots/{plots['latency']})", ""]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return report
