"""The offline demo model answers through the real SDK path when no API key is set."""

from __future__ import annotations

import pytest

from chatproxy.demo import PIECE, demo_answer, demo_reply
from chatproxy.models import Conversation, Message
from chatproxy.upstream import get_client
from tests.conftest import answer_text, chat, read_events

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo(settings):
    settings.CHATPROXY_API_KEY = ""
    del settings.CHATPROXY_MODELS
    del settings.CHATPROXY_DEFAULT_MODEL


async def test_demo_model_streams_a_deterministic_multi_sentence_reply(demo, client, upstream):
    messages = [{"role": "user", "content": "Hi there"}]

    events = await read_events(await chat(client, {"messages": messages}))

    assert events[0]["model"] == "chatproxy-demo"
    answering = [e for e in events if e["event"] == "answering"]
    assert len(answering) > 10
    text = answer_text(events)
    assert text == demo_reply(messages)
    assert text.count(". ") >= 2 and "Hi there" in text
    completed = events[-1]
    assert completed["event"] == "completed" and completed["finish_reason"] == "stop"
    reasoning = demo_answer({"messages": messages}).reasoning
    assert completed["usage"]["completion_tokens"] == len(answering) + len(PIECE.findall(reasoning))
    assert upstream.requests == []  # the demo never touches the network
    answer = await Message.objects.aget(role="assistant")
    assert (answer.content, answer.model, answer.status) == (text, "chatproxy-demo", "completed")


async def test_demo_model_is_named_when_it_answers_for_a_configured_model(settings, client):
    # The install guide's settings, without a key: the demo answers, and says it does.
    settings.CHATPROXY_API_KEY = ""
    settings.CHATPROXY_MODELS = ["gpt-4o-mini"]
    settings.CHATPROXY_DEFAULT_MODEL = "gpt-4o-mini"

    events = await read_events(
        await chat(client, {"messages": [{"role": "user", "content": "Hi"}]})
    )

    assert events[0]["event"] == "analyzing" and events[0]["model"] == "chatproxy-demo"
    assert events[-1]["event"] == "completed"
    answer = await Message.objects.select_related("conversation").aget(role="assistant")
    assert (answer.model, answer.conversation.model) == ("chatproxy-demo", "chatproxy-demo")


async def test_demo_model_refuses_other_models(demo, client):
    response = await chat(
        client, {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4o"}
    )

    assert response.status_code == 400
    assert b"model_not_allowed" in response.content


TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


async def sdk_stream(**request):
    """The demo model's stream as the openai SDK parses it."""
    stream = await get_client().chat.completions.create(
        model="chatproxy-demo", stream=True, stream_options={"include_usage": True}, **request
    )
    return [chunk async for chunk in stream]


async def test_demo_model_streams_reasoning_before_its_answer(demo):
    chunks = await sdk_stream(messages=[{"role": "user", "content": "Hi"}])

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join((d.model_extra or {}).get("reasoning_content", "") for d in deltas)
    text = "".join(d.content or "" for d in deltas)
    assert reasoning == "The user said something: I will greet them and say it back."
    first_text = next(i for i, d in enumerate(deltas) if d.content)
    assert all(not (d.model_extra or {}).get("reasoning_content") for d in deltas[first_text:])
    assert text == demo_reply([{"role": "user", "content": "Hi"}])
    usage = chunks[-1].usage
    assert usage.completion_tokens_details.reasoning_tokens == len(PIECE.findall(reasoning))


async def test_demo_model_calls_a_time_tool_in_the_openai_shape_when_asked_the_time(demo):
    chunks = await sdk_stream(
        messages=[{"role": "user", "content": "What time is it?"}], tools=[TIME_TOOL]
    )

    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert calls[0].id.startswith("call_demo_") and calls[0].type == "function"
    assert calls[0].function.name == "get_time" and {c.index for c in calls} == {0}
    assert "".join(c.function.arguments or "" for c in calls) == "{}"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)


async def test_demo_model_does_not_call_a_tool_it_was_not_offered_or_not_asked_for(demo):
    asked = await sdk_stream(messages=[{"role": "user", "content": "What time is it?"}])
    offered = await sdk_stream(messages=[{"role": "user", "content": "Hi"}], tools=[TIME_TOOL])

    for chunks in (asked, offered):
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


async def test_demo_model_answers_with_the_tool_result(demo):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00 in Lisbon"},
    ]
    chunks = await sdk_stream(messages=messages, tools=[TIME_TOOL])

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("The tool says: \u201c12:00 in Lisbon\u201d.")


async def test_a_demo_turn_offered_a_time_tool_ends_calling_it(demo, client):
    body = {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [TIME_TOOL]}
    events = await read_events(await chat(client, body))

    assert events[-1]["event"] == "completed" and events[-1]["finish_reason"] == "tool_calls"
    answer = await Message.objects.aget(role="assistant")
    assert answer.finish_reason == "tool_calls"


async def test_the_demo_shows_the_whole_protocol_over_two_turns(demo, client):
    body = {"messages": [{"role": "user", "content": "What time is it?"}], "tools": [TIME_TOOL]}
    first = await read_events(await chat(client, body))

    assert "reasoning" in {e["event"] for e in first}
    call = next(e for e in first if e["event"] == "tool_call")
    assert (call["name"], call["arguments"]) == ("get_time", "{}")
    assert first[-1]["tool_calls"] == [{"id": call["id"], "name": "get_time", "arguments": "{}"}]
    result = {"role": "tool", "tool_call_id": call["id"], "content": "noon"}
    second = await read_events(
        await chat(
            client,
            {
                "conversation_id": first[0]["conversation_id"],
                "messages": [result],
                "tools": [TIME_TOOL],
            },
        )
    )
    assert answer_text(second).startswith("The tool says: \u201cnoon\u201d.")


TIME_QUESTION = {"role": "user", "content": "What time is it?"}
DEMO_TOOLS = ["project.tools.current_time", "project.tools.count_my_conversations"]


async def test_the_demo_model_runs_the_demo_projects_time_tool_with_no_key(demo, client, settings):
    settings.CHATPROXY_TOOLS = DEMO_TOOLS
    events = await read_events(await chat(client, {"messages": [TIME_QUESTION]}))

    kinds = [e["event"] for e in events]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("answering")
    result = next(e for e in events if e["event"] == "tool_result")
    assert result["name"] == "current_time"
    quoted = f'"{result["result"]}"'  # the result as JSON text, as the model got it
    assert answer_text(events).startswith(f"The tool says: \u201c{quoted}\u201d.")
    assert events[-1]["finish_reason"] == "stop"


async def test_the_demo_conversation_tool_counts_only_the_asking_users_conversations(
    demo, client, settings, other_user
):
    settings.CHATPROXY_TOOLS = DEMO_TOOLS
    await Conversation.objects.acreate(owner=other_user, title="Someone else's")
    question = {"role": "user", "content": "How many conversations do I have?"}
    events = await read_events(await chat(client, {"messages": [question]}))

    result = next(e for e in events if e["event"] == "tool_result")
    assert (result["name"], result["result"]) == ("count_my_conversations", 1)
    assert answer_text(events).startswith("The tool says: \u201c1\u201d.")
