"""Malformed input on both transports: always a documented 4xx or error frame, never a 500,
and never a half-written row."""

from __future__ import annotations

import orjson
import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatproxy.exceptions import ERROR_CODES
from chatproxy.models import Conversation, Message
from tests.conftest import open_socket, read_events, session_cookie

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
PNG = "data:image/png;base64,iVBORw0KGgoAAAAA"
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": st.sampled_from([PNG, "https://img.example/a.png", "data:x", "ftp://a"])},
                optional={"detail": st.sampled_from(["auto", "low", "huge"])},
            )
            | JSON,
        }
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["input_audio", "file", ""])}),
    JSON,
)
TOOL_CALL = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["call_1", "call_2", ""]) | JSON,
        "type": st.just("function") | JSON,
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["get_time", "bad name"]), "arguments": st.just("{}") | JSON}
        )
        | JSON,
    }
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "assistant", "system", "tool", "", 3]) | JSON,
            "content": JSON | st.text() | st.lists(PART, max_size=3),
        },
        optional={"name": st.text(max_size=5), "tool_calls": st.lists(TOOL_CALL, max_size=2)},
    ),
    st.fixed_dictionaries(
        {
            "role": st.just("tool"),
            "tool_call_id": st.sampled_from(["call_1", "call_2"]) | JSON,
            "content": st.text(max_size=5) | JSON,
        }
    ),
)
TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function") | JSON,
        "function": st.fixed_dictionaries(
            {"name": st.sampled_from(["get_time", "x" * 70, ""]) | JSON},
            optional={"description": JSON, "parameters": JSON, "strict": JSON},
        )
        | JSON,
    }
)
BODY = st.one_of(
    st.binary(max_size=200),  # anything, including invalid UTF-8
    st.just(b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1' + b"0" * 40 + b"}"),
    JSON.map(orjson.dumps),  # JSON that is not the expected shape
    st.fixed_dictionaries(
        {"messages": st.lists(MESSAGE, max_size=3) | JSON},
        optional={
            "model": JSON,
            "conversation_id": JSON | st.uuids().map(str),
            "temperature": JSON,
            "max_tokens": JSON,
            "unexpected": JSON,
            "user": JSON,
            "tools": st.lists(TOOL, max_size=2) | JSON,
            "tool_choice": st.sampled_from(["auto", "required", "always"]) | JSON,
            "parallel_tool_calls": JSON,
            "response_format": st.fixed_dictionaries(
                {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
                optional={"json_schema": JSON},
            )
            | JSON,
            "stop": JSON | st.lists(st.text(max_size=3), max_size=5),
            "max_completion_tokens": JSON,
            "reasoning_effort": st.sampled_from(["low", "max"]) | JSON,
        },
    ).map(orjson.dumps),
    st.integers(min_value=2000, max_value=5000).map(lambda n: b"[" * n + b"]" * n),  # deep
    st.integers(min_value=1, max_value=3).map(
        lambda n: b'{"messages": "' + b"x" * (300_000 * n) + b'"}'
    ),
)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    # One user serves every example: the checks compare row counts per example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def rows() -> tuple[int, int]:
    return Conversation.objects.count(), Message.objects.count()


@pytest.mark.django_db(transaction=True)
@FUZZ
@given(body=BODY)
def test_http_bad_bodies_get_a_documented_4xx_and_write_nothing(user, body):
    before = rows()

    async def post():
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.post("/completions", body, content_type="application/json")
        if response.status_code == 200:  # the fuzzer found a valid request
            return 200, (await read_events(response))[-1]
        return response.status_code, orjson.loads(response.content)

    status, answer = async_to_sync(post)()

    if status == 200:
        assert answer["event"] in ("completed", "error")
    else:
        assert 400 <= status < 500, (status, answer)
        assert answer["error"]["code"] in ERROR_CODES
        assert rows() == before


@pytest.mark.django_db(transaction=True)
@FUZZ
@given(frame=BODY)
def test_websocket_bad_frames_get_a_documented_error_frame(user, frame):
    before = rows()

    async def send():
        socket = await open_socket(await session_cookie(user))
        await socket.connect()
        try:
            text = frame.decode() or " "  # the test communicator cannot send an empty frame
        except UnicodeDecodeError:
            await socket.send_to(bytes_data=frame)
        else:
            await socket.send_to(text_data=text)
        first = await socket.receive_json_from(timeout=10)
        frames = [first]
        while frames[-1]["event"] not in ("completed", "error"):
            frames.append(await socket.receive_json_from(timeout=10))
        await socket.disconnect()
        return frames

    frames = async_to_sync(send)()

    if frames[0]["event"] == "error":
        assert frames[0]["error"]["code"] in ERROR_CODES
        assert rows() == before
    else:
        assert frames[-1]["event"] in ("completed", "error")
