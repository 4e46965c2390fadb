"""The only module that imports ``openai``: the client factory, the stream, the error mapping.

Everything past this module sees :class:`Chunk` tuples and :class:`UpstreamError`; no other
module catches an ``openai`` exception.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any
from weakref import WeakKeyDictionary

import aiohttp
import httpx2
import openai
from openai.types.chat import ChatCompletion

from . import metrics, tracing
from .chunks import Chunk, SSEDecoder, SSEEvent, in_band_error, parse_chunk, parse_completion
from .conf import conf
from .demo import DemoTransport
from .exceptions import UpstreamError
from .relay import Relay
from .transport import RESPONSE, AiohttpTransport
from .upstreams import Route, Upstream, configured, cool_down, routes, skip_cooling

logger = logging.getLogger("chatproxy.upstream")

DEMO_BASE_URL = "http://chatproxy-demo.invalid/v1"
STREAMED: bool = True  # typed bool: post() may give back the response or a stream of it


# One client per event loop: pooled connections belong to the loop that opened them, so a
# client shared across loops (tests, management commands, WSGI) fails with "Event loop is closed".
_clients: WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[Any, ...], openai.AsyncOpenAI]]
_clients = WeakKeyDictionary()


def get_client(upstream: Upstream | None = None) -> openai.AsyncOpenAI:
    """Return the ``AsyncOpenAI`` client for the running loop and ``upstream`` (by default
    the first one configured), as the settings are now: one per upstream."""
    if upstream is None:
        upstream = configured()[0]
    demo = conf.demo
    key = (demo, *upstream.client_key)
    per_loop = _clients.setdefault(asyncio.get_running_loop(), {})
    client = per_loop.get(key)
    if client is None:
        if demo:
            http_client = httpx2.AsyncClient(transport=DemoTransport())
        else:
            http_client = httpx2.AsyncClient(
                transport=AiohttpTransport(),
                timeout=None,
                # httpx2 keeps the cookies responses set, and sends them on every later call
                # (every user's): a jar whose policy allows no domain keeps none.
                cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
            )
        client = per_loop[key] = openai.AsyncOpenAI(
            api_key=upstream.api_key or "offline-demo",
            base_url=DEMO_BASE_URL if demo else upstream.base_url,
            timeout=httpx2.Timeout(upstream.timeout, connect=upstream.connect_timeout),
            # chatproxy retries itself (_open): the SDK's own retries would honour a
            # Retry-After of up to a minute while the client waits for its first token.
            max_retries=0,
            default_headers=dict(upstream.headers) or None,
            http_client=http_client,
        )
    return client


async def close_clients() -> None:
    """Close the running loop's clients and their connections (at the end of a loop's life:
    a test, a management command; a server keeps its loop, and its clients, for good)."""
    for client in _clients.pop(asyncio.get_running_loop(), {}).values():
        await client.close()


class AnswerStream:
    """One streamed chat completion, read in batches by the task that relays it.

    The SDK builds and sends the request (auth, base URL, headers, status errors, chatproxy's
    retries) in a task of its own, so a slow start can be waited on with a timeout. The SSE
    body is read raw and parsed here, which costs a fraction of a pydantic model per chunk.
    Through chatproxy's aiohttp transport the caller's own task reads aiohttp's reader: its
    reads can be cancelled (a timeout, the client leaving) without losing data, so no task
    stands between a token and the client. Any other transport (the offline demo's) is read
    by a ``Relay`` task. ``aclose()`` closes the upstream connection, so the upstream stops
    generating and no more tokens are paid for.
    """

    __slots__ = (
        "_opening", "_response", "_reader", "_relay", "_decoder", "_error", "_ended", "_whole",
        "_heard", "_silent_after", "_deadline", "_silence", "_waking", "_reading", "_woken",
        "route",
    )  # fmt: skip

    def __init__(
        self,
        model: str,
        messages: list[dict[str, str]],
        params: dict[str, Any],
        idempotency_key: str,
    ) -> None:
        if conf.CHATPROXY_STREAM_USAGE:
            params = {**params, "stream_options": {"include_usage": True}}
        self._opening: asyncio.Future[tuple[httpx2.Response, Route]] | None = asyncio.ensure_future(
            _start(model, messages, params, idempotency_key)
        )
        self.route: Route | None = None  # the upstream that answers, once it has
        self._response: httpx2.Response | None = None
        self._reader: aiohttp.StreamReader | None = None
        self._relay: Relay[bytes] | None = None
        self._decoder = SSEDecoder()
        self._error: Exception | None = None
        self._ended = False
        self._whole: httpx2.Response | None = None
        # The timing of silences while the body is read (_read_or_wake).
        self._heard = self._silent_after = self._deadline = 0.0
        self._silence: asyncio.TimerHandle | None = None
        self._waking: asyncio.Task[Any] | None = None  # the task the timer wakes
        self._reading = self._woken = False

    async def next_batch(self, timeout: float | None = None) -> list[Chunk] | None:
        """Return the chunks that arrived since the last call; ``[]`` after ``timeout`` s of
        silence; ``None`` at the end. Raise ``UpstreamError`` (after the chunks before it),
        or the error given to ``fail()``."""
        while True:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            if self._response is None:
                if not await self._opened(timeout):
                    return []
                if self._whole is not None:  # the server answered with one JSON body
                    return [await self._read_whole(self._whole)]
            data = await self._read(timeout)
            if data is None:
                return []
            if data:
                events = self._decoder.feed(data)
            else:  # the body ended without [DONE]: the answer is what arrived
                self._ended = True
                events = self._decoder.close()
            chunks = []
            for payload in events:
                if isinstance(payload, SSEEvent):
                    if payload.type == "error":
                        self._error = in_band_error()
                        break
                    continue  # another type of event: not for an OpenAI client
                if payload == b"[DONE]":
                    self._ended = True
                    break
                try:
                    chunks.append(parse_chunk(payload))
                except UpstreamError as exc:
                    self._error = exc
                    break
            if chunks:
                return chunks
            if self._ended and self._error is None:
                return None
            # Only part of an event arrived, or [DONE], or an error: look again.

    async def _opened(self, timeout: float | None) -> bool:
        opening = self._opening
        assert opening is not None
        if not opening.done():
            await asyncio.wait({opening}, timeout=timeout)
            if self._error is not None:
                raise self._error
            if not opening.done():
                return False
        self._opening = None
        response, self.route = opening.result()
        self._response = response
        if response.headers.get("content-type", "").startswith("application/json"):
            self._whole = response  # a server that ignores stream: true
            return True
        raw: aiohttp.ClientResponse | None = response.extensions.get(RESPONSE)
        encoded = response.headers.get("content-encoding", "identity") != "identity"
        if raw is not None and not encoded:  # httpx2 decodes an encoded body
            self._reader = raw.content
            # The silences are timed here (_read_or_wake), with the heartbeat's timer: the
            # transport sets no aiohttp read timeout, which would set a timer per chunk read.
            # 0: no limit, as aiohttp's.
            self._silent_after = self.route.upstream.timeout or math.inf
            self._heard = asyncio.get_running_loop().time()
        else:
            self._relay = Relay(response.aiter_bytes())
        return True

    async def _read_whole(self, response: httpx2.Response) -> Chunk:
        """Read a ``chat.completion`` body whole, as the one chunk of the answer."""
        self._whole, self._ended = None, True
        try:
            assert self.route is not None
            async with asyncio.timeout(self.route.upstream.timeout or None):
                body = await response.aread()
        except TimeoutError:
            raise UpstreamError(SILENT, code="upstream_timeout") from None
        except httpx2.TransportError:
            raise UpstreamError(DROPPED, code="upstream_disconnected") from None
        return parse_completion(body)

    async def _read(self, timeout: float | None) -> bytes | None:
        """Return the next bytes of the body, ``b""`` at its end, None after ``timeout``."""
        if self._reader is not None:
            return await self._read_or_wake(self._reader, timeout)
        assert self._relay is not None
        try:
            pieces = await self._relay.next_batch(timeout)
        except httpx2.TimeoutException:
            raise UpstreamError(SILENT, code="upstream_timeout") from None
        except httpx2.TransportError:
            raise UpstreamError(DROPPED, code="upstream_disconnected") from None
        if pieces is None:
            return b""
        return b"".join(pieces) or None

    async def _read_or_wake(
        self, reader: aiohttp.StreamReader, timeout: float | None
    ) -> bytes | None:
        """Read as ``asyncio.timeout()`` around ``_read_any`` would, waking after ``timeout``
        s (the heartbeat) with None, or raising ``upstream_timeout`` once the upstream has said
        nothing for CHATPROXY_TIMEOUT s; but with one timer per silence rather than one per
        read (measured: ~5 µs of the event loop's CPU per read, and a read came with every
        token). A read that ends in time only moves the deadline on; the timer, when it fires
        early, sets itself again for the deadline."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        silent_at = self._heard + self._silent_after
        self._deadline = silent_at if timeout is None else min(loop.time() + timeout, silent_at)
        if self._deadline == math.inf:  # no heartbeat and no CHATPROXY_TIMEOUT: just read
            data, self._error = await _read_any(reader)
            return data
        if self._silence is not None and self._waking is not task:  # read from another task
            self._silence.cancel()
            self._silence = None
        if self._silence is None:
            self._waking = task
            self._silence = loop.call_at(self._deadline, self._on_silence)
        cancelling = task.cancelling()
        self._reading = True
        try:
            data, self._error = await _read_any(reader)
        except asyncio.CancelledError:
            # The timer's cancel, unless someone else's (the client leaving) came too.
            if self._woken:
                self._woken = False
                if task.uncancel() <= cancelling:
                    if loop.time() >= silent_at:
                        raise UpstreamError(SILENT, code="upstream_timeout") from None
                    return None
            raise
        finally:
            self._reading = False
        self._heard = loop.time()
        return data

    def _on_silence(self) -> None:
        loop = asyncio.get_running_loop()
        self._silence = None
        if not self._reading or self._waking is None:
            return  # the next read sets a timer of its own
        if loop.time() < self._deadline:
            self._silence = loop.call_at(self._deadline, self._on_silence)
        else:
            self._woken = True
            self._waking.cancel()

    def fail(self, exc: Exception) -> None:
        """End the stream early with ``exc``, which the pending or next read raises."""
        self._error = exc
        if self._opening is not None:
            self._opening.cancel()
        if self._reader is not None:
            self._reader.set_exception(exc)
        if self._relay is not None:
            self._relay.fail(exc)

    async def aclose(self) -> None:
        """Stop reading and close the upstream connection (or the request still opening)."""
        if self._silence is not None:
            self._silence.cancel()
            self._silence = None
        opening, self._opening = self._opening, None
        if opening is not None:
            if not opening.done():
                opening.cancel()
                await asyncio.wait({opening})
            if not opening.cancelled() and opening.exception() is None:
                self._response, self.route = opening.result()
        if self._relay is not None:
            await self._relay.aclose()
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()


SILENT = "The model's server went silent mid-answer. Try again."
DROPPED = "The connection to the model's server dropped mid-answer. Try again."


async def _read_any(reader: aiohttp.StreamReader) -> tuple[bytes, UpstreamError | None]:
    """Read what arrived; on a failure, also return the bytes that arrived before it."""
    try:
        return await reader.readany(), None
    except aiohttp.ClientError:
        error = UpstreamError(DROPPED, code="upstream_disconnected")
    rest = buffered_after_error(reader)
    if not rest:
        raise error
    return rest, error


def buffered_after_error(reader: aiohttp.StreamReader) -> bytes:
    """The bytes still in ``reader``'s buffer once it has an exception: the last tokens before
    a dropped connection, when they arrived together with the drop.

    The one private call of the read path, fenced here: aiohttp raises a reader's exception
    ahead of the data in its buffer from every public read (readany, read_nowait, iter_any),
    and has no public way to that data. Checked on aiohttp 3.10 to 3.14.5;
    tests/test_upstream_read.py fails loudly if it changes."""
    return reader._read_nowait(-1)


async def _start(
    model: str, messages: list[dict[str, str]], params: dict[str, Any], idempotency_key: str
) -> tuple[httpx2.Response, Route]:
    """Send the request and return the response, its body unread, and the route that gave it.

    Each upstream serving ``model`` is tried in turn (``upstreams.routes``, the ones cooling
    down last): a connection error, a timeout, a 429 or a 5xx puts it on its cooldown and
    moves on to the next. Only before the response's first byte: after it, the client may
    already have part of the answer, and an answer never switches upstream. The last
    upstream's error is the turn's."""
    found = await skip_cooling(routes(model))
    if not found:
        raise UpstreamError(
            f"No upstream serves the model {model!r}. Tell the site's administrator.",
            code="model_not_served",
        )
    for number, route in enumerate(found, 1):
        try:
            response = await _post(route, messages, params, idempotency_key)
        except openai.APIError as exc:
            error, failover = _map_error(exc), number < len(found) and _fails_over(exc)
            metrics.upstream_failed(route.upstream.name, error.code, failover=failover)
            if not failover:
                raise error from None
            await cool_down(route.upstream)
            tracing.failed_over(route.upstream.name, error.code, found[number].upstream.name)
            logger.warning(
                "Upstream %s failed (%s); failing over to %s",
                route.upstream.name, error.code, found[number].upstream.name,
            )  # fmt: skip
            continue
        return response, route
    raise AssertionError("unreachable: the last route returns or raises")


def _fails_over(exc: openai.APIError) -> bool:
    """Whether ``exc`` is worth trying another upstream for: it says nothing of the request."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code == 429 or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # APITimeoutError is one too


async def _post(
    route: Route, messages: list[dict[str, str]], params: dict[str, Any], idempotency_key: str
) -> httpx2.Response:
    """Send the request to one upstream, retrying failures before its first byte up to its
    ``max_retries`` times.

    ``idempotency_key`` is the SDK's for the request and its retries (a client configured with
    an idempotency header sends it). Given, the SDK does not make one with ``uuid4()``, whose
    ``os.urandom`` lets go of the GIL: while chatproxy's database thread runs, the event loop
    then waits for the GIL to come back (measured: 0.3–0.5 ms per call under load)."""
    upstream = route.upstream
    retries, cap = upstream.max_retries, conf.CHATPROXY_RETRY_AFTER_CAP
    client = get_client(upstream)
    body = {"model": route.model, "messages": messages, "stream": True, **params}
    attempt = 0
    while True:
        try:
            # The SDK's own public post(), as chat.completions.create() calls it (auth, base
            # URL, headers, status errors), minus its walk of the body through the parameters'
            # type hints: about 1 ms of CPU per turn, and the body is already plain validated
            # values. stream=True leaves the body unread, and with cast_to=httpx2.Response
            # the SDK hands back the response itself (this module parses the bytes).
            response = await client.post(
                "/chat/completions",
                cast_to=httpx2.Response,
                body=body,
                options={"idempotency_key": idempotency_key},
                stream=STREAMED,
                stream_cls=openai.AsyncStream[Any],
            )
            return response if isinstance(response, httpx2.Response) else response.response
        except openai.APIError as exc:
            delay = _retry_delay(exc, attempt, cap)
            if attempt == retries or delay is None:
                raise
            attempt += 1
            logger.info("Upstream %s; retry %d in %.2f s", type(exc).__name__, attempt, delay)
            await asyncio.sleep(delay)


async def complete(model: str, messages: list[dict[str, Any]], max_tokens: int) -> str:
    """One chat completion, not streamed and not retried (a side call, such as a title):
    its text; an ``UpstreamError`` when it fails."""
    try:
        completion = await get_client().chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=max_tokens,
            stream=False,
        )
    except openai.APIError as exc:
        raise _map_error(exc) from None
    if not isinstance(completion, ChatCompletion) or not completion.choices:
        return ""
    return completion.choices[0].message.content or ""


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


_UNLOGGABLE = re.compile(r"[^A-Za-z0-9._:-]")
_REQUEST_ID_LENGTH = 64


def _loggable_request_id(value: str | None) -> str:
    """Return the upstream's request id as it may be logged: only ``[A-Za-z0-9._:-]``, at most
    _REQUEST_ID_LENGTH characters, ``-`` when there is none. The upstream chooses the header,
    and a log line must not carry its control characters, forged lines or kilobytes."""
    return _UNLOGGABLE.sub("", value or "")[:_REQUEST_ID_LENGTH] or "-"


def _map_error(exc: openai.APIError) -> UpstreamError:
    # Log the upstream's request id, never its body: bodies can echo keys or internal URLs.
    request_id = _loggable_request_id(getattr(exc, "request_id", None))
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
