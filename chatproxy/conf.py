"""The only reader of ``django.conf.settings`` in chatproxy.

Every setting is a property, so it is read on each access and ``override_settings`` just works.
docs/settings.md lists the same names with the same defaults (a test keeps them in step).
"""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEMO_MODEL = "chatproxy-demo"
# The flags a reviewer may put on a conversation or an answer: key (stored) and label (shown).
REVIEW_FLAGS = {
    "needs_review": "Needs review",
    "personal_data": "Personal data",
    "wrong_answer": "Wrong answer",
}
TAG_LENGTH = 50  # of a review flag's key, or a tag (chatproxy.review)

# How a parameter is checked: (low, high) is a number clamped to its bounds (integers when both
# bounds are); a list of strings is one of those values; a string names one of the validators
# of chatproxy.parameters (KINDS).
ParameterSpec = tuple[float, float] | list[str] | str

DEFAULT_PARAMETERS: dict[str, ParameterSpec] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "max_tokens": (1, 4096),
    "max_completion_tokens": (1, 16384),
    "presence_penalty": (-2.0, 2.0),
    "frequency_penalty": (-2.0, 2.0),
    "seed": (0, 2**31 - 1),
    "stop": "stop",
    "reasoning_effort": ["none", "minimal", "low", "medium", "high"],
    "response_format": "response_format",
    "tools": "tools",
    "tool_choice": "tool_choice",
    "parallel_tool_calls": "boolean",
}


class Settings:
    @property
    def CHATPROXY_API_KEY(self) -> str:
        return str(getattr(settings, "CHATPROXY_API_KEY", "") or "")

    @property
    def CHATPROXY_BASE_URL(self) -> str:
        return str(getattr(settings, "CHATPROXY_BASE_URL", "") or "https://api.openai.com/v1")

    @property
    def demo(self) -> bool:
        """Answer from the built-in offline demo model: true while no API key and no
        CHATPROXY_UPSTREAMS are set."""
        return not self.CHATPROXY_API_KEY and not self.CHATPROXY_UPSTREAMS

    @property
    def CHATPROXY_UPSTREAMS(self) -> dict[str, dict[str, Any]]:
        upstreams = getattr(settings, "CHATPROXY_UPSTREAMS", None)
        return dict(upstreams) if isinstance(upstreams, dict) else {}  # E060 names a bad one

    @property
    def CHATPROXY_MODEL_ALIASES(self) -> dict[str, str]:
        aliases = getattr(settings, "CHATPROXY_MODEL_ALIASES", None)
        return dict(aliases) if isinstance(aliases, dict) else {}  # E063 names a bad one

    @property
    def CHATPROXY_METRICS(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_METRICS", False))

    @property
    def CHATPROXY_METRICS_TOKEN(self) -> str:
        return str(getattr(settings, "CHATPROXY_METRICS_TOKEN", "") or "")

    @property
    def CHATPROXY_TRACES(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_TRACES", False))

    @property
    def CHATPROXY_TRACE_CONTENT(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_TRACE_CONTENT", False))

    @property
    def CHATPROXY_UPSTREAM_COOLDOWN(self) -> float:
        return float(getattr(settings, "CHATPROXY_UPSTREAM_COOLDOWN", 30.0))

    @property
    def CHATPROXY_TIMEOUT(self) -> float:
        return float(getattr(settings, "CHATPROXY_TIMEOUT", 60.0))

    @property
    def CHATPROXY_CONNECT_TIMEOUT(self) -> float:
        return float(getattr(settings, "CHATPROXY_CONNECT_TIMEOUT", 5.0))

    @property
    def CHATPROXY_MAX_RETRIES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_RETRIES", 1))

    @property
    def CHATPROXY_DEFAULT_MODEL(self) -> str:
        default = DEMO_MODEL if self.demo else "gpt-4o-mini"
        return str(getattr(settings, "CHATPROXY_DEFAULT_MODEL", default))

    @property
    def CHATPROXY_MODELS(self) -> list[str]:
        models = getattr(settings, "CHATPROXY_MODELS", None)
        return list(models) if models is not None else [self.CHATPROXY_DEFAULT_MODEL]

    @property
    def CHATPROXY_PARAMETERS(self) -> dict[str, ParameterSpec]:
        return dict(getattr(settings, "CHATPROXY_PARAMETERS", DEFAULT_PARAMETERS))

    @property
    def CHATPROXY_MAX_IMAGES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_IMAGES", 4))

    @property
    def CHATPROXY_MAX_IMAGE_BYTES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_IMAGE_BYTES", 180_000))

    @property
    def CHATPROXY_IMAGE_HOSTS(self) -> list[str] | None:
        hosts = getattr(settings, "CHATPROXY_IMAGE_HOSTS", None)
        return None if hosts is None else [str(h).lower() for h in hosts]

    @property
    def CHATPROXY_EXTRA_PART_TYPES(self) -> list[str]:
        return list(getattr(settings, "CHATPROXY_EXTRA_PART_TYPES", []))

    @property
    def CHATPROXY_MAX_TOOLS(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_TOOLS", 32))

    @property
    def CHATPROXY_MAX_TOOLS_BYTES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_TOOLS_BYTES", 32 * 1024))

    @property
    def CHATPROXY_TOOLS(self) -> list[Any]:
        return list(getattr(settings, "CHATPROXY_TOOLS", []))

    @property
    def CHATPROXY_TOOL_TIMEOUT(self) -> float:
        return float(getattr(settings, "CHATPROXY_TOOL_TIMEOUT", 30.0))

    @property
    def CHATPROXY_MAX_TOOL_STEPS(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_TOOL_STEPS", 8))

    @property
    def CHATPROXY_MAX_PARALLEL_TOOLS(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_PARALLEL_TOOLS", 4))

    @property
    def CHATPROXY_MAX_SCHEMA_BYTES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_SCHEMA_BYTES", 16 * 1024))

    @property
    def CHATPROXY_SEND_USER(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_SEND_USER", True))

    @property
    def CHATPROXY_REASONING_FIELD(self) -> str | None:
        field = getattr(settings, "CHATPROXY_REASONING_FIELD", None)
        return None if not field else str(field)

    @property
    def CHATPROXY_MAX_MESSAGES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_MESSAGES", 100))

    @property
    def CHATPROXY_MAX_CHARS(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_CHARS", 40_000))

    @property
    def CHATPROXY_MAX_HISTORY_CHARS(self) -> int:
        default = 4 * self.CHATPROXY_MAX_CHARS
        return int(getattr(settings, "CHATPROXY_MAX_HISTORY_CHARS", default))

    @property
    def CHATPROXY_MAX_BODY_BYTES(self) -> int:
        return int(getattr(settings, "CHATPROXY_MAX_BODY_BYTES", 256 * 1024))

    @property
    def CHATPROXY_ALLOW_ANONYMOUS(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_ALLOW_ANONYMOUS", False))

    @property
    def CHATPROXY_ALLOW_SYSTEM_MESSAGES(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_ALLOW_SYSTEM_MESSAGES", False))

    @property
    def CHATPROXY_STREAM_USAGE(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_STREAM_USAGE", True))

    @property
    def CHATPROXY_HEARTBEAT(self) -> float:
        return float(getattr(settings, "CHATPROXY_HEARTBEAT", 15.0))

    @property
    def CHATPROXY_COALESCE_DELTAS(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_COALESCE_DELTAS", False))

    @property
    def CHATPROXY_DEMO_DELAY(self) -> float:
        return float(getattr(settings, "CHATPROXY_DEMO_DELAY", 0.03))

    @property
    def CHATPROXY_INTERCEPTORS(self) -> list[Any]:
        default = ["chatproxy.interceptors.SystemPrompt", "chatproxy.interceptors.Cost"]
        return list(getattr(settings, "CHATPROXY_INTERCEPTORS", default))

    @property
    def CHATPROXY_SYSTEM_PROMPT(self) -> str:
        return str(getattr(settings, "CHATPROXY_SYSTEM_PROMPT", "") or "")

    @property
    def CHATPROXY_PRICES(self) -> dict[str, dict[str, float]]:
        return dict(getattr(settings, "CHATPROXY_PRICES", {}))

    @property
    def CHATPROXY_BUDGETS(self) -> dict[str, Any] | None:
        budgets = getattr(settings, "CHATPROXY_BUDGETS", None)
        return None if budgets is None else dict(budgets)

    @property
    def CHATPROXY_BUDGET_MAX_TOKENS(self) -> int:
        return int(getattr(settings, "CHATPROXY_BUDGET_MAX_TOKENS", 4096))

    @property
    def CHATPROXY_GROUP_MODELS(self) -> dict[str, list[str]]:
        return dict(getattr(settings, "CHATPROXY_GROUP_MODELS", {}))

    @property
    def CHATPROXY_RATE_LIMIT(self) -> tuple[int, int] | None:
        limit = getattr(settings, "CHATPROXY_RATE_LIMIT", (30, 60))
        return None if limit is None else (int(limit[0]), int(limit[1]))

    @property
    def CHATPROXY_MAX_STREAMS(self) -> int | None:
        limit = getattr(settings, "CHATPROXY_MAX_STREAMS", 3)
        return None if limit is None else int(limit)

    @property
    def CHATPROXY_MAX_ANONYMOUS_STREAMS(self) -> int | None:
        limit = getattr(settings, "CHATPROXY_MAX_ANONYMOUS_STREAMS", 10)
        return None if limit is None else int(limit)

    @property
    def CHATPROXY_TRUSTED_PROXIES(self) -> list[str]:
        return list(getattr(settings, "CHATPROXY_TRUSTED_PROXIES", []))

    @property
    def CHATPROXY_MAX_FOLLOWERS(self) -> int | None:
        limit = getattr(settings, "CHATPROXY_MAX_FOLLOWERS", 10)
        return None if limit is None else int(limit)

    @property
    def CHATPROXY_MAX_FOLLOWERS_PER_USER(self) -> int | None:
        limit = getattr(settings, "CHATPROXY_MAX_FOLLOWERS_PER_USER", 10)
        return None if limit is None else int(limit)

    @property
    def CHATPROXY_CACHE(self) -> str:
        return str(getattr(settings, "CHATPROXY_CACHE", "default"))

    @property
    def CHATPROXY_STORE_CONTENT(self) -> bool:
        return bool(getattr(settings, "CHATPROXY_STORE_CONTENT", True))

    @property
    def CHATPROXY_DELETE(self) -> str:
        """How an owner's delete removes a conversation: "hard" deletes its rows, "soft"
        hides it from its owner and keeps the rows for review."""
        return str(getattr(settings, "CHATPROXY_DELETE", "hard"))

    @property
    def CHATPROXY_STALE_AFTER(self) -> float:
        return float(getattr(settings, "CHATPROXY_STALE_AFTER", 600.0))

    @property
    def CHATPROXY_RETRY_AFTER_CAP(self) -> float:
        return float(getattr(settings, "CHATPROXY_RETRY_AFTER_CAP", 10.0))

    @property
    def CHATPROXY_CHECKPOINT_INTERVAL(self) -> float:
        return float(getattr(settings, "CHATPROXY_CHECKPOINT_INTERVAL", 2.0))

    @property
    def CHATPROXY_SHUTDOWN_GRACE(self) -> float:
        return float(getattr(settings, "CHATPROXY_SHUTDOWN_GRACE", 20.0))

    @property
    def CHATPROXY_SEND_TIMEOUT(self) -> float:
        return float(getattr(settings, "CHATPROXY_SEND_TIMEOUT", 30.0))

    @property
    def trusted_origins(self) -> list[str]:
        """Django's CSRF_TRUSTED_ORIGINS, which the WebSocket origin check shares."""
        return list(getattr(settings, "CSRF_TRUSTED_ORIGINS", []))

    @property
    def CHATPROXY_IDEMPOTENCY_WINDOW(self) -> float:
        return float(getattr(settings, "CHATPROXY_IDEMPOTENCY_WINDOW", 600.0))

    @property
    def CHATPROXY_REVIEW_FLAGS(self) -> dict[str, str]:
        return dict(getattr(settings, "CHATPROXY_REVIEW_FLAGS", REVIEW_FLAGS))

    def raw(self, name: str) -> Any:
        """Return a setting exactly as the project wrote it, for the system checks."""
        return getattr(settings, name, None)


conf = Settings()
