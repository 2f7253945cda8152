"""16. Gemini tiers for bulk drafting: cost and wall time of 1,000 tasks on standard, Flex and the Batch API.

Flex runs twice in the same run: with GEMINI_FLEX_RETRIES=0 (a refused call goes straight to the standard tier,
the behaviour before issue 16's fix) and with the default retries on Flex, so the before/after share the baseline."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from bench.common import Context
from bench.results import Result, Row, goal_row

NAME = "tiers"
TITLE = "13. Bulk drafting per Gemini tier: cost and wall time of 1,000 tasks"
CONFIG_XML = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">'
              '<Label value="Car"/><Label value="Person"/></RectangleLabels></View>')


def run(ctx: Context) -> Result:
    import redis
    from PIL import Image

    from backend.core.label_config import ProjectConfig
    from backend.core.settings import Settings
    from backend.detectors.gemini.batch import GeminiBatches
    from backend.detectors.gemini.client import GeminiDetector, GeminiUnavailable
    from tests import fake_gemini as fg
    from tests.paths import TEST_REDIS_URL

    n = ctx.pick(1000, 100)
    latency, flex_extra, refuse, batch_s = 0.05, 0.2, 0.1, 2.0
    config = ProjectConfig.parse(CONFIG_XML)
    answer = fg.boxes([{"box_2d": [100, 100, 500, 500], "label": "Car"}], prompt_tokens=1100, output_tokens=40)
    result = Result(NAME, TITLE, params={"tasks": n, "standard_latency_s": latency, "flex_extra_latency_s": flex_extra,
                                         "flex_refusal_rate": refuse, "batch_running_s": batch_s, "concurrency": 16,
                                         "prices": "standard $0.30/$2.50 per 1M in/out; flex and batch x0.5"})
    client = redis.Redis.from_url(TEST_REDIS_URL)
    images = [Image.new("RGB", (64, 48), (i % 256, (i * 7) % 256, (i * 13) % 256)) for i in range(n)]
    rows: dict[str, tuple[float, float, int, int]] = {}
    refusals: dict[str, tuple[int, int]] = {}
    runs = {"standard": ("standard", {}), "flex, no retry (before)": ("flex", {"gemini_flex_retries": 0}),
            "flex": ("flex", {}), "batch": ("batch", {})}
    with fg.FakeGemini(responder=lambda request: fg.delayed(answer, latency)) as gemini:
        gemini.flex.latency_s, gemini.flex.refuse_rate = flex_extra, refuse
        gemini.batches.running_s = batch_s
        for run_name, (tier, overrides) in runs.items():
            prefix = f"bench:tiers:{uuid.uuid4().hex}"
            settings = Settings(gemini_api_key=fg.DEFAULT_KEY, gemini_base_url=gemini.base_url, gemini_api_version="v1beta",
                                gemini_daily_budget_usd=0.0, gemini_cache_ttl=1, model_dir=ctx.workdir / prefix.rsplit(":", 1)[1],
                                gemini_breaker_failures=100000, **overrides)
            flex_before = (gemini.flex.refused, gemini.flex.served)
            detector = GeminiDetector(settings, client, prefix=prefix, tier="flex" if tier == "flex" else "standard")
            drafted: dict[int, int] = {}
            started = time.monotonic()
            if tier == "batch":
                batches = GeminiBatches(detector)
                names, reserved = [], 0.0
                for start in range(0, n, 200):
                    chunk = range(start, min(n, start + 200))
                    requests = [batches.request(str(i), images[i], f"{prefix}{i}", config) for i in chunk]
                    name, r = batches.submit(requests, "bench")
                    names.append(name)
                    reserved += r
                actual = 0.0
                for name in names:
                    while (poll := batches.poll(name)).running:
                        time.sleep(0.25)
                    for item in poll.results or []:
                        actual += item.cost_usd
                        if item.answer is not None:
                            batches.detections(item.answer, (64, 48), config)
                            drafted[int(item.key)] = drafted.get(int(item.key), 0) + 1
                detector.cost.settle(reserved, actual)
            else:
                def one(i: int, detector=detector, prefix=prefix, drafted=drafted) -> None:
                    try:
                        detector.detect(images[i], f"{prefix}{i}", config)
                        drafted[i] = drafted.get(i, 0) + 1
                    except GeminiUnavailable:
                        pass
                with ThreadPoolExecutor(16) as pool:
                    list(pool.map(one, range(n)))
            wall = time.monotonic() - started
            cost = detector.cost.spent_today()
            rows[run_name] = (cost, wall, len(drafted), max(drafted.values(), default=0))
            refusals[run_name] = (gemini.flex.refused - flex_before[0], gemini.flex.served - flex_before[1])
            ctx.log(f"tiers: {run_name}: ${cost:.4f} in {wall:.1f} s, {len(drafted)} tasks drafted, "
                    f"flex refused/served {refusals[run_name]}")
            detector.close()
            for key in client.scan_iter(f"{prefix}*"):
                client.delete(key)
    std_cost, std_wall = rows["standard"][0], rows["standard"][1]
    for tier, (cost, wall, count, most) in rows.items():
        share = cost / std_cost if std_cost else float("nan")
        refused, served = refusals[tier]
        note = f"flex calls refused {refused}, served {served}" if tier.startswith("flex") else ""
        if tier == "standard":
            result.add(Row(f"standard: cost of {n} tasks", f"${cost:.4f} in {wall:.1f} s", ratio="1.00"))
        elif "before" in tier:  # the reference for the fix, not a way to draft: no goal of its own
            result.add(Row(f"{tier}: cost of {n} tasks vs standard", f"${cost:.4f} in {wall:.1f} s",
                           f"standard ${std_cost:.4f} in {std_wall:.1f} s", f"{share:.2f}", note=note))
        else:
            result.add(goal_row(f"{tier}: cost of {n} tasks vs standard", f"${cost:.4f} in {wall:.1f} s", share, 0.55, False,
                                "≤ 55%", baseline=f"standard ${std_cost:.4f} in {std_wall:.1f} s", ratio_text=f"{share:.2f}",
                                note=note))
        once = count == n and most == 1
        result.add(goal_row(f"{tier}: tasks drafted exactly once", f"{count}/{n}, at most {most} per task", once, True, True,
                            "all, once"))
    retries = Settings.model_fields["gemini_flex_retries"].default
    result.method = (f"{n} tiny images drafted through the real google-genai client against the fake Gemini "
                     f"(tests/fake_gemini.py): standard answers after {latency} s; Flex after {latency + flex_extra} s and "
                     f"refuses {refuse:.0%} of calls with 429/503 (no Retry-After); a refused call is billed nothing. "
                     f"\"flex, no retry (before)\": GEMINI_FLEX_RETRIES=0, a refused task falls back to standard at the standard "
                     f"price (the behaviour before the fix); \"flex\": the default GEMINI_FLEX_RETRIES={retries}, "
                     f"refusals retried on Flex after a jittered backoff of 0.5 s and more within GEMINI_FLEX_TIMEOUT_S, "
                     f"standard only after the last refusal; "
                     f"the Batch API takes {batch_s} s per batch of 200. Cost is the day's charged spend of the run's own ledger "
                     f"(batch: reserved at submission, settled on the results' usageMetadata), with 1,100 input and 40 output "
                     f"tokens per answer. 16 synchronous calls in flight.")
    return result
