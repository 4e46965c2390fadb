"""A turn's life beyond the happy path: upstream failures, disconnects, and the pure state."""

from __future__ import annotations

import orjson
import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.asgi import get_asgi_application
from django.db import connection

from chatproxy.chunks import Chunk
from chatproxy.models import Message, Status
from chatproxy.turns import TurnState
from tests.conftest import (
    FAILURES,
    KEY,
    answer_text,
    chat,
    counted_queries,
    http_scope,
    read_body,
    read_events,
    session_cookie,
)
from tests.fake_upstream import Reply

HI = {"messages": [{"role": "user", "content": "Hi"}]}

db = pytest.mark.django_db(transaction=True)

# A turn's statements, however long its answer (docs/performance.md says so too): on SQLite two
# of them are its BEGIN IMMEDIATE; one is the dashboard's rollup (chatproxy.usage).
STATEMENTS_PER_TURN = {"sqlite": 9, "postgresql": 7}


def test_turn_state_assembles_text_usage_and_finish_reason():
    state = TurnState()
    fed = [
        state.feed(Chunk(response_id="r1")),
        state.feed(Chunk("Hel", response_id="r1")),
        state.feed(Chunk("lo", finish_reason="stop", response_id="r1")),
        state.feed(
            Chunk(
                usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                response_id="r1",
            )
        ),
    ]
    state.end(Status.COMPLETED)

    outcome = state.outcome()
    assert fed == ["", "Hel", "lo", ""]
    assert (outcome.content, outcome.status, outcome.finish_reason) == (
        "Hello",
        "completed",
        "stop",
    )
    assert (outcome.prompt_tokens, outcome.completion_tokens, outcome.total_tokens) == (1, 2, 3)
    assert outcome.response_id == "r1"
    assert outcome.first_token_ms is not None


def test_turn_state_refuses_a_second_ending():
    state = TurnState()
    state.end(Status.COMPLETED)

    with pytest.raises(RuntimeError, match="Expected 'streaming', but got 'completed'"):
        state.end(Status.FAILED)


async def run_failing_turn(client, upstream, reply):
    if reply is not None:
        upstream.enqueue(reply)
    response = await chat(client, HI)
    assert response.status_code == 200
    body = await read_body(response)
    events = [orjson.loads(line) for line in body.splitlines()]
    answer = await Message.objects.aget(role="assistant")
    return body, events, answer


@db
@pytest.mark.parametrize(("reply", "code", "partial"), FAILURES)
async def test_upstream_failure_ends_with_error_event_and_failed_row(
    client, upstream, reply, code, partial
):
    body, events, answer = await run_failing_turn(client, upstream, reply)

    assert [e["event"] for e in events] == ["analyzing"] + ["answering"] * len(partial) + ["error"]
    assert events[-1]["error"]["code"] == code
    assert events[-1]["message_id"] == str(answer.pk)
    assert answer_text(events) == partial
    assert (answer.status, answer.error_code, answer.content) == ("failed", code, partial)
    # Nothing of the upstream's error body, the API key or a traceback reaches the client.
    assert b"upstream exploded" not in body and KEY.encode() not in body
    assert b"Traceback" not in body


@db
async def test_stalled_upstream_ends_with_upstream_timeout(client, upstream, settings):
    settings.CHATPROXY_TIMEOUT = 0.3
    body, events, answer = await run_failing_turn(
        client, upstream, Reply(tokens=["a", "b"], fail="stall", fail_after=1)
    )

    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert (answer.status, answer.content) == ("failed", "a")
    assert await upstream.requests[0].wait_closed_by_client()


@db
async def test_unreachable_upstream_ends_with_upstream_unreachable(client, settings):
    settings.CHATPROXY_BASE_URL = "http://127.0.0.1:9/v1"  # discard port: nothing listens

    body, events, answer = await run_failing_turn(client, None, None)

    assert events[-1]["error"]["code"] == "upstream_unreachable"
    assert answer.status == "failed"


@db
async def test_stalled_upstream_times_out_with_the_heartbeat_off(client, upstream, settings):
    settings.CHATPROXY_HEARTBEAT = 0
    settings.CHATPROXY_TIMEOUT = 0.3
    body, events, answer = await run_failing_turn(
        client, upstream, Reply(tokens=["a", "b"], fail="stall", fail_after=1)
    )

    assert [e["event"] for e in events] == ["analyzing", "answering", "error"]
    assert events[-1]["error"]["code"] == "upstream_timeout"
    assert (answer.status, answer.content) == ("failed", "a")


@db
async def test_timeout_counts_silence_not_the_whole_answer(client, upstream, settings):
    settings.CHATPROXY_HEARTBEAT = 0.05
    settings.CHATPROXY_TIMEOUT = 0.5
    tokens = [f"t{i} " for i in range(8)]
    upstream.enqueue(Reply(tokens=tokens, delay=0.1))  # 0.8 s in all, never 0.5 s silent

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed"
    assert answer_text(events) == "".join(tokens)


@db
async def test_zero_timeout_puts_no_limit_on_silence(client, upstream, settings):
    settings.CHATPROXY_HEARTBEAT = 0.05
    settings.CHATPROXY_TIMEOUT = 0
    upstream.enqueue(Reply(tokens=["late"], first_delay=0.3))

    events = await read_events(await chat(client, HI))

    assert [e["event"] for e in events][-2:] == ["answering", "completed"]
    assert answer_text(events) == "late"


@db
async def test_heartbeat_pings_while_the_upstream_is_silent(client, upstream, settings):
    settings.CHATPROXY_HEARTBEAT = 0.05
    upstream.enqueue(Reply(tokens=["late"], first_delay=0.4))

    events = await read_events(await chat(client, HI))

    kinds = [e["event"] for e in events]
    assert kinds[0] == "analyzing" and kinds[-2:] == ["answering", "completed"]
    assert kinds.count("ping") >= 2
    assert answer_text(events) == "late"


@db
async def test_heartbeat_pings_while_the_upstream_is_slow_to_answer_at_all(
    client, upstream, settings
):
    settings.CHATPROXY_HEARTBEAT = 0.05
    settings.CHATPROXY_MAX_RETRIES = 1
    upstream.enqueue(Reply(status=503, headers={"retry-after-ms": "400"}), Reply(tokens=["ok"]))

    events = await read_events(await chat(client, HI))

    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["analyzing", "ping", "ping"]  # while the retry waits
    assert kinds[-2:] == ["answering", "completed"]
    assert answer_text(events) == "ok"
    assert len(upstream.requests) == 2


@db
async def test_coalescing_joins_deltas_already_waiting(client, upstream, settings):
    settings.CHATPROXY_COALESCE_DELTAS = True
    upstream.enqueue(Reply(tokens=[f"t{i} " for i in range(50)]))

    events = await read_events(await chat(client, HI))

    assert answer_text(events) == "".join(f"t{i} " for i in range(50))
    assert events[-1]["event"] == "completed"
    answer = await Message.objects.aget(role="assistant")
    assert answer.content == answer_text(events)


@db
async def test_partial_answer_saved_when_client_disconnects(user, upstream):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(200)], delay=0.02))
    app = ApplicationCommunicator(
        get_asgi_application(), http_scope("/completions", cookies=await session_cookie(user))
    )
    await app.send_input(
        {"type": "http.request", "body": b'{"messages":[{"role":"user","content":"Hi"}]}'}
    )
    start = await app.receive_output(5)
    assert start["status"] == 200
    received = b""
    while received.count(b'"answering"') < 3:
        received += (await app.receive_output(5))["body"]

    await app.send_input({"type": "http.disconnect"})
    await app.wait(5)

    assert await upstream.requests[0].wait_closed_by_client()
    answer = await Message.objects.aget(role="assistant")
    assert answer.status == "interrupted"
    assert answer.error_code == "client_disconnected"
    delivered = "".join(
        orjson.loads(line)["content"] for line in received.splitlines() if b'"answering"' in line
    )
    assert answer.content.startswith(delivered) and len(answer.content) >= len(delivered)
    assert len(answer.content) < len("".join(f"w{i} " for i in range(200)))


@db
async def test_database_work_per_turn_does_not_grow_with_the_answer(client, upstream):
    await read_body(await chat(client, HI))  # warm up: sessions, connections
    counts = []
    for tokens in (5, 500):
        upstream.enqueue(Reply(tokens=["tok "] * tokens))
        with counted_queries() as statements:
            events = await read_events(await chat(client, HI))
        assert answer_text(events) == "tok " * tokens
        counts.append(len(statements))

    assert counts[0] == counts[1]
    assert counts[0] == STATEMENTS_PER_TURN[connection.vendor]


@db
async def test_a_keyed_turn_looks_its_idempotency_key_up_once(client, upstream):
    await read_body(await chat(client, HI))  # warm up: sessions, connections
    with counted_queries() as statements:
        events = await read_events(await chat(client, HI, headers={"Idempotency-Key": "k-1"}))

    assert events[-1]["event"] == "completed"
    lookups = [s for s in statements if s.lstrip().startswith("SELECT") and "idempotency" in s]
    assert len(lookups) == 1, lookups
