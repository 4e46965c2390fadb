"""The only module that imports ``openai``: the client factory, the stream, the error mapping.

Everything past this module sees :class:`Chunk` tuples and :class:`UpstreamError`; no other
module catches an ``openai`` exception.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

import httpx2
import openai
import orjson

from .conf import conf
from .demo import DemoTransport
from .events import Usage
from .exceptions import UpstreamError
from .transport import AiohttpTransport

logger = logging.getLogger("chatproxy.upstream")

DEMO_BASE_URL = "http://chatproxy-demo.invalid/v1"
RAW_STREAM = {"X-Stainless-Raw-Response": "stream"}


class Chunk(NamedTuple):
    """What chatproxy needs from one upstream chunk."""

    content: str
    finish_reason: str | None
    usage: Usage | None
    response_id: str


# One client per event loop: pooled connections belong to the loop that opened them, so a
# client shared across loops (tests, management commands, WSGI) fails with "Event loop is closed".
_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], openai.AsyncOpenAI]]
_clients = WeakKeyDictionary()


def get_client() -> openai.AsyncOpenAI:
    """Return the ``AsyncOpenAI`` client for the running loop and the current settings."""
    demo = conf.demo
    key = (
        demo,
        conf.CHATPROXY_BASE_URL,
        conf.CHATPROXY_API_KEY,
        conf.CHATPROXY_TIMEOUT,
        conf.CHATPROXY_CONNECT_TIMEOUT,
    )
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(key)
    if client is None:
        _, base_url, api_key, read, connect = key
        if demo:
            http_client = httpx2.AsyncClient(transport=DemoTransport())
        else:
            http_client = httpx2.AsyncClient(transport=AiohttpTransport(), timeout=None)
        client = per_loop[key] = openai.AsyncOpenAI(
            api_key=api_key or "offline-demo",
            base_url=DEMO_BASE_URL if demo else base_url,
            timeout=httpx2.Timeout(read, connect=connect),
            # chatproxy retries itself (_open): the SDK's own retries would honour a
            # Retry-After of up to a minute while the client waits for its first token.
            max_retries=0,
            http_client=http_client,
        )
    return client


async def close_clients() -> None:
    """Close the running loop's clients and their connections (at the end of a loop's life:
    a test, a management command; a server keeps its loop, and its clients, for good)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


async def stream_chat(
    model: str, messages: list[dict[str, str]], params: dict[str, Any]
) -> AsyncIterator[Chunk]:
    """Yield the chunks of one streamed chat completion; raise ``UpstreamError`` on failure.

    The SDK builds and sends the request (auth, base URL, headers, status errors); the SSE body
    is read raw and parsed here, which costs a fraction of building a pydantic model per chunk.
    Closing this generator (or cancelling the task iterating it) closes the upstream
    connection, so the upstream stops generating and no more tokens are paid for.
    """
    if conf.CHATPROXY_STREAM_USAGE:
        params = {**params, "stream_options": {"include_usage": True}}
    async with _open(model, messages, params) as response:
        decoder = SSEDecoder()
        try:
            async for data in response.aiter_bytes():
                for payload in decoder.feed(data):
                    if payload == b"[DONE]":
                        return
                    yield parse_chunk(payload)
        except httpx2.TimeoutException:
            raise UpstreamError(
                "The model's server went silent mid-answer. Try again.", code="upstream_timeout"
            ) from None
        except httpx2.TransportError:
            raise UpstreamError(
                "The connection to the model's server dropped mid-answer. Try again.",
                code="upstream_disconnected",
            ) from None


class SSEDecoder:
    """Split a server-sent-events byte stream into the payloads of its ``data:`` fields."""

    __slots__ = ("_buffer", "_data")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes; return the payload of every event they complete."""
        *lines, self._buffer = (self._buffer + data).split(b"\n")
        payloads = []
        for line in lines:
            line = line.removesuffix(b"\r")
            if not line:  # a blank line ends the event
                if self._data:
                    payloads.append(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            # Comments (":") and the other fields (event, id, retry) carry nothing we use.
        return payloads


def parse_chunk(payload: bytes) -> Chunk:
    """Read one ``chat.completion.chunk``; raise ``UpstreamError`` for an error or garbage."""
    try:
        chunk = orjson.loads(payload)
        if "error" in chunk:
            logger.warning("Upstream reported an error inside the stream")
            raise UpstreamError(
                "The model's server failed while answering. Try again.", code="upstream_error"
            )
        usage = chunk.get("usage")
        choices = chunk.get("choices")
        if choices:
            choice = choices[0]
            content = (choice.get("delta") or {}).get("content") or ""
            return Chunk(content, choice.get("finish_reason"), None, chunk.get("id") or "")
        if usage:
            return Chunk(
                "",
                None,
                {
                    "prompt_tokens": int(usage["prompt_tokens"]),
                    "completion_tokens": int(usage["completion_tokens"]),
                    "total_tokens": int(usage["total_tokens"]),
                },
                chunk.get("id") or "",
            )
        return Chunk("", None, None, chunk.get("id") or "")
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        logger.warning("Upstream sent an unreadable chunk")
        raise UpstreamError(
            "The model's server sent a response chatproxy could not read.",
            code="upstream_bad_response",
        ) from None


@asynccontextmanager
async def _open(
    model: str, messages: list[dict[str, str]], params: dict[str, Any]
) -> AsyncIterator[httpx2.Response]:
    """Start the stream, retrying failures before its first byte (never after: the client may
    already have part of the answer) up to CHATPROXY_MAX_RETRIES times."""
    retries, cap = conf.CHATPROXY_MAX_RETRIES, conf.CHATPROXY_RETRY_AFTER_CAP
    client = get_client()
    body = {"model": model, "messages": messages, "stream": True, **params}
    for attempt in range(retries + 1):
        try:
            # The SDK's own post(), as chat.completions.create() calls it (auth, base URL,
            # headers, status errors), minus its walk of the body through the parameters' type
            # hints: about 1 ms of CPU per turn, and the body is already plain validated
            # values. The header is the one with_streaming_response sets: leave the body
            # unread, so it streams.
            response = await client.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                options={"headers": RAW_STREAM},
            )
        except openai.APIError as exc:
            delay = _retry_delay(exc, attempt, cap)
            if attempt == retries or delay is None:
                raise _map_error(exc) from None
            logger.info("Upstream %s; retry %d in %.2f s", type(exc).__name__, attempt + 1, delay)
            await asyncio.sleep(delay)
            continue
        try:
            yield response
        finally:
            await response.aclose()
        return


def _retry_delay(exc: openai.APIError, attempt: int, cap: float) -> float | None:
    """Return how long to wait before retrying ``exc``, or None if it is not worth retrying."""
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code not in (408, 409, 429) and exc.status_code < 500:
            return None
        headers = exc.response.headers
        for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
            try:
                wait = float(headers[name]) * scale
                return float(min(max(wait, 0.0), cap))
            except (KeyError, ValueError):
                continue
    elif not isinstance(exc, openai.APIConnectionError):
        return None
    return min(0.5 * 2.0**attempt, cap)


def _map_error(exc: openai.APIError) -> UpstreamError:
    # Log the upstream's request id, never its body: bodies can echo keys or internal URLs.
    request_id = getattr(exc, "request_id", None)
    logger.warning("Upstream error %s (request id %s)", type(exc).__name__, request_id)
    if isinstance(exc, openai.APITimeoutError):
        return UpstreamError(
            "The model's server did not answer in time. Try again.", code="upstream_timeout"
        )
    if isinstance(exc, openai.APIConnectionError):
        return UpstreamError(
            "The model's server could not be reached. Try again later.",
            code="upstream_unreachable",
        )
    if isinstance(exc, openai.RateLimitError):
        return UpstreamError(
            "The model's server is rate-limiting requests. Wait a moment and try again.",
            code="upstream_rate_limited",
        )
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return UpstreamError(
            "The model's server refused this site's credentials. Tell the site's administrator.",
            code="upstream_auth_failed",
        )
    if isinstance(exc, openai.APIStatusError) and exc.status_code < 500:
        return UpstreamError(
            f"The model's server refused the request (HTTP {exc.status_code}). "
            "Shorten the conversation or change the parameters and try again.",
            code="upstream_rejected",
        )
    return UpstreamError(
        "The model's server failed while answering. Try again.", code="upstream_error"
    )
