"""Server tools: the schema derived from type hints, the checks, the arguments' validation."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from django.test import AsyncClient

from chatproxy import followers
from chatproxy.checks import check_settings
from chatproxy.models import Conversation, Message
from tests import sample_tools
from tests.conftest import (
    answer_text,
    chat,
    frames_until_terminal,
    open_socket,
    read_body,
    read_events,
    session_cookie,
)
from tests.fake_upstream import Reply


def test_a_tools_schema_comes_from_its_hints_and_docstring():
    assert sample_tools.weather.schema() == {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Tell the weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city's name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }


def test_options_name_the_tool_and_literals_lists_and_optionals_are_described():
    schema = sample_tools.choose.schema()["function"]
    assert schema["name"] == "pick"
    assert schema["description"] == "Pick one."
    assert schema["parameters"]["properties"] == {
        "color": {"enum": ["red", "green"], "type": "string"},
        "sizes": {"anyOf": [{"type": "array", "items": {"type": "integer"}}, {"type": "null"}]},
        "ratio": {"type": "number"},
    }
    assert schema["parameters"]["required"] == ["color"]


def test_the_turn_parameter_is_not_offered_to_the_model():
    assert sample_tools.conversations.parameters["properties"] == {}
    assert sample_tools.conversations.wants_turn


def test_arguments_are_checked_against_the_schema_and_enums_converted():
    assert sample_tools.weather.arguments('{"city": "Oslo", "unit": "fahrenheit"}') == {
        "city": "Oslo",
        "unit": sample_tools.Unit.FAHRENHEIT,
    }
    for text, message in [
        ("{", "The arguments are not valid JSON."),
        ("[]", "The arguments must be a JSON object."),
        ("{}", "arguments lack the required city."),
        ('{"city": 3}', "city must be of type string."),
        ('{"city": "Oslo", "when": 1}', "arguments have the unknown when."),
        ('{"city": "Oslo", "unit": "kelvin"}', "unit must be one of 'celsius', 'fahrenheit'."),
    ]:
        with pytest.raises(ValueError) as caught:
            sample_tools.weather.arguments(text)
        assert str(caught.value) == message


def test_a_registered_tool_passes_the_checks(settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.weather", "tests.sample_tools.add"]
    assert [m.id for m in check_settings()] == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("tests.sample_tools.weather", "chatproxy.E020"),
        (["tests.sample_tools.nowhere"], "chatproxy.E020"),
        (["tests.sample_tools.plain"], "chatproxy.E020"),
        (["tests.sample_tools.weather", "tests.sample_tools.weather"], "chatproxy.E020"),
        (["tests.sample_tools.unsupported"], "chatproxy.E021"),
    ],
)
def test_bad_tools_are_refused_at_start_up(settings, value, expected):
    settings.CHATPROXY_TOOLS = value
    assert [m.id for m in check_settings()] == [expected]


def test_an_unsupported_hint_says_which_types_work(settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.unsupported"]
    assert check_settings()[0].msg == (
        "unsupported(when) has the type set[str], which chatproxy cannot describe to the "
        "model: use str, int, float, bool, X | None, list[X], Literal[...] or a str Enum."
    )


# The loop, over HTTP, against the fake upstream.

pytestmark_db = pytest.mark.django_db(transaction=True)
ASK = {"messages": [{"role": "user", "content": "Weather in Oslo?"}]}
TOOLS = [
    "tests.sample_tools.weather",
    "tests.sample_tools.add",
    "tests.sample_tools.broken",
    "tests.sample_tools.hang",
    "tests.sample_tools.staff_only",
    "tests.sample_tools.conversations",
    "tests.sample_tools.slow",
    "tests.sample_tools.refund",
]


def call(id_: str, name: str, arguments: str = "{}") -> dict[str, str]:
    return {"id": id_, "name": name, "arguments": arguments}


async def rows(conversation_id: str) -> list[tuple[Any, ...]]:
    found = Message.objects.filter(conversation_id=conversation_id).order_by("position")
    return [
        (m.position, m.role, m.status, m.content, m.tool_call_id, m.finish_reason)
        async for m in found
    ]


@pytest.fixture
def server_tools(settings):
    settings.CHATPROXY_TOOLS = TOOLS


@pytestmark_db
async def test_a_server_tool_is_run_its_result_sent_back_and_every_step_saved(
    client, upstream, server_tools
):
    oslo = call("call_1", "weather", '{"city": "Oslo"}')
    upstream.enqueue(Reply(tokens=["Let me look."], tool_calls=[oslo]), Reply(tokens=["Sunny."]))
    events = await read_events(await chat(client, ASK))

    kinds = [e["event"] for e in events]
    assert kinds == [
        "analyzing", "answering", "tool_call", "tool_result", "answering", "completed"
    ]  # fmt: skip
    result = {"city": "Oslo", "degrees": 21, "unit": "celsius"}
    assert events[3] == {
        "event": "tool_result",
        "id": "call_1",
        "name": "weather",
        "result": result,
    }
    completed = events[-1]
    assert completed["finish_reason"] == "stop"
    assert "tool_calls" not in completed
    # Each fake step reports prompt 1 (the first) and as many completion tokens as it sent.
    first, second = upstream.requests[0].json, upstream.requests[1].json
    assert [t["function"]["name"] for t in first["tools"]] == [n.rsplit(".", 1)[1] for n in TOOLS]
    assert second["messages"][1:] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": orjson.dumps(result).decode()},
    ]
    conversation_id = completed["conversation_id"]
    assert await rows(conversation_id) == [
        (0, "user", "", "Weather in Oslo?", "", ""),
        (1, "assistant", "completed", "Let me look.", "", "tool_calls"),
        (2, "tool", "completed", orjson.dumps(result).decode(), "call_1", ""),
        (3, "assistant", "completed", "Sunny.", "", "stop"),
    ]
    answer = await Message.objects.aget(pk=completed["message_id"])
    assert answer.position == 3  # the turn's answer row is its last step
    tool_row = await Message.objects.aget(role="tool")
    assert set(tool_row.metadata) == {"name", "duration_ms"}
    step = await Message.objects.aget(position=1)
    assert step.tool_calls == [oslo]
    total = step.total_tokens + answer.total_tokens
    assert completed["usage"]["total_tokens"] == total


@pytestmark_db
async def test_the_next_turn_sends_the_whole_loop_back_upstream(client, upstream, server_tools):
    oslo = call("call_1", "weather", '{"city": "Oslo"}')
    upstream.enqueue(Reply(tokens=[], tool_calls=[oslo]), Reply(tokens=["Sunny."]))
    completed = (await read_events(await chat(client, ASK)))[-1]
    upstream.enqueue(Reply(tokens=["Bye."]))
    body = {
        "conversation_id": completed["conversation_id"],
        "messages": [{"role": "user", "content": "Thanks"}],
    }
    await read_events(await chat(client, body))

    sent = upstream.requests[2].json["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "assistant", "user"]


@pytestmark_db
async def test_parallel_calls_run_concurrently_and_each_result_goes_back(
    client, upstream, server_tools, settings
):
    settings.CHATPROXY_MAX_PARALLEL_TOOLS = 2
    calls = [call("a", "add", '{"a": 1, "b": 2}'), call("b", "weather", '{"city": "Rome"}')]
    upstream.enqueue(Reply(tokens=[], tool_calls=calls), Reply(tokens=["3, and sunny."]))
    events = await read_events(await chat(client, ASK))

    results = {e["id"]: e for e in events if e["event"] == "tool_result"}
    assert results["a"]["result"] == 3
    assert results["b"]["result"]["city"] == "Rome"
    tool_messages = [m for m in upstream.requests[1].json["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in tool_messages] == ["a", "b"]


@pytestmark_db
async def test_a_failing_tool_gives_the_model_an_error_and_the_client_no_traceback(
    client, upstream, server_tools, caplog
):
    upstream.enqueue(Reply(tokens=[], tool_calls=[call("x", "broken")]), Reply(tokens=["Sorry."]))
    response = await chat(client, ASK)
    body = await read_body(response)

    assert b"secret database password" not in body
    events = [orjson.loads(line) for line in body.splitlines()]
    assert events[2] == {
        "event": "tool_result", "id": "x", "name": "broken", "error": "The tool broken failed."
    }  # fmt: skip
    assert "secret database password" in caplog.text  # logged, with its traceback
    sent = upstream.requests[1].json["messages"][-1]
    assert sent == {
        "role": "tool", "tool_call_id": "x", "content": '{"error":"The tool broken failed."}'
    }  # fmt: skip
    tool_row = await Message.objects.aget(role="tool")
    assert tool_row.metadata["error"] is True


@pytestmark_db
@pytest.mark.parametrize(
    ("name", "arguments", "error"),
    [
        ("hang", "{}", "The tool hang did not finish in time."),
        ("staff_only", "{}", "You may not use the tool staff_only in this conversation."),
        ("weather", '{"town": "Oslo"}', "Invalid arguments: arguments lack the required city."),
        ("add", '{"a": "1", "b": 2}', "Invalid arguments: a must be of type integer."),
    ],
)
async def test_a_call_that_cannot_run_goes_back_to_the_model_as_its_error(
    client, upstream, server_tools, name, arguments, error
):
    upstream.enqueue(Reply(tokens=[], tool_calls=[call("x", name, arguments)]), Reply())
    events = await read_events(await chat(client, ASK))

    assert events[2] == {"event": "tool_result", "id": "x", "name": name, "error": error}
    assert events[-1]["event"] == "completed"


@pytestmark_db
async def test_a_tool_acts_as_the_asking_user_only(client, upstream, server_tools, other_user):
    await Conversation.objects.acreate(owner=other_user, title="Not yours")
    upstream.enqueue(Reply(tokens=[], tool_calls=[call("x", "conversations")]), Reply())
    events = await read_events(await chat(client, ASK))

    assert events[2]["result"] == 1  # the conversation of this very turn, not the other's


@pytestmark_db
async def test_the_step_limit_ends_the_turn_with_its_own_error(
    client, upstream, server_tools, settings
):
    settings.CHATPROXY_MAX_TOOL_STEPS = 2
    upstream.enqueue(
        Reply(tokens=[], tool_calls=[call("a", "add", '{"a": 1, "b": 1}')]),
        Reply(tokens=[], tool_calls=[call("b", "add", '{"a": 2, "b": 2}')]),
    )
    events = await read_events(await chat(client, ASK))

    assert events[-1]["error"] == {
        "code": "too_many_tool_steps",
        "message": "The model called tools 2 times in a row without answering.",
    }
    assert [r[1:3] for r in await rows(events[0]["conversation_id"])] == [
        ("user", ""),
        ("assistant", "completed"),
        ("tool", "completed"),
        ("assistant", "completed"),
        ("tool", "completed"),
        ("assistant", "failed"),
    ]


@pytestmark_db
async def test_client_calls_beside_server_calls_end_the_turn_for_the_client_to_answer(
    client, upstream, server_tools
):
    mine = {"type": "function", "function": {"name": "locate", "parameters": {"type": "object"}}}
    calls = [call("s", "add", '{"a": 1, "b": 1}'), call("c", "locate")]
    upstream.enqueue(Reply(tokens=[], tool_calls=calls))
    events = await read_events(await chat(client, {**ASK, "tools": [mine]}))

    assert [e["event"] for e in events][-2:] == ["tool_result", "completed"]
    completed = events[-1]
    assert completed["finish_reason"] == "tool_calls"
    assert completed["tool_calls"] == [calls[1]]
    conversation_id = completed["conversation_id"]
    assert [r[1:5] for r in await rows(conversation_id)] == [
        ("user", "", "Weather in Oslo?", ""),
        ("assistant", "completed", "", ""),
        ("tool", "completed", "2", "s"),
    ]
    # The client answers exactly its own call, and the loop goes on.
    upstream.enqueue(Reply(tokens=["Found you."]))
    answer = {"role": "tool", "tool_call_id": "c", "content": "Oslo"}
    body = {"conversation_id": conversation_id, "messages": [answer], "tools": [mine]}
    events = await read_events(await chat(client, body))
    assert answer_text(events) == "Found you."


@pytestmark_db
async def test_a_client_tool_may_not_take_a_server_tools_name(client, upstream, server_tools):
    mine = {"type": "function", "function": {"name": "weather"}}
    response = await chat(client, {**ASK, "tools": [mine]})

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"] == {
        "code": "tool_name_taken",
        "message": "The tool name 'weather' belongs to a tool that runs on the server: "
        "rename your tool.",
    }
    assert not upstream.requests


@pytestmark_db
@pytest.mark.parametrize(
    "fields",
    [
        {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
        {"tool_choice": "required"},
        {"parallel_tool_calls": False},
    ],
)
async def test_tool_parameters_may_rely_on_the_server_tools_alone(
    client, upstream, server_tools, fields
):
    upstream.enqueue(Reply(tokens=["Sunny."]))
    events = await read_events(await chat(client, {**ASK, **fields}))

    assert answer_text(events) == "Sunny."
    sent = upstream.requests[0].json
    assert {name: sent[name] for name in fields} == fields
    assert "weather" in [tool["function"]["name"] for tool in sent["tools"]]


@pytestmark_db
@pytest.mark.parametrize(
    ("fields", "code", "message"),
    [
        (
            {"tool_choice": {"type": "function", "function": {"name": "weather"}}},
            "invalid_tool_choice",
            "tool_choice names the function 'weather', which is not in tools: add it to "
            "tools, or choose one of the functions it has.",
        ),
        (
            {"tool_choice": "required"},
            "invalid_tool_choice",
            "tool_choice 'required' needs tools: send them, or leave it out.",
        ),
        (
            {"parallel_tool_calls": True},
            "invalid_parameter",
            "parallel_tool_calls applies only with tools: send them too.",
        ),
    ],
)
async def test_tool_parameters_without_any_tools_are_refused(
    client, upstream, fields, code, message
):
    response = await chat(client, {**ASK, **fields})

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"] == {"code": code, "message": message}
    assert not upstream.requests


# Over the WebSocket, and cancelled mid-run.


@pytest.fixture
async def socket(user, server_tools):
    comm = await open_socket(await session_cookie(user))
    connected, _ = await comm.connect()
    assert connected
    yield comm
    await comm.disconnect()


@pytest.fixture
def slow_tool():
    sample_tools.slow_started.clear()
    sample_tools.slow_cancelled.clear()
    return sample_tools


@pytestmark_db
async def test_the_loop_runs_over_the_websocket_with_the_same_events(socket, upstream):
    upstream.enqueue(
        Reply(tokens=[], tool_calls=[call("x", "add", '{"a": 2, "b": 3}')]), Reply(tokens=["5"])
    )
    await socket.send_json_to({"type": "chat", **ASK, "request_id": "r1"})
    frames = await frames_until_terminal(socket)

    assert [f["event"] for f in frames] == [
        "analyzing", "tool_call", "tool_result", "answering", "completed"
    ]  # fmt: skip
    assert frames[2] == {
        "event": "tool_result", "id": "x", "name": "add", "result": 5, "request_id": "r1"
    }  # fmt: skip


async def _running_slow_tool(socket: Any, upstream: Any, slow_tool: Any) -> dict[str, Any]:
    upstream.enqueue(Reply(tokens=["Wait."], tool_calls=[call("s", "slow")]))
    await socket.send_json_to({"type": "chat", **ASK})
    analyzing = await socket.receive_json_from(timeout=5)
    assert await asyncio.to_thread(slow_tool.slow_started.wait, 5)
    return analyzing


async def _assert_saved_interrupted(conversation_id: str, code: str) -> None:
    assert await rows(conversation_id) == [
        (0, "user", "", "Weather in Oslo?", "", ""),
        (1, "assistant", "interrupted", "Wait.", "", "tool_calls"),
        (2, "tool", "completed", '{"error":"The tool run was interrupted."}', "s", ""),
    ]
    answer = await Message.objects.aget(position=1)
    assert answer.error_code == code


@pytestmark_db
async def test_a_cancel_frame_during_a_tool_run_cancels_the_tool_and_saves_interrupted(
    socket, upstream, slow_tool
):
    analyzing = await _running_slow_tool(socket, upstream, slow_tool)
    await socket.send_json_to({"type": "cancel"})
    rest = await frames_until_terminal(socket)

    assert rest[-1]["error"]["code"] == "cancelled"
    assert await asyncio.to_thread(slow_tool.slow_cancelled.wait, 5)
    await _assert_saved_interrupted(analyzing["conversation_id"], "cancelled")
    assert len(upstream.requests) == 1


@pytestmark_db
async def test_a_cancel_from_another_request_during_a_tool_run_stops_it(
    socket, upstream, slow_tool
):
    analyzing = await _running_slow_tool(socket, upstream, slow_tool)
    assert await followers.cancel(analyzing["message_id"])
    rest = await frames_until_terminal(socket)

    assert rest[-1]["error"]["code"] == "cancelled"
    assert await asyncio.to_thread(slow_tool.slow_cancelled.wait, 5)
    await _assert_saved_interrupted(analyzing["conversation_id"], "cancelled")


@pytestmark_db
async def test_a_socket_closed_during_a_tool_run_cancels_the_tool_and_saves_interrupted(
    user, upstream, server_tools, slow_tool, saved_answers
):
    comm = await open_socket(await session_cookie(user))
    await comm.connect()
    analyzing = await _running_slow_tool(comm, upstream, slow_tool)
    await comm.disconnect()

    await asyncio.wait_for(saved_answers.get(), 5)
    assert slow_tool.slow_cancelled.is_set()
    await _assert_saved_interrupted(analyzing["conversation_id"], "client_disconnected")


# Resume and follow replay the loop.


@pytestmark_db
async def test_a_resume_of_a_finished_loop_replays_every_step_from_the_rows(
    client, upstream, server_tools
):
    oslo = call("call_1", "weather", '{"city": "Oslo"}')
    upstream.enqueue(
        Reply(tokens=["Looking."], tool_calls=[oslo]),
        Reply(tokens=[], tool_calls=[call("call_2", "broken")]),
        Reply(tokens=["Sunny."]),
    )
    events = await read_events(await chat(client, ASK))
    resumed = await read_events(
        await client.get(f"/completions/{events[0]['conversation_id']}/stream")
    )

    live = [e for e in events if e["event"] != "analyzing"]
    assert [e for e in resumed if e["event"] != "analyzing"] == [
        *live[:-1],
        {**live[-1], "usage": resumed[-1]["usage"]},  # the saved answer's own step's usage
    ]


@pytestmark_db
async def test_a_follower_attaching_during_a_tool_run_gets_the_steps_so_far(
    socket, client, upstream, slow_tool
):
    analyzing = await _running_slow_tool(socket, upstream, slow_tool)
    response = await client.get(f"/completions/{analyzing['conversation_id']}/stream")
    assert await followers.cancel(analyzing["message_id"])
    followed = await read_events(response)

    assert followed == [
        {**analyzing, "resumed": True},
        {"event": "answering", "content": "Wait."},
        {"event": "tool_call", **call("s", "slow")},
        {"event": "error", "error": followed[-1]["error"], **ids(analyzing)},
    ]
    assert followed[-1]["error"]["code"] == "cancelled"
    await frames_until_terminal(socket)


def ids(event: dict[str, Any]) -> dict[str, str]:
    return {k: event[k] for k in ("conversation_id", "message_id")}


# Approval.


async def _asked_for_approval(client: Any, upstream: Any) -> list[dict[str, Any]]:
    sample_tools.refunds.clear()
    calls = [call("r", "refund", '{"amount": 5}'), call("a", "add", '{"a": 1, "b": 1}')]
    upstream.enqueue(Reply(tokens=["One moment."], tool_calls=calls))
    return await read_events(await chat(client, ASK))


@pytestmark_db
async def test_a_call_needing_approval_ends_the_turn_asking_for_it(client, upstream, server_tools):
    events = await _asked_for_approval(client, upstream)

    assert [e["event"] for e in events] == [
        "analyzing", "answering", "tool_call", "tool_call", "tool_result", "approval_required",
        "completed",
    ]  # fmt: skip
    assert events[5] == {"event": "approval_required", **call("r", "refund", '{"amount": 5}')}
    assert events[-1]["finish_reason"] == "approval_required"
    assert "tool_calls" not in events[-1]
    assert sample_tools.refunds == []
    answer = await Message.objects.aget(pk=events[-1]["message_id"])
    assert (answer.status, answer.finish_reason) == ("completed", "approval_required")
    assert answer.metadata["approval_required"] == ["r"]


@pytestmark_db
async def test_an_approved_call_runs_in_the_next_turn_and_the_loop_goes_on(
    client, upstream, server_tools
):
    first = await _asked_for_approval(client, upstream)
    conversation_id = first[0]["conversation_id"]
    upstream.enqueue(Reply(tokens=["Done."]))
    body = {"conversation_id": conversation_id, "approvals": [{"id": "r", "approved": True}]}
    events = await read_events(await chat(client, body))

    assert [e["event"] for e in events] == ["analyzing", "tool_result", "answering", "completed"]
    assert events[1] == {
        "event": "tool_result",
        "id": "r",
        "name": "refund",
        "result": "Refunded 5.",
    }
    assert sample_tools.refunds == [5]
    sent = upstream.requests[1].json["messages"]
    assert [(m["role"], m.get("tool_call_id")) for m in sent] == [
        ("user", None), ("assistant", None), ("tool", "a"), ("tool", "r"),
    ]  # fmt: skip
    assert [r[1:3] for r in await rows(conversation_id)] == [
        ("user", ""),
        ("assistant", "completed"),
        ("tool", "completed"),
        ("tool", "completed"),
        ("assistant", "completed"),
    ]


@pytestmark_db
async def test_a_denied_call_over_the_websocket_gives_the_model_the_denial(
    client, socket, upstream
):
    first = await _asked_for_approval(client, upstream)
    upstream.enqueue(Reply(tokens=["Understood."]))
    await socket.send_json_to(
        {
            "type": "chat",
            "conversation_id": first[0]["conversation_id"],
            "approvals": [{"id": "r", "approved": False}],
        }
    )
    frames = await frames_until_terminal(socket)

    assert frames[1] == {
        "event": "tool_result", "id": "r", "name": "refund", "error": "The user denied this call."
    }  # fmt: skip
    assert frames[-1]["event"] == "completed"
    assert sample_tools.refunds == []
    assert upstream.requests[1].json["messages"][-1] == {
        "role": "tool", "tool_call_id": "r", "content": '{"error":"The user denied this call."}'
    }  # fmt: skip


async def _resumed(client: Any, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The resume of a finished answer, told apart from its live events only by ``resumed``."""
    url = f"/completions/{events[0]['conversation_id']}/stream"
    resumed = await read_events(await client.get(url))
    assert resumed[0] == {**events[0], "resumed": True}
    return resumed[1:]


@pytestmark_db
async def test_a_resume_of_a_turn_asking_for_approval_replays_its_results_and_the_ask(
    client, upstream, server_tools
):
    events = await _asked_for_approval(client, upstream)

    assert await _resumed(client, events) == events[1:]


@pytestmark_db
async def test_a_resume_of_the_approving_turn_replays_the_approved_calls_results(
    client, upstream, server_tools
):
    first = await _asked_for_approval(client, upstream)
    upstream.enqueue(Reply(tokens=["Done."]))
    body = {
        "conversation_id": first[0]["conversation_id"],
        "approvals": [{"id": "r", "approved": True}],
    }
    events = await read_events(await chat(client, body))

    assert await _resumed(client, events) == events[1:]
    answer = await Message.objects.aget(pk=events[-1]["message_id"])
    assert answer.metadata["approvals"] == {"r": True}


@pytestmark_db
async def test_a_resume_of_server_results_beside_client_calls_replays_both(
    client, upstream, server_tools
):
    mine = {"type": "function", "function": {"name": "locate", "parameters": {"type": "object"}}}
    calls = [call("s", "add", '{"a": 1, "b": 1}'), call("c", "locate")]
    upstream.enqueue(Reply(tokens=[], tool_calls=calls))
    events = await read_events(await chat(client, {**ASK, "tools": [mine]}))
    resumed = await _resumed(client, events)

    assert [e["event"] for e in resumed] == ["tool_call", "tool_call", "tool_result", "completed"]
    assert resumed[:-1] == events[1:-1]
    assert resumed[-1]["tool_calls"] == [calls[1]]  # the client's own, as the turn sent it


@pytestmark_db
async def test_a_follower_of_an_approving_turn_gets_the_approved_results_first(
    socket, client, upstream, slow_tool
):
    first = await _asked_for_approval(client, upstream)
    upstream.enqueue(Reply(tokens=["Wait."], tool_calls=[call("s", "slow")]))
    body = {
        "type": "chat",
        "conversation_id": first[0]["conversation_id"],
        "approvals": [{"id": "r", "approved": False}],
    }
    await socket.send_json_to(body)
    analyzing = await socket.receive_json_from(timeout=5)
    assert await asyncio.to_thread(slow_tool.slow_started.wait, 5)
    response = await client.get(f"/completions/{analyzing['conversation_id']}/stream")
    assert await followers.cancel(analyzing["message_id"])
    followed = await read_events(response)

    assert [e["event"] for e in followed] == [
        "analyzing", "tool_result", "answering", "tool_call", "error"
    ]  # fmt: skip
    assert followed[1] == {
        "event": "tool_result", "id": "r", "name": "refund", "error": "The user denied this call."
    }  # fmt: skip
    await frames_until_terminal(socket)


@pytestmark_db
async def test_a_continuation_must_answer_exactly_the_calls_waiting_for_approval(
    client, upstream, server_tools
):
    first = await _asked_for_approval(client, upstream)
    conversation_id = first[0]["conversation_id"]
    said = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "Hm"}]}
    response = await chat(client, said)

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"] == {
        "code": "approvals_mismatch",
        "message": "The last answer waits for your approval of the calls r: send approvals "
        'with exactly one {"id", "approved"} for each; this request answers none.',
    }
    wrong = {"conversation_id": conversation_id, "approvals": [{"id": "x", "approved": True}]}
    assert (await chat(client, wrong)).status_code == 400
    assert len(upstream.requests) == 1


@pytestmark_db
@pytest.mark.parametrize(
    ("approvals", "code"),
    [
        ([{"id": "r", "approved": "yes"}], "invalid_approvals"),
        ([], "invalid_approvals"),
        ([{"id": "r", "approved": True}], "approvals_mismatch"),
    ],
)
async def test_approvals_that_answer_nothing_waiting_are_refused(
    client, upstream, server_tools, approvals, code
):
    upstream.enqueue(Reply(tokens=["Hi."]))
    first = await read_events(await chat(client, ASK))
    body = {"conversation_id": first[0]["conversation_id"], "approvals": approvals}
    response = await chat(client, body)

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"]["code"] == code


@pytestmark_db
async def test_another_users_approvals_find_no_conversation(
    client, upstream, server_tools, other_user
):
    first = await _asked_for_approval(client, upstream)
    stranger = AsyncClient()
    await stranger.aforce_login(other_user)
    body = {
        "conversation_id": first[0]["conversation_id"],
        "approvals": [{"id": "r", "approved": True}],
    }
    response = await chat(stranger, body)

    assert response.status_code == 404
    assert sample_tools.refunds == []


@pytestmark_db
async def test_cost_prices_every_step_of_the_loop_on_the_answer(client, upstream, settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.add"]
    settings.CHATPROXY_PRICES = {"gpt-test": {"prompt": 1_000_000, "completion": 1_000_000}}
    upstream.enqueue(
        Reply(tokens=[], tool_calls=[call("a", "add", '{"a": 1, "b": 1}')]), Reply(tokens=["2"])
    )
    completed = (await read_events(await chat(client, ASK)))[-1]

    answer = await Message.objects.aget(pk=completed["message_id"])
    assert answer.cost == completed["usage"]["total_tokens"]  # a unit price per token
    assert answer.cost > answer.total_tokens
