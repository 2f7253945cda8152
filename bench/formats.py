"""3. CPU inference formats: ONNX Runtime, OpenVINO f32 and OpenVINO INT8 exports vs the PyTorch checkpoint.

"End to end" is the serving path: ``YoloDetector.detect_batch`` (Ultralytics pre-processing, the
model, NMS, class mapping to labels) on decoded images. "Direct" is the runtime alone on the very
tensor Ultralytics feeds it (``session.run`` / the compiled OpenVINO model / the fused torch module).
The exports are made and checked by ``worker.training.exporter``: f32 ones by IoU ≥ 0.99 against the
.pt's boxes, the INT8 one (NNCF, calibrated on the checkpoint's training images) by held-out mAP50-95
within 0.01 of the .pt's. Every format's held-out mAP50 / mAP50-95 is measured the same way (the one
evaluation, ``backend.evaluation.metrics``, through ``YoloDetector``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import CLASSES, Context
from bench.fixtures import label_config, synthetic, trained_checkpoint, verified_exports, write_yolo_dataset
from bench.results import Result, Row, goal_row
from bench.stats import Stats, ratio, timed

NAME = "formats"
TITLE = "3. CPU inference formats: ONNX Runtime and OpenVINO (f32, INT8) vs PyTorch"
LABELS = {"pt": "PyTorch .pt", "onnx": "ONNX Runtime", "openvino": "OpenVINO f32", "openvino_int8": "OpenVINO INT8"}


def checkpoint_data(ctx: Context) -> tuple[Path, list]:
    """The data ``trained_checkpoint`` was trained on, rebuilt (same seed, size and 80/20 split): its
    ``data.yaml`` (the training split calibrates INT8) and the held-out items (they judge every format)."""
    items = synthetic(ctx.pick(120, 48), seed=101)
    cut = int(len(items) * 0.8)
    return write_yolo_dataset(ctx.tmp("checkpoint-data"), items[:cut], items[cut:]), items[cut:]


def held_out_metrics(detector, items) -> dict:
    """mAP50, mAP50-95 (and P/R at 0.25) of a detector on the held-out synthetic items, one image per call."""
    from backend.core.detections import Detections
    from backend.core.label_config import ProjectConfig
    from backend.evaluation.metrics import detection_metrics
    from worker.training.gate import ALL_BOXES

    config = ProjectConfig.parse(label_config())
    preds = [detector.detect_batch([item.image], config, ALL_BOXES)[0] for item in items]
    truth = [Detections([b.xyxy for b in item.boxes], [b.label for b in item.boxes], [1.0] * len(item.boxes),
                        (item.width, item.height), "truth") for item in items]
    return detection_metrics(zip(preds, truth), CLASSES, score_threshold=0.25, max_det=detector.max_det).to_dict()


def int8_export(ctx: Context, checkpoint: Path, fresh: bool = False) -> tuple[Path | None, dict]:
    """``worker.training.exporter.export_int8`` of the shared checkpoint (cached beside it unless ``fresh``):
    the INT8 folder if it passed its held-out mAP check (else None), and the check."""
    from backend.detectors.yolo import YoloDetector
    from worker.training.exporter import export_int8

    out = checkpoint.parent / "exports-int8"
    report_file = out / "report.json"
    if not fresh and report_file.is_file():
        check = json.loads(report_file.read_text())
        if not check["ok"] or Path(check["path"]).is_dir():
            return (Path(check["path"]) if check["ok"] else None), check
    shutil.rmtree(out, ignore_errors=True)
    data, held_out = checkpoint_data(ctx)
    reference = held_out_metrics(YoloDetector(checkpoint, "bench"), held_out)["map50_95"]
    check = export_int8(checkpoint, out, data, 320,
                        lambda path: held_out_metrics(YoloDetector(path, "bench"), held_out)["map50_95"], reference)
    meta = check.__dict__
    report_file.write_text(json.dumps(meta, indent=2, default=str))
    return (Path(check.path) if check.ok else None), meta


def _direct_runner(fmt: str, path, model_pt, precision: str = "f32"):
    """A callable running the raw model on a preprocessed BCHW float32 array."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    if fmt == "openvino":
        import openvino as ov

        xml = next(path.glob("*.xml"))
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}  # f32: as YoloDetector serves it
        compiled = ov.Core().compile_model(str(xml), "CPU", config)
        return lambda x: compiled(x)
    import torch

    from backend.detectors.yolo import on_inference_thread

    module = model_pt.predictor.model  # AutoBackend around the fused module, as predict uses it

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    # On the thread YoloDetector predicts on: a second calling thread would get its own OpenMP team.
    return lambda x: on_inference_thread(run, x)


def run(ctx: Context) -> Result:

    from backend.core.label_config import ProjectConfig
    from backend.detectors.yolo import YoloDetector

    checkpoint = trained_checkpoint(ctx)
    n1, n16 = ctx.pick(60, 8), ctx.pick(15, 2)
    images = [item.image for item in synthetic(16, seed=91)]
    config = ProjectConfig.parse(label_config())
    result = Result(NAME, TITLE, params={"imgsz": 320, "images": "16 × 320x240", "batch1_calls": n1, "batch16_calls": n16,
                                         "cores": os.cpu_count()})
    t = time.monotonic()
    exports, report = verified_exports(ctx, checkpoint, fresh=True)
    export_s = time.monotonic() - t
    int8_path, int8 = int8_export(ctx, checkpoint, fresh=True)
    if int8_path is not None:
        exports["openvino_int8"] = int8_path
    measured = f"{int8['map50_95']}" if int8["map50_95"] is not None else "not measured"
    result.add(goal_row("INT8 OpenVINO export: held-out mAP50-95 vs the .pt", measured,
                        (int8["map50_95"] or 0) - int8["map50_95_pt"], -0.01, True,
                        "within 0.01 of the .pt (else not served)", baseline=f".pt {int8['map50_95_pt']}",
                        ratio_text=f"{(int8['map50_95'] or 0) - int8['map50_95_pt']:+.4f}",
                        note=(f"served; NNCF with {int8['calibration_images']} training images, export {int8['export_s']} s"
                              if int8["ok"] else f"kept out: {int8['reason']}")))
    for fmt, check in report["checks"].items():
        ok = bool(check["ok"])
        detail = (f"{check['matched']}/{check['boxes_pt']} boxes matched, min IoU {check['min_iou']}, "
                  f"max score diff {check['max_score_diff']}, export {check['export_s']} s") if ok else check["reason"]
        result.add(Row(f"{fmt} export verified against the .pt on 8 images", "yes" if ok else "NO",
                       goal="matched boxes IoU ≥ 0.99", status="met" if ok else "MISSED", note=detail))
    result.add(Row("export + verification time, both formats", f"{export_s:.1f} s"))

    detectors = {"pt": YoloDetector(checkpoint, "bench", "cpu", 0, 0)}
    for fmt in ("onnx", "openvino", "openvino_int8"):
        if fmt in exports:
            detectors[fmt] = YoloDetector(exports[fmt], "bench", "cpu", 0, 0)
    for det in detectors.values():
        det.warm_up()

    # Inputs and runners per format, then every measurement interleaved across formats (round robin),
    # so a change in the machine's load hits all formats alike.
    inputs, runners = {}, {}
    for fmt, det in detectors.items():
        for image in images:  # warm every shape
            det.detect_batch([image], config, 0.25)
        det.detect_batch(images, config, 0.25)
        predictor = det._model.predictor  # the tensors Ultralytics feeds the runtime (rect letterbox, like the .pt)
        inputs[fmt] = (predictor.preprocess([np.asarray(images[0])[..., ::-1]]).cpu().numpy().astype(np.float32),
                       predictor.preprocess([np.asarray(im)[..., ::-1] for im in images]).cpu().numpy().astype(np.float32))
        runners[fmt] = _direct_runner("openvino" if fmt == "openvino_int8" else fmt, det.path, det._model)
        runners[fmt](inputs[fmt][0]), runners[fmt](inputs[fmt][1])
    if "openvino" in detectors:  # what f32 costs against OpenVINO's bf16 default on this CPU
        runners["openvino-bf16"] = _direct_runner("openvino", detectors["openvino"].path, None, "bf16")
        inputs["openvino-bf16"] = inputs["openvino"]
        runners["openvino-bf16"](inputs["openvino"][0]), runners["openvino-bf16"](inputs["openvino"][1])
    samples: dict[str, dict[str, list[float]]] = {f: {"e2e1": [], "e2e16": [], "direct1": [], "direct16": []} for f in runners}
    # Blocks of calls per format, formats in turn: each detector sets its own torch thread count (all
    # cores for the .pt, 1 for an export), and switching it costs a call, which the untimed first
    # call of each block absorbs.
    block = 10
    for start in range(0, n1, block):
        for fmt in runners:
            det = detectors.get(fmt)
            if det is not None:
                det.detect_batch([images[start % len(images)]], config, 0.25)
            for i in range(start, min(n1, start + block)):
                image = images[i % len(images)]
                if det is not None:
                    samples[fmt]["e2e1"].append(timed(lambda det=det, image=image: det.detect_batch([image], config, 0.25))[0])
                samples[fmt]["direct1"].append(timed(lambda fmt=fmt: runners[fmt](inputs[fmt][0]))[0])
    for start in range(0, n16, 5):
        for fmt in runners:
            det = detectors.get(fmt)
            if det is not None:
                det.detect_batch(images[:1], config, 0.25)
            for _ in range(start, min(n16, start + 5)):
                if det is not None:
                    samples[fmt]["e2e16"].append(timed(lambda det=det: det.detect_batch(images, config, 0.25))[0])
                samples[fmt]["direct16"].append(timed(lambda fmt=fmt: runners[fmt](inputs[fmt][1]))[0])
    timings: dict[str, dict] = {}
    for fmt, values in samples.items():
        timings[fmt] = {k: Stats.of(v) for k, v in values.items()}
        timings[fmt]["shape"] = inputs[fmt][0].shape
        ctx.log(f"formats: {fmt}: 1 image {timings[fmt]['e2e1'].median * 1000:.1f} ms "
                f"(direct {timings[fmt]['direct1'].median * 1000:.1f}), 16 images {timings[fmt]['e2e16'].median * 1000:.0f} ms "
                f"(direct {timings[fmt]['direct16'].median * 1000:.0f})")
    _, held_out = checkpoint_data(ctx)
    quality = {fmt: held_out_metrics(det, held_out) for fmt, det in detectors.items()}
    for fmt, q in quality.items():
        ctx.log(f"formats: {fmt}: held-out mAP50 {q['map50']:.4f}, mAP50-95 {q['map50_95']:.4f}")
        result.add(Row(f"{LABELS[fmt]}: held-out mAP50 / mAP50-95 ({len(held_out)} images)",
                       f"{q['map50']:.4f} / {q['map50_95']:.4f}",
                       baseline="" if fmt == "pt" else f".pt {quality['pt']['map50']:.4f} / {quality['pt']['map50_95']:.4f}"))
    pt = timings["pt"]
    result.add(Row("PyTorch .pt, detect_batch, 1 image (ms)", pt["e2e1"].spread(1000, "", 1),
                   baseline=f"torch module alone {pt['direct1'].median * 1000:.1f}",
                   ratio=f"{ratio(pt['e2e1'].median, pt['direct1'].median):.2f}× the module"))
    result.add(Row("PyTorch .pt, detect_batch, 16 images (ms)", pt["e2e16"].spread(1000, "", 0),
                   baseline=f"torch module alone {pt['direct16'].median * 1000:.0f}",
                   ratio=f"{ratio(pt['e2e16'].median, pt['direct16'].median):.2f}× the module"))
    for fmt in ("onnx", "openvino", "openvino_int8"):
        if fmt not in timings:
            result.add(Row(f"{fmt}: not measured", "export missing or rejected", status="MISSED"))
            continue
        t = timings[fmt]
        label = LABELS[fmt]
        for size, key in (("1 image", "1"), ("16 images", "16")):
            e2e, direct, base = t[f"e2e{key}"], t[f"direct{key}"], pt[f"e2e{key}"]
            speed = ratio(base.median, e2e.median)
            digits = 1 if key == "1" else 0
            result.add(goal_row(f"{label}, detect_batch, {size} (ms)", e2e.spread(1000, "", digits), speed, 3.0, True,
                                "≥ 3× the PyTorch path", baseline=f"PyTorch {base.median * 1000:.{digits}f}",
                                ratio_text=f"{speed:.2f}× faster"))
            over = ratio(e2e.median, direct.median)
            result.add(goal_row(f"… {label} {size}: end to end vs the runtime called directly (ms)",
                                f"{e2e.median * 1000:.{digits}f}", over, 1.3, False, "≤ 1.3×",
                                baseline=f"direct {direct.spread(1000, '', digits)}", ratio_text=f"{over:.2f}×"))
    if "openvino-bf16" in timings:
        f32, bf16 = timings["openvino"], timings["openvino-bf16"]
        result.add(Row("OpenVINO runtime alone, f32 (served) vs bf16 (OpenVINO's default here), 1 / 16 images (ms)",
                       f"f32 {f32['direct1'].median * 1000:.1f} / {f32['direct16'].median * 1000:.0f}",
                       baseline=f"bf16 {bf16['direct1'].median * 1000:.1f} / {bf16['direct16'].median * 1000:.0f}",
                       ratio=f"bf16 {ratio(f32['direct1'].median, bf16['direct1'].median):.2f}× / "
                             f"{ratio(f32['direct16'].median, bf16['direct16'].median):.2f}× faster",
                       note="bf16 moves boxes by ~1 px (IoU ~0.95 vs the .pt) and fails the export check; f32 is served"))
    result.raw = {fmt: {k: v.__dict__ if isinstance(v, Stats) else v for k, v in t.items()} for fmt, t in timings.items()}
    result.raw["export_report"] = report
    result.raw["int8_check"] = int8
    result.raw["held_out"] = quality
    missed_speed = [r for r in result.rows if r.status == "MISSED" and "≥ 3×" in r.goal]
    missed_over = [r for r in result.rows if r.status == "MISSED" and "≤ 1.3×" in r.goal]
    shape = "×".join(str(s) for s in timings["pt"]["shape"])
    if missed_speed:
        served_fmt = "openvino_int8" if "openvino_int8" in timings else "openvino" if "openvino" in timings else None
        extra = ""
        if served_fmt:
            sv = timings[served_fmt]
            extra = (f" For the served model ({LABELS[served_fmt]}) the runtime alone takes {sv['direct1'].median * 1000:.1f} ms "
                     f"against {pt['e2e1'].median * 1000:.1f} ms for the whole PyTorch path "
                     f"({ratio(pt['e2e1'].median, sv['direct1'].median):.1f}× with no pre- or post-processing at all), and "
                     f"Ultralytics' per-call pre- and post-processing adds "
                     f"{(sv['e2e1'].median - sv['direct1'].median) * 1000:.1f} ms "
                     f"to every format: that fixed cost, not the model, bounds the end-to-end gain. OpenVINO's bf16 default "
                     f"is not an option (it moves boxes by about a pixel, failing the f32 export check). The baseline is "
                     f"our PyTorch path, which runs torch on every core from one inference thread (Ultralytics' default of "
                     f"1 torch thread here is slower). At 16 images the .pt batches well on 2 cores and the exports gain less.")
        result.notes.append(
            "≥ 3× end to end: missed where marked. Pre-processing (letterbox) and post-processing (NMS, boxes "
            "scaled back, label mapping) cost the same for every format, so the end-to-end gain is below the "
            f"runtime's own gain (input tensor {shape} for one 320×240 image)." + extra)
    if missed_over:
        result.notes.append(
            "≤ 1.3× of the runtime called directly: missed where marked, because the fixed per-call cost of "
            "Ultralytics' predictor (building the input, NMS, Results objects; ~1–3 ms) is large next to a "
            "4–8 ms OpenVINO/ONNX call. Calling the runtime without the Ultralytics predictor (own letterbox + "
            "numpy NMS) would close most of the gap; not done because the predictor is what guarantees the "
            "export gives the .pt's boxes.")
    result.method = ("In one process: `YoloDetector(path)` for the .pt and for each verified export "
                     "(`worker.training.exporter.export_and_check`, dynamic-shape exports, fp32), `detect_batch` on 320×240 "
                     "images with conf 0.25 — batch 1 cycling through 16 images, then all 16 at once; torch threads as "
                     "YoloDetector sets them (all cores for the .pt, 1 for an export, whose runtime has its own pool), "
                     "every call on "
                     "YoloDetector's one inference thread; ONNX Runtime at its defaults and OpenVINO in LATENCY mode, as "
                     "Ultralytics creates them, OpenVINO compiled in f32 (its bf16 default on this AVX512-BF16 CPU moves boxes). "
                     "Direct: the runtime alone on the tensor Ultralytics' predictor builds for the same images. "
                     "Formats are measured in alternating blocks of calls, so load changes hit them alike.")
    return result
