"""System checks for chatproxy's settings and for a setup that would break streaming."""

from __future__ import annotations

import numbers
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from .conf import conf
from .interception import Interceptor

_POSITIVE_INTS = ("CHATPROXY_MAX_MESSAGES", "CHATPROXY_MAX_CHARS", "CHATPROXY_MAX_BODY_BYTES")
_SECONDS = (
    "CHATPROXY_TIMEOUT",
    "CHATPROXY_CONNECT_TIMEOUT",
    "CHATPROXY_HEARTBEAT",
    "CHATPROXY_DEMO_DELAY",
    "CHATPROXY_RETRY_AFTER_CAP",
    "CHATPROXY_CHECKPOINT_INTERVAL",
    "CHATPROXY_SHUTDOWN_GRACE",
    "CHATPROXY_STALE_AFTER",
    "CHATPROXY_IDEMPOTENCY_WINDOW",
    "CHATPROXY_SEND_TIMEOUT",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_settings(**kwargs: Any) -> list[CheckMessage]:
    """Validate every CHATPROXY_* setting and warn about setups that buffer the stream."""
    return [*_errors(), *_warnings()]


def _errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    models = conf.raw("CHATPROXY_MODELS")
    if models is not None and (
        not isinstance(models, list | tuple)
        or not models
        or not all(isinstance(m, str) and m for m in models)
    ):
        errors.append(
            Error("CHATPROXY_MODELS must be a non-empty list of model names.", id="chatproxy.E001")
        )
    elif conf.CHATPROXY_DEFAULT_MODEL not in conf.CHATPROXY_MODELS:
        errors.append(
            Error(
                f"CHATPROXY_DEFAULT_MODEL {conf.CHATPROXY_DEFAULT_MODEL!r} is not in "
                "CHATPROXY_MODELS.",
                hint="Add it to CHATPROXY_MODELS, or pick one of the allowed models.",
                id="chatproxy.E002",
            )
        )
    params = conf.raw("CHATPROXY_PARAMETERS")
    if params is not None and not (
        isinstance(params, dict)
        and all(
            isinstance(bounds, list | tuple)
            and len(bounds) == 2
            and all(_is_number(b) for b in bounds)
            and bounds[0] <= bounds[1]
            for bounds in params.values()
        )
    ):
        errors.append(
            Error(
                "CHATPROXY_PARAMETERS must map parameter names to (low, high) bounds.",
                hint='For example {"temperature": (0.0, 2.0), "max_tokens": (1, 4096)}.',
                id="chatproxy.E003",
            )
        )
    for name in _POSITIVE_INTS:
        value = conf.raw(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            errors.append(Error(f"{name} must be a positive integer.", id="chatproxy.E004"))
    for name in _SECONDS:
        value = conf.raw(name)
        if value is not None and (not _is_number(value) or value < 0):
            errors.append(
                Error(f"{name} must be a number of seconds, 0 or more.", id="chatproxy.E005")
            )
    retries = conf.raw("CHATPROXY_MAX_RETRIES")
    if retries is not None and (
        not isinstance(retries, int) or isinstance(retries, bool) or retries < 0
    ):
        errors.append(
            Error("CHATPROXY_MAX_RETRIES must be an integer, 0 or more.", id="chatproxy.E006")
        )
    errors += _interceptor_errors()
    rate = conf.raw("CHATPROXY_RATE_LIMIT")
    if rate is not None and not (
        isinstance(rate, list | tuple)
        and len(rate) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in rate)
    ):
        errors.append(
            Error(
                "CHATPROXY_RATE_LIMIT must be None or (requests, seconds), two positive integers.",
                id="chatproxy.E009",
            )
        )
    streams = conf.raw("CHATPROXY_MAX_STREAMS")
    if streams is not None and (
        not isinstance(streams, int) or isinstance(streams, bool) or streams < 1
    ):
        errors.append(
            Error("CHATPROXY_MAX_STREAMS must be None or a positive integer.", id="chatproxy.E010")
        )
    groups = conf.raw("CHATPROXY_GROUP_MODELS")
    if groups is not None and not (
        isinstance(groups, dict)
        and all(
            isinstance(m, list | tuple) and all(isinstance(x, str) for x in m)
            for m in groups.values()
        )
    ):
        errors.append(
            Error(
                "CHATPROXY_GROUP_MODELS must map group names to lists of model names.",
                id="chatproxy.E011",
            )
        )
    if conf.CHATPROXY_CACHE not in settings.CACHES:
        errors.append(
            Error(
                f"CHATPROXY_CACHE names {conf.CHATPROXY_CACHE!r}, which is not in CACHES.",
                id="chatproxy.E012",
            )
        )
    prices = conf.raw("CHATPROXY_PRICES")
    if prices is not None and not (
        isinstance(prices, dict)
        and all(
            isinstance(p, dict)
            and {"prompt", "completion"} <= set(p)
            and all(map(_is_number, p.values()))
            for p in prices.values()
        )
    ):
        errors.append(
            Error(
                "CHATPROXY_PRICES must map model names to "
                '{"prompt": ..., "completion": ...} prices per million tokens.',
                id="chatproxy.E008",
            )
        )
    return errors


def _interceptor_errors() -> list[CheckMessage]:
    specs = conf.raw("CHATPROXY_INTERCEPTORS")
    if specs is None:
        return []
    if not isinstance(specs, list | tuple):
        return [Error("CHATPROXY_INTERCEPTORS must be a list.", id="chatproxy.E007")]
    errors: list[CheckMessage] = []
    for spec in specs:
        target, options = spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, {})
        try:
            cls = import_string(target) if isinstance(target, str) else target
            ok = (
                isinstance(cls, type) and issubclass(cls, Interceptor) and isinstance(options, dict)
            )
        except ImportError:
            ok = False
        if not ok:
            errors.append(
                Error(
                    f"CHATPROXY_INTERCEPTORS has {spec!r}, which is not an Interceptor subclass "
                    "(a dotted path or a class, alone or as (path, options)).",
                    id="chatproxy.E007",
                )
            )
    return errors


def _warnings() -> list[CheckMessage]:
    warnings: list[CheckMessage] = []
    if not getattr(settings, "ASGI_APPLICATION", None):
        warnings.append(
            Warning(
                "ASGI_APPLICATION is not set: under WSGI every chat answer is buffered whole "
                "and sent at the end.",
                hint="Serve the project with an ASGI server (uvicorn, or daphne in "
                "INSTALLED_APPS) and set ASGI_APPLICATION.",
                id="chatproxy.W001",
            )
        )
    if conf.demo:
        warnings.append(
            Warning(
                "CHATPROXY_API_KEY is not set: the offline demo model answers every chat.",
                hint="Set CHATPROXY_API_KEY (and CHATPROXY_BASE_URL for a non-OpenAI server).",
                id="chatproxy.W002",
            )
        )
    if "django.middleware.gzip.GZipMiddleware" in settings.MIDDLEWARE:
        warnings.append(
            Warning(
                "GZipMiddleware compresses each streamed line on its own, tripling its size.",
                hint="Remove it, or compress at the proxy with X-Accel-Buffering honoured.",
                id="chatproxy.W003",
            )
        )
    for alias, db in settings.DATABASES.items():
        if db.get("CONN_MAX_AGE"):
            warnings.append(
                Warning(
                    f"DATABASES[{alias!r}] sets CONN_MAX_AGE; under ASGI such connections leak.",
                    hint="Set CONN_MAX_AGE to 0 and use the backend's pool instead.",
                    id="chatproxy.W004",
                )
            )
        if db.get("ENGINE") == "django.db.backends.sqlite3" and (
            str(db.get("OPTIONS", {}).get("transaction_mode", "")).upper() != "IMMEDIATE"
        ):
            warnings.append(
                Warning(
                    f"DATABASES[{alias!r}] is SQLite without transaction_mode IMMEDIATE: "
                    "concurrent turns fail with 'database is locked'.",
                    hint='Add "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 20}.',
                    id="chatproxy.W005",
                )
            )
    if conf.CHATPROXY_ALLOW_ANONYMOUS and not conf.demo:
        warnings.append(
            Warning(
                "CHATPROXY_ALLOW_ANONYMOUS is on with a real API key: anyone can spend it.",
                hint="Turn it off, or add rate limits in front of the endpoint.",
                id="chatproxy.W006",
            )
        )
    return warnings
