"""Built-in interceptors: a system prompt, streaming-safe redaction, a blocking guardrail, cost."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from . import prices
from .conf import conf
from .exceptions import ContentBlockedError
from .interception import Interceptor

if TYPE_CHECKING:
    from .turns import Turn

EMAIL = r"[A-Za-z0-9._%+-]{1,32}@[A-Za-z0-9-]{1,32}(?:\.[A-Za-z0-9-]{1,32}){0,3}\.[A-Za-z]{2,8}"
API_KEY = r"\b(?:sk|pk|rk)-[A-Za-z0-9_-]{16,64}"


class SystemPrompt(Interceptor):
    """Put a system message first: ``prompt`` from the options, else CHATPROXY_SYSTEM_PROMPT."""

    async def before_upstream(self, turn: Turn) -> None:
        prompt = self.options.get("prompt") or conf.CHATPROXY_SYSTEM_PROMPT
        if prompt:
            turn.messages.insert(0, {"role": "system", "content": prompt})


class _Window:
    """Find matches of a bounded pattern in a stream of text, releasing text only once no
    match can still cover it.

    A match is at most ``max_match`` characters long, so text more than ``max_match - 1``
    characters before the end is final. When matches never contain whitespace, everything up
    to the last whitespace is final too, which keeps the hold-back to about one word.
    """

    __slots__ = ("pattern", "hold", "whitespace_free", "buffer")

    def __init__(self, pattern: re.Pattern[str], max_match: int, whitespace_free: bool) -> None:
        self.pattern, self.hold, self.whitespace_free = pattern, max_match - 1, whitespace_free
        self.buffer = ""

    def scan(self, text: str, final: bool = False) -> list[str | re.Match[str]]:
        """Add ``text``; return the released pieces in order: plain text and final matches."""
        buffer = self.buffer + text
        safe = len(buffer) if final else len(buffer) - self.hold
        if self.whitespace_free and not final:
            last_space = max(buffer.rfind(" "), buffer.rfind("\n"), buffer.rfind("\t"))
            safe = max(safe, last_space + 1)
        pieces: list[str | re.Match[str]] = []
        position = cut = 0
        for match in self.pattern.finditer(buffer):
            if match.end() > safe:  # more text could still change this match: keep it
                safe = min(safe, match.start())
                break
            pieces += [buffer[position : match.start()], match]
            position = match.end()
        cut = max(position, safe)
        pieces.append(buffer[position:cut])
        self.buffer = buffer[cut:]
        return [p for p in pieces if p]


def _compile(patterns: Iterable[str], literals: Iterable[str], flags: int = 0) -> re.Pattern[str]:
    parts = [f"(?:{p})" for p in patterns] + [re.escape(word) for word in literals]
    return re.compile("|".join(parts), flags)


class Redact(Interceptor):
    """Replace matches of ``patterns`` (regexes) and ``literals`` with ``replacement``, even
    when a match is split across deltas: the client never receives text that completes one.

    Options: ``patterns`` (default: e-mail addresses and API-key shapes), ``literals``,
    ``replacement`` ("[redacted]"), ``max_match`` (the longest possible match, 80),
    ``whitespace_free`` (True: no match contains whitespace), and ``reasoning`` (False: True
    redacts the reasoning text too, in a window of its own).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        patterns = options.get("patterns", [EMAIL, API_KEY])
        self.replacement = str(options.get("replacement", "[redacted]"))
        pattern = _compile(patterns, options.get("literals", []))
        max_match = int(options.get("max_match", 80))
        whitespace_free = bool(options.get("whitespace_free", True))
        self.window = _Window(pattern, max_match, whitespace_free)
        self.reasoning_window = None
        if options.get("reasoning", False):
            self.reasoning_window = _Window(pattern, max_match, whitespace_free)

    def _render(self, pieces: list[str | re.Match[str]]) -> str:
        return "".join(p if isinstance(p, str) else self.replacement for p in pieces)

    async def on_delta(self, turn: Turn, text: str) -> str:
        return self._render(self.window.scan(text))

    async def flush(self, turn: Turn) -> str:
        return self._render(self.window.scan("", final=True))

    async def on_reasoning(self, turn: Turn, text: str) -> str:
        if self.reasoning_window is None:
            return text
        return self._render(self.reasoning_window.scan(text))

    async def flush_reasoning(self, turn: Turn) -> str:
        if self.reasoning_window is None:
            return ""
        return self._render(self.reasoning_window.scan("", final=True))


class _Screen:
    """Guardrail's watch over one stream of text (the answer, or the reasoning)."""

    __slots__ = ("window", "check", "hold", "seen", "pending")

    def __init__(self, words: list[str], check: Callable[[str], bool] | None, hold: int) -> None:
        self.window = None
        if words:
            pattern = _compile([rf"\b{re.escape(w)}\b" for w in words], [], re.IGNORECASE)
            self.window = _Window(
                pattern, max(map(len, words)) + 1, not any(c.isspace() for c in "".join(words))
            )
        self.check, self.hold = check, hold
        self.seen = self.pending = ""

    def screen(self, text: str, final: bool) -> str:
        if self.window is not None:
            pieces = self.window.scan(text, final)
            if any(not isinstance(p, str) for p in pieces):
                raise ContentBlockedError("The answer was stopped by the site's content policy.")
            text = "".join(p for p in pieces if isinstance(p, str))
        if self.check is not None:
            candidate = self.pending + text
            if self.check(self.seen + candidate):
                raise ContentBlockedError("The answer was stopped by the site's content policy.")
            text = candidate if final or not self.hold else candidate[: -self.hold]
            self.pending = candidate[len(text) :]
            self.seen += text
        return text


class Guardrail(Interceptor):
    """Stop the answer before a blocked word, or text a ``check`` callable rejects, reaches
    the client; the answer is saved ``blocked`` and the stream ends with ``content_blocked``.

    Options: ``words`` (matched whole, ignoring case), ``check`` (a callable or dotted path
    taking the answer so far and returning True to block), ``hold`` (characters held back
    for ``check``, 0 by default: it sees each delta before it is sent), and ``reasoning``
    (False: True screens the reasoning text too, on its own).
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        words = [str(w) for w in options.get("words", [])]
        check = options.get("check")
        self.check: Callable[[str], bool] | None = (
            import_string(check) if isinstance(check, str) else check
        )
        self.hold = int(options.get("hold", 0))
        self.answer = _Screen(words, self.check, self.hold)
        self.reasoning = None
        if options.get("reasoning", False):
            self.reasoning = _Screen(words, self.check, self.hold)

    async def on_delta(self, turn: Turn, text: str) -> str:
        return self.answer.screen(text, final=False)

    async def flush(self, turn: Turn) -> str:
        return self.answer.screen("", final=True)

    async def on_reasoning(self, turn: Turn, text: str) -> str:
        return text if self.reasoning is None else self.reasoning.screen(text, final=False)

    async def flush_reasoning(self, turn: Turn) -> str:
        return "" if self.reasoning is None else self.reasoning.screen("", final=True)


class Cost(Interceptor):
    """Price the answer from its usage: ``prices`` (or CHATPROXY_PRICES) maps a model to
    ``{"prompt": ..., "completion": ...}`` in currency units per million tokens, and optionally
    ``"cached_prompt"``: the price of the prompt tokens the upstream served from its cache
    (``usage.cached_tokens``; without the key they cost as any prompt token)."""

    async def after_response(self, turn: Turn) -> None:
        price = (self.options.get("prices") or conf.CHATPROXY_PRICES).get(turn.model)
        usage = turn.usage()  # every step of a tool loop
        if price and usage:
            turn.cost = prices.price(price, usage)
