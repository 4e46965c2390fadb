"""The OpenAI-compatible API, driven by the official openai SDKs as clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import openai
import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from chatproxy.models import ApiKey, Conversation, Message
from tests.conftest import (
    asgi_application,
    doc_blocks,
    read_body,
    run_node,
    shared_database_name,
    without_ids,
)
from tests.fake_upstream import Reply
from tests.server import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)
HI = [{"role": "user", "content": "Hi"}]
LOOKUP = {"id": "call_1", "name": "lookup", "arguments": '{"q":"x"}'}
LOOKUP_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}
SERVER_TOOLS = ["tests.sample_tools.weather", "tests.sample_tools.add"]


@pytest.fixture
async def key(user) -> str:
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "sdk")
    return raw


@pytest.fixture
async def live(server, key) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK against the project under uvicorn."""
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0) as c:
        yield c


@pytest.fixture
async def sdk(key) -> AsyncIterator[openai.AsyncOpenAI]:
    """The SDK against the ASGI app in this process, so a test's settings apply."""
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=asgi_application()))
    async with openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key=key, max_retries=0, http_client=http
    ) as c:
        yield c


async def saved(conversation_id: str) -> list[tuple[str, str]]:
    rows = Message.objects.filter(conversation_id=conversation_id).order_by("position")
    return [(m.role, m.content) async for m in rows]


@pytest.mark.server
async def test_a_completion_answers_in_openais_shape_and_is_saved_for_the_keys_user(
    live, upstream, user
):
    completion = await live.chat.completions.create(model="gpt-test", messages=HI)

    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "Echo: Hi"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    conversation_id = completion.model_extra["conversation_id"]
    assert completion.id == f"chatcmpl-{(await saved_answer(conversation_id)).pk}"
    assert await saved(conversation_id) == [("user", "Hi"), ("assistant", "Echo: Hi")]
    owner = await Conversation.objects.values_list("owner_id", flat=True).aget(pk=conversation_id)
    assert owner == user.pk


async def saved_answer(conversation_id: str) -> Message:
    return await Message.objects.filter(conversation_id=conversation_id, role="assistant").alast()


@pytest.mark.server
async def test_a_stream_sends_chunks_then_usage_and_done(live, upstream):
    upstream.enqueue(Reply(tokens=["One ", "two"]))
    stream = await live.chat.completions.create(
        model="gpt-test", messages=HI, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]

    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "One two"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


@pytest.mark.server
async def test_the_stream_helper_of_the_sdk_accumulates_the_answer(live, upstream):
    upstream.enqueue(Reply(tokens=["Sum", "med."]))
    async with live.chat.completions.stream(model="gpt-test", messages=HI) as stream:
        final = await stream.get_final_completion()

    assert final.choices[0].message.content == "Summed."


@pytest.mark.server
async def test_models_lists_the_models_the_user_may_use(live):
    models = [model.id async for model in live.models.list()]

    assert models == ["gpt-test", "gpt-other"]


@pytest.mark.server
async def test_metadata_conversation_id_continues_a_conversation_from_its_saved_history(
    live, upstream
):
    first = await live.chat.completions.create(model="gpt-test", messages=HI)
    conversation_id = first.model_extra["conversation_id"]
    upstream.enqueue(Reply(tokens=["Again."]))
    history = [*HI, {"role": "assistant", "content": "Echo: Hi"}]

    second = await live.chat.completions.create(
        model="gpt-test",
        messages=[*history, {"role": "user", "content": "More"}],
        metadata={"conversation_id": conversation_id},
    )

    assert second.model_extra["conversation_id"] == conversation_id
    assert upstream.requests[-1].json["messages"] == [
        *history,
        {"role": "user", "content": "More"},
    ]
    assert len(await saved(conversation_id)) == 4


@pytest.mark.server
async def test_client_tool_calls_pass_through_and_their_results_continue_the_turn(live, upstream):
    upstream.enqueue(Reply(tokens=[], tool_calls=[LOOKUP]), Reply(tokens=["Found."]))

    asked = await live.chat.completions.create(model="gpt-test", messages=HI, tools=[LOOKUP_TOOL])
    message = asked.choices[0].message
    assert asked.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_1", "lookup", '{"q":"x"}')
    ]
    answered = await live.chat.completions.create(
        model="gpt-test",
        messages=[
            *HI,
            message.model_dump(include={"role", "content", "tool_calls"}),
            {"role": "tool", "tool_call_id": "call_1", "content": "x is 1"},
        ],
        tools=[LOOKUP_TOOL],
        metadata={"conversation_id": asked.model_extra["conversation_id"]},
    )

    assert answered.choices[0].message.content == "Found."
    assert upstream.requests[-1].json["messages"][-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": "x is 1",
    }


@pytest.mark.server
async def test_streamed_client_tool_calls_reach_the_sdk(live, upstream):
    upstream.enqueue(Reply(tokens=[], tool_calls=[LOOKUP]))
    async with live.chat.completions.stream(
        model="gpt-test", messages=HI, tools=[LOOKUP_TOOL]
    ) as stream:
        final = await stream.get_final_completion()

    assert final.choices[0].finish_reason == "tool_calls"
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"q":"x"}'


async def test_server_tools_run_in_the_loop_and_only_the_answer_reaches_the_client(
    sdk, upstream, settings
):
    settings.CHATPROXY_TOOLS = SERVER_TOOLS
    add = {"id": "call_9", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    upstream.enqueue(Reply(tokens=["Adding."], tool_calls=[add]), Reply(tokens=["It is 5."]))

    completion = await sdk.chat.completions.create(model="gpt-test", messages=HI)

    assert completion.choices[0].message.content == "Adding.\n\nIt is 5."
    assert completion.choices[0].message.tool_calls is None
    assert upstream.requests[1].json["messages"][-1]["content"] == "5"


@pytest.mark.parametrize(
    ("raises", "status", "code", "setup"),
    [
        (openai.BadRequestError, 400, "model_not_allowed", {"model": "gpt-nope"}),
        (openai.BadRequestError, 400, "unknown_field", {"logit_bias": {}}),
        (openai.BadRequestError, 400, "role_not_allowed", {"system": True}),
    ],
)
async def test_request_errors_are_the_sdks_exceptions_with_chatproxys_code(
    sdk, raises, status, code, setup
):
    messages = [{"role": "system", "content": "Be brief."}, *HI] if setup.get("system") else HI
    extra = {"logit_bias": setup["logit_bias"]} if "logit_bias" in setup else {}
    with pytest.raises(raises) as caught:
        await sdk.chat.completions.create(
            model=setup.get("model", "gpt-test"), messages=messages, **extra
        )

    assert caught.value.status_code == status
    assert caught.value.code == code
    assert caught.value.type == "invalid_request_error"


async def test_an_unknown_key_is_the_sdks_authentication_error(upstream):
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=asgi_application()))
    async with openai.AsyncOpenAI(
        base_url="http://testserver/v1", api_key="nope", max_retries=0, http_client=http
    ) as sdk:
        with pytest.raises(openai.AuthenticationError) as caught:
            await sdk.chat.completions.create(model="gpt-test", messages=HI)

    assert caught.value.code == "invalid_api_key"


async def test_a_session_cookie_is_not_enough(client):
    response = await client.post("/v1/chat/completions", {"messages": HI}, "application/json")

    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "authentication_required"
    assert response["WWW-Authenticate"] == 'Bearer realm="chatproxy"'


async def test_the_rate_limit_is_the_sdks_rate_limit_error_with_retry_after(sdk, settings):
    settings.CHATPROXY_RATE_LIMIT = (1, 60)
    await sdk.chat.completions.create(model="gpt-test", messages=HI)

    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)

    assert caught.value.code == "rate_limited"
    assert int(caught.value.response.headers["Retry-After"]) > 0


async def test_an_upstream_failure_is_a_5xx_the_sdk_retries(sdk, upstream):
    upstream.enqueue(Reply(status=500), Reply(status=500))

    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(model="gpt-test", messages=HI)

    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_error"
    assert "upstream exploded" not in str(caught.value.body)


async def test_an_upstream_failure_mid_stream_raises_in_the_sdk(sdk, upstream):
    upstream.enqueue(Reply(tokens=["a", "b", "c"], fail="drop", fail_after=1))
    stream = await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)

    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass

    assert caught.value.code == "upstream_disconnected"
    assert (
        caught.value.message
        == "The connection to the model's server dropped mid-answer. Try again."
    )


async def test_an_interceptor_applies_to_the_api(sdk, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = ["tests.test_interception.Shout"]
    completion = await sdk.chat.completions.create(model="gpt-test", messages=HI)

    assert completion.choices[0].message.content == "ECHO: HI"


async def test_continuing_someone_elses_conversation_is_not_found(sdk, other_user):
    theirs = await Conversation.objects.acreate(owner=other_user, title="theirs")

    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(
            model="gpt-test", messages=HI, metadata={"conversation_id": str(theirs.pk)}
        )

    assert caught.value.code == "conversation_not_found"


async def test_n_other_than_one_is_refused_in_openais_error_shape(key):
    response = await AsyncClient().post(
        "/v1/chat/completions",
        {"messages": HI, "n": 2},
        "application/json",
        headers={"Authorization": f"Bearer {key}"},
    )

    assert response.status_code == 400
    assert orjson.loads(response.content) == {
        "error": {
            "message": "n must be 1: chatproxy writes one answer.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_parameter",
        }
    }


@pytest.fixture(scope="module")
def tools_server(django_db_blocker: Any, upstream_server: Any):
    process = ServerProcess(
        shared_database_name(django_db_blocker),
        upstream_server.base_url,
        {"CHATPROXY_TOOLS": SERVER_TOOLS},
    )
    process.start()
    yield process
    process.stop()


@pytest.mark.server
async def test_the_node_sdk_completes_streams_and_calls_tools(
    server, tools_server, upstream, key, node_clients
):
    upstream.enqueue(
        Reply(tokens=["Hello ", "node."]),
        Reply(tokens=["Stream", "ed."]),
        Reply(tokens=[], tool_calls=[LOOKUP]),
        Reply(tokens=[], tool_calls=[LOOKUP]),
    )
    result = await run_node("openai_client.mjs", f"{server.url}/v1", key)

    assert result["completion"] == {"content": "Hello node.", "finish_reason": "stop"}
    assert result["stream"] == {"content": "Streamed.", "finish_reason": "stop", "usage": True}
    assert result["tool"] == {"name": "lookup", "arguments": '{"q":"x"}'}
    assert result["streamedTool"] == {"name": "lookup", "arguments": '{"q":"x"}'}
    assert result["badKey"] == {"status": 401, "code": "invalid_api_key"}
    assert result["models"] == ["gpt-test", "gpt-other"]

    add = {"id": "call_9", "name": "add", "arguments": '{"a": 2, "b": 3}'}
    upstream.enqueue(Reply(tokens=[], tool_calls=[add]), Reply(tokens=["It is 5."]))
    served = await run_node("openai_client.mjs", f"{tools_server.url}/v1", key, "server-tools")

    assert served == {"content": "It is 5.", "finish_reason": "stop", "toolCalls": None}


SECTION = "The OpenAI-compatible API"


async def test_the_docs_transcripts_are_what_a_call_answers(key, upstream):
    client, headers = AsyncClient(), {"Authorization": f"Bearer {key}"}
    upstream.enqueue(Reply(tokens=["Hel", "lo", "."]), Reply(tokens=["Hel", "lo", "."]))
    body = {"model": "gpt-test", "messages": HI}
    _, _, streamed, whole = doc_blocks("protocols.md", SECTION)

    stream = await client.post(
        "/v1/chat/completions",
        orjson.dumps({**body, "stream": True}),
        "application/json",
        headers=headers,
    )
    assert without_ids((await read_body(stream)).decode()) == without_ids(streamed)
    answer = await client.post(
        "/v1/chat/completions", orjson.dumps(body), "application/json", headers=headers
    )
    assert orjson.loads(without_ids(answer.content.decode())) == orjson.loads(without_ids(whole))


@pytest.mark.server
async def test_the_docs_python_example_runs_against_the_api(server, key, upstream):
    example = doc_blocks("protocols.md", SECTION)[0]

    code = example.replace("https://chat.example.com", server.url)
    await asyncio.to_thread(exec, code, {"CHATPROXY_KEY": key})

    assert len(upstream.requests) == 3


async def test_reasoning_comes_as_reasoning_content(sdk, upstream):
    upstream.enqueue(Reply(tokens=["42."], reasoning=["Let me ", "think."]))
    upstream.enqueue(Reply(tokens=["42."], reasoning=["Let me ", "think."]))

    completion = await sdk.chat.completions.create(model="gpt-test", messages=HI)
    stream = await sdk.chat.completions.create(model="gpt-test", messages=HI, stream=True)
    deltas = [chunk.choices[0].delta async for chunk in stream if chunk.choices]

    assert completion.choices[0].message.model_extra["reasoning_content"] == "Let me think."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == (
        "Let me think."
    )


async def test_a_retried_call_with_its_idempotency_key_replays_the_first(sdk, upstream):
    headers = {"Idempotency-Key": "call-1"}
    first = await sdk.chat.completions.create(model="gpt-test", messages=HI, extra_headers=headers)

    again = await sdk.chat.completions.create(model="gpt-test", messages=HI, extra_headers=headers)

    assert again.id == first.id
    assert again.choices[0].message.content == first.choices[0].message.content
    assert len(upstream.requests) == 1
