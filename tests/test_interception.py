"""Interceptors shape every stage of a turn, on both transports."""

from __future__ import annotations

import asyncio
import logging
import re
from decimal import ROUND_HALF_UP, Decimal

import pytest
from channels.auth import AuthMiddlewareStack
from channels.testing import WebsocketCommunicator
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from chatproxy.consumers import ChatConsumer
from chatproxy.exceptions import TurnRejectedError
from chatproxy.interception import Interceptor
from chatproxy.interceptors import API_KEY, EMAIL, Redact
from chatproxy.models import Message
from chatproxy.signals import turn_finished
from tests.conftest import answer_text, chat, read_events, session_cookie
from tests.fake_upstream import Reply

HI = {"messages": [{"role": "user", "content": "Hi"}]}
db = pytest.mark.django_db(transaction=True)


class Shout(Interceptor):
    async def on_delta(self, turn, text):
        return text.upper()


class Exclaim(Interceptor):
    async def on_delta(self, turn, text):
        return text + "!"


class Record(Interceptor):
    """Write down the order hooks ran in, on the saved answer's metadata."""

    async def before_upstream(self, turn):
        turn.metadata.setdefault("calls", []).append(f"{self.options['name']}.before")

    async def after_response(self, turn):
        turn.metadata.setdefault("calls", []).append(f"{self.options['name']}.after")


class AddContext(Interceptor):
    async def before_upstream(self, turn):
        turn.emit({"event": "analyzing", "detail": "Searching the docs"})
        turn.messages.insert(-1, {"role": "user", "content": "Context: the sky is green."})
        turn.params["temperature"] = 0.1


class CiteSources(Interceptor):
    async def after_response(self, turn):
        turn.emit({"event": "sources", "items": [{"title": "Sky facts", "url": "/sky"}]})
        turn.metadata["sources"] = ["/sky"]


class RefuseWeather(Interceptor):
    async def before_upstream(self, turn):
        if "weather" in turn.messages[-1]["content"]:
            raise TurnRejectedError("I only talk about the sky's colour.", code="off_topic")


class Broken(Interceptor):
    async def on_delta(self, turn, text):
        raise ZeroDivisionError("oops")


class StopAtTen(Interceptor):
    async def on_delta(self, turn, text):
        if len(turn.state.raw_text) >= 10:
            turn.stop("length")
        return text


@db
async def test_delta_hooks_run_in_order_each_feeding_the_next(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [Shout, Exclaim]
    upstream.enqueue(Reply(tokens=["Hel", "lo"]))

    events = await read_events(await chat(client, HI))

    assert answer_text(events) == "HEL!LO!"
    answer = await Message.objects.aget(role="assistant")
    assert (answer.content, answer.raw_content) == ("HEL!LO!", "Hello")


@db
async def test_before_and_after_hooks_run_in_the_configured_order(client, settings):
    settings.CHATPROXY_INTERCEPTORS = [(Record, {"name": "a"}), (Record, {"name": "b"})]

    await read_events(await chat(client, HI))

    answer = await Message.objects.aget(role="assistant")
    assert answer.metadata == {"calls": ["a.before", "b.before", "a.after", "b.after"]}


@db
async def test_before_hook_rewrites_the_upstream_request_and_emits_progress(
    client, upstream, settings
):
    settings.CHATPROXY_INTERCEPTORS = ["chatproxy.interceptors.SystemPrompt", AddContext]
    settings.CHATPROXY_SYSTEM_PROMPT = "Be brief."

    events = await read_events(await chat(client, HI))

    assert events[1] == {"event": "analyzing", "detail": "Searching the docs"}
    sent = (await upstream.wait_for_request()).json
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Context: the sky is green."},
        {"role": "user", "content": "Hi"},
    ]
    assert sent["temperature"] == 0.1
    saved = [m.content async for m in Message.objects.filter(role="user")]
    assert saved == ["Hi"]  # context and system prompt go upstream, not into the transcript


@db
async def test_after_hook_emits_sources_before_completed_and_saves_metadata(client, settings):
    settings.CHATPROXY_INTERCEPTORS = [CiteSources]

    events = await read_events(await chat(client, HI))

    assert [e["event"] for e in events][-2:] == ["sources", "completed"]
    assert events[-2]["items"] == [{"title": "Sky facts", "url": "/sky"}]
    assert (await Message.objects.aget(role="assistant")).metadata == {"sources": ["/sky"]}


@db
async def test_rejection_before_the_call_makes_no_upstream_request(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [RefuseWeather]

    events = await read_events(
        await chat(client, {"messages": [{"role": "user", "content": "weather?"}]})
    )

    assert [e["event"] for e in events] == ["analyzing", "error"]
    assert events[-1]["error"] == {
        "code": "off_topic",
        "message": "I only talk about the sky's colour.",
    }
    assert upstream.requests == []
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code, answer.content) == ("blocked", "off_topic", "")


@db
async def test_guardrail_stops_the_stream_before_the_blocked_word_reaches_the_client(
    client, upstream, settings
):
    settings.CHATPROXY_INTERCEPTORS = [
        ("chatproxy.interceptors.Guardrail", {"words": ["forbidden"]})
    ]
    upstream.enqueue(Reply(tokens=["This is ", "forb", "idden", " text", " and more"], delay=0.01))

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "error" and events[-1]["error"]["code"] == "content_blocked"
    delivered = answer_text(events)
    assert "forb" not in delivered.lower()
    assert delivered == "This is "
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code, answer.content) == (
        "blocked",
        "content_blocked",
        delivered,
    )
    # "forbidden" is final only once the next character shows it is a whole word: the raw
    # text runs to the read that brought " text" (a loaded machine reads " and more" with it).
    assert answer.raw_content in {"This is forbidden text", "This is forbidden text and more"}
    assert await upstream.requests[0].wait_closed_by_client()


@db
async def test_guardrail_check_callable_blocks(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [
        ("chatproxy.interceptors.Guardrail", {"check": lambda text: "secret" in text, "hold": 6})
    ]
    upstream.enqueue(Reply(tokens=["the ", "sec", "ret plan"]))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "content_blocked"
    assert "sec" not in answer_text(events)


@db
async def test_interceptor_that_raises_ends_with_interceptor_failed_and_a_logged_traceback(
    client, settings, caplog
):
    settings.CHATPROXY_INTERCEPTORS = [Broken]

    with caplog.at_level(logging.ERROR, logger="chatproxy.interception"):
        events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "error"
    assert events[-1]["error"]["code"] == "interceptor_failed"
    assert "ZeroDivisionError" not in str(events)
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("failed", "interceptor_failed")


@db
async def test_stop_ends_the_answer_early_and_normally(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [StopAtTen]
    upstream.enqueue(Reply(tokens=["abcd"] * 20, delay=0.01))

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed" and events[-1]["finish_reason"] == "length"
    assert answer_text(events) == "abcd" * 3
    assert await upstream.requests[0].wait_closed_by_client()


@db
async def test_cost_is_computed_from_the_price_table_and_saved(client, settings):
    settings.CHATPROXY_PRICES = {"gpt-test": {"prompt": 2.5, "completion": 10}}

    await read_events(await chat(client, HI))

    answer = await Message.objects.aget(role="assistant")
    expected = (Decimal("2.5") * answer.prompt_tokens + 10 * answer.completion_tokens) / 10**6
    assert answer.cost == expected.quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


@db
async def test_cost_prices_cached_prompt_tokens_at_their_own_price(client, upstream, settings):
    settings.CHATPROXY_PRICES = {
        "gpt-test": {"prompt": 2, "completion": 8, "cached_prompt": 0.5},
        "other": {"prompt": 2, "completion": 8},
    }
    usage = {
        "prompt_tokens": 1000,
        "completion_tokens": 100,
        "total_tokens": 1100,
        "prompt_tokens_details": {"cached_tokens": 800},
    }
    message = {"role": "assistant", "content": "ok"}
    body = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": usage,
    }
    upstream.enqueue(Reply(body=body))

    events = await read_events(await chat(client, HI))

    assert events[-1]["usage"]["cached_tokens"] == 800
    answer = await Message.objects.aget(role="assistant")
    assert answer.cost == Decimal("0.001600")  # 200 × 2 + 800 × 0.5 + 100 × 8, per million


@db
async def test_turn_finished_signal_carries_the_saved_message(client):
    seen = []

    async def receiver(sender, message, turn, **kwargs):
        seen.append((message.status, message.content, turn.model))

    turn_finished.connect(receiver)
    try:
        events = await read_events(await chat(client, HI))
    finally:
        turn_finished.disconnect(receiver)

    assert seen == [("completed", answer_text(events), "gpt-test")]


@db
async def test_a_view_can_have_its_own_interceptors(client, upstream):
    upstream.enqueue(Reply(tokens=["quiet"]))

    events = await read_events(
        await client.post("/shouting/completions", HI, content_type="application/json")
    )

    assert answer_text(events) == "QUIET"


@db
async def test_custom_events_and_rejections_reach_the_websocket_too(user, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [AddContext, CiteSources, RefuseWeather]
    app = AuthMiddlewareStack(
        ChatConsumer.as_asgi(interceptors=[AddContext, CiteSources, RefuseWeather])
    )
    # A session authenticates only a socket with an Origin (a browser's, checked in asgi.py).
    cookie = (await session_cookie(user)).encode()
    headers = [(b"origin", b"http://testserver"), (b"cookie", cookie)]
    socket = WebsocketCommunicator(app, "/ws/chat/", headers=headers)
    await socket.connect()
    upstream.enqueue(Reply(tokens=["Green."]))

    await socket.send_json_to({"type": "chat", **HI})
    frames = [await socket.receive_json_from(timeout=5) for _ in range(5)]
    await socket.send_json_to(
        {"type": "chat", "messages": [{"role": "user", "content": "weather?"}]}
    )
    refused = [await socket.receive_json_from(timeout=5) for _ in range(3)]
    await socket.disconnect()

    assert [f["event"] for f in frames] == [
        "analyzing",
        "analyzing",
        "answering",
        "sources",
        "completed",
    ]
    assert frames[1]["detail"] == "Searching the docs"
    assert [f["event"] for f in refused] == ["analyzing", "analyzing", "error"]
    assert refused[-1]["error"]["code"] == "off_topic"


# Streaming-safe redaction, against many chunkings of the same text.

PATTERN = re.compile(f"(?:{EMAIL})|(?:{API_KEY})")
FRAGMENTS = [
    "Write to ", "jane.doe@example.com", " or ", "ops@corp.example.org", " today. ", "Key: ",
    "sk-ABCDEFGHIJKLMNOPQRSTUVWX", " is live.", "\n", "a@b.co", "no@", "x", " sk-short ", "@@ ",
]  # fmt: skip


def redact_stream(text: str, cuts: list[int]) -> list[str]:
    interceptor = Redact()
    bounds = [0, *sorted(set(c % (len(text) + 1) for c in cuts)), len(text)]
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]

    async def run() -> list[str]:
        out = [await interceptor.on_delta(None, piece) for piece in pieces]  # type: ignore[arg-type]
        return [*out, await interceptor.flush(None)]  # type: ignore[arg-type]

    return asyncio.run(run())


@hsettings(max_examples=300, deadline=None)
@given(
    parts=st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
)
def test_redaction_holds_every_split_match_back(parts, cuts):
    text = "".join(parts)

    delivered = redact_stream(text, cuts)

    expected = PATTERN.sub("[redacted]", text)
    assert "".join(delivered) == expected
    prefix = ""
    for piece in delivered:
        prefix += piece
        assert not PATTERN.search(prefix), prefix


def test_redaction_keeps_latency_to_about_a_word():
    delivered = redact_stream("one two three four", [4, 8, 14])

    assert delivered[:3] == ["one ", "two ", "three "]


@db
async def test_redaction_end_to_end_with_a_match_split_across_deltas(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = ["chatproxy.interceptors.Redact"]
    upstream.enqueue(Reply(tokens=["Mail jane", ".doe@exa", "mple.com now"]))

    events = await read_events(await chat(client, HI))

    assert answer_text(events) == "Mail [redacted] now"
    assert all("jane" not in e.get("content", "") for e in events)
    answer = await Message.objects.aget(role="assistant")
    assert (answer.content, answer.raw_content) == (
        "Mail [redacted] now",
        "Mail jane.doe@example.com now",
    )


# Reasoning and tool calls: their own hooks, and the reasoning option of Redact and Guardrail.

CALLS = [
    {"id": "call_1", "name": "delete_files", "arguments": '{"path": "/"}'},
    {"id": "call_2", "name": "now", "arguments": '{"tz": "UTC"}'},
]


class OnlySafeTools(Interceptor):
    """Drop calls to dangerous tools, pin the time zone of the others."""

    async def on_tool_call(self, turn, call):
        if call["name"] == "delete_files":
            return None
        return {**call, "arguments": '{"tz": "Europe/Paris"}'}


class RefuseAllTools(Interceptor):
    async def on_tool_call(self, turn, call):
        raise TurnRejectedError("Tools are off on this site.", code="tools_off")


class Whisper(Interceptor):
    async def on_reasoning(self, turn, text):
        return text.lower()


def tool_events(events):
    return [e for e in events if e["event"] == "tool_call"]


@db
async def test_on_tool_call_rewrites_or_drops_each_completed_call(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [OnlySafeTools]
    upstream.enqueue(Reply(tokens=[], tool_calls=CALLS))

    events = await read_events(await chat(client, HI))

    pinned = {"id": "call_2", "name": "now", "arguments": '{"tz": "Europe/Paris"}'}
    assert tool_events(events) == [{"event": "tool_call", **pinned}]
    assert events[-1]["tool_calls"] == [pinned]
    assert events[-1]["finish_reason"] == "tool_calls"


@db
async def test_on_tool_call_may_refuse_the_turn(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [RefuseAllTools]
    upstream.enqueue(Reply(tokens=["Let me check."], tool_calls=CALLS[1:]))

    events = await read_events(await chat(client, HI))

    assert tool_events(events) == []
    assert events[-1]["error"] == {"code": "tools_off", "message": "Tools are off on this site."}
    assert (await Message.objects.aget(role="assistant")).status == "blocked"


@db
async def test_on_reasoning_sees_reasoning_only_and_on_delta_text_only(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = [Whisper, Shout]
    upstream.enqueue(Reply(reasoning=["Think ", "HARD"], tokens=["ok"]))

    events = await read_events(await chat(client, HI))

    assert [e["content"] for e in events if e["event"] == "reasoning"] == ["think ", "hard"]
    assert answer_text(events) == "OK"


def reasoning_of(events):
    return "".join(e["content"] for e in events if e["event"] == "reasoning")


@db
async def test_redact_covers_reasoning_only_when_asked(client, upstream, settings):
    reply = {"reasoning": ["Mail jane", ".doe@exa", "mple.com first"], "tokens": ["Done."]}
    settings.CHATPROXY_INTERCEPTORS = ["chatproxy.interceptors.Redact"]
    upstream.enqueue(Reply(**reply))
    plain = await read_events(await chat(client, HI))
    settings.CHATPROXY_INTERCEPTORS = [("chatproxy.interceptors.Redact", {"reasoning": True})]
    upstream.enqueue(Reply(**reply))

    covered = await read_events(await chat(client, HI))

    assert reasoning_of(plain) == "Mail jane.doe@example.com first"
    assert reasoning_of(covered) == "Mail [redacted] first"
    assert all("jane" not in e.get("content", "") for e in covered)
    assert answer_text(covered) == "Done."


@db
async def test_redact_lets_held_back_reasoning_go_when_the_body_ends_in_it(
    client, upstream, settings
):
    settings.CHATPROXY_INTERCEPTORS = [("chatproxy.interceptors.Redact", {"reasoning": True})]
    upstream.enqueue(Reply(reasoning=["ask ops@corp.example.org"], tokens=[]))

    events = await read_events(await chat(client, HI))

    assert reasoning_of(events) == "ask [redacted]"
    assert events[-1]["event"] == "completed"


@db
async def test_guardrail_screens_reasoning_only_when_asked(client, upstream, settings):
    reply = {"reasoning": ["the pass", "word is hunter2"], "tokens": ["Sure."]}
    guard = "chatproxy.interceptors.Guardrail"
    settings.CHATPROXY_INTERCEPTORS = [(guard, {"words": ["hunter2"]})]
    upstream.enqueue(Reply(**reply))
    plain = await read_events(await chat(client, HI))
    settings.CHATPROXY_INTERCEPTORS = [(guard, {"words": ["hunter2"], "reasoning": True})]
    upstream.enqueue(Reply(**reply))

    covered = await read_events(await chat(client, HI))

    assert plain[-1]["event"] == "completed"
    assert covered[-1]["error"]["code"] == "content_blocked"
    assert "hunter2" not in reasoning_of(covered)
    assert answer_text(covered) == ""
