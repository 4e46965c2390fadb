"""The upstream module: SSE framing and chunk reading without a network, then what the client
sends to and keeps from the fake upstream, and what it logs."""

from __future__ import annotations

import logging
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatproxy.exceptions import UpstreamError
from chatproxy.upstream import AnswerStream, Chunk, SSEDecoder, parse_chunk
from tests.fake_upstream import Reply

STREAM = (
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"id":"c1","choices":[{"index":0,"delta":{"content":"Hel"}}]}\r\n\r\n'
    b'event: message\ndata: {"id":"c1","choices":[{"index":0,"delta":{"content":"lo"},'
    b'"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,'
    b'"total_tokens":3}}\n\n'
    b"data: [DONE]\n\n"
)


def decode_all(pieces: list[bytes]) -> list[bytes]:
    decoder = SSEDecoder()
    return [payload for piece in pieces for payload in decoder.feed(piece)]


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_sse_payloads_are_the_same_however_the_bytes_are_split(cuts):
    bounds = [0, *sorted(cuts), len(STREAM)]

    payloads = decode_all([STREAM[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])

    assert payloads == decode_all([STREAM])
    assert len(payloads) == 5 and payloads[-1] == b"[DONE]"


def test_multi_line_data_is_joined_with_newlines():
    assert decode_all([b"data: {\n", b"data: }\n\n"]) == [b"{\n}"]


def test_chunks_carry_text_finish_reason_and_usage():
    chunks = [parse_chunk(p) for p in decode_all([STREAM])[:-1]]

    assert chunks == [
        Chunk("", None, None, "c1"),
        Chunk("Hel", None, None, "c1"),
        Chunk("lo", "stop", None, "c1"),
        Chunk("", None, {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, "c1"),
    ]


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b'{"error": {"message": "boom"}}', "upstream_error"),
        (b"{not json", "upstream_bad_response"),
        (b"\xff\xfe", "upstream_bad_response"),
        (b"[1, 2]", "upstream_bad_response"),
        (b'{"choices": [{"delta": "text"}]}', "upstream_bad_response"),
        (b'{"choices": [], "usage": {"prompt_tokens": 1}}', "upstream_bad_response"),
    ],
)
def test_errors_and_garbage_raise_upstream_errors(payload, code):
    with pytest.raises(UpstreamError) as raised:
        parse_chunk(payload)

    assert raised.value.code == code
    assert "boom" not in raised.value.message


async def read_answer() -> list[Chunk]:
    """Stream one answer from the upstream the settings name, through the shared client."""
    stream = AnswerStream("gpt-test", [{"role": "user", "content": "Hi"}], {}, "")
    chunks: list[Chunk] = []
    try:
        while (batch := await stream.next_batch()) is not None:
            chunks += batch
    finally:
        await stream.aclose()
    return chunks


async def test_a_cookie_the_upstream_sets_is_never_sent_back(upstream, settings):
    # By name, not 127.0.0.1: cookie jars may refuse cookies from a bare IP address.
    settings.CHATPROXY_BASE_URL = f"http://localhost:{upstream.port}/v1"
    upstream.enqueue(Reply(headers={"set-cookie": "affinity=alices-session; Path=/"}), Reply())

    first, second = await read_answer(), await read_answer()

    assert first and second
    assert [r.headers.get("cookie") for r in upstream.requests] == [None, None]


@pytest.mark.parametrize(
    "request_id",
    [
        # Folded onto a second line (aiohttp joins it with a space), with terminal escapes and
        # a forged log line, 8 kB: just under aiohttp's limit for a header line.
        "req_1\r\n \x1b[2KCRITICAL root: all users deleted\x07 " + "A" * 8000,
        "B" * 10_000,  # over aiohttp's limit: the response is refused whole
    ],
    ids=["folded-escapes-8kB", "10kB"],
)
async def test_the_upstreams_request_id_is_logged_sanitized_and_bounded(
    upstream, caplog, request_id
):
    upstream.enqueue(Reply(status=500, headers={"x-request-id": request_id}))

    with caplog.at_level(logging.INFO, logger="chatproxy"), pytest.raises(UpstreamError):
        await read_answer()

    logged = [r.getMessage() for r in caplog.records if r.name.startswith("chatproxy")]
    assert logged
    for line in logged:
        found = re.fullmatch(r"Upstream error \w+ \(request id ([^)]*)\)", line)
        assert found is not None, line
        assert re.fullmatch(r"[A-Za-z0-9._:-]{1,64}", found.group(1)), line


async def test_a_plain_request_id_is_logged_as_sent(upstream, caplog):
    upstream.enqueue(Reply(status=500, headers={"x-request-id": "req_7f3a-9c:01.b"}))

    with caplog.at_level(logging.INFO, logger="chatproxy"), pytest.raises(UpstreamError):
        await read_answer()

    assert "Upstream error InternalServerError (request id req_7f3a-9c:01.b)" in caplog.messages
