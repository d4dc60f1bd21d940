"""A bounded load test of a running ``deltamem serve`` (``python -m deltamem_agents.benchmarks.server_load``).

``--sessions`` conversations of ``--turns`` turns each, at most ``--concurrency`` requests in flight. Every
session is driven as an OpenAI client would: each turn resends the whole conversation (user messages plus the
replies so far) to ``/v1/chat/completions`` with ``X-Session-ID``. It reports p50/p90/p99 latency, requests/s,
completion tokens/s and errors by HTTP status; then it checks every session against what was acknowledged:
``GET /v1/sessions/{id}`` answers, its turn equals the acknowledged turns, its version is 1 + that, it holds one
snapshot per turn plus turn 0, and two written messages (user, reply) per turn. The sessions are deleted
afterwards unless ``--keep``.

Needs only httpx. With a tiny model it measures the server stack (HTTP, admission, store, locking), not the
model's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LoadResult", "add_arguments", "check_sessions", "format_report", "main", "run_args", "run_load"]


@dataclass
class LoadResult:
    """What one run measured (latencies in ms, of acknowledged and failed requests alike)."""

    url: str
    sessions: int
    turns: int
    concurrency: int
    max_tokens: int
    wall_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests_per_s: float
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens_per_s: float
    consistent_sessions: int = 0
    inconsistent: list[str] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def _session(client: Any, sem: asyncio.Semaphore, sid: str, turns: int, max_tokens: int,
                   log: list[tuple[float, int, dict[str, Any] | None]]) -> int:
    """One conversation; returns its acknowledged turns. Appends ``(latency_s, status, usage)`` per request."""
    messages: list[dict[str, str]] = []
    acked = 0
    for t in range(turns):
        messages.append({"role": "user", "content": f"Turn {t} of {sid}: remember the number {t * 7 + 3}."})
        body = {"model": "any", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body, headers={"X-Session-ID": sid})
                status, payload = r.status_code, (r.json() if r.status_code == 200 else None)
            except Exception as exc:  # noqa: BLE001 - a transport error is counted, not fatal
                status, payload = type(exc).__name__, None
            log.append((time.perf_counter() - t0, status, payload["usage"] if payload else None))
        if payload is None:
            messages.pop()  # not committed: the next turn resends the conversation without it
            continue
        acked += 1
        messages.append({"role": "assistant", "content": payload["choices"][0]["message"]["content"] or ""})
    return acked


async def check_sessions(client: Any, acked: dict[str, int]) -> list[str]:
    """Problems found comparing each session's record with its acknowledged turns (empty: all consistent)."""
    problems = []
    for sid, n in acked.items():
        r = await client.get(f"/v1/sessions/{sid}")
        if r.status_code != 200:
            problems.append(f"{sid}: GET /v1/sessions/{{id}} answered {r.status_code}")
            continue
        info = r.json()
        expect = {"turn": n, "version": 1 + n, "snapshots": n + 1, "written_messages": 2 * n}
        got = {"turn": info["turn"], "version": info["version"], "snapshots": info["stats"]["snapshots"],
               "written_messages": info["stats"]["written_messages"]}
        if got != expect or len(info["turns"]) != n + 1:
            problems.append(f"{sid}: expected {expect}, got {got} ({len(info['turns'])} turns listed)")
    return problems


async def wait_healthy(client: Any, wait_s: float) -> None:
    """Until ``GET /health`` answers 200; raises ``ConnectionError`` after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if (await client.get("/health")).status_code == 200:
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise ConnectionError(f"{client.base_url} did not answer /health within {wait_s:.0f} s")
        await asyncio.sleep(0.5)


async def run_load(url: str, *, sessions: int = 16, turns: int = 20, concurrency: int = 16, max_tokens: int = 16,
                   api_key: str = "local", keep: bool = False, timeout: float = 300, wait_s: float = 60) -> LoadResult:
    """Wait for the server, run the load, then the consistency check (and delete the sessions unless ``keep``)."""
    import httpx

    prefix = f"load-{uuid.uuid4().hex[:8]}"
    sids = [f"{prefix}-{i}" for i in range(sessions)]
    sem = asyncio.Semaphore(concurrency)
    log: list[tuple[float, int, dict[str, Any] | None]] = []
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits) as client:
        await wait_healthy(client, wait_s)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(_session(client, sem, s, turns, max_tokens, log) for s in sids))
        wall = time.perf_counter() - t0
        acked = dict(zip(sids, counts, strict=True))
        problems = await check_sessions(client, acked)
        if not keep:
            await asyncio.gather(*(client.delete(f"/v1/sessions/{s}") for s in sids))
    latencies = [lat * 1000 for lat, _, _ in log]
    usages = [u for _, _, u in log if u]
    completion = sum(u["completion_tokens"] for u in usages)
    return LoadResult(
        url=url, sessions=sessions, turns=turns, concurrency=concurrency, max_tokens=max_tokens, wall_s=wall,
        requests=len(log), ok=len(usages), errors=dict(Counter(str(s) for _, s, u in log if not u)),
        p50_ms=_percentile(latencies, 0.5), p90_ms=_percentile(latencies, 0.9), p99_ms=_percentile(latencies, 0.99),
        max_ms=max(latencies, default=float("nan")), requests_per_s=len(log) / wall, completion_tokens=completion,
        prompt_tokens=sum(u["prompt_tokens"] for u in usages),
        cached_tokens=sum((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for u in usages),
        completion_tokens_per_s=completion / wall, consistent_sessions=sessions - len(problems),
        inconsistent=problems,
    )  # fmt: skip


def format_report(r: LoadResult) -> str:
    """A short human-readable summary."""
    lines = [
        f"{r.sessions} sessions x {r.turns} turns, concurrency {r.concurrency}, max_tokens {r.max_tokens}: "
        f"{r.requests} requests in {r.wall_s:.1f} s ({r.requests_per_s:.1f} req/s)",
        f"latency ms: p50 {r.p50_ms:.0f}  p90 {r.p90_ms:.0f}  p99 {r.p99_ms:.0f}  max {r.max_ms:.0f}",
        f"tokens: {r.completion_tokens} completion ({r.completion_tokens_per_s:.1f}/s), {r.prompt_tokens} prompt, "
        f"{r.cached_tokens} of them from the KV cache",
        f"ok {r.ok}, errors by status: {r.errors or 'none'}",
        f"consistency: {r.consistent_sessions}/{r.sessions} sessions agree with their acknowledged turns",
    ]
    lines += [f"  {p}" for p in r.inconsistent]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options (shared by ``python -m …server_load`` and ``deltamem bench server``)."""
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=20, help="turns per session")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at most")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    p.add_argument("--api-key", default="local", help="a key (dm-…) in keys mode; anything in local mode")
    p.add_argument("--wait", type=float, default=60, help="seconds to wait for /health first (default 60)")
    p.add_argument("--keep", action="store_true", help="keep the sessions (default: delete them afterwards)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")


def run_args(args: argparse.Namespace) -> int:
    """Run from parsed options: exit status 1 when a session is inconsistent, 2 when the options are invalid or
    the server does not answer, else 0 (request errors are reported, not fatal)."""
    for name in ("sessions", "turns", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    try:
        result = asyncio.run(run_load(args.url, sessions=args.sessions, turns=args.turns, concurrency=args.concurrency,
                                      max_tokens=args.max_tokens, api_key=args.api_key, keep=args.keep,
                                      wait_s=args.wait))
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result), f, indent=2)
    return 1 if result.inconsistent else 0


def main(argv: list[str] | None = None) -> int:
    """Command line (see :func:`run_args` for the exit status)."""
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_arguments(p)
    return run_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
