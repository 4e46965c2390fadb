"""What the upstream client sends to and keeps from the fake upstream, and what it logs. (The
SSE framing and chunk reading are tested without a network in test_chunks.py.)"""

from __future__ import annotations

import logging
import re

import pytest

from chatproxy.chunks import Chunk
from chatproxy.exceptions import UpstreamError
from chatproxy.upstream import AnswerStream
from tests.fake_upstream import Reply


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
