"""The Vercel AI SDK's UI message stream, read by the real ``ai`` package (and parsed here)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from chatproxy.interception import Interceptor
from chatproxy.models import ApiKey, Conversation, Message
from chatproxy.uistream import conversation_for
from tests.conftest import doc_blocks, read_body, run_node, shared_database_name, without_ids
from tests.fake_upstream import Reply
from tests.server import ServerProcess
from tests.test_live_server import settled

pytestmark = pytest.mark.django_db(transaction=True)
LOOKUP = {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'}
LOOKUP_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}


def ui_user(text: str, id_: str = "u1") -> dict[str, Any]:
    return {"id": id_, "role": "user", "parts": [{"type": "text", "text": text}]}


async def post_chat(client: AsyncClient, body: Any, **headers: str) -> Any:
    return await client.post("/ui/chat", orjson.dumps(body), "application/json", headers=headers)


async def read_parts(response: Any) -> list[Any]:
    assert response["Content-Type"] == "text/event-stream"
    assert response["x-vercel-ai-ui-message-stream"] == "v1"
    body = (await read_body(response)).decode()
    data = [block[len("data: ") :] for block in body.split("\n\n") if block.startswith("data: ")]
    return [d if d == "[DONE]" else orjson.loads(d) for d in data]


def types(parts: list[Any]) -> list[str]:
    return [p if isinstance(p, str) else p["type"] for p in parts]


@pytest.fixture
async def key(user) -> str:
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "ui")
    return raw


async def test_a_turn_streams_start_text_parts_and_finish(client, upstream, user):
    upstream.enqueue(Reply(tokens=["Hel", "lo"]))

    parts = await read_parts(await post_chat(client, {"id": "chat-1", "messages": [ui_user("Hi")]}))

    assert types(parts) == [
        "start", "start-step", "text-start", "text-delta", "text-delta", "text-end",
        "finish-step", "finish", "[DONE]",
    ]  # fmt: skip
    conversation_id = str(conversation_for(f"user:{user.pk}", "chat-1"))
    answer = await Message.objects.aget(conversation_id=conversation_id, role="assistant")
    assert parts[0] == {
        "type": "start",
        "messageId": str(answer.pk),
        "messageMetadata": {"conversationId": conversation_id, "model": "gpt-test"},
    }
    assert "".join(p["delta"] for p in parts[:-1] if p["type"] == "text-delta") == "Hello"
    assert parts[-2]["finishReason"] == "stop"
    assert answer.content == "Hello"


async def test_the_same_chat_id_continues_the_users_conversation(client, upstream, user):
    await read_parts(await post_chat(client, {"id": "chat-1", "messages": [ui_user("Hi")]}))
    said = {"id": "a1", "role": "assistant", "parts": [{"type": "text", "text": "Echo: Hi"}]}

    await read_parts(
        await post_chat(
            client, {"id": "chat-1", "messages": [ui_user("Hi"), said, ui_user("More", "u2")]}
        )
    )

    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Echo: Hi"},
        {"role": "user", "content": "More"},
    ]
    assert await Conversation.objects.filter(owner=user).acount() == 1


async def test_two_users_with_the_same_chat_id_have_two_conversations(client, other_user, upstream):
    other = AsyncClient()
    await other.aforce_login(other_user)
    body = {"id": "chat-1", "messages": [ui_user("Hi")]}

    await read_parts(await post_chat(client, body))
    await read_parts(await post_chat(other, body))

    assert await Conversation.objects.acount() == 2
    assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "Hi"}]


async def test_reasoning_and_client_tool_calls_become_their_parts(client, upstream):
    upstream.enqueue(Reply(tokens=["Let me see."], reasoning=["Thinking"], tool_calls=[LOOKUP]))

    body = {"id": "c", "messages": [ui_user("Hi")], "tools": [LOOKUP_TOOL]}
    parts = await read_parts(await post_chat(client, body))

    assert types(parts)[:8] == [
        "start", "start-step", "reasoning-start", "reasoning-delta", "reasoning-end",
        "text-start", "text-delta", "text-end",
    ]  # fmt: skip
    call = next(p for p in parts if p["type"] == "tool-input-available")
    assert call == {
        "type": "tool-input-available",
        "toolCallId": "call_1",
        "toolName": "lookup",
        "input": {"q": "x"},
    }
    assert parts[-2]["finishReason"] == "tool-calls"


async def test_server_tools_are_provider_executed_with_their_output(client, upstream, settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.add"]
    add = {"id": "call_9", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    upstream.enqueue(Reply(tokens=[], tool_calls=[add]), Reply(tokens=["5."]))

    parts = await read_parts(await post_chat(client, {"id": "c", "messages": [ui_user("Add")]}))

    assert types(parts) == [
        "start", "start-step", "tool-input-available", "tool-output-available", "finish-step",
        "start-step", "text-start", "text-delta", "text-end", "finish-step", "finish", "[DONE]",
    ]  # fmt: skip
    assert parts[2]["providerExecuted"] is True
    assert parts[3] == {
        "type": "tool-output-available",
        "toolCallId": "call_9",
        "output": 5,
        "providerExecuted": True,
    }


async def test_an_upstream_failure_is_an_error_part(client, upstream):
    upstream.enqueue(Reply(status=500))

    parts = await read_parts(await post_chat(client, {"id": "c", "messages": [ui_user("Hi")]}))

    assert types(parts) == ["start", "error", "[DONE]"]
    assert "upstream exploded" not in parts[1]["errorText"]


async def test_an_interceptors_event_is_a_data_part(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = ["tests.test_uistream.Sources"]

    parts = await read_parts(await post_chat(client, {"id": "c", "messages": [ui_user("Hi")]}))

    assert {"type": "data-sources", "data": {"event": "sources", "items": [1]}} in parts


class Sources(Interceptor):
    async def before_upstream(self, turn: Any) -> None:
        turn.emit({"event": "sources", "items": [1]})


async def test_cancel_stops_the_answer_with_an_abort_part(client, upstream):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(200)], delay=0.02))
    response = await post_chat(client, {"id": "c", "messages": [ui_user("Hi")]})
    stream = aiter(response.streaming_content)
    while b"text-delta" not in await anext(stream):
        pass

    cancelled = await client.post("/ui/chat/c/cancel")
    rest = b"".join([chunk async for chunk in stream])

    assert cancelled.status_code == 202
    assert b'"type":"abort"' in rest
    assert rest.endswith(b"data: [DONE]\n\n")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": [ui_user("Hi")]}, "invalid_request"),
        ({"id": "c" * 101, "messages": [ui_user("Hi")]}, "invalid_request"),
        ({"id": "c", "messages": "Hi"}, "invalid_messages"),
        (
            {"id": "c", "messages": [ui_user("Hi")], "trigger": "regenerate-message"},
            "invalid_request",
        ),
        ({"id": "c", "messages": [ui_user("Hi")], "model": "gpt-nope"}, "model_not_allowed"),
        ({"id": "c", "messages": [{"id": "u", "role": "user"}]}, "invalid_messages"),
    ],
)
async def test_bad_requests_are_4xx_json_that_say_what_to_fix(client, body, code):
    response = await post_chat(client, body)

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"]["code"] == code
    assert await Conversation.objects.acount() == 0


async def test_a_refused_turn_leaves_no_empty_conversation(client, settings):
    settings.CHATPROXY_RATE_LIMIT = (1, 60)
    await read_parts(await post_chat(client, {"id": "a", "messages": [ui_user("Hi")]}))

    refused = await post_chat(client, {"id": "b", "messages": [ui_user("Hi")]})

    assert refused.status_code == 429
    assert await Conversation.objects.acount() == 1


async def test_anonymous_visitors_are_refused_even_with_anonymous_chat_on(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True

    response = await post_chat(AsyncClient(), {"id": "c", "messages": [ui_user("Hi")]})

    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "authentication_required"


async def test_resume_without_a_streaming_answer_is_204(client, upstream):
    await read_parts(await post_chat(client, {"id": "c", "messages": [ui_user("Hi")]}))

    assert (await client.get("/ui/chat/c/stream")).status_code == 204
    assert (await client.get("/ui/chat/unknown/stream")).status_code == 204


async def test_a_session_needs_the_csrf_token(user):
    strict = AsyncClient(enforce_csrf_checks=True)
    await strict.aforce_login(user)

    response = await post_chat(strict, {"id": "c", "messages": [ui_user("Hi")]})

    assert response.status_code == 403


# The real `ai` package as the client, against the project under uvicorn.


@pytest.mark.server
async def test_the_ai_sdk_reads_a_chat_and_continues_it(server, upstream, key, node_clients):
    upstream.enqueue(Reply(tokens=["Hel", "lo."]), Reply(tokens=["Again."]))

    result = await run_node("ui_chat.mjs", server.url, key, "chat", "chat-sdk")

    first = result["first"]
    assert first["errors"] == []
    assert [p for p in first["message"]["parts"] if p["type"] == "text"] == [
        {"type": "text", "text": "Hello.", "state": "done"}
    ]
    assert first["message"]["metadata"]["conversationId"]
    assert result["second"]["message"]["parts"][-1]["text"] == "Again."
    assert upstream.requests[-1].json["messages"][-1] == {"role": "user", "content": "More"}


@pytest.mark.server
async def test_the_ai_sdk_answers_a_client_tool_and_the_turn_goes_on(
    server, upstream, key, node_clients
):
    upstream.enqueue(Reply(tokens=[], tool_calls=[LOOKUP]), Reply(tokens=["Found 1."]))

    result = await run_node("ui_chat.mjs", server.url, key, "client-tool", "chat-tool")

    asked = result["asked"]["message"]
    tool = next(p for p in asked["parts"] if p["type"] == "tool-lookup")
    assert (tool["state"], tool["input"]) == ("input-available", {"q": "x"})
    assert upstream.requests[0].json["tools"] == [LOOKUP_TOOL]
    assert upstream.requests[-1].json["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": '{"found":1}',
    }
    answered = result["answered"]
    assert answered["errors"] == []
    # The answer went on the same message, as useChat shows it: the call, its output, the text.
    assert answered["message"]["id"] == asked["id"]
    tool = next(p for p in answered["message"]["parts"] if p["type"] == "tool-lookup")
    assert (tool["state"], tool["output"]) == ("output-available", {"found": 1})
    assert answered["message"]["parts"][-1]["text"] == "Found 1."


@pytest.fixture(scope="module")
def tools_server(django_db_blocker: Any, upstream_server: Any):
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {"CHATPROXY_TOOLS": ["tests.sample_tools.add", "tests.sample_tools.refund"]},
    )
    process.start()
    yield process
    process.stop()


@pytest.mark.server
async def test_the_ai_sdk_shows_a_server_tools_output(tools_server, upstream, key, node_clients):
    add = {"id": "call_9", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    upstream.enqueue(Reply(tokens=[], tool_calls=[add]), Reply(tokens=["5."]))

    result = await run_node("ui_chat.mjs", tools_server.url, key, "server-tool", "chat-add")

    parts = result["result"]["message"]["parts"]
    tool = next(p for p in parts if p["type"] == "tool-add")
    assert (tool["state"], tool["output"], tool["providerExecuted"]) == (
        "output-available",
        5,
        True,
    )
    assert parts[-1]["text"] == "5."


@pytest.mark.server
async def test_the_ai_sdk_asks_for_approval_and_its_answer_runs_the_tool(
    tools_server, upstream, key, node_clients
):
    refund = {"id": "r", "name": "refund", "arguments": '{"amount": 5}'}
    upstream.enqueue(Reply(tokens=["One moment."], tool_calls=[refund]), Reply(tokens=["Done."]))

    result = await run_node("ui_chat.mjs", tools_server.url, key, "approval", "chat-refund")

    asked = next(p for p in result["asked"]["message"]["parts"] if p["type"] == "tool-refund")
    assert (asked["state"], asked["approval"]) == ("approval-requested", {"id": "r"})
    assert "tool-approval-request" in result["asked"]["types"]
    assert result["approved"]["errors"] == []
    parts = result["approved"]["message"]["parts"]
    done = next(p for p in parts if p["type"] == "tool-refund")
    assert (done["state"], done["output"]) == ("output-available", "Refunded 5.")
    assert parts[-1]["text"] == "Done."


@pytest.mark.server
async def test_the_ai_sdk_reconnects_to_an_answer_while_it_streams(
    server, upstream, key, node_clients
):
    tokens = [f"t{i} " for i in range(10)]
    upstream.enqueue(Reply(tokens=tokens, delay=0.05))

    result = await run_node("ui_chat.mjs", server.url, key, "resume", "chat-resume")

    resumed = result["resumed"]
    assert resumed["errors"] == []
    assert resumed["types"][0] == "start" and resumed["types"][-1] == "finish"
    assert [p["text"] for p in resumed["message"]["parts"] if p["type"] == "text"] == [
        "".join(tokens)
    ]
    assert result["after"] is None  # 204: nothing streams any more


@pytest.mark.server
async def test_the_ai_sdks_stop_saves_the_answer_interrupted(
    server, upstream, key, node_clients, user
):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(100)], delay=0.02))

    result = await run_node("ui_chat.mjs", server.url, key, "stop", "chat-stop")

    # Aborted at the second delta; a loaded machine may have read one or two more with it.
    assert 2 <= result["deltas"] < 10
    assert any("abort" in error.lower() for error in result["errors"]), result["errors"]
    conversation_id = conversation_for(f"user:{user.pk}", "chat-stop")
    answer = await Message.objects.aget(conversation_id=conversation_id, role="assistant")
    assert await upstream.requests[-1].wait_closed_by_client()
    answer = await settled(str(answer.pk))
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert "w99 " not in answer.content


@pytest.mark.server
async def test_the_ai_sdk_gets_an_error_part_as_its_error(server, upstream, key, node_clients):
    upstream.enqueue(Reply(status=500))

    result = await run_node("ui_chat.mjs", server.url, key, "error", "chat-error")

    assert result["result"]["types"] == ["start", "error"]
    assert result["result"]["errors"] != []


@pytest.mark.server
async def test_the_ai_sdk_raises_a_refusal_with_chatproxys_message(server, node_clients):
    result = await run_node("ui_chat.mjs", server.url, "", "refused", "chat-refused")

    assert "Log in" in result["error"]["message"]


async def test_the_docs_transcript_is_what_a_turn_streams(client, upstream):
    upstream.enqueue(Reply(tokens=["Hel", "lo", "."]))
    body = {"id": "chat-1", "messages": [ui_user("Hi", "m1")]}

    streamed = await read_body(await post_chat(client, body))

    shown = doc_blocks("protocols.md", "The Vercel AI SDK's UI message stream")[1]
    assert without_ids(streamed.decode()) == without_ids(shown)


async def test_image_file_parts_go_upstream_as_image_parts(client, upstream):
    image = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQ"
        "DwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    parts = [
        {"type": "text", "text": "What is it?"},
        {"type": "file", "mediaType": "image/png", "url": image},
    ]
    body = {"id": "c", "messages": [{"id": "u", "role": "user", "parts": parts}]}

    await read_parts(await post_chat(client, body))

    assert upstream.requests[0].json["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is it?"},
            {"type": "image_url", "image_url": {"url": image}},
        ],
    }
