"""The owner of an answer rates it up or down, over HTTP and over the WebSocket, and may change
the rating; for anyone else the answer does not exist."""

from __future__ import annotations

import orjson
import pytest

from chatproxy.feedback import Rating
from tests.conftest import chat, frames_until_terminal, open_socket, read_events, session_cookie

db = pytest.mark.django_db(transaction=True)
HI = {"messages": [{"role": "user", "content": "Hi"}]}


async def rate(client, message_id, body, **kwargs):
    data = body if isinstance(body, bytes | str) else orjson.dumps(body)
    return await client.post(
        f"/messages/{message_id}/rating",
        data,
        content_type=kwargs.pop("content_type", "application/json"),
        **kwargs,
    )


async def answer_of(client) -> str:
    events = await read_events(await chat(client, HI))
    return events[-1]["message_id"]


@db
async def test_the_owner_rates_an_answer_and_changes_the_rating(client):
    answer = await answer_of(client)

    first = await rate(client, answer, {"value": "up"})
    second = await rate(client, answer, {"value": "down", "comment": " Too short. "})

    assert first.status_code == second.status_code == 200
    assert orjson.loads(first.content) == {
        "rating": {"message_id": answer, "value": "up", "comment": ""}
    }
    assert orjson.loads(second.content)["rating"]["comment"] == "Too short."
    ratings = [(str(r.message_id), r.value, r.comment) async for r in Rating.objects.all()]
    assert ratings == [(answer, "down", "Too short.")]


@db
async def test_someone_elses_answer_is_not_found(client, other_user):
    from django.test import AsyncClient

    answer = await answer_of(client)
    bob = AsyncClient()
    await bob.aforce_login(other_user)

    response = await rate(bob, answer, {"value": "down"})

    assert response.status_code == 404
    assert orjson.loads(response.content)["error"] == {
        "code": "message_not_found",
        "message": "No answer with that id belongs to you.",
    }
    assert not await Rating.objects.aexists()


@db
async def test_a_users_own_message_is_not_an_answer_to_rate(client):
    from chatproxy.models import Message

    await answer_of(client)
    question = await Message.objects.aget(role="user")

    response = await rate(client, question.pk, {"value": "up"})

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"value": "meh"}, '"value" must be "up" or "down".'),
        ({}, '"value" must be "up" or "down".'),
        ({"value": "up", "comment": 5}, '"comment" must be text of at most 1000 characters.'),
        (
            {"value": "up", "comment": "x" * 1001},
            '"comment" must be text of at most 1000 characters.',
        ),
        (
            {"value": "up", "stars": 5},
            'Send {"value": "up" or "down", "comment": "optional text"}.',
        ),
        (["up"], 'Send {"value": "up" or "down", "comment": "optional text"}.'),
    ],
)
@db
async def test_a_malformed_rating_says_what_to_send(client, body, message):
    answer = await answer_of(client)

    response = await rate(client, answer, body)

    assert response.status_code == 400
    assert orjson.loads(response.content)["error"] == {"code": "invalid_rating", "message": message}


@db
async def test_a_rating_must_be_posted_as_json(client):
    answer = await answer_of(client)

    wrong_type = await rate(client, answer, "value=up", content_type="text/plain")
    wrong_method = await client.get(f"/messages/{answer}/rating")

    assert wrong_type.status_code == 415
    assert wrong_method.status_code == 405 and wrong_method["Allow"] == "POST"


@db
async def test_the_owner_rates_over_the_websocket_even_while_a_turn_runs(user):
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    answer = (await frames_until_terminal(socket))[-1]["message_id"]

    await socket.send_json_to({"type": "chat", **HI})
    await socket.send_json_to(
        {"type": "rate", "message_id": answer, "value": "down", "comment": "No.", "request_id": "r"}
    )
    frames = await frames_until_terminal(socket)
    while not any(f["event"] == "rated" for f in frames):
        frames.append(await socket.receive_json_from(timeout=5))
    await socket.disconnect()

    rated = next(f for f in frames if f["event"] == "rated")
    assert rated == {
        "event": "rated",
        "rating": {"message_id": answer, "value": "down", "comment": "No."},
        "request_id": "r",
    }
    assert await Rating.objects.filter(message_id=answer, value="down").aexists()


@db
async def test_a_wrong_rate_frame_gets_an_error_frame_and_the_socket_goes_on(user):
    socket = await open_socket(await session_cookie(user))
    await socket.connect()

    await socket.send_json_to({"type": "rate", "message_id": "nope", "value": "up"})
    unknown = await socket.receive_json_from(timeout=5)
    await socket.send_json_to({"type": "rate", "message_id": "nope", "value": "sideways"})
    malformed = await socket.receive_json_from(timeout=5)
    await socket.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert unknown["error"]["code"] == "message_not_found"
    assert malformed["error"]["code"] == "invalid_rating"
    assert frames[-1]["event"] == "completed"
