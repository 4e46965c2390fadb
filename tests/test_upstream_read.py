"""The read path on public APIs: the SDK's public post(), asyncio timers, and the one fenced
private read of aiohttp, checked here so that a change in aiohttp fails loudly."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_proto import ResponseHandler

import chatproxy.upstream
from chatproxy.upstream import buffered_after_error
from tests.conftest import chat, read_events
from tests.fake_upstream import Reply

HI = {"messages": [{"role": "user", "content": "Hi"}]}
CHANGED = (
    f"aiohttp {aiohttp.__version__} changed StreamReader: check upstream.buffered_after_error "
    "(checked on aiohttp 3.10 to 3.14.5)"
)


async def test_aiohttp_raises_ahead_of_buffered_bytes_and_the_fence_still_reads_them():
    reader = aiohttp.StreamReader(ResponseHandler(asyncio.get_running_loop()), 2**16)
    reader.feed_data(b"data: last\n\n")
    reader.set_exception(aiohttp.ClientPayloadError("dropped"))

    with pytest.raises(aiohttp.ClientPayloadError):  # why the fence exists
        reader.read_nowait()
    assert buffered_after_error(reader) == b"data: last\n\n", CHANGED
    assert buffered_after_error(reader) == b"", CHANGED


def test_the_read_path_sets_no_sdk_internal_header_and_no_protocol_timer():
    source = Path(chatproxy.upstream.__file__).read_text()

    assert "X-Stainless" not in source
    assert "start_timeout" not in source and "read_timeout" not in source
    private = re.findall(r"\b(?!self\b)[a-z]\w*\._[a-z]\w*", source)
    assert private == ["reader._read_nowait"]  # the fence, and nothing else


@pytest.mark.django_db(transaction=True)
async def test_the_request_carries_no_raw_response_header(client, upstream):
    await read_events(await chat(client, HI))

    assert "x-stainless-raw-response" not in (await upstream.wait_for_request()).headers


@pytest.mark.django_db(transaction=True)
async def test_a_server_that_never_sends_its_head_ends_with_upstream_timeout(
    client, upstream, settings
):
    settings.CHATPROXY_TIMEOUT = 0.3
    settings.CHATPROXY_MAX_RETRIES = 0
    upstream.enqueue(Reply(fail="stall_head"))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert await upstream.requests[0].wait_closed_by_client()
