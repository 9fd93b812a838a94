"""What the accuracy evaluations share: locating packaged data, sending chat requests to an
OpenAI-compatible server, and the binomial confidence interval of an accuracy."""
from __future__ import annotations

import asyncio
import json
import math
from statistics import NormalDist
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def load_jsonl(path: str, parse_row: Callable[[dict], Optional[T]]) -> list[T]:
    """Rows of a JSON-lines file through `parse_row`; blank lines, undecodable lines and rows
    `parse_row` rejects (returns None) are skipped."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = parse_row(json.loads(line))
            except json.JSONDecodeError:
                continue
            if row is not None:
                out.append(row)
    return out


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion: unlike the normal approximation it stays
    inside [0, 1] and is not degenerate at 0 or n correct (what a tiny model scores)."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence}")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 or n correct the bound is exactly 0 or 1; say so rather than leave rounding noise.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


async def _chat_all(base_url: str, model: Optional[str], conversations: list[list[dict]], *,
                    max_tokens: int, temperature: float, concurrency: int,
                    api_key: Optional[str], timeout: float, progress: bool) -> list[tuple[str, str]]:
    import httpx

    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max(1, concurrency))
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=len(conversations), desc="eval")
        except ImportError:
            pass

    async def one(client, messages) -> tuple[str, str]:
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if model:
            body["model"] = model
        async with sem:
            try:
                r = await client.post(url, json=body, headers=headers)
                if r.status_code != 200:
                    return "", f"HTTP {r.status_code}: {r.text[:200]}"
                return r.json()["choices"][0]["message"].get("content") or "", ""
            except Exception as e:  # noqa: BLE001 - a failed question is scored wrong, not fatal
                return "", f"{type(e).__name__}: {e}"
            finally:
                if bar is not None:
                    bar.update(1)

    limits = httpx.Limits(max_connections=max(1, concurrency))
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30.0), limits=limits) as c:
        out = await asyncio.gather(*(one(c, m) for m in conversations))
    if bar is not None:
        bar.close()
    return list(out)


def chat_all(base_url: str, model: Optional[str], conversations: list[list[dict]], *,
             max_tokens: int, temperature: float = 0.0, concurrency: int = 32,
             api_key: Optional[str] = None, timeout: float = 600.0,
             progress: bool = False) -> list[tuple[str, str]]:
    """(reply text, error) per conversation, in order; error is "" on success."""
    return asyncio.run(_chat_all(base_url, model, conversations, max_tokens=max_tokens,
                                 temperature=temperature, concurrency=concurrency,
                                 api_key=api_key, timeout=timeout, progress=progress))


def summarize(task: str, correct: list[bool], errors: list[str], confidence: float,
              **extra) -> dict:
    n, k = len(correct), sum(correct)
    lo, hi = wilson_interval(k, n, confidence)
    failed = [e for e in errors if e]
    return {"task": task, "num_questions": n, "num_correct": k,
            "accuracy": k / n if n else 0.0, "ci_low": lo, "ci_high": hi,
            "confidence": confidence, "ci_method": "wilson", "num_request_errors": len(failed),
            "first_error": failed[0] if failed else None, **extra}
