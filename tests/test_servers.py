"""Recorded streams of real servers (tests/fixtures/*.sse) replayed through the whole pipeline,
over HTTP and the WebSocket: the events a client gets and the row that is saved."""

from __future__ import annotations

import pytest

from chatproxy.models import Message, Status
from tests.conftest import (
    answer_text,
    chat,
    fixture,
    frames_until_terminal,
    open_socket,
    read_events,
    session_cookie,
)
from tests.fake_upstream import Reply

pytestmark = pytest.mark.django_db(transaction=True)

HI = {"messages": [{"role": "user", "content": "Hi"}]}


def every(step: int, data: bytes) -> list[int]:
    """Cut positions every ``step`` bytes: pieces that end inside fields, JSON and line ends."""
    return list(range(step, len(data), step))


async def http_turn(client, upstream, reply: Reply) -> list[dict]:
    upstream.enqueue(reply)
    response = await chat(client, HI)
    assert response.status_code == 200
    return await read_events(response)


async def socket_turn(user, upstream, reply: Reply) -> list[dict]:
    upstream.enqueue(reply)
    comm = await open_socket(await session_cookie(user))
    assert (await comm.connect())[0]
    try:
        await comm.send_json_to({"type": "chat", **HI})
        return await frames_until_terminal(comm)
    finally:
        await comm.disconnect()


def kinds(events: list[dict]) -> list[str]:
    return [e["event"] for e in events]


GROQ_CALL = {"id": "tk85n1k4m", "name": "weather", "arguments": "{}"}


async def test_groq_tool_call_is_one_tool_call_event_and_listed_in_completed(client, upstream):
    events = await http_turn(client, upstream, Reply(raw=fixture("groq-tool-call.sse")))

    assert kinds(events) == ["analyzing", "tool_call", "completed"]
    assert events[1] == {"event": "tool_call", **GROQ_CALL}
    assert events[-1]["finish_reason"] == "tool_calls"
    assert events[-1]["tool_calls"] == [GROQ_CALL]
    assert events[-1]["usage"] == {
        "prompt_tokens": 210,
        "completion_tokens": 15,
        "total_tokens": 225,
    }
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.finish_reason, answer.content) == ("completed", "tool_calls", "")


async def test_groq_tool_call_over_the_socket_in_awkward_pieces(user, upstream):
    raw = fixture("groq-tool-call.sse")

    frames = await socket_turn(user, upstream, Reply(raw=raw, cuts=every(7, raw)))

    assert kinds(frames) == ["analyzing", "tool_call", "completed"]
    assert frames[-1]["tool_calls"] == [GROQ_CALL]


async def test_groq_reasoning_goes_in_reasoning_events_never_in_answering(user, upstream):
    raw = fixture("groq-reasoning.sse")

    frames = await socket_turn(user, upstream, Reply(raw=raw, cuts=every(13, raw)))

    reasoning = "".join(f["content"] for f in frames if f["event"] == "reasoning")
    assert reasoning == "Okay, let me try to figure out"
    assert answer_text(frames) == " Answer**: $\\boxed{3}$"
    assert kinds(frames).index("answering") > max(
        i for i, kind in enumerate(kinds(frames)) if kind == "reasoning"
    )
    assert frames[-1]["usage"]["reasoning_tokens"] == 963
    assert "tool_calls" not in frames[-1]


async def test_azure_content_filter_chunks_are_skipped_and_usage_details_kept(client, upstream):
    events = await http_turn(client, upstream, Reply(raw=fixture("azure-content-filter.sse")))

    assert answer_text(events) == "Capital of Denmark."
    assert events[-1]["usage"] == {
        "prompt_tokens": 15,
        "completion_tokens": 78,
        "total_tokens": 93,
        "cached_tokens": 0,
        "reasoning_tokens": 64,
    }


async def test_mistral_call_without_index_and_usage_beside_the_choice(client, upstream):
    events = await http_turn(client, upstream, Reply(raw=fixture("mistral-tool-call.sse")))

    call = {"id": "gSIMJiOkT", "name": "weather", "arguments": '{"location": "San Francisco"}'}
    assert [e for e in events if e["event"] == "tool_call"] == [{"event": "tool_call", **call}]
    assert events[-1]["usage"] == {
        "prompt_tokens": 124,
        "completion_tokens": 22,
        "total_tokens": 146,
    }


async def test_gemini_call_without_index_or_id_gets_an_id_and_finish_reason_as_sent(
    client, upstream
):
    events = await http_turn(client, upstream, Reply(raw=fixture("gemini-tool-call.sse")))

    (call,) = events[-1]["tool_calls"]
    assert (call["id"], call["name"]) == ("call_0", "set_in_user_memory")
    assert call["arguments"].startswith('{"argument_2":"False"')
    assert events[-1]["finish_reason"] == "stop"


async def test_llama_cpp_reasoning_content_in_awkward_pieces(client, upstream):
    raw = fixture("llamacpp-reasoning.sse")

    events = await http_turn(client, upstream, Reply(raw=raw, cuts=every(5, raw)))

    assert [e["content"] for e in events if e["event"] == "reasoning"] == [" it", " handles", " a"]
    assert answer_text(events) == "Yes."


@pytest.mark.parametrize(
    ("name", "partial"),
    [
        ("openai-inband-error.sse", 'The question "'),
        ("openrouter-inband-error.sse", "Half"),
        ("llamacpp-error.sse", ""),
    ],
)
async def test_in_band_errors_end_in_error_and_a_failed_row(client, upstream, name, partial):
    events = await http_turn(client, upstream, Reply(raw=fixture(name)))

    assert events[-1]["event"] == "error"
    assert events[-1]["error"]["code"] == "upstream_error"
    assert answer_text(events) == partial
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.content) == (Status.FAILED, partial)


async def test_in_band_error_over_the_socket_is_the_terminal_error_frame(user, upstream):
    frames = await socket_turn(user, upstream, Reply(raw=fixture("openrouter-inband-error.sse")))

    assert kinds(frames) == ["analyzing", "answering", "error"]
    assert "Provider" not in frames[-1]["error"]["message"]


async def test_a_server_that_ignores_stream_true_is_relayed_as_one_answer(client, upstream):
    events = await http_turn(
        client, upstream, Reply(tokens=["Whole ", "answer."], ignore_stream=True)
    )

    assert kinds(events) == ["analyzing", "answering", "completed"]
    assert answer_text(events) == "Whole answer."
    assert events[-1]["finish_reason"] == "stop"
    assert events[-1]["usage"]["completion_tokens"] == 2
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.content) == ("completed", "Whole answer.")


async def test_a_whole_body_with_reasoning_and_tool_calls_over_the_socket(user, upstream):
    call = {"id": "call_9", "type": "function", "function": {"name": "now", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "reasoning": "Time?", "tool_calls": [call]}
    body = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
    }

    frames = await socket_turn(user, upstream, Reply(body=body))

    assert kinds(frames) == ["analyzing", "reasoning", "tool_call", "completed"]
    assert frames[1]["content"] == "Time?"
    assert frames[-1]["tool_calls"] == [{"id": "call_9", "name": "now", "arguments": "{}"}]


async def test_a_whole_error_body_is_an_error_and_a_failed_row(client, upstream):
    body = {"error": {"message": "upstream exploded", "type": "server_error"}}

    events = await http_turn(client, upstream, Reply(body=body))

    assert kinds(events) == ["analyzing", "error"]
    assert events[-1]["error"]["code"] == "upstream_error"
    assert "exploded" not in events[-1]["error"]["message"]
    assert (await Message.objects.aget(role="assistant")).status == Status.FAILED


async def test_ollama_parallel_calls_each_whole_in_one_chunk(user, upstream):
    frames = await socket_turn(user, upstream, Reply(raw=fixture("ollama-parallel-tool-calls.sse")))

    assert [(f["id"], f["arguments"]) for f in frames if f["event"] == "tool_call"] == [
        ("call_wteop8bt", '{"command":"ls"}'),
        ("call_rk2xye1l", '{"command":"ls -l"}'),
    ]
    assert frames[-1]["finish_reason"] == "tool_calls"


async def test_vllm_parallel_calls_under_one_index_are_told_apart_by_their_ids(client, upstream):
    events = await http_turn(client, upstream, Reply(raw=fixture("vllm-parallel-tool-calls.sse")))

    assert [(c["id"], c["name"], c["arguments"]) for c in events[-1]["tool_calls"]] == [
        ("chatcmpl-tool-c9ZCzB9b9NikK5kjPBXpFG", "func_name", "xxxxx"),
        ("chatcmpl-tool-HfzZPEVfQgvgpSJccb8Vr8", "func_name", "xxxxx"),
    ]
    assert kinds(events) == ["analyzing", "tool_call", "tool_call", "completed"]
