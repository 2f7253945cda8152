"""3. CPU inference formats: ONNX Runtime and OpenVINO exports vs the PyTorch checkpoint.

"End to end" is the serving path: ``YoloDetector.detect_batch`` (Ultralytics pre-processing, the
model, NMS, class mapping to labels) on decoded images. "Direct" is the runtime alone on the very
tensor Ultralytics feeds it (``session.run`` / the compiled OpenVINO model / the fused torch module).
The exports are made and checked by ``worker.export`` (IoU ≥ 0.99 against the .pt's boxes).
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.common import (Context, Result, Row, Stats, goal_row, label_config, ratio, synthetic, timed,
                          trained_checkpoint, verified_exports)

NAME = "formats"
TITLE = "3. CPU inference formats: ONNX Runtime and OpenVINO vs PyTorch"


def _direct_runner(fmt: str, path, model_pt):
    """A callable running the raw model on a preprocessed BCHW float32 array."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    if fmt == "openvino":
        import openvino as ov

        xml = next(path.glob("*.xml"))
        compiled = ov.Core().compile_model(str(xml), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        return lambda x: compiled(x)
    import torch

    module = model_pt.predictor.model  # AutoBackend around the fused module, as predict uses it

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


def run(ctx: Context) -> Result:
    import torch

    from backend.detectors.yolo import YoloDetector
    from backend.label_config import ProjectConfig

    checkpoint = trained_checkpoint(ctx)
    n1, n16 = ctx.pick(60, 8), ctx.pick(15, 2)
    images = [item.image for item in synthetic(16, seed=91)]
    config = ProjectConfig.parse(label_config())
    result = Result(NAME, TITLE, params={"imgsz": 320, "images": "16 × 320x240", "batch1_calls": n1, "batch16_calls": n16,
                                         "threads": os.cpu_count()})
    t = time.monotonic()
    exports, report = verified_exports(ctx, checkpoint, fresh=True)
    export_s = time.monotonic() - t
    for fmt, check in report["checks"].items():
        ok = bool(check["ok"])
        detail = (f"{check['matched']}/{check['boxes_pt']} boxes matched, min IoU {check['min_iou']}, "
                  f"max score diff {check['max_score_diff']}, export {check['export_s']} s") if ok else check["reason"]
        result.add(Row(f"{fmt} export verified against the .pt on 8 images", "yes" if ok else "NO", goal="matched boxes IoU ≥ 0.99",
                       status="met" if ok else "MISSED", note=detail))
    result.add(Row("export + verification time, both formats", f"{export_s:.1f} s"))

    detectors = {"pt": YoloDetector(checkpoint, "bench", "cpu", 0, 0)}
    for fmt in ("onnx", "openvino"):
        if fmt in exports:
            detectors[fmt] = YoloDetector(exports[fmt], "bench", "cpu", 0, 0)
    for det in detectors.values():
        det.warm_up()
    torch.set_num_threads(os.cpu_count() or 1)

    timings: dict[str, dict[str, Stats]] = {}
    for fmt, det in detectors.items():
        for image in images:  # warm every shape
            det.detect_batch([image], config, 0.25)
        one = [timed(lambda i=i: det.detect_batch([images[i % len(images)]], config, 0.25))[0] for i in range(n1)]
        det.detect_batch(images, config, 0.25)
        many = [timed(lambda: det.detect_batch(images, config, 0.25))[0] for _ in range(n16)]
        # The same tensors Ultralytics feeds the runtime (rect letterbox: dynamic exports are preprocessed like the .pt).
        predictor = det._model.predictor
        x1 = predictor.preprocess([np.asarray(images[0])[..., ::-1]]).cpu().numpy().astype(np.float32)
        x16 = predictor.preprocess([np.asarray(im)[..., ::-1] for im in images]).cpu().numpy().astype(np.float32)
        runner = _direct_runner(fmt, det.path, det._model)
        runner(x1), runner(x16)
        d1 = [timed(lambda: runner(x1))[0] for _ in range(n1)]
        d16 = [timed(lambda: runner(x16))[0] for _ in range(n16)]
        timings[fmt] = {"e2e1": Stats.of(one), "e2e16": Stats.of(many), "direct1": Stats.of(d1), "direct16": Stats.of(d16),
                        "shape": x1.shape}
        ctx.log(f"formats: {fmt}: 1 image {Stats.of(one).median * 1000:.1f} ms (direct {Stats.of(d1).median * 1000:.1f}), "
                f"16 images {Stats.of(many).median * 1000:.0f} ms (direct {Stats.of(d16).median * 1000:.0f})")
    pt = timings["pt"]
    result.add(Row("PyTorch .pt, detect_batch, 1 image (ms)", pt["e2e1"].spread(1000, "", 1),
                   baseline=f"torch module alone {pt['direct1'].median * 1000:.1f}",
                   ratio=f"{ratio(pt['e2e1'].median, pt['direct1'].median):.2f}× the module"))
    result.add(Row("PyTorch .pt, detect_batch, 16 images (ms)", pt["e2e16"].spread(1000, "", 0),
                   baseline=f"torch module alone {pt['direct16'].median * 1000:.0f}",
                   ratio=f"{ratio(pt['e2e16'].median, pt['direct16'].median):.2f}× the module"))
    for fmt in ("onnx", "openvino"):
        if fmt not in timings:
            result.add(Row(f"{fmt}: not measured", "export missing or rejected", status="MISSED"))
            continue
        t = timings[fmt]
        label = {"onnx": "ONNX Runtime", "openvino": "OpenVINO"}[fmt]
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
    result.raw = {fmt: {k: v.__dict__ if isinstance(v, Stats) else v for k, v in t.items()} for fmt, t in timings.items()}
    result.raw["export_report"] = report
    missed_speed = [r for r in result.rows if r.status == "MISSED" and "≥ 3×" in r.goal]
    missed_over = [r for r in result.rows if r.status == "MISSED" and "≤ 1.3×" in r.goal]
    shape = "×".join(str(s) for s in timings["pt"]["shape"])
    if missed_speed:
        result.notes.append(
            "≥ 3× end to end: missed where marked. The model call is only part of detect_batch; Ultralytics' "
            "pre-processing (letterbox, HWC→CHW, /255) and post-processing (NMS, scaling boxes back) and our label "
            "mapping cost the same for every format, so the end-to-end gain is capped below the runtime's own gain "
            f"(input tensor {shape} for one 320×240 image). PROTOCOL.md section 3 measured PyTorch at 13 ms with 2 "
            "threads and OpenVINO at 4.4 ms: 2.95×, already under 3× for the model call alone at batch 1.")
    if missed_over:
        result.notes.append(
            "≤ 1.3× of the runtime called directly: missed where marked, because the fixed per-call cost of "
            "Ultralytics' predictor (building the input, NMS, Results objects; ~1–3 ms) is large next to a "
            "4–8 ms OpenVINO/ONNX call. Calling the runtime without the Ultralytics predictor (own letterbox + "
            "numpy NMS) would close most of the gap; not done because the predictor is what guarantees the "
            "export gives the .pt's boxes.")
    result.method = ("In one process: `YoloDetector(path)` for the .pt and for each verified export "
                     "(`worker.export.export_and_check`, dynamic-shape exports, fp32), `detect_batch` on 320×240 "
                     "images with conf 0.25 — batch 1 cycling through 16 images, then all 16 at once; torch threads = "
                     "all cores; ONNX Runtime and OpenVINO at their defaults (as Ultralytics creates them, OpenVINO "
                     "in LATENCY mode). Direct: the runtime alone on the tensor Ultralytics' predictor builds "
                     "for the same images.")
    return result
