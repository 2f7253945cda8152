"""3. CPU inference formats: ONNX Runtime and OpenVINO exports vs the PyTorch checkpoint.

"End to end" is the serving path: ``YoloDetector.detect_batch`` (Ultralytics pre-processing, the
model, NMS, class mapping to labels) on decoded images. "Direct" is the runtime alone on the very
tensor Ultralytics feeds it (``session.run`` / the compiled OpenVINO model / the fused torch module).
The exports are made and checked by ``worker.training.exporter`` (IoU ≥ 0.99 against the .pt's boxes).
"""

from __future__ import annotations

import os
import time

import numpy as np

from bench.common import Context
from bench.fixtures import label_config, synthetic, trained_checkpoint, verified_exports
from bench.results import Result, Row, goal_row
from bench.stats import Stats, ratio, timed

NAME = "formats"
TITLE = "3. CPU inference formats: ONNX Runtime and OpenVINO vs PyTorch"


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
    for fmt, check in report["checks"].items():
        ok = bool(check["ok"])
        detail = (f"{check['matched']}/{check['boxes_pt']} boxes matched, min IoU {check['min_iou']}, "
                  f"max score diff {check['max_score_diff']}, export {check['export_s']} s") if ok else check["reason"]
        result.add(Row(f"{fmt} export verified against the .pt on 8 images", "yes" if ok else "NO",
                       goal="matched boxes IoU ≥ 0.99", status="met" if ok else "MISSED", note=detail))
    result.add(Row("export + verification time, both formats", f"{export_s:.1f} s"))

    detectors = {"pt": YoloDetector(checkpoint, "bench", "cpu", 0, 0)}
    for fmt in ("onnx", "openvino"):
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
        runners[fmt] = _direct_runner(fmt, det.path, det._model)
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
    missed_speed = [r for r in result.rows if r.status == "MISSED" and "≥ 3×" in r.goal]
    missed_over = [r for r in result.rows if r.status == "MISSED" and "≤ 1.3×" in r.goal]
    shape = "×".join(str(s) for s in timings["pt"]["shape"])
    if missed_speed:
        bf16 = timings.get("openvino-bf16")
        ov = timings.get("openvino")
        extra = ""
        if bf16 and ov:
            extra = (f" The runtime itself is the limit: OpenVINO in f32 runs the model in {ov['direct1'].median * 1000:.1f} ms "
                     f"against {pt['e2e1'].median * 1000:.1f} ms for the whole PyTorch path "
                     f"({ratio(pt['e2e1'].median, ov['direct1'].median):.1f}× with no pre- or post-processing at all); "
                     f"only OpenVINO's bf16 default ({bf16['direct1'].median * 1000:.1f} ms) is fast enough for 3×, and "
                     f"bf16 moves boxes by about a pixel (IoU ~0.95 against the .pt), failing the IoU ≥ 0.99 export "
                     f"check — so the served export is f32 and the 3× is traded for identical boxes. The baseline is "
                     f"our PyTorch path, which runs torch on every core from one inference thread; the reference ~4× "
                     f"(docs/ultralytics.md) "
                     f"was against Ultralytics' default of 1 torch thread here (18.8 ms). At 16 images the .pt "
                     f"batches well on 2 cores and the exports gain little.")
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
