"""System checks for chatproxy's settings and for a setup that would break streaming."""

from __future__ import annotations

import ipaddress
import numbers
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from .conf import conf
from .interception import Interceptor
from .parameters import KINDS
from .tools import Tool

_POSITIVE_INTS = (
    "CHATPROXY_MAX_MESSAGES",
    "CHATPROXY_MAX_CHARS",
    "CHATPROXY_MAX_HISTORY_CHARS",
    "CHATPROXY_MAX_BODY_BYTES",
    "CHATPROXY_MAX_IMAGE_BYTES",
    "CHATPROXY_MAX_TOOLS",
    "CHATPROXY_MAX_TOOLS_BYTES",
    "CHATPROXY_MAX_SCHEMA_BYTES",
    "CHATPROXY_MAX_TOOL_STEPS",
    "CHATPROXY_MAX_PARALLEL_TOOLS",
)
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
    "CHATPROXY_TOOL_TIMEOUT",
)


# Caps that are None (off) or a positive integer.
_OPTIONAL_CAPS = (
    "CHATPROXY_MAX_ANONYMOUS_STREAMS",
    "CHATPROXY_MAX_FOLLOWERS",
    "CHATPROXY_MAX_FOLLOWERS_PER_USER",
)


def _is_positive(value: Any) -> bool:
    """True for a positive integer, and for an unset setting (its default is one)."""
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_settings(**kwargs: Any) -> list[CheckMessage]:
    """Validate every CHATPROXY_* setting and warn about setups that buffer the stream."""
    return [*_errors(), *_conversation_errors(), *_warnings()]


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
        isinstance(params, dict) and all(map(_is_parameter_spec, params.values()))
    ):
        errors.append(
            Error(
                "CHATPROXY_PARAMETERS must map parameter names to (low, high) bounds, a list of "
                f"allowed strings, or one of the kinds {', '.join(sorted(KINDS))}.",
                hint='For example {"temperature": (0.0, 2.0), "reasoning_effort": ["low", '
                '"high"], "tools": "tools"}.',
                id="chatproxy.E003",
            )
        )
    bad_limits = set()
    for name in _POSITIVE_INTS:
        value = conf.raw(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            bad_limits.add(name)
            errors.append(Error(f"{name} must be a positive integer.", id="chatproxy.E004"))
    if (
        not bad_limits & {"CHATPROXY_MAX_CHARS", "CHATPROXY_MAX_HISTORY_CHARS"}
        and conf.CHATPROXY_MAX_HISTORY_CHARS < conf.CHATPROXY_MAX_CHARS
    ):
        errors.append(
            Error(
                f"CHATPROXY_MAX_HISTORY_CHARS ({conf.CHATPROXY_MAX_HISTORY_CHARS}) is below "
                f"CHATPROXY_MAX_CHARS ({conf.CHATPROXY_MAX_CHARS}): a request at the limit "
                "would not fit.",
                hint="Raise CHATPROXY_MAX_HISTORY_CHARS, or leave it out for 4 times "
                "CHATPROXY_MAX_CHARS.",
                id="chatproxy.E015",
            )
        )
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
    errors += _tool_errors()
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
    for name in _OPTIONAL_CAPS:
        value = conf.raw(name)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            errors.append(Error(f"{name} must be None or a positive integer.", id="chatproxy.E014"))
    errors += _proxy_errors()
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
    errors += _content_errors()
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


def _conversation_errors() -> list[CheckMessage]:
    if conf.CHATPROXY_DELETE in ("hard", "soft"):
        return []
    return [
        Error(
            f"CHATPROXY_DELETE must be 'hard' or 'soft', not {conf.CHATPROXY_DELETE!r}.",
            hint="'hard' deletes a conversation's rows; 'soft' hides it from its owner and "
            "keeps them for review in the admin.",
            id="chatproxy.E040",
        )
    ]


def _proxy_errors() -> list[CheckMessage]:
    proxies = conf.raw("CHATPROXY_TRUSTED_PROXIES")
    if proxies is None:
        return []
    if isinstance(proxies, list | tuple):
        bad = [proxy for proxy in proxies if not _is_network(proxy)]
        if not bad:
            return []
        proxies = bad[0]
    return [
        Error(
            "CHATPROXY_TRUSTED_PROXIES must be a list of IP addresses or networks, such as "
            f'["10.0.0.0/8", "127.0.0.1"]; {proxies!r} is not one.',
            hint="List the addresses of your own reverse proxies only: chatproxy reads "
            "X-Forwarded-For when a request comes from one of them.",
            id="chatproxy.E013",
        )
    ]


def _is_network(value: Any) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except (TypeError, ValueError):
        return False
    return isinstance(value, str)


def _is_parameter_spec(spec: Any) -> bool:
    if isinstance(spec, str):
        return spec in KINDS
    if not isinstance(spec, list | tuple) or not spec:
        return False
    if all(isinstance(choice, str) for choice in spec):
        return True
    return len(spec) == 2 and all(map(_is_number, spec)) and spec[0] <= spec[1]


def _content_errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    images = conf.raw("CHATPROXY_MAX_IMAGES")
    if images is not None and (
        not isinstance(images, int) or isinstance(images, bool) or images < 0
    ):
        errors.append(
            Error(
                "CHATPROXY_MAX_IMAGES must be an integer, 0 (no images) or more.",
                id="chatproxy.E016",
            )
        )
    hosts = conf.raw("CHATPROXY_IMAGE_HOSTS")
    if hosts is not None and not (
        isinstance(hosts, list | tuple) and all(isinstance(h, str) and h for h in hosts)
    ):
        errors.append(
            Error(
                "CHATPROXY_IMAGE_HOSTS must be None (any host) or a list of host names.",
                hint='For example ["images.example.com"].',
                id="chatproxy.E017",
            )
        )
    kinds = conf.raw("CHATPROXY_EXTRA_PART_TYPES")
    if kinds is not None and not (
        isinstance(kinds, list | tuple)
        and all(isinstance(k, str) and k and k not in ("text", "image_url") for k in kinds)
    ):
        errors.append(
            Error(
                "CHATPROXY_EXTRA_PART_TYPES must be a list of content part types other than "
                "text and image_url, which chatproxy checks itself.",
                hint='For example ["input_audio", "file"].',
                id="chatproxy.E018",
            )
        )
    field = conf.raw("CHATPROXY_REASONING_FIELD")
    if field is not None and not (isinstance(field, str) and field.isidentifier()):
        errors.append(
            Error(
                "CHATPROXY_REASONING_FIELD must be None or the name of the assistant message's "
                "field that carries reasoning back upstream.",
                hint='For example "reasoning_content".',
                id="chatproxy.E019",
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


def _tool_errors() -> list[CheckMessage]:
    specs = conf.raw("CHATPROXY_TOOLS")
    if specs is None:
        return []
    if not isinstance(specs, list | tuple):
        return [Error("CHATPROXY_TOOLS must be a list.", id="chatproxy.E020")]
    errors: list[CheckMessage] = []
    names: set[str] = set()
    for spec in specs:
        try:
            found = import_string(spec) if isinstance(spec, str) else spec
        except ImportError:
            found = None
        if not isinstance(found, Tool):
            errors.append(
                Error(
                    f"CHATPROXY_TOOLS has {spec!r}, which is not a tool.",
                    hint="List dotted paths to functions declared with @chatproxy.tools.tool.",
                    id="chatproxy.E020",
                )
            )
        elif found.problem:
            errors.append(Error(found.problem, id="chatproxy.E021"))
        elif found.name in names:
            errors.append(
                Error(
                    f"CHATPROXY_TOOLS has two tools named {found.name!r}.",
                    hint="Give one of them another name: @tool(name=...).",
                    id="chatproxy.E020",
                )
            )
        else:
            names.add(found.name)
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
                hint="Set CHATPROXY_API_KEY in your settings, for example from the environment "
                'as the demo project does: CHATPROXY_API_KEY = os.environ.get("OPENAI_API_KEY", '
                '""). For a server other than OpenAI, set CHATPROXY_BASE_URL too.',
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
    if (
        _is_positive(conf.raw("CHATPROXY_MAX_IMAGE_BYTES"))
        and _is_positive(conf.raw("CHATPROXY_MAX_BODY_BYTES"))
        and conf.CHATPROXY_MAX_IMAGES
        and (conf.CHATPROXY_MAX_IMAGE_BYTES * 4 / 3 > conf.CHATPROXY_MAX_BODY_BYTES)
    ):
        warnings.append(
            Warning(
                "CHATPROXY_MAX_IMAGE_BYTES of images, in base64, do not fit in "
                "CHATPROXY_MAX_BODY_BYTES: such requests get 413 body_too_large.",
                hint="Raise CHATPROXY_MAX_BODY_BYTES to at least 4/3 of "
                "CHATPROXY_MAX_IMAGE_BYTES plus room for the text.",
                id="chatproxy.W007",
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
