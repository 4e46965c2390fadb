"""The upstreams a turn can go to: which of them serve a model, in which order, and which are
cooling down after a failure.

CHATPROXY_UPSTREAMS names them; without it the single-upstream settings (CHATPROXY_BASE_URL,
CHATPROXY_API_KEY, ...) make one, ``default``, which serves every model under its own name.
A cooldown is a key in CHATPROXY_CACHE, so every worker sharing the cache skips the same
failing upstream. This module knows nothing of ``openai``: ``upstream`` sends the requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections.abc import Mapping
from typing import Any, NamedTuple

from django.core.cache import caches

from .conf import conf

DEFAULT = "default"
DEMO = "demo"
COOLDOWN_KEY = "chatproxy:cooldown:"

# The keys an entry of CHATPROXY_UPSTREAMS may have (the checks refuse any other).
FIELDS = frozenset(
    {
        "base_url", "api_key", "api_key_env", "headers", "timeout", "connect_timeout",
        "max_retries", "models", "priority", "weight", "cooldown",
    }
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Upstream:
    """One OpenAI-compatible server and how to call it."""

    name: str
    base_url: str
    api_key: str
    api_key_env: str = ""  # where the key came from, for the checks' messages
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 60.0
    connect_timeout: float = 5.0
    max_retries: int = 1
    # Public model name -> this upstream's name for it; None: every model, as it is named.
    models: Mapping[str, str] | None = None
    priority: int = 0  # lower goes first
    weight: float = 1.0  # among equal priorities, the share of turns tried here first
    cooldown: float = 30.0

    def serves(self, model: str) -> str | None:
        """This upstream's name for ``model``, or None if it does not serve it."""
        if self.models is None:
            return model
        return self.models.get(model)

    @property
    def client_key(self) -> tuple[Any, ...]:
        """What a client for this upstream is built from: equal keys share one client."""
        return (self.base_url, self.api_key, self.headers, self.timeout, self.connect_timeout)


class Route(NamedTuple):
    """An upstream that serves a turn's model, and its own name for that model."""

    upstream: Upstream
    model: str


def _models(value: Any) -> Mapping[str, str] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    return {str(name): str(name) for name in value}


def build(name: str, entry: Mapping[str, Any]) -> Upstream:
    """Make an upstream from an entry of CHATPROXY_UPSTREAMS; the global timeouts and retries
    are the defaults of its own."""
    env = str(entry.get("api_key_env") or "")
    key = str(entry.get("api_key") or "") or (os.environ.get(env, "") if env else "")
    return Upstream(
        name=name,
        base_url=str(entry["base_url"]),
        api_key=key,
        api_key_env=env,
        headers=tuple((str(k), str(v)) for k, v in dict(entry.get("headers") or {}).items()),
        timeout=float(entry.get("timeout", conf.CHATPROXY_TIMEOUT)),
        connect_timeout=float(entry.get("connect_timeout", conf.CHATPROXY_CONNECT_TIMEOUT)),
        max_retries=int(entry.get("max_retries", conf.CHATPROXY_MAX_RETRIES)),
        models=_models(entry.get("models")),
        priority=int(entry.get("priority", 0)),
        weight=float(entry.get("weight", 1.0)),
        cooldown=float(entry.get("cooldown", conf.CHATPROXY_UPSTREAM_COOLDOWN)),
    )


def configured() -> list[Upstream]:
    """Every upstream, as the settings are now."""
    entries = conf.CHATPROXY_UPSTREAMS
    if entries:
        return [build(name, entry) for name, entry in entries.items()]
    name = DEMO if conf.demo else DEFAULT
    single = {"base_url": conf.CHATPROXY_BASE_URL, "api_key": conf.CHATPROXY_API_KEY}
    return [build(name, single)]


def resolve(model: str) -> str:
    """The model a public name stands for (CHATPROXY_MODEL_ALIASES), or the name itself."""
    return conf.CHATPROXY_MODEL_ALIASES.get(model, model)


def routes(model: str) -> list[Route]:
    """The upstreams that serve ``model`` (or what its alias stands for), in the order to try
    them: by priority, then in a random order weighted by weight (Efraimidis–Spirakis keys)."""
    target = resolve(model)
    found = [Route(u, own) for u in configured() if (own := u.serves(target)) is not None]
    if len(found) < 2:
        return found
    return sorted(
        found,
        key=lambda r: (r.upstream.priority, -(random.random() ** (1.0 / r.upstream.weight))),
    )


async def skip_cooling(found: list[Route]) -> list[Route]:
    """Move the upstreams cooling down after the others: they are tried only if every other
    one fails too. One cache read, off the event loop, and none for a single upstream."""
    if len(found) < 2:
        return found
    cache = caches[conf.CHATPROXY_CACHE]
    keys = [COOLDOWN_KEY + r.upstream.name for r in found]
    cooling = await asyncio.to_thread(cache.get_many, keys)
    if not cooling:
        return found
    return sorted(found, key=lambda r: COOLDOWN_KEY + r.upstream.name in cooling)


async def cool_down(upstream: Upstream) -> None:
    """Put ``upstream`` on its cooldown, for every worker that shares the cache."""
    if upstream.cooldown <= 0:
        return
    cache = caches[conf.CHATPROXY_CACHE]
    await asyncio.to_thread(cache.set, COOLDOWN_KEY + upstream.name, 1, upstream.cooldown)
