"""A conversation as a whole, for its owner, over HTTP and WebSocket: list, search, read,
rename, delete, switch branch, list branches; resume and cancel per answer on any branch."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import AsyncClient

from chatproxy import titles
from chatproxy.models import Conversation, Message
from tests.conftest import chat, frames_until_terminal, open_socket, read_events, session_cookie
from tests.fake_upstream import Reply

pytestmark = pytest.mark.django_db(transaction=True)

NOT_FOUND = {
    "error": {
        "code": "conversation_not_found",
        "message": "No conversation with that id belongs to you. Pick one from the list.",
    }
}
SLOW = Reply(tokens=[f"w{i} " for i in range(200)], delay=0.02)


async def ask(client, upstream, body, reply="ok"):
    upstream.enqueue(Reply(tokens=[reply]))
    events = await read_events(await chat(client, body))
    assert events[-1]["event"] == "completed", events
    return events


async def started(client, upstream, text="Hi", reply="A1"):
    events = await ask(client, upstream, {"messages": [{"role": "user", "content": text}]}, reply)
    return events[0]["conversation_id"], events[0]["message_id"]


async def branched(client, upstream):
    """Hi / A1, then A1 regenerated as A1b: two branches, the second active."""
    conversation_id, answer = await started(client, upstream)
    body = {"conversation_id": conversation_id, "regenerate": answer}
    second = await ask(client, upstream, body, "A1b")
    return conversation_id, answer, second[0]["message_id"]


def json_body(response):
    return response.status_code, response.json()


async def send(client, method, url, body):
    """A JSON request: PATCH or POST ``body`` to ``url``."""
    return await getattr(client, method)(url, body, "application/json")


# Listing and searching


async def test_the_list_pages_through_the_latest_first(client, user):
    for i in range(5):
        await Conversation.objects.acreate(owner=user, title=f"c{i}")

    first = (await client.get("/conversations?limit=2")).json()
    second = (await client.get("/conversations?limit=2&page=3")).json()

    assert len(first["conversations"]) == 2 and first["next_page"] == 2
    assert len(second["conversations"]) == 1 and second["next_page"] is None


async def test_search_finds_titles_and_messages_of_the_owner_only(client, upstream, other_user):
    mine, _ = await started(client, upstream, "Plan a trip to Lisbon", "Sure")
    await started(client, upstream, "Bake bread", "Flour, water")
    other = AsyncClient()
    await other.aforce_login(other_user)
    await started(other, upstream, "Lisbon for Bob", "ok")

    by_title = (await client.get("/conversations?q=lisbon")).json()["conversations"]
    by_answer = (await client.get("/conversations?q=FLOUR")).json()["conversations"]

    assert [c["id"] for c in by_title] == [mine]
    assert [c["title"] for c in by_answer] == ["Bake bread"]


@pytest.mark.parametrize("query", ["page=0", "page=x", "limit=0", "limit=101"])
async def test_a_bad_page_or_limit_is_400(client, query):
    status, body = json_body(await client.get(f"/conversations?{query}"))

    assert status == 400 and body["error"]["code"] == "invalid_request"


# Renaming and deleting


async def test_rename_sets_the_title_the_owner_gives(client, upstream):
    conversation_id, _ = await started(client, upstream)

    status, body = json_body(
        await send(
            client, "patch", f"/conversations/{conversation_id}", {"title": "  Trip  plans "}
        )
    )

    assert status == 200 and body["title"] == "Trip plans"
    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Trip plans"


@pytest.mark.parametrize("title", ["", "   ", 5, None, "x" * 81])
async def test_a_bad_title_is_400_saying_what_to_send(client, upstream, title):
    conversation_id, _ = await started(client, upstream)

    status, body = json_body(
        await send(client, "patch", f"/conversations/{conversation_id}", {"title": title})
    )

    assert status == 400 and body["error"]["code"] == "invalid_title"


async def test_delete_removes_the_rows_by_default(client, upstream):
    conversation_id, _ = await started(client, upstream)

    status, body = json_body(await client.delete(f"/conversations/{conversation_id}"))

    assert status == 200 and body == {"id": conversation_id, "deleted": True}
    assert not await Conversation.objects.filter(pk=conversation_id).aexists()
    assert not await Message.objects.filter(conversation_id=conversation_id).aexists()


async def test_a_soft_delete_hides_the_conversation_and_keeps_its_rows(client, upstream, settings):
    settings.CHATPROXY_DELETE = "soft"
    conversation_id, _ = await started(client, upstream)

    assert (await client.delete(f"/conversations/{conversation_id}")).status_code == 200

    assert (await client.get(f"/conversations/{conversation_id}")).json() == NOT_FOUND
    assert (await client.get("/conversations")).json()["conversations"] == []
    follow = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "x"}]}
    assert (await chat(client, follow)).status_code == 404
    kept = await Conversation.objects.aget(pk=conversation_id)
    assert kept.deleted_at is not None
    assert await Message.objects.filter(conversation_id=conversation_id).acount() == 2


async def test_deleting_while_an_answer_streams_is_409(client, upstream):
    upstream.enqueue(SLOW)
    response = await chat(client, {"messages": [{"role": "user", "content": "Hi"}]})
    stream = aiter(response.streaming_content)
    analyzing = await anext(stream)
    conversation_id = orjson.loads(analyzing)["conversation_id"]

    status, body = json_body(await client.delete(f"/conversations/{conversation_id}"))

    assert status == 409 and body["error"]["code"] == "conversation_streaming"
    await client.post(f"/completions/{conversation_id}/cancel")
    async for _ in stream:
        pass


# Branches


async def test_branches_lists_each_leaf_and_marks_the_active_one(client, upstream):
    conversation_id, first, second = await branched(client, upstream)

    status, body = json_body(await client.get(f"/conversations/{conversation_id}/branches"))

    assert status == 200
    assert [(b["leaf"], b["active"], b["messages"]) for b in body["branches"]] == [
        (first, False, 2),
        (second, True, 2),
    ]
    assert body["active_leaf"] == second
    assert {b["question"] for b in body["branches"]} == {"Hi"}


async def test_the_transcript_shows_the_active_branch_with_its_siblings(client, upstream):
    conversation_id, first, second = await branched(client, upstream)

    body = (await client.get(f"/conversations/{conversation_id}")).json()

    assert [m["content"] for m in body["messages"]] == ["Hi", "A1b"]
    assert body["messages"][1]["siblings"] == [first, second]
    assert "siblings" not in body["messages"][0]


async def test_switching_makes_the_next_turn_follow_that_branch(client, upstream):
    conversation_id, first, second = await branched(client, upstream)

    status, body = json_body(
        await send(
            client, "post", f"/conversations/{conversation_id}/branch", {"message_id": first}
        )
    )
    assert status == 200 and body["active_leaf"] == first
    assert [m["content"] for m in body["messages"]] == ["Hi", "A1"]
    follow = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "Go"}]}
    await ask(client, upstream, follow)

    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Go"},
    ]


async def test_switching_to_a_question_lands_on_its_newest_answer(client, upstream):
    conversation_id, first, second = await branched(client, upstream)
    hi = await Message.objects.aget(conversation_id=conversation_id, role="user")
    await send(client, "post", f"/conversations/{conversation_id}/branch", {"message_id": first})

    body = (
        await client.post(
            f"/conversations/{conversation_id}/branch",
            {"message_id": str(hi.pk)},
            "application/json",
        )
    ).json()

    assert body["active_leaf"] == second


async def test_switching_to_a_message_of_another_conversation_is_404(client, upstream):
    conversation_id, _ = await started(client, upstream)
    _, elsewhere = await started(client, upstream)

    status, body = json_body(
        await client.post(
            f"/conversations/{conversation_id}/branch",
            {"message_id": elsewhere},
            "application/json",
        )
    )

    assert status == 404 and body["error"]["code"] == "message_not_found"


# Ownership: every door answers the same 404 for someone else's conversation


async def test_every_conversation_door_is_404_for_someone_else(client, upstream, other_user):
    conversation_id, answer = await started(client, upstream)
    other = AsyncClient()
    await other.aforce_login(other_user)
    base = f"/conversations/{conversation_id}"

    responses = [
        await other.get(base),
        await other.patch(base, {"title": "mine"}, "application/json"),
        await other.delete(base),
        await other.get(f"{base}/branches"),
        await send(other, "post", f"{base}/branch", {"message_id": answer}),
    ]

    assert [r.status_code for r in responses] == [404] * 5
    assert {r.json()["error"]["code"] for r in responses} == {"conversation_not_found"}
    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Hi"


# Resume and cancel per answer, on any branch


async def test_resume_replays_the_answer_a_message_id_names_on_another_branch(client, upstream):
    conversation_id, first, second = await branched(client, upstream)

    response = await client.get(f"/completions/{conversation_id}/stream?message_id={first}")
    events = await read_events(response)

    assert events[0]["message_id"] == first and events[0]["resumed"] is True
    assert [e["content"] for e in events if e["event"] == "answering"] == ["A1"]
    latest = await read_events(await client.get(f"/completions/{conversation_id}/stream"))
    assert latest[0]["message_id"] == second


async def test_resume_of_a_message_id_not_an_answer_there_is_404(client, upstream):
    conversation_id, _ = await started(client, upstream)

    responses = [
        await client.get(f"/completions/{conversation_id}/stream?message_id={uuid.uuid4()}"),
        await client.get(f"/completions/{conversation_id}/stream?message_id=nope"),
    ]

    assert [r.status_code for r in responses] == [404, 404]


async def test_an_idempotency_key_replays_a_regenerated_answer(client, upstream):
    conversation_id, answer = await started(client, upstream)
    body = {"conversation_id": conversation_id, "regenerate": answer}
    headers = {"Idempotency-Key": "regen-1"}
    upstream.enqueue(Reply(tokens=["again"]))
    first = await read_events(await chat(client, body, headers=headers))

    retried = await read_events(await chat(client, body, headers=headers))

    assert retried[0]["message_id"] == first[0]["message_id"] and retried[0]["resumed"]
    assert len(upstream.requests) == 2


async def test_staff_watch_the_answer_a_message_id_names_on_another_branch(
    client, upstream, django_user_model
):
    conversation_id, first, _ = await branched(client, upstream)
    staff = await sync_to_async(django_user_model.objects.create_user)(
        "staff", password="pw", is_staff=True
    )
    view = await Permission.objects.aget(codename="view_conversation")
    await sync_to_async(staff.user_permissions.add)(view)
    watcher = AsyncClient()
    await watcher.aforce_login(staff)

    watched = await read_events(
        await watcher.get(f"/completions/{conversation_id}/watch?message_id={first}")
    )
    refused = await client.get(f"/completions/{conversation_id}/watch?message_id={first}")

    assert watched[0]["message_id"] == first and watched[-1]["event"] == "completed"
    assert refused.status_code == 404


async def test_cancel_stops_the_answer_a_message_id_names(client, upstream, saved_answers):
    conversation_id, answer = await started(client, upstream)
    upstream.enqueue(SLOW)
    body = {"conversation_id": conversation_id, "regenerate": answer, "detach": True}
    stream = (await chat(client, body)).streaming_content
    running = orjson.loads(await anext(stream))["message_id"]
    base = f"/completions/{conversation_id}/cancel"

    finished = await client.post(f"{base}?message_id={answer}")
    cancelled = await client.post(f"{base}?message_id={running}")
    lines = [orjson.loads(line) async for line in stream]

    assert finished.status_code == 409  # that one has ended: nothing to stop
    assert cancelled.status_code == 202 and cancelled.json()["message_id"] == running
    assert lines[-1]["error"]["code"] == "cancelled"
    saved = await asyncio.wait_for(saved_answers.get(), 10)
    while str(saved.pk) != running:  # the first turn's answer was saved before
        saved = await asyncio.wait_for(saved_answers.get(), 10)
    assert (saved.status, saved.error_code) == ("interrupted", "cancelled")


# The same over the WebSocket


@pytest.fixture
async def socket(user):
    comm = await open_socket(await session_cookie(user))
    connected, _ = await comm.connect()
    assert connected
    yield comm
    await comm.disconnect()


async def frame(socket, content):
    await socket.send_json_to(content)
    return await socket.receive_json_from(timeout=5)


async def test_a_socket_regenerates_and_edits(socket, upstream):
    upstream.enqueue(Reply(tokens=["A1"]), Reply(tokens=["A1b"]), Reply(tokens=["A2"]))
    await socket.send_json_to({"type": "chat", "messages": [{"role": "user", "content": "Hi"}]})
    first = await frames_until_terminal(socket)
    conversation_id = first[0]["conversation_id"]

    regenerate = {"type": "chat", "conversation_id": conversation_id}
    await socket.send_json_to({**regenerate, "regenerate": first[0]["message_id"]})
    again = await frames_until_terminal(socket)
    hi = await Message.objects.aget(conversation_id=conversation_id, role="user")
    edit = {"edit": str(hi.pk), "messages": [{"role": "user", "content": "Hello"}]}
    await socket.send_json_to({**regenerate, **edit})
    edited = await frames_until_terminal(socket)

    assert again[-1]["event"] == edited[-1]["event"] == "completed"
    assert [r.json["messages"] for r in upstream.requests[1:]] == [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hello"}],
    ]


async def test_a_socket_lists_renames_switches_and_deletes(socket, client, upstream):
    conversation_id, first, second = await branched(client, upstream)

    listed = await frame(socket, {"type": "conversations", "request_id": "l"})
    renamed = await frame(
        socket, {"type": "rename", "conversation_id": conversation_id, "title": "Named"}
    )
    branches = await frame(socket, {"type": "branches", "conversation_id": conversation_id})
    switched = await frame(
        socket, {"type": "switch", "conversation_id": conversation_id, "message_id": first}
    )
    read = await frame(socket, {"type": "conversation", "conversation_id": conversation_id})
    deleted = await frame(socket, {"type": "delete", "conversation_id": conversation_id})

    assert listed["event"] == "conversations" and listed["request_id"] == "l"
    assert [c["id"] for c in listed["conversations"]] == [conversation_id]
    assert renamed["event"] == "renamed" and renamed["title"] == "Named"
    assert branches["event"] == "branches" and len(branches["branches"]) == 2
    assert switched["event"] == "switched" and switched["active_leaf"] == first
    assert read["event"] == "conversation" and read["messages"][-1]["id"] == first
    assert deleted == {"event": "deleted", "id": conversation_id, "deleted": True}
    assert not await Conversation.objects.filter(pk=conversation_id).aexists()


async def test_a_socket_gets_the_same_404_for_someone_elses_conversation(
    socket, upstream, other_user
):
    other = AsyncClient()
    await other.aforce_login(other_user)
    conversation_id, answer = await started(other, upstream)

    frames = [
        await frame(socket, {"type": kind, "conversation_id": conversation_id, **extra})
        for kind, extra in [
            ("conversation", {}),
            ("rename", {"title": "x"}),
            ("delete", {}),
            ("branches", {}),
            ("switch", {"message_id": answer}),
            ("resume", {"message_id": answer}),
        ]
    ]

    assert {(f["event"], f["error"]["code"]) for f in frames} == {
        ("error", "conversation_not_found")
    }
    assert await Conversation.objects.filter(pk=conversation_id).aexists()


async def test_a_socket_resumes_an_answer_on_another_branch(socket, client, upstream):
    conversation_id, first, _ = await branched(client, upstream)

    await socket.send_json_to(
        {"type": "resume", "conversation_id": conversation_id, "message_id": first}
    )
    frames = await frames_until_terminal(socket)

    assert frames[0]["message_id"] == first
    assert [f["content"] for f in frames if f["event"] == "answering"] == ["A1"]


# Titles


async def test_the_title_is_the_first_message_by_default(client, upstream):
    conversation_id, _ = await started(client, upstream, "  Plan a   trip\nto Lisbon ")

    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Plan a trip to Lisbon"
    assert len(upstream.requests) == 1


TITLED = [("chatproxy.titles.Title", {"words": 4})]


async def test_the_title_interceptor_asks_the_model_after_the_first_answer(
    client, upstream, settings
):
    settings.CHATPROXY_INTERCEPTORS = TITLED
    upstream.enqueue(Reply(tokens=["Lisbon is lovely."]), Reply(tokens=['"Trip to Lisbon."']))

    events = await read_events(
        await chat(client, {"messages": [{"role": "user", "content": "Plan a trip to Lisbon"}]})
    )
    await titles.settled()

    conversation_id = events[0]["conversation_id"]
    assert (await Conversation.objects.aget(pk=conversation_id)).title == "Trip to Lisbon"
    asked = upstream.requests[1].json
    assert asked["stream"] is False and "at most 4 words" in asked["messages"][0]["content"]
    assert asked["messages"][1]["content"] == "Plan a trip to Lisbon\n\nLisbon is lovely."
    follow = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "x"}]}
    await ask(client, upstream, follow)
    await titles.settled()
    assert len(upstream.requests) == 3  # no title call for a later turn


async def test_a_failed_title_call_leaves_the_first_message_title(client, upstream, settings):
    settings.CHATPROXY_INTERCEPTORS = TITLED
    upstream.enqueue(Reply(tokens=["ok"]), Reply(status=500))

    await read_events(await chat(client, {"messages": [{"role": "user", "content": "Hi there"}]}))
    await titles.settled()

    assert (await Conversation.objects.aget()).title == "Hi there"


# Detached turns: a client that leaves does not stop the answer


async def test_a_detached_answer_goes_on_to_the_end_when_its_http_client_leaves(
    client, upstream, saved_answers
):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(40)], delay=0.01))
    response = await chat(client, {"messages": [{"role": "user", "content": "Hi"}], "detach": True})
    stream = response.streaming_content
    analyzing = orjson.loads(await anext(stream))
    await stream.aclose()  # the client left: a reload, a closed tab

    saved = await asyncio.wait_for(saved_answers.get(), 10)

    assert (saved.status, saved.content) == ("completed", "".join(f"w{i} " for i in range(40)))
    assert str(saved.pk) == analyzing["message_id"]
    resumed = await read_events(
        await client.get(f"/completions/{analyzing['conversation_id']}/stream")
    )
    assert resumed[-1]["event"] == "completed"


async def test_a_detached_answer_goes_on_when_its_socket_closes(user, upstream, saved_answers):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(40)], delay=0.01))
    socket = await open_socket(await session_cookie(user))
    await socket.connect()
    await socket.send_json_to(
        {"type": "chat", "detach": True, "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert (await socket.receive_json_from(timeout=5))["event"] == "analyzing"
    await socket.disconnect()

    saved = await asyncio.wait_for(saved_answers.get(), 10)

    assert saved.status == "completed" and saved.content.endswith("w39 ")


async def test_a_detached_answer_stops_on_a_cancel_frame(socket, upstream):
    upstream.enqueue(SLOW)
    await socket.send_json_to(
        {"type": "chat", "detach": True, "messages": [{"role": "user", "content": "Hi"}]}
    )
    analyzing = await socket.receive_json_from(timeout=5)
    await socket.receive_json_from(timeout=5)  # its first words
    await socket.send_json_to({"type": "cancel"})

    frames = await frames_until_terminal(socket)

    assert frames[-1]["error"]["code"] == "cancelled"
    answer = await Message.objects.aget(pk=analyzing["message_id"])
    assert (answer.status, answer.error_code) == ("interrupted", "cancelled")


async def test_detach_must_be_a_boolean(client):
    response = await chat(client, {"messages": [{"role": "user", "content": "Hi"}], "detach": 1})

    assert json_body(response)[1]["error"]["code"] == "invalid_request"


@pytest.mark.parametrize("fields", [{"page": 0}, {"page": True}, {"page": "2"}, {"q": 5}])
async def test_a_socket_list_frame_with_a_bad_page_or_query_is_an_error(socket, fields):
    reply = await frame(socket, {"type": "conversations", **fields})

    assert reply["event"] == "error" and reply["error"]["code"] == "invalid_request"


async def test_a_detached_answer_still_counts_against_the_stream_cap(
    client, upstream, settings, saved_answers
):
    settings.CHATPROXY_MAX_STREAMS = 1
    upstream.enqueue(SLOW)
    hi = {"messages": [{"role": "user", "content": "Hi"}], "detach": True}
    stream = (await chat(client, hi)).streaming_content
    analyzing = orjson.loads(await anext(stream))
    await stream.aclose()  # the client left; the answer goes on

    refused = await chat(client, {"messages": [{"role": "user", "content": "Again"}]})

    assert json_body(refused)[0] == 429
    assert json_body(refused)[1]["error"]["code"] == "too_many_streams"
    cancel = f"/completions/{analyzing['conversation_id']}/cancel"
    assert (await client.post(cancel)).status_code == 202
    saved = await asyncio.wait_for(saved_answers.get(), 10)
    assert (saved.status, saved.error_code) == ("interrupted", "cancelled")
