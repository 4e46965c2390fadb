"""Prometheus metrics, with the ``prometheus`` extra and CHATPROXY_METRICS on.

Counted once per turn (when it ends), per failed upstream call and per follower: never per
token. The names are listed in docs/upstreams.md. Several worker processes share their
figures through prometheus_client's multiprocess mode: set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty directory before the workers start, and the endpoint reads every worker's files.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import time
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe

from .conf import conf

try:
    import prometheus_client
    from prometheus_client import multiprocess
except ImportError:  # the extra is not installed: chatproxy.E064 refuses CHATPROXY_METRICS
    prometheus_client = None  # type: ignore[assignment]

SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BY_ANSWER = ["model", "upstream"]


class _Metrics:
    """The metrics themselves, registered once, on first use."""

    def __init__(self) -> None:
        p = prometheus_client
        self.turns = p.Counter("chatproxy_turns", "Turns ended, by status.", ["status", *BY_ANSWER])
        self.tokens = p.Counter(
            "chatproxy_tokens", "Tokens, by kind: prompt (in) or completion (out).",
            ["kind", *BY_ANSWER],
        )  # fmt: skip
        self.cost = p.Counter(
            "chatproxy_cost", "Cost, as the Cost interceptor priced it.", BY_ANSWER
        )
        self.first_token = p.Histogram(
            "chatproxy_time_to_first_token_seconds",
            "Time from the upstream call to the answer's first token.",
            BY_ANSWER,
            buckets=SECONDS,
        )
        self.duration = p.Histogram(
            "chatproxy_turn_duration_seconds", "Time from a turn's start to its end.",
            BY_ANSWER, buckets=SECONDS,
        )  # fmt: skip
        self.streaming = p.Gauge(
            "chatproxy_streaming_answers", "Turns running now.", multiprocess_mode="livesum"
        )
        self.upstream_errors = p.Counter(
            "chatproxy_upstream_errors",
            "Failed upstream calls, by error code.",
            ["upstream", "code"],
        )
        self.failovers = p.Counter(
            "chatproxy_failovers",
            "Turns moved to another upstream, by the failing one and its error code.",
            ["upstream", "code"],
        )
        self.followers = p.Gauge(
            "chatproxy_followers", "Resumes and watches following a turn now.",
            multiprocess_mode="livesum",
        )  # fmt: skip


_metrics: _Metrics | None = None


def installed() -> bool:
    """Whether the ``prometheus`` extra (prometheus-client) is installed."""
    return prometheus_client is not None


def _get() -> _Metrics | None:
    global _metrics
    if not conf.CHATPROXY_METRICS or prometheus_client is None:
        return None
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


def turn_started() -> float | None:
    """Count a turn as streaming; return its start for ``turn_ended`` (None: metrics off)."""
    if (m := _get()) is None:
        return None
    m.streaming.inc()
    return time.monotonic()


def turn_ended(turn: Any, started: float | None) -> None:
    """Count a turn that ended (a ``turns.Turn``, whatever its status)."""
    if started is None or (m := _get()) is None:
        return
    m.streaming.dec()
    route = turn.stream.route if turn.stream is not None else None
    labels = (turn.model, route.upstream.name if route is not None else "")
    state = turn.state
    m.turns.labels(state.status, *labels).inc()
    m.duration.labels(*labels).observe(time.monotonic() - started)
    if state.first_token_at is not None:
        m.first_token.labels(*labels).observe(state.first_token_at - state.started)
    if (usage := turn.usage()) is not None:
        m.tokens.labels("prompt", *labels).inc(usage.get("prompt_tokens") or 0)
        m.tokens.labels("completion", *labels).inc(usage.get("completion_tokens") or 0)
    if turn.cost is not None:
        m.cost.labels(*labels).inc(float(turn.cost))
    if route is not None and state.error_code.startswith("upstream_"):  # failed mid-answer
        m.upstream_errors.labels(labels[1], state.error_code).inc()


def upstream_failed(upstream: str, code: str, *, failover: bool) -> None:
    """Count an upstream call that failed before its first byte, and the failover it caused."""
    if (m := _get()) is None:
        return
    m.upstream_errors.labels(upstream, code).inc()
    if failover:
        m.failovers.labels(upstream, code).inc()


def followers_changed(by: int) -> None:
    if (m := _get()) is not None:
        m.followers.inc(by)


def _exposition() -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = prometheus_client.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return bytes(prometheus_client.generate_latest(registry))
    return bytes(prometheus_client.generate_latest())


def _refusal(code: str, message: str, status: int) -> JsonResponse:
    response = JsonResponse({"error": {"code": code, "message": message}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="chatproxy metrics"'
    return response


async def _allowed(request: HttpRequest) -> bool:
    token, sent = conf.CHATPROXY_METRICS_TOKEN, request.headers.get("Authorization", "")
    if token and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode()):
        return True
    user = await request.auser() if hasattr(request, "auser") else None
    return bool(user is not None and user.is_active and user.is_superuser)


@require_safe
async def export(request: HttpRequest) -> HttpResponse:
    """The metrics in Prometheus' text format, for ``Authorization: Bearer`` the
    CHATPROXY_METRICS_TOKEN or a superuser's session."""
    if _get() is None:
        return _refusal(
            "metrics_off",
            "Metrics are off. Install chatproxy[prometheus] and set CHATPROXY_METRICS = True.",
            404,
        )
    if not await _allowed(request):
        return _refusal(
            "metrics_token_required",
            "Send Authorization: Bearer with the site's CHATPROXY_METRICS_TOKEN, "
            "or log in as a superuser.",
            401,
        )
    body = await asyncio.to_thread(_exposition)
    return HttpResponse(
        body,
        content_type=prometheus_client.CONTENT_TYPE_LATEST,
        headers={"Cache-Control": "no-store"},
    )
