"""Each wire format's server CPU in the throughput scenario (``python -m bench.run --formats``).

The same turn (the scenario's tokens, no delay) over each of chatproxy's formats: NDJSON
(``POST /completions``), server-sent events (the same with ``Accept: text/event-stream``), the
OpenAI-compatible stream (``POST /v1/chat/completions``, ``"stream": true``) and the Vercel AI
SDK's UI message stream (``POST /ui/chat``, a new chat id per turn), all with the same bearer
API key, in ``ROUNDS`` alternated slices within one server process (each round starting with
the next format), so the machine's drift hits every format alike. Each format's server CPU per
1,000 relayed tokens, and its ratio to NDJSON's, go under ``"formats"`` in the scenario's JSON.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable
from typing import Any

import orjson

from bench.client import Mode, http_request, run_load

ROUNDS = 10
# Turns of each format per turn of the scenario: slices long enough for the CPU clock's ticks.
TURNS_FACTOR = 2
PROMPT_TEXT = "Tell me something."
_chats = itertools.count()


def requests(port: int, api_key: str) -> dict[str, tuple[Mode, bytes | Callable[[int], bytes]]]:
    """Each format's client mode and request (the UI stream's: one per turn, for its chat id)."""
    bearer = {"Authorization": f"Bearer {api_key}"}
    messages = [{"role": "user", "content": PROMPT_TEXT}]
    prompt = orjson.dumps({"messages": messages})
    openai = orjson.dumps({"messages": messages, "stream": True})
    part = [{"type": "text", "text": PROMPT_TEXT}]

    def ui(_: int) -> bytes:
        body = {
            "id": f"bench-{next(_chats)}",
            "messages": [{"id": "u", "role": "user", "parts": part}],
        }
        return http_request(port, "/ui/chat", orjson.dumps(body), bearer)

    sse = {**bearer, "Accept": "text/event-stream"}
    return {
        "ndjson": ("ndjson", http_request(port, "/completions", prompt, bearer)),
        "sse": ("events", http_request(port, "/completions", prompt, sse)),
        "openai": ("openai", http_request(port, "/v1/chat/completions", openai, bearer)),
        "ui": ("ui", ui),
    }


async def measure(
    port: int,
    cpu_seconds: Callable[[], float],
    api_key: str,
    concurrency: int,
    turns: int,
    tokens: int,
    text: str,
    turn_timeout: float,
) -> tuple[dict[str, Any], list[str]]:
    """Run ``turns`` turns of each format in alternated slices; return the figures and the
    answer ids (their saved answers are checked with the others)."""
    formats = requests(port, api_key)
    cpu = dict.fromkeys(formats, 0.0)
    ok = dict.fromkeys(formats, 0)
    errors: dict[str, list[str]] = {name: [] for name in formats}
    slices: dict[str, list[float | None]] = {name: [] for name in formats}
    ids: list[str] = []
    part = max(1, turns // ROUNDS)
    names = list(formats)
    for round_ in range(ROUNDS):
        # Each round starts with the next format, so none is always first or last.
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            mode, request = formats[name]
            cpu0 = cpu_seconds()
            results, _ = await run_load(
                port, request, mode, concurrency=concurrency, turns=part, turn_timeout=turn_timeout
            )
            used = cpu_seconds() - cpu0
            cpu[name] += used
            good = [r for r in results if r.terminal in ("completed", "done") and r.text == text]
            slices[name].append(round(used * 1e6 / (len(good) * tokens), 1) if good else None)
            ok[name] += len(good)
            errors[name] += [r.error or r.terminal for r in results if r not in good][:5]
            ids += [r.message_id for r in results if r.message_id]
    per_1k = {k: cpu[k] * 1e6 / (ok[k] * tokens) if ok[k] else None for k in cpu}
    base = per_1k["ndjson"]
    figures = {
        "turns_each": part * ROUNDS,
        "ok": ok,
        "errors": {k: v for k, v in errors.items() if v},
        "server_cpu_ms_per_1k_tokens": per_1k,
        "vs_ndjson": {k: v / base if v and base else None for k, v in per_1k.items()},
        "slices_ms_per_1k_tokens": slices,  # each slice's, in the order they ran per round
        # Each slice's ratio to the NDJSON slice of its round, their median: what a slice that
        # another process slowed moves least.
        "median_slice_vs_ndjson": {
            k: _median_ratio(v, slices["ndjson"]) for k, v in slices.items()
        },
    }
    return figures, ids


def _median_ratio(mine: list[float | None], base: list[float | None]) -> float | None:
    ratios = [a / b for a, b in zip(mine, base, strict=True) if a and b]
    return statistics.median(ratios) if ratios else None


def summary(figures: dict[str, Any]) -> str:
    per, ratio = figures["server_cpu_ms_per_1k_tokens"], figures["vs_ndjson"]
    median = figures["median_slice_vs_ndjson"]
    cells = ", ".join(
        f"{name} {per[name]:.1f} ({(ratio[name] - 1) * 100:+.1f} %, median slice "
        f"{(median[name] - 1) * 100:+.1f} %)"
        if per[name] and ratio[name] and median[name]
        else f"{name} –"
        for name in per
    )
    return (
        f"formats, alternated ({figures['turns_each']} turns each, ok {figures['ok']}): server "
        f"CPU ms per 1k tokens (vs NDJSON): {cells}"
    )
