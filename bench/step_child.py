"""Time YOLO11n training steps (forward + backward, batch 16, imgsz 320) in this process.

    python -m bench.step_child THREADS STEPS [MAX_SECONDS]  -> one JSON line {"threads", "steps_s": [...]}

Run by the training benchmark with and without OMP_WAIT_POLICY=PASSIVE, with and without a
competing CPU-bound process, to show what torch's OpenMP spin-waiting costs on a shared 2-core host.
"""

from __future__ import annotations

import json
import os
import sys
import time

from bench.common import setup_environment


def main() -> int:
    threads, steps = int(sys.argv[1]), int(sys.argv[2])
    budget = float(sys.argv[3]) if len(sys.argv) > 3 else float("inf")
    setup_environment()
    from backend.core import ultralytics_env

    ultralytics_env.prepare()
    import torch
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolo11n.yaml", nc=3, verbose=False)
    x = torch.randn(16, 3, 320, 320)
    torch.set_num_threads(threads)

    def total(out):
        if isinstance(out, dict):
            return sum(total(v) for v in out.values())
        if isinstance(out, (list, tuple)):
            return sum(total(v) for v in out)
        return out.float().mean() if hasattr(out, "mean") else 0.0

    def step():
        model.zero_grad(set_to_none=True)
        total(model(x)).backward()

    step()
    times = []
    deadline = time.monotonic() + budget
    for _ in range(steps):  # at least one timed step, then stop at the budget
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
        if time.monotonic() > deadline:
            break
    print(json.dumps({"threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "steps_s": times}))
    return 0


def burn(seconds: float) -> None:
    """A CPU-bound competitor (one core) for ``seconds``."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(10000):
            x += i * i


if __name__ == "__main__":
    if sys.argv[1] == "burn":
        burn(float(sys.argv[2]))
        raise SystemExit(0)
    raise SystemExit(main())
