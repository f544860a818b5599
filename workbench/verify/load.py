"""The concurrency probe: N requests at once (mixed prompt lengths, half of them streamed) must all succeed
and give the same greedy text as the same requests sent one at a time; reports throughput and latency."""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from .probes import Check, Client

DEFAULT_CONCURRENCY = 8


def load_prompts(prompts: tuple[str, ...], n: int) -> list[str]:
    """``n`` prompts of mixed lengths: the probe prompts as they are, then with more and more context before them."""
    out = []
    for k in range(n):
        prompt = prompts[k % len(prompts)]
        context = "\n".join(prompts) * (k // len(prompts))
        out.append(context + ("\n" if context else "") + prompt)
    return out


def _send(client: Client, prompt: str, max_tokens: int, streamed: bool) -> tuple[str, int, float]:
    """(text, completion tokens, seconds) of one greedy request."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    t0 = time.perf_counter()
    if streamed:
        chunks = client.stream("/v1/completions", body)
        texts = [c["choices"][0].get("text", "") for c in chunks if c.get("choices")]
        return "".join(texts), sum(1 for t in texts if t), time.perf_counter() - t0
    r = client.post("/v1/completions", body)
    return r["choices"][0].get("text", ""), int(r.get("usage", {}).get("completion_tokens") or 0), time.perf_counter() - t0


def _prefix_agreement(pairs: list[tuple[str, str]]) -> float:
    """Characters in the common prefix of each pair over the longer text, summed over pairs."""
    common = total = 0
    for a, b in pairs:
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        common, total = common + n, total + max(len(a), len(b))
    return common / total if total else 1.0


def probe_concurrency(client: Client, prompts: tuple[str, ...], max_tokens: int, min_agreement: float,
                      n: int = DEFAULT_CONCURRENCY) -> Check:
    """The concurrency check: ``n`` greedy requests of mixed lengths sent one at a time, then all at once (every
    other one streamed); failed when a concurrent request fails or their texts' prefix agreement with the replies
    sent alone is under ``min_agreement``. Its metrics hold throughput and latency."""
    batch = load_prompts(prompts, n)
    alone = [_send(client, p, max_tokens, False) for p in batch]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(_send, client, p, max_tokens, i % 2 == 1) for i, p in enumerate(batch)]
        results, errors = [], []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:  # noqa: BLE001 - every failed request is reported
                errors.append(f"{type(exc).__name__}: {exc}")
    wall = time.perf_counter() - t0
    if errors:
        return Check("concurrency", "failed", f"{len(errors)}/{n} concurrent requests failed: {errors[0]}")
    latencies = sorted(r[2] for r in results)
    tokens = sum(r[1] for r in results)
    agreement = _prefix_agreement([(a[0], c[0]) for a, c in zip(alone, results)])
    identical = sum(a[0] == c[0] for a, c in zip(alone, results))
    cut = sum(len(c[0]) < len(a[0]) and a[0].startswith(c[0]) for a, c in zip(alone, results))
    metrics = {"requests": n, "streamed": n // 2, "identical_replies": identical, "cut_short": cut, "prefix_agreement": round(agreement, 4),
               "tokens": tokens, "seconds": round(wall, 3), "tokens_per_second": round(tokens / wall, 2),
               "sequential_tokens_per_second": round(sum(a[1] for a in alone) / sum(a[2] for a in alone), 2),
               "p50_latency_s": round(statistics.median(latencies), 3),
               "p95_latency_s": round(latencies[min(n - 1, round(0.95 * (n - 1)))], 3)}
    detail = (f"{n} concurrent requests ({n // 2} streamed) all answered; {identical}/{n} replies equal to the same "
              f"request sent alone (prefix agreement {agreement:.1%}, min {min_agreement:.0%}); "
              f"{metrics['tokens_per_second']} tokens/s (one at a time {metrics['sequential_tokens_per_second']}), "
              f"p50 {metrics['p50_latency_s']}s, p95 {metrics['p95_latency_s']}s")
    if cut:
        detail += f"; {cut} replies ended early (a prefix of the reply sent alone: the server cut them)"
    return Check("concurrency", "passed" if agreement >= min_agreement else "failed", detail, metrics)
