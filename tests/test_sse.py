"""Server-sent events: the same turn as NDJSON, with ids a reconnecting EventSource resumes from."""

from __future__ import annotations

import asyncio

import httpx2
import orjson
import pytest
from asgiref.sync import sync_to_async
from django.http import HttpRequest
from django.test import RequestFactory

from chatproxy.models import ApiKey
from chatproxy.sse import Cursor, wants_sse
from tests.conftest import (
    CHROMIUM,
    CHROMIUM_ARGS,
    CSRF_TOKEN,
    CuttingProxy,
    chat,
    doc_blocks,
    parse_sse,
    read_body,
    read_events,
    read_sse,
    run_node,
    session_cookie,
    without_ids,
)
from tests.fake_upstream import Reply

db = pytest.mark.django_db(transaction=True)
HI = {"messages": [{"role": "user", "content": "Hi"}]}
SSE = {"Accept": "text/event-stream"}
SECTION = "Server-sent events"


def sent_events(stream: list[dict]) -> list[dict]:
    return [e for e in stream if "event" in e]


def text_of(stream: list[dict]) -> str:
    return "".join(e["data"]["content"] for e in stream if e.get("event") == "answering")


@db
async def test_post_with_accept_event_stream_streams_the_ndjson_events_as_sse(client, upstream):
    upstream.enqueue(Reply(tokens=["Hel", "lo", "."]))

    response = await chat(client, HI, headers=SSE)
    stream = await read_sse(response)

    assert response["Cache-Control"] == "private, no-store, no-transform"
    assert "Accept" in response["Vary"]
    assert stream[0] == {"retry": 1000}
    events = sent_events(stream)
    assert [e["event"] for e in events] == ["analyzing", *["answering"] * 3, "completed"]
    assert all(e["event"] == e["data"]["event"] for e in events)
    message_id = events[0]["data"]["message_id"]
    assert [e["id"] for e in events] == [
        f"{message_id}:0:0:0",
        f"{message_id}:3:0:0",
        f"{message_id}:5:0:0",
        f"{message_id}:6:0:0",
        f"{message_id}:end",
    ]


@db
@pytest.mark.parametrize(
    "accept", ["*/*", "application/x-ndjson", "text/event-stream, application/x-ndjson, */*"]
)
async def test_accept_any_or_ndjson_keeps_ndjson(client, upstream, accept):
    response = await chat(client, HI, headers={"Accept": accept})

    assert response["Content-Type"] == "application/x-ndjson"
    assert (await read_events(response))[-1]["event"] == "completed"


def test_wants_sse_only_when_event_stream_is_named_and_preferred():
    assert wants_sse(accepting("text/event-stream"))
    assert wants_sse(accepting("application/json, text/event-stream;q=0.9"))
    assert wants_sse(accepting("application/x-ndjson;q=0.5, text/event-stream"))
    assert wants_sse(accepting("Text/Event-Stream;q=0.9, APPLICATION/X-NDJSON;q=0.5"))
    assert not wants_sse(accepting("*/*"))
    assert not wants_sse(accepting(""))
    assert not wants_sse(accepting("text/event-stream;q=0"))
    # A client that takes both gets the native NDJSON, whatever the order.
    assert not wants_sse(accepting("text/event-stream, application/x-ndjson, */*"))
    assert not wants_sse(accepting("application/x-ndjson, text/event-stream"))
    assert not wants_sse(accepting("text/event-stream;q=0.8, application/x-ndjson;q=0.9"))


def accepting(accept: str) -> HttpRequest:
    return RequestFactory().get("/completions", headers={"accept": accept} if accept else {})


@db
async def test_pings_are_sse_comments(client, upstream, settings):
    settings.CHATPROXY_HEARTBEAT = 0.05
    upstream.enqueue(Reply(tokens=["a"], first_delay=0.3))

    stream = await read_sse(await chat(client, HI, headers=SSE))

    assert {"comment": "ping"} in stream
    assert not [e for e in sent_events(stream) if e["event"] == "ping"]


@db
async def test_resume_after_a_last_event_id_continues_after_that_event(client, upstream):
    upstream.enqueue(Reply(tokens=["One ", "two ", "three ", "four."]))
    first = sent_events(await read_sse(await chat(client, HI, headers=SSE)))
    conversation_id = first[0]["data"]["conversation_id"]

    resumed = await client.get(
        f"/completions/{conversation_id}/stream", headers={**SSE, "Last-Event-ID": first[2]["id"]}
    )
    rest = sent_events(await read_sse(resumed))

    assert text_of(first[:3]) + text_of(rest) == "One two three four."
    assert [e["event"] for e in rest] == ["answering", "completed"]
    assert rest[-1]["id"] == first[-1]["id"]


@db
async def test_resume_cuts_the_text_a_cursor_holds_part_of(client, upstream):
    upstream.enqueue(Reply(tokens=["abc", "def"]))
    first = sent_events(await read_sse(await chat(client, HI, headers=SSE)))
    ids = first[0]["data"]
    cursor = f"{ids['message_id']}:2:0:0"  # as if the deltas had been "ab", "cdef"

    resumed = await client.get(
        f"/completions/{ids['conversation_id']}/stream", headers={**SSE, "Last-Event-ID": cursor}
    )

    assert text_of(sent_events(await read_sse(resumed))) == "cdef"


@db
async def test_resume_after_the_terminal_event_answers_204(client, upstream):
    first = sent_events(await read_sse(await chat(client, HI, headers=SSE)))
    conversation_id = first[0]["data"]["conversation_id"]

    resumed = await client.get(
        f"/completions/{conversation_id}/stream", headers={**SSE, "Last-Event-ID": first[-1]["id"]}
    )

    assert resumed.status_code == 204


@db
@pytest.mark.parametrize("last_event_id", ["garbage", "0:0:0:0", "{message}-x:1:2"])
async def test_resume_with_an_unknown_last_event_id_replays_the_whole_answer(
    client, upstream, last_event_id
):
    upstream.enqueue(Reply(tokens=["abc", "def"]))
    first = sent_events(await read_sse(await chat(client, HI, headers=SSE)))
    ids = first[0]["data"]

    resumed = await client.get(
        f"/completions/{ids['conversation_id']}/stream",
        headers={**SSE, "Last-Event-ID": last_event_id.format(message=ids["message_id"])},
    )
    events = sent_events(await read_sse(resumed))

    assert events[0]["data"]["resumed"] is True
    assert text_of(events) == "abcdef"


@db
async def test_resume_with_the_cursor_of_an_earlier_answer_replays_the_latest_whole(
    client, upstream
):
    first = sent_events(await read_sse(await chat(client, HI, headers=SSE)))
    ids = first[0]["data"]
    upstream.enqueue(Reply(tokens=["new ", "answer"]))
    body = {**HI, "conversation_id": ids["conversation_id"]}
    await read_sse(await chat(client, body, headers=SSE))

    resumed = await client.get(
        f"/completions/{ids['conversation_id']}/stream",
        headers={**SSE, "Last-Event-ID": first[-2]["id"]},
    )

    assert text_of(sent_events(await read_sse(resumed))) == "new answer"


@db
async def test_reasoning_and_tool_calls_count_in_the_cursor(client, upstream):
    call = {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'}
    upstream.enqueue(Reply(tokens=["Hi"], reasoning=["Let me ", "think"], tool_calls=[call]))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    first = sent_events(await read_sse(await chat(client, {**HI, "tools": tools}, headers=SSE)))
    ids = first[0]["data"]

    assert first[-2]["event"] == "tool_call"
    assert first[-2]["id"] == f"{ids['message_id']}:2:12:1"
    # Holding the first reasoning piece: the replay sends the rest of it, the text, the call.
    resumed = await client.get(
        f"/completions/{ids['conversation_id']}/stream",
        headers={**SSE, "Last-Event-ID": first[1]["id"]},
    )
    rest = sent_events(await read_sse(resumed))

    assert [(e["event"], e["data"].get("content")) for e in rest] == [
        ("reasoning", "think"),
        ("answering", "Hi"),
        ("tool_call", None),
        ("completed", None),
    ]


def test_cursor_round_trips_through_its_id():
    cursor = Cursor("6f1c1f57-3c55-4f3b-9b6a-0c1b2b3c4d5e", 5, 3, 1)

    assert Cursor.parse(cursor.id().decode()) == cursor
    assert Cursor.parse("6f1c1f57-3c55-4f3b-9b6a-0c1b2b3c4d5e:-1:0:0") is None


@pytest.mark.server
@db
async def test_a_real_eventsource_reconnects_after_a_drop_without_loss_or_repeats(
    server, upstream, user, node_clients
):
    tokens = [f"t{i} " for i in range(12)]
    upstream.enqueue(Reply(tokens=tokens, delay=0.1))
    _, key = await sync_to_async(ApiKey.objects.issue)(user, "sse")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    proxy = CuttingProxy(server.port, marker=b"event: answering")
    port = await proxy.start()
    # The turn runs for the POST's client, which reads it to the end meanwhile.
    async with (
        httpx2.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/completions", content=orjson.dumps(HI), headers=headers) as posted,
    ):
        lines = posted.aiter_lines()
        conversation_id = orjson.loads(await anext(lines))["conversation_id"]
        reading = asyncio.ensure_future(_drain(lines))
        url = f"http://127.0.0.1:{port}/completions/{conversation_id}/stream"
        result = await run_node("sse_follow.mjs", url, key)
        await reading
    await proxy.stop()

    events = result["events"]
    # At least the cut one and the reconnect; a loaded machine may see one more reconnect,
    # each carrying the cursor of what arrived, so nothing is lost or repeated either way.
    assert proxy.connections >= 2
    assert result["sentIds"][0] is None
    assert all(sent for sent in result["sentIds"][1:])
    assert result["sentIds"][1].startswith(events[0]["data"]["message_id"])
    assert "".join(e["data"]["content"] for e in events if e["event"] == "answering") == "".join(
        tokens
    )
    assert events[-1]["event"] == "completed"
    assert [e["event"] for e in events].count("analyzing") == 1


async def _drain(lines) -> None:
    async for _ in lines:
        pass


def test_parse_sse_reads_comments_and_fields():
    body = b'retry: 1000\n\n: ping\n\nevent: answering\nid: x\ndata: {"a":1}\n\n'

    assert parse_sse(body) == [
        {"retry": 1000},
        {"comment": "ping"},
        {"event": "answering", "id": "x", "data": {"a": 1}},
    ]


@db
async def test_the_docs_transcript_is_what_a_turn_streams(client, upstream):
    upstream.enqueue(Reply(tokens=["Hel", "lo", "."]))

    body = await read_body(await chat(client, HI, headers=SSE))

    assert without_ids(body.decode()) == without_ids(doc_blocks("protocols.md", SECTION)[0])


@pytest.mark.server
@pytest.mark.browser
@db
async def test_chromiums_eventsource_follows_an_answer_across_a_dropped_connection(
    server, upstream, user
):
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's Chromium at /usr/bin/chromium: apt-get install chromium")
    from playwright.async_api import async_playwright

    tokens = [f"c{i} " for i in range(12)]
    upstream.enqueue(Reply(tokens=tokens, delay=0.1))
    cookie = await session_cookie(user)
    headers = {"Cookie": cookie, "X-CSRFToken": CSRF_TOKEN, "Content-Type": "application/json"}
    proxy = CuttingProxy(server.port, marker=b"event: answering")
    base = f"http://127.0.0.1:{await proxy.start()}"
    async with (
        async_playwright() as playwright,
        httpx2.AsyncClient(base_url=server.url, timeout=30) as http,
        http.stream("POST", "/completions", content=orjson.dumps(HI), headers=headers) as posted,
    ):
        lines = posted.aiter_lines()
        conversation_id = orjson.loads(await anext(lines))["conversation_id"]
        reading = asyncio.ensure_future(_drain(lines))
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        context = await browser.new_context()
        session = cookie.split(";")[0].split("=", 1)[1]
        await context.add_cookies([{"name": "sessionid", "value": session, "url": base}])
        page = await context.new_page()
        await page.goto(f"{base}/static/chatproxy/chat.css")  # a page of the site's origin
        events = await page.evaluate(FOLLOW, f"/completions/{conversation_id}/stream")
        await browser.close()
        await reading
    await proxy.stop()

    assert proxy.cut
    assert "".join(e["content"] for e in events if e["event"] == "answering") == "".join(tokens)
    assert [e["event"] for e in events].count("analyzing") == 1
    assert events[-1]["event"] == "completed"


# Follow a URL with the browser's own EventSource until the terminal event.
FOLLOW = """url => new Promise((resolve, reject) => {
  const events = [];
  const source = new EventSource(url);
  for (const name of ["analyzing", "answering", "completed", "error"]) {
    source.addEventListener(name, (e) => {
      if (e.data === undefined) return;  // the connection dropped: EventSource reconnects
      events.push(JSON.parse(e.data));
      if (name === "completed" || name === "error") { source.close(); resolve(events); }
    });
  }
  setTimeout(() => reject(new Error("no terminal event: " + JSON.stringify(events))), 15000);
})"""
