"""Open-loop HTTP load from its own process: requests at a fixed rate, one JSON line per request.

    python -m bench.loadgen --url http://127.0.0.1:PORT --path /predict --bodies bodies.json \\
        --rate 15 --duration 30 --out requests.jsonl

Request ``i`` is due at ``start + i / rate`` whatever happened to the earlier ones (open loop: a
slow server does not slow the load down, and lateness is recorded as ``lat_sched``). Every request
opens a new connection, as Label Studio's ``requests.post`` does, so the kernel spreads them over
gunicorn's workers. Lines: ``{"i", "t" (send, epoch s), "lat", "lat_sched", "status", "mv", "err"}``;
``mv`` is the first result's ``model_version`` of a /predict answer.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import threading
import time

import requests


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--path", default="/health")
    parser.add_argument("--method", default=None, help="GET or POST (default: POST when --bodies is given)")
    parser.add_argument("--bodies", help="JSON file: a list of request bodies, used in turn")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--threads", type=int, default=16, help="requests in flight at most")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--start-at", type=float, default=0.0, help="epoch seconds to start at (default: now)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    bodies = json.load(open(args.bodies)) if args.bodies else [None]
    method = (args.method or ("POST" if args.bodies else "GET")).upper()
    url = args.url.rstrip("/") + args.path
    start = max(args.start_at, time.time())
    total = int(args.duration * args.rate)
    counter = itertools.count()
    lock = threading.Lock()
    stop = threading.Event()
    out = open(args.out, "w")
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def worker() -> None:
        while not stop.is_set():
            i = next(counter)
            if i >= total:
                return
            due = start + i / args.rate
            delay = due - time.time()
            if delay > 0 and stop.wait(delay):
                return
            body = bodies[i % len(bodies)]
            record = {"i": i, "t": time.time(), "status": 0, "mv": None, "err": None}
            sent = time.perf_counter()
            try:
                response = requests.request(method, url, json=body, timeout=args.timeout, headers={"Connection": "close"})
                record["status"] = response.status_code
                if args.path.startswith("/predict") and response.ok:
                    results = response.json().get("results") or [{}]
                    record["mv"] = results[0].get("model_version")
            except Exception as exc:  # a failed request is a data point, not a crash
                record["err"] = f"{type(exc).__name__}: {exc}"[:300]
            record["lat"] = time.perf_counter() - sent
            record["lat_sched"] = time.time() - due
            with lock:
                out.write(json.dumps(record) + "\n")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
