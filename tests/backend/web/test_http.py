"""backend.web.http: the pre-parse estimate of a JSON body's memory is an upper bound of what parsing takes."""

from __future__ import annotations

import json
import tracemalloc

import pytest

from backend.web.http import json_cost_bytes

N = 200_000
SHAPES = {
    "empty objects": "[" + ",".join(["{}"] * N) + "]",
    "empty lists": "[" + ",".join(["[]"] * N) + "]",
    "one-key objects": "[" + ",".join(['{"a":0}'] * N) + "]",
    "one-item lists": "[" + ",".join(["[0]"] * N) + "]",
    "floats": "[" + ",".join(["0.5"] * N) + "]",
    "big ints": "[" + ",".join(["123456789012"] * N) + "]",
    "unique strings": "[" + ",".join(f'"{i}"' for i in range(N)) + "]",
    "unique keys": "{" + ",".join(f'"{i}":0.5' for i in range(N)) + "}",
    "a Label Studio task": json.dumps({"tasks": [{"id": i, "data": {"image": f"/data/upload/1/{i}.png"},
                                                 "annotations": [], "predictions": []} for i in range(N // 10)]}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_estimate_bounds_what_json_loads_allocates(shape):
    raw = SHAPES[shape].encode()
    tracemalloc.start()
    try:
        parsed = json.loads(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del parsed
    estimate = json_cost_bytes(raw)
    assert estimate >= peak, f"{shape}: estimated {estimate / 1e6:.1f} MB, json.loads took {peak / 1e6:.1f} MB"
    assert estimate <= 6 * peak, f"{shape}: estimate {estimate / 1e6:.1f} MB is too pessimistic for {peak / 1e6:.1f} MB"


def test_text_costs_what_it_weighs():
    raw = json.dumps({"text": "plain words " * 100_000}).encode()
    assert json_cost_bytes(raw) < 1.01 * len(raw) + 1000
