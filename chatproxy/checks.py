"""System checks for chatproxy's settings and for a setup that would break streaming."""

from __future__ import annotations

import ipaddress
import numbers
from decimal import Decimal, InvalidOperation
from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.utils.module_loading import import_string

from . import metrics, tracing, upstreams
from .conf import TAG_LENGTH, conf
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
    "CHATPROXY_UPSTREAM_COOLDOWN",
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
    return [
        *_errors(),
        *_review_errors(),
        *_conversation_errors(),
        *_budget_errors(),
        *_warnings(),
    ]


_BUDGET_EXAMPLE = (
    'For example {"user": [{"period": "day", "tokens": 200000}], "groups": {"staff": '
    '[{"period": "month", "cost": "20.00"}]}, "anonymous": [{"period": "rolling", "window": '
    '3600, "tokens": 50000}], "site": [{"period": "month", "cost": "500"}]}.'
)


def _budget_problem(entry: Any) -> str:
    """What is wrong with one budget of CHATPROXY_BUDGETS, or ""."""
    if not isinstance(entry, dict) or set(entry) - {"period", "window", "tokens", "cost"}:
        return "each budget is a dict of period, window, tokens and cost"
    if entry.get("period") not in ("day", "week", "month", "rolling"):
        return 'period is "day", "week", "month" or "rolling"'
    if (entry["period"] == "rolling") != ("window" in entry) or not _is_positive(
        entry.get("window")
    ):
        return "a rolling budget, and only it, has a window: a positive number of seconds"
    if "tokens" not in entry and "cost" not in entry:
        return "a budget has tokens, a cost, or both"
    if not _is_positive(entry.get("tokens")):
        return "tokens is a positive integer"
    cost = entry.get("cost")
    if cost is not None:
        try:
            if isinstance(cost, bool) or Decimal(str(cost)) <= 0:
                return 'cost is a positive number (a string such as "5.00" keeps it exact)'
        except InvalidOperation:
            return 'cost is a positive number (a string such as "5.00" keeps it exact)'
    return ""


def _budget_errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    budgets = conf.raw("CHATPROXY_BUDGETS")
    if budgets is not None:
        lists: list[Any] = []
        problem = ""
        if not isinstance(budgets, dict) or set(budgets) - {
            "user",
            "groups",
            "api_key",
            "anonymous",
            "site",
        }:
            problem = 'its keys are "user", "groups", "api_key", "anonymous" and "site"'
        else:
            groups = budgets.get("groups", {})
            if not isinstance(groups, dict):
                problem = '"groups" maps group names to lists of budgets'
            else:
                lists = [budgets.get(k, []) for k in ("user", "api_key", "anonymous", "site")]
                lists += list(groups.values())
        for entries in lists:
            if not isinstance(entries, list | tuple):
                problem = problem or "each scope has a list of budgets"
                continue
            problem = problem or next(filter(None, map(_budget_problem, entries)), "")
        if problem:
            errors.append(
                Error(
                    f"CHATPROXY_BUDGETS is invalid: {problem}.",
                    hint=_BUDGET_EXAMPLE,
                    id="chatproxy.E070",
                )
            )
    if not _is_positive(conf.raw("CHATPROXY_BUDGET_MAX_TOKENS")):
        errors.append(
            Error(
                "CHATPROXY_BUDGET_MAX_TOKENS must be a positive integer: the completion tokens a "
                "turn without max_tokens reserves, and is limited to.",
                id="chatproxy.E071",
            )
        )
    return errors


def _review_errors() -> list[CheckMessage]:
    flags = conf.raw("CHATPROXY_REVIEW_FLAGS")
    if flags is None or (
        isinstance(flags, dict)
        and all(
            isinstance(k, str) and k.isidentifier() and len(k) <= TAG_LENGTH and isinstance(v, str)
            for k, v in flags.items()
        )
    ):
        return []
    return [
        Error(
            "CHATPROXY_REVIEW_FLAGS must map flag keys (identifiers of at most "
            f"{TAG_LENGTH} characters, which are stored) to labels (which are shown).",
            hint='For example {"needs_review": "Needs review", "wrong_answer": "Wrong answer"}.',
            id="chatproxy.E030",
        )
    ]


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
    errors += _upstream_errors()
    if conf.CHATPROXY_TRACES and not tracing.installed():
        errors.append(
            Error(
                "CHATPROXY_TRACES is on, but opentelemetry-api is not installed.",
                hint="pip install 'django-chatproxy[otel]' and an OpenTelemetry SDK with an "
                "exporter, or turn CHATPROXY_TRACES off.",
                id="chatproxy.E065",
            )
        )
    if conf.CHATPROXY_METRICS and not metrics.installed():
        errors.append(
            Error(
                "CHATPROXY_METRICS is on, but prometheus-client is not installed.",
                hint="pip install 'django-chatproxy[prometheus]', or turn CHATPROXY_METRICS off.",
                id="chatproxy.E064",
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


def _upstream_problem(entry: Any) -> str:
    """What is wrong with an entry of CHATPROXY_UPSTREAMS, or ""."""
    if not isinstance(entry, dict):
        return "is not a dict"
    if unknown := sorted(set(entry) - upstreams.FIELDS, key=str):
        return f"has unknown keys {unknown}"
    if not (isinstance(entry.get("base_url"), str) and entry["base_url"]):
        return "needs a base_url"
    for name in ("timeout", "connect_timeout", "cooldown"):
        if name in entry and not (_is_number(entry[name]) and entry[name] >= 0):
            return f"has a {name} that is not a number of seconds, 0 or more"
    retries = entry.get("max_retries", 0)
    if not (isinstance(retries, int) and not isinstance(retries, bool) and retries >= 0):
        return "has a max_retries that is not an integer, 0 or more"
    if not isinstance(entry.get("priority", 0), int):
        return "has a priority that is not an integer"
    if not (_is_number(entry.get("weight", 1)) and entry.get("weight", 1) > 0):
        return "has a weight that is not a positive number"
    headers, models = entry.get("headers", {}), entry.get("models", [])
    if not (isinstance(headers, dict) and all(isinstance(v, str) for v in headers.values())):
        return "has headers that are not a dict of strings"
    if isinstance(models, dict):
        models = [*models, *models.values()]
    if not (isinstance(models, list | tuple) and all(isinstance(m, str) and m for m in models)):
        return "has models that are not a list of names, or a dict of public name to its own"
    return ""


def _upstream_errors() -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    entries, aliases = conf.raw("CHATPROXY_UPSTREAMS"), conf.raw("CHATPROXY_MODEL_ALIASES")
    if aliases is not None and not (
        isinstance(aliases, dict) and all(isinstance(v, str) and v for v in aliases.values())
    ):
        errors.append(
            Error(
                "CHATPROXY_MODEL_ALIASES must map public model names to the names they stand "
                'for, such as {"fast": "gpt-4o-mini"}.',
                id="chatproxy.E063",
            )
        )
    if entries is None or entries == {}:
        return errors
    if isinstance(entries, dict):
        bad = {name: p for name, entry in entries.items() if (p := _upstream_problem(entry))}
    else:
        bad = {"": "is not a dict of named upstreams"}
    for name, problem in bad.items():
        errors.append(
            Error(
                f"CHATPROXY_UPSTREAMS {name!r} {problem}."
                if name
                else f"CHATPROXY_UPSTREAMS {problem}.",
                hint='For example {"openai": {"base_url": "https://api.openai.com/v1", '
                '"api_key_env": "OPENAI_API_KEY", "models": ["gpt-4o-mini"]}}.',
                id="chatproxy.E060",
            )
        )
    if bad:
        return errors
    found = [upstreams.build(name, entry) for name, entry in entries.items()]
    for upstream in found:
        if not upstream.api_key:
            where = (
                f"the environment variable {upstream.api_key_env} is empty or unset"
                if upstream.api_key_env
                else "it has neither api_key nor api_key_env"
            )
            errors.append(
                Error(
                    f"The upstream {upstream.name!r} has no API key: {where}.",
                    hint="Set the variable, or give the upstream its key. A server that needs "
                    'none (a local vLLM) still takes any string: "api_key": "none".',
                    id="chatproxy.E061",
                )
            )
    groups = conf.raw("CHATPROXY_GROUP_MODELS")
    public = [*conf.CHATPROXY_MODELS, conf.CHATPROXY_DEFAULT_MODEL]
    if isinstance(groups, dict):
        public += [m for names in groups.values() if isinstance(names, list | tuple) for m in names]
    unserved = [
        m
        for m in dict.fromkeys(public)
        if isinstance(m, str) and not any(u.serves(upstreams.resolve(m)) for u in found)
    ]
    if unserved:
        errors.append(
            Error(
                f"No upstream in CHATPROXY_UPSTREAMS serves the models {unserved}.",
                hint="Add them to the models of an upstream (or leave out an upstream's models "
                "to let it serve any), or map them to a served model in "
                "CHATPROXY_MODEL_ALIASES.",
                id="chatproxy.E062",
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
    if conf.CHATPROXY_METRICS and not conf.CHATPROXY_METRICS_TOKEN:
        warnings.append(
            Warning(
                "CHATPROXY_METRICS is on without CHATPROXY_METRICS_TOKEN: only superusers, "
                "logged in, can read the metrics.",
                hint="Set CHATPROXY_METRICS_TOKEN to a long random string, and give it to "
                "Prometheus as the scrape's bearer token.",
                id="chatproxy.W060",
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
