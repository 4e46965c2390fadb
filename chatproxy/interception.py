"""The interceptor API: a base class with optional async hooks, and the chain that runs them.

An interceptor is instantiated once per turn, so it may keep state across its hooks. Hooks run
in the configured order; ``on_delta`` feeds each interceptor's output to the next. An
interceptor that raises ``TurnError`` (``TurnRejectedError``, ``ContentBlockedError``) ends the
turn with its own code; any other exception ends it with ``interceptor_failed`` and is logged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from .conf import conf
from .exceptions import TurnError

if TYPE_CHECKING:  # importing this module must not need the app registry (checks use it)
    from .events import ToolCall
    from .turns import Turn

logger = logging.getLogger("chatproxy.interception")

# A dotted path or a class, alone or with the options its constructor takes.
InterceptorSpec = str | type["Interceptor"] | tuple[str | type["Interceptor"], dict[str, Any]]


class Interceptor:
    """Subclass and define any of the hooks; each is optional."""

    def __init__(self, **options: Any) -> None:
        self.options = options

    async def before_upstream(self, turn: Turn) -> None:
        """Called before the upstream call: change ``turn.messages``/``params``/``model``,
        add context, ``turn.emit()`` progress, or raise ``TurnRejectedError``."""

    async def on_delta(self, turn: Turn, text: str) -> str:
        """Called with each piece of answer text: return what the client gets ('' holds it
        back or drops it), raise ``ContentBlockedError``, or call ``turn.stop()``."""
        return text

    async def flush(self, turn: Turn) -> str:
        """Called once when the upstream is done: return any text still held back."""
        return ""

    async def on_reasoning(self, turn: Turn, text: str) -> str:
        """Called with each piece of reasoning text, as ``on_delta`` is with answer text:
        return what the client gets ('' drops it), or raise ``ContentBlockedError``."""
        return text

    async def flush_reasoning(self, turn: Turn) -> str:
        """Called once the reasoning ends (the answer or a tool call starts, or the upstream is
        done): return any reasoning still held back."""
        return ""

    async def on_tool_call(self, turn: Turn, call: ToolCall) -> ToolCall | None:
        """Called with each completed tool call (``{"id", "name", "arguments"}``): return it,
        possibly rewritten, or None to drop it; raise ``TurnRejectedError`` to refuse the turn."""
        return call

    async def after_response(self, turn: Turn) -> None:
        """Called after the answer is complete and before ``completed``: read ``turn.state``,
        ``turn.emit()`` extra events, fill ``turn.metadata`` or ``turn.cost``."""

    async def on_error(self, turn: Turn, error: TurnError) -> None:
        """Called when the turn fails (upstream error, rejection, block); cannot change it."""

    async def on_interrupt(self, turn: Turn) -> None:
        """Called when the client leaves or cancels mid-turn."""


@functools.lru_cache(maxsize=64)
def _import(path: str) -> type[Interceptor]:
    cls = import_string(path)
    if not (isinstance(cls, type) and issubclass(cls, Interceptor)):
        raise TypeError(f"{path} is not a chatproxy Interceptor subclass.")
    return cls


def build_chain(specs: Sequence[InterceptorSpec] | None = None) -> Chain:
    """Instantiate the interceptors for one turn; ``specs`` defaults to the setting."""
    interceptors = []
    for spec in conf.CHATPROXY_INTERCEPTORS if specs is None else specs:
        target, options = spec if isinstance(spec, tuple) else (spec, {})
        cls = _import(target) if isinstance(target, str) else target
        interceptors.append(cls(**options))
    return Chain(interceptors)


def _overrides(interceptor: Interceptor, name: str) -> bool:
    return getattr(type(interceptor), name) is not getattr(Interceptor, name)


class Chain:
    """Run each hook of a turn's interceptors in order, turning bugs into ``interceptor_failed``."""

    __slots__ = (
        "interceptors", "before", "deltas", "reasonings", "tool_calls", "after", "transforming",
    )  # fmt: skip

    def __init__(self, interceptors: list[Interceptor]) -> None:
        self.interceptors = interceptors
        self.before = [i for i in interceptors if _overrides(i, "before_upstream")]
        self.deltas = [
            i for i in interceptors if _overrides(i, "on_delta") or _overrides(i, "flush")
        ]
        self.reasonings = [
            i
            for i in interceptors
            if _overrides(i, "on_reasoning") or _overrides(i, "flush_reasoning")
        ]
        self.tool_calls = [i for i in interceptors if _overrides(i, "on_tool_call")]
        self.after = [i for i in interceptors if _overrides(i, "after_response")]
        self.transforming = bool(self.deltas)

    async def before_upstream(self, turn: Turn) -> None:
        for interceptor in self.before:
            await _guarded(interceptor, "before_upstream", interceptor.before_upstream(turn))

    async def on_delta(self, turn: Turn, text: str) -> str:
        for interceptor in self.deltas:
            text = await _guarded(interceptor, "on_delta", interceptor.on_delta(turn, text))
            if not text:
                return ""
        return text

    async def on_reasoning(self, turn: Turn, text: str) -> str:
        for interceptor in self.reasonings:
            text = await _guarded(interceptor, "on_reasoning", interceptor.on_reasoning(turn, text))
            if not text:
                return ""
        return text

    async def flush_reasoning(self, turn: Turn) -> str:
        """Collect held-back reasoning, as ``flush`` does the answer's."""
        text = ""
        for interceptor in self.reasonings:
            if text:
                text = await _guarded(
                    interceptor, "on_reasoning", interceptor.on_reasoning(turn, text)
                )
            text += await _guarded(
                interceptor, "flush_reasoning", interceptor.flush_reasoning(turn)
            )
        return text

    async def on_tool_call(self, turn: Turn, call: ToolCall) -> ToolCall | None:
        kept: ToolCall | None = call
        for interceptor in self.tool_calls:
            kept = await _guarded(interceptor, "on_tool_call", interceptor.on_tool_call(turn, call))
            if kept is None:
                return None
            call = kept
        return kept

    async def flush(self, turn: Turn) -> str:
        """Collect held-back text, passing each interceptor's remainder through the later ones."""
        text = ""
        for interceptor in self.deltas:
            if text:
                text = await _guarded(interceptor, "on_delta", interceptor.on_delta(turn, text))
            text += await _guarded(interceptor, "flush", interceptor.flush(turn))
        return text

    async def after_response(self, turn: Turn) -> None:
        for interceptor in self.after:
            await _guarded(interceptor, "after_response", interceptor.after_response(turn))

    async def notify(self, hook: str, turn: Turn, *args: Any) -> None:
        """Run ``on_error`` or ``on_interrupt``: failures there are logged, never raised."""
        for interceptor in self.interceptors:
            if _overrides(interceptor, hook):
                try:
                    await getattr(interceptor, hook)(turn, *args)
                except Exception:
                    logger.exception("Interceptor %s.%s failed", type(interceptor).__name__, hook)


async def _guarded(interceptor: Interceptor, hook: str, call: Awaitable[Any]) -> Any:
    try:
        return await call
    except TurnError:
        raise
    except Exception:
        logger.exception("Interceptor %s.%s failed", type(interceptor).__name__, hook)
        raise TurnError(
            "A processing step on the server failed. Try again later.",
            code="interceptor_failed",
        ) from None
