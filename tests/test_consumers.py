"""The WebSocket transport in-process: the same events as HTTP, many turns, cancel, bad frames."""

from __future__ import annotations

import logging

import orjson
import pytest

from chatproxy import followers
from chatproxy.models import Message
from tests.conftest import StallingSocket, frames_until_terminal, open_socket, session_cookie
from tests.fake_upstream import Reply

pytestmark = pytest.mark.django_db(transaction=True)

HI = {"type": "chat", "messages": [{"role": "user", "content": "Hi"}]}
SLOW = Reply(tokens=[f"w{i} " for i in range(200)], delay=0.02)


@pytest.fixture
async def socket(user):
    comm = await open_socket(await session_cookie(user))
    connected, _ = await comm.connect()
    assert connected
    yield comm
    await comm.disconnect()


async def test_two_turns_on_one_socket_with_request_ids(socket, upstream):
    upstream.enqueue(Reply(tokens=["One"]), Reply(tokens=["Two"]))

    await socket.send_json_to({**HI, "request_id": "r1"})
    first = await frames_until_terminal(socket)
    follow_up = {
        "type": "chat",
        "request_id": "r2",
        "conversation_id": first[0]["conversation_id"],
        "messages": [{"role": "user", "content": "Again"}],
    }
    await socket.send_json_to(follow_up)
    second = await frames_until_terminal(socket)

    assert [f["event"] for f in first] == ["analyzing", "answering", "completed"]
    assert [f["event"] for f in second] == ["analyzing", "answering", "completed"]
    assert {f["request_id"] for f in first} == {"r1"}
    assert {f["request_id"] for f in second} == {"r2"}
    assert first[1]["content"] == "One" and second[1]["content"] == "Two"
    assert (await upstream.wait_for_request(2)).json["messages"][-2:] == [
        {"role": "assistant", "content": "One"},
        {"role": "user", "content": "Again"},
    ]


async def test_frames_match_the_http_events(socket, upstream):
    upstream.enqueue(Reply(tokens=["Hel", "lo"]))

    await socket.send_json_to(HI)
    frames = await frames_until_terminal(socket)

    answer = await Message.objects.aget(role="assistant")
    ids = {"conversation_id": str(answer.conversation_id), "message_id": str(answer.pk)}
    assert frames == [
        {"event": "analyzing", **ids, "model": "gpt-test"},
        {"event": "answering", "content": "Hel"},
        {"event": "answering", "content": "lo"},
        {
            "event": "completed",
            **ids,
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
    ]


async def test_deltas_that_arrive_together_are_still_a_frame_each(socket, upstream):
    tokens = [f"t{i} " for i in range(20)]
    upstream.enqueue(Reply(tokens=tokens, burst=True))

    await socket.send_json_to(HI)
    frames = await frames_until_terminal(socket)

    assert [f["content"] for f in frames[1:-1]] == tokens
    assert frames[-1]["event"] == "completed"


async def test_cancel_stops_the_upstream_and_saves_interrupted(socket, upstream):
    upstream.enqueue(SLOW)
    await socket.send_json_to({**HI, "request_id": "r1"})
    frames = [await socket.receive_json_from(timeout=5) for _ in range(3)]

    await socket.send_json_to({"type": "cancel"})
    rest = await frames_until_terminal(socket)

    assert frames[0]["event"] == "analyzing"
    assert rest[-1]["event"] == "error"
    assert rest[-1]["error"]["code"] == "cancelled"
    assert rest[-1]["request_id"] == "r1"
    assert rest[-1]["message_id"] == frames[0]["message_id"]
    assert await upstream.requests[0].wait_closed_by_client()
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    delivered = "".join(f.get("content", "") for f in frames + rest)
    assert answer.content.startswith(delivered)


async def test_chat_while_a_turn_runs_is_busy_and_the_turn_goes_on(socket, upstream):
    upstream.enqueue(Reply(tokens=["a", "b", "c"], delay=0.05))
    await socket.send_json_to(HI)
    assert (await socket.receive_json_from(timeout=5))["event"] == "analyzing"

    await socket.send_json_to({**HI, "request_id": "second"})
    frames = await frames_until_terminal(socket)

    busy = [f for f in frames if f.get("request_id") == "second"]
    assert busy == [
        {
            "event": "error",
            "error": {
                "code": "busy",
                "message": "A turn is still running on this socket: "
                "wait for its last event, or cancel it.",
            },
            "request_id": "second",
        }
    ]
    rest = await frames_until_terminal(socket) if frames[-1].get("request_id") else frames
    assert rest[-1]["event"] == "completed"


BAD_FRAMES = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_request"),
    ('{"type": "dance"}', "invalid_request"),
    ('{"messages": []}', "invalid_request"),
    ('{"type": "chat", "messages": []}', "invalid_messages"),
    ('{"type": "chat", "messages": [{"role": "tool", "content": "x"}]}', "invalid_messages"),
    ('{"type": "chat", "messages": [{"role": "ghost", "content": "x"}]}', "role_not_allowed"),
    (
        '{"type": "chat", "model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
        "model_not_allowed",
    ),
    (
        '{"type": "chat", "stream": true, "messages": [{"role": "user", "content": "x"}]}',
        "unknown_field",
    ),
    (
        '{"type": "chat", "request_id": 5, "messages": [{"role": "user", "content": "x"}]}',
        "invalid_request",
    ),
    (
        '{"type": "chat", "conversation_id": "00000000-0000-0000-0000-000000000000",'
        ' "messages": [{"role": "user", "content": "x"}]}',
        "conversation_not_found",
    ),
]


@pytest.mark.parametrize(("frame", "code"), BAD_FRAMES)
async def test_malformed_frame_gets_an_error_frame_and_the_socket_stays_usable(
    socket, upstream, frame, code
):
    await socket.send_to(text_data=frame)
    error = await socket.receive_json_from(timeout=5)

    assert error["event"] == "error" and error["error"]["code"] == code, error
    await socket.send_json_to(HI)
    assert (await frames_until_terminal(socket))[-1]["event"] == "completed"
    assert len(upstream.requests) == 1


async def test_binary_and_oversized_frames_get_error_frames(socket, settings):
    settings.CHATPROXY_MAX_BODY_BYTES = 50

    await socket.send_to(bytes_data=b"{}")
    binary = await socket.receive_json_from(timeout=5)
    await socket.send_to(text_data=orjson.dumps({**HI, "pad": "x" * 100}).decode())
    large = await socket.receive_json_from(timeout=5)

    assert binary["error"]["code"] == "invalid_json"
    assert large["error"]["code"] == "body_too_large"


async def test_unauthenticated_socket_is_closed_with_4401(upstream):
    comm = await open_socket()
    connected, _ = await comm.connect()

    assert connected
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


async def test_frame_sent_right_after_the_4401_close_is_ignored_without_a_traceback(
    upstream, caplog
):
    socket = await open_socket()
    await socket.send_input({"type": "websocket.connect"})
    await socket.send_json_to(HI)  # before the client has seen the close

    assert (await socket.receive_output(timeout=5))["type"] == "websocket.accept"
    assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
    await socket.send_input({"type": "websocket.disconnect", "code": 4401})
    await socket.wait(timeout=5)  # re-raises what the consumer raised
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert upstream.requests == []


async def test_foreign_origin_is_refused(user):
    comm = await open_socket(await session_cookie(user), origin=b"http://evil.example")

    connected, _ = await comm.connect()

    assert not connected


async def test_disconnect_mid_answer_saves_interrupted_and_closes_upstream(user, upstream):
    comm = await open_socket(await session_cookie(user))
    await comm.connect()
    upstream.enqueue(SLOW)
    await comm.send_json_to(HI)
    for _ in range(3):
        await comm.receive_json_from(timeout=5)

    await comm.disconnect()

    assert await upstream.requests[0].wait_closed_by_client()
    answer = await Message.objects.aget(role="assistant")
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert answer.content


async def test_cancel_from_another_request_stops_the_turn(socket, upstream):
    upstream.enqueue(SLOW)
    await socket.send_json_to(HI)
    analyzing = await socket.receive_json_from(timeout=5)
    await socket.receive_json_from(timeout=5)  # the first answering frame: the turn runs

    assert await followers.cancel(analyzing["message_id"])
    rest = await frames_until_terminal(socket)

    assert rest[-1]["error"]["code"] == "cancelled"
    assert await upstream.requests[0].wait_closed_by_client()


async def test_other_users_conversation_is_not_found_over_the_socket(socket, other_user, upstream):
    await socket.send_json_to(HI)
    conversation_id = (await frames_until_terminal(socket))[0]["conversation_id"]
    theirs = await open_socket(await session_cookie(other_user))
    await theirs.connect()

    await theirs.send_json_to({**HI, "conversation_id": conversation_id})
    error = await theirs.receive_json_from(timeout=5)
    await theirs.disconnect()

    assert error["error"]["code"] == "conversation_not_found"


async def test_a_chat_frame_takes_parts_and_tools_like_the_http_body(socket, upstream):
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    tool = {"type": "function", "function": {"name": "get_time"}}
    await socket.send_json_to(
        {"type": "chat", "messages": [{"role": "user", "content": parts}], "tools": [tool]}
    )
    frames = await frames_until_terminal(socket)

    assert frames[-1]["event"] == "completed"
    sent = (await upstream.wait_for_request()).json
    assert (sent["messages"], sent["tools"]) == ([{"role": "user", "content": parts}], [tool])


async def test_a_bad_tool_in_a_chat_frame_is_an_error_frame_with_its_code(socket, upstream):
    tool = {"type": "function", "function": {"name": "what time?"}}
    await socket.send_json_to({**HI, "tools": [tool]})
    error = await socket.receive_json_from(timeout=5)

    assert error["error"] == {
        "code": "invalid_tools",
        "message": "tools[0].function.name must be 1 to 64 letters, digits, '_' or '-'.",
    }


async def test_a_chat_frame_of_just_tool_results_continues_the_conversation(socket, upstream):
    upstream.enqueue(Reply(tokens=["Checking"]), Reply(tokens=["Noon."]))
    await socket.send_json_to(HI)
    first = await frames_until_terminal(socket)
    # The stream side saves a streamed call this way; the fake upstream here streams text.
    call = {"id": "call_1", "name": "get_time", "arguments": "{}"}
    await Message.objects.filter(pk=first[0]["message_id"]).aupdate(tool_calls=[call])

    result = {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}
    await socket.send_json_to(
        {"type": "chat", "conversation_id": first[0]["conversation_id"], "messages": [result]}
    )
    frames = await frames_until_terminal(socket)

    assert frames[-1]["event"] == "completed"
    sent = (await upstream.wait_for_request(2)).json
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool"]
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_1"


# A client that stops reading: the turn never waits for it, and it is dropped when it dies or
# stays silent for CHATPROXY_SEND_TIMEOUT.


async def stalled_mid_answer(user, upstream, reply=SLOW) -> tuple[StallingSocket, dict]:
    """A socket whose turn streams while its client has stopped reading."""
    client = StallingSocket(await session_cookie(user))
    await client.connect()
    upstream.enqueue(reply)
    client.send_json({**HI, "request_id": "r1"})
    analyzing = await client.receive_json()
    await client.stop_reading()
    return client, analyzing


async def test_followers_get_the_answer_live_while_its_own_client_does_not_read(
    user, upstream, saved_answers
):
    client, analyzing = await stalled_mid_answer(user, upstream, Reply(tokens=["a "] * 50))

    items = [item async for item in await followers.follow(analyzing["message_id"])]

    assert items[-1]["event"]["event"] == "completed"
    assert (await saved_answers.get()).status == "completed"
    client.read_again()
    frames = [await client.receive_json() for _ in range(51)]
    assert frames[-1]["event"] == "completed"
    await client.vanish()


async def test_cancel_frame_stops_a_turn_whose_client_does_not_read(user, upstream, saved_answers):
    client, analyzing = await stalled_mid_answer(user, upstream)

    client.send_json({"type": "cancel"})

    answer = await saved_answers.get()
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert await upstream.requests[0].wait_closed_by_client()
    client.read_again()
    while (frame := await client.receive_json())["event"] == "answering":
        pass
    assert frame["error"]["code"] == "cancelled" and frame["request_id"] == "r1"
    await client.vanish()


async def test_cancel_from_another_request_reaches_a_turn_whose_client_does_not_read(
    user, upstream, saved_answers
):
    client, analyzing = await stalled_mid_answer(user, upstream)

    assert await followers.cancel(analyzing["message_id"])

    answer = await saved_answers.get()
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")
    assert await upstream.requests[0].wait_closed_by_client()
    await client.vanish()


async def test_client_that_stops_reading_then_vanishes_saves_interrupted_and_closes_upstream(
    user, upstream, saved_answers, caplog
):
    client, analyzing = await stalled_mid_answer(user, upstream)

    await client.vanish()

    answer = await saved_answers.get()
    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert await upstream.requests[0].wait_closed_by_client()
    assert client.app.exception() is None
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_frames_from_a_client_that_does_not_read_wait_instead_of_their_replies(
    user, upstream, saved_answers, settings
):
    settings.CHATPROXY_SEND_TIMEOUT = 0.3
    client, analyzing = await stalled_mid_answer(user, upstream)
    taken = client.taken

    for _ in range(100):  # each would get an error frame the client does not read
        client.send_json({"type": "dance"})
    await saved_answers.get()  # dropped after the send timeout

    # One was taken, and its reply waits; the rest were not read (TCP pushes back on them).
    assert client.taken_when_given_up == taken + 1
    await client.vanish()


async def test_client_that_stops_reading_is_dropped_after_the_send_timeout(
    user, upstream, saved_answers, settings
):
    settings.CHATPROXY_SEND_TIMEOUT = 0.2
    client, analyzing = await stalled_mid_answer(user, upstream)

    answer = await saved_answers.get()

    assert (answer.status, answer.error_code) == ("interrupted", "client_disconnected")
    assert await upstream.requests[0].wait_closed_by_client()
    client.send_json(HI)  # ignored: the server gave up on this socket
    client.read_again()
    while (message := await client.receive())["type"] == "websocket.send":
        pass
    assert message == {"type": "websocket.close", "code": 4408}
    await client.vanish()
    assert len(upstream.requests) == 1
