"""Every door checked, per user: authentication, ownership, limits, secrets, data."""

from __future__ import annotations

import asyncio
import datetime
import logging

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import AsyncClient, Client
from django.utils import timezone

from chatproxy.models import ApiKey, Conversation, Message
from tests.conftest import (
    chat,
    frames_until_terminal,
    open_socket,
    read_body,
    read_events,
    session_cookie,
)
from tests.fake_upstream import Reply
from tests.test_pipeline import FAILURES, KEY

HI = {"messages": [{"role": "user", "content": "Hi"}]}
db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def people(django_user_model):
    staff = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
    staff.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_conversation", "view_message"])
    )
    return {
        "anonymous": None,
        "alice": django_user_model.objects.create_user("alice", password="pw"),
        "bob": django_user_model.objects.create_user("bob", password="pw"),
        "staff": staff,
        "superuser": django_user_model.objects.create_superuser("root", password="pw"),
    }


async def client_for(user) -> AsyncClient:
    c = AsyncClient()
    if user is not None:
        await c.aforce_login(user)
    return c


async def alices_conversation(people) -> str:
    events = await read_events(await chat(await client_for(people["alice"]), HI))
    return events[0]["conversation_id"]


# The authorization matrix: who gets what, on each door.

NEW_CHAT = {"anonymous": 401, "alice": 200, "bob": 200, "staff": 200, "superuser": 200}
CONTINUE_ALICES = {"anonymous": 401, "alice": 200, "bob": 404, "staff": 404, "superuser": 404}
ADMIN_LIST = {"anonymous": 302, "alice": 302, "bob": 302, "staff": 200, "superuser": 200}


@db
@pytest.mark.parametrize("who", NEW_CHAT)
async def test_matrix_http_new_conversation(people, who):
    response = await chat(await client_for(people[who]), HI)

    assert response.status_code == NEW_CHAT[who]
    if response.status_code == 200:
        await read_body(response)


@db
@pytest.mark.parametrize("who", CONTINUE_ALICES)
async def test_matrix_http_continue_alices_conversation(people, who):
    conversation_id = await alices_conversation(people)
    body = {**HI, "conversation_id": conversation_id}

    response = await chat(await client_for(people[who]), body)

    assert response.status_code == CONTINUE_ALICES[who]
    if response.status_code == 200:
        assert (await read_events(response))[-1]["event"] == "completed"
    else:
        assert orjson.loads(response.content)["error"]["code"] in {
            "authentication_required",
            "conversation_not_found",
        }


@db
@pytest.mark.parametrize("who", CONTINUE_ALICES)
async def test_matrix_websocket_continue_alices_conversation(people, who):
    conversation_id = await alices_conversation(people)
    user = people[who]
    socket = await open_socket(await session_cookie(user) if user else "")
    await socket.connect()

    if user is None:
        assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
        return
    await socket.send_json_to({"type": "chat", "conversation_id": conversation_id, **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    expected = "completed" if CONTINUE_ALICES[who] == 200 else "conversation_not_found"
    last = frames[-1]
    assert (last["event"] if last["event"] == "completed" else last["error"]["code"]) == expected


# The WebSocket's origin check, for alice's logged-in browser session: Django's CSRF rule.

ORIGINS = {
    "same origin": ("http://testserver", "completed"),
    "another port": ("http://testserver:8001", 403),
    "another scheme": ("https://testserver", 403),
    "a trusted origin": ("https://app.example.com", "completed"),
    # Not a browser: let through, but its session cookie is ignored, so alice is nobody.
    "no origin": (None, 4401),
}


@db
@pytest.mark.parametrize("row", ORIGINS)
async def test_matrix_websocket_origin(people, settings, row):
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]
    origin, expected = ORIGINS[row]
    cookie = await session_cookie(people["alice"])
    socket = await open_socket(cookie, origin=origin.encode() if origin else None)

    outcome = await chat_over(socket)

    assert outcome == expected


async def chat_over(socket) -> str | int:
    """Chat once over a socket: the terminal event, or the handshake's 403, or a close code."""
    connected, _ = await socket.connect()
    if not connected:
        return 403
    await socket.send_json_to({"type": "chat", **HI})
    first = await socket.receive_output(timeout=5)
    if first["type"] == "websocket.close":
        await socket.disconnect()
        return first["code"]
    frames = [orjson.loads(first["text"])]
    if frames[0]["event"] not in ("completed", "error"):
        frames += await frames_until_terminal(socket)
    await socket.disconnect()
    return frames[-1]["event"]


# Who a socket is, by whether it carries an Origin (a browser) and how it authenticates.

SOCKET_DOORS = {
    "origin and session": ("http://testserver", "session", "completed"),
    "origin and bearer key": ("http://testserver", "bearer", "completed"),
    "no origin and bearer key": (None, "bearer", "completed"),
    "no origin and session": (None, "session", 4401),  # the session is ignored
}


@db
@pytest.mark.parametrize("door", SOCKET_DOORS)
async def test_matrix_websocket_origin_and_authentication(people, door):
    origin, credential, expected = SOCKET_DOORS[door]
    _, raw = await sync_to_async(ApiKey.objects.issue)(people["alice"], "bot")
    cookie = await session_cookie(people["alice"]) if credential == "session" else ""
    socket = await open_socket(
        cookie,
        origin=origin.encode() if origin else None,
        bearer=raw if credential == "bearer" else "",
    )

    assert await chat_over(socket) == expected
    if expected == "completed":
        assert (await Conversation.objects.aget()).owner_id == people["alice"].pk


@db
async def test_socket_without_origin_ignores_the_session_even_when_anonymous_chat_is_on(
    people, settings
):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    conversation_id = await alices_conversation(people)
    socket = await open_socket(await session_cookie(people["alice"]), origin=None)
    await socket.connect()

    await socket.send_json_to({"type": "chat", "conversation_id": conversation_id, **HI})
    theirs = await socket.receive_json_from(timeout=5)
    await socket.send_json_to({"type": "chat", **HI})
    own = await frames_until_terminal(socket)
    await socket.disconnect()

    assert theirs["error"]["code"] == "conversation_not_found"
    assert own[-1]["event"] == "completed"
    conversation = await Conversation.objects.aget(pk=own[0]["conversation_id"])
    assert conversation.owner_id is None and conversation.session_key.startswith("ws-")


@db
@pytest.mark.parametrize("who", ADMIN_LIST)
async def test_matrix_admin_transcripts(people, who):
    conversation_id = await alices_conversation(people)
    c = Client()
    if people[who] is not None:
        await sync_to_async(c.force_login)(people[who])

    listing = await sync_to_async(c.get)("/admin/chatproxy/conversation/")
    detail = await sync_to_async(c.get)(f"/admin/chatproxy/conversation/{conversation_id}/change/")

    assert listing.status_code == detail.status_code == ADMIN_LIST[who]


@db
async def test_conversation_ids_are_random_uuid4(people):
    ids = {await alices_conversation(people) for _ in range(3)}

    assert len(ids) == 3
    assert all(i[14] == "4" for i in ids)


# Bearer API keys for server-to-server clients.


@db
async def test_bearer_key_streams_without_a_session_or_csrf(people):
    _, raw = await sync_to_async(ApiKey.objects.issue)(people["alice"], "backend")
    strict = AsyncClient(enforce_csrf_checks=True)

    response = await chat(strict, HI, headers={"Authorization": f"Bearer {raw}"})

    assert (await read_events(response))[-1]["event"] == "completed"
    conversation = await Conversation.objects.aget()
    assert conversation.owner_id == people["alice"].pk
    key = await ApiKey.objects.aget()
    assert key.hashed != raw and raw not in key.hashed and key.last_used_at is not None


@db
@pytest.mark.parametrize("value", ["Bearer cpx_nope_nope", "Bearer ", "Bearer sk-other"])
async def test_unknown_bearer_key_is_401_even_with_a_session(people, value):
    response = await chat(await client_for(people["alice"]), HI, headers={"Authorization": value})

    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "invalid_api_key"
    assert response["WWW-Authenticate"] == 'Bearer realm="chatproxy"'


@db
async def test_revoked_key_is_refused(people):
    key, raw = await sync_to_async(ApiKey.objects.issue)(people["alice"], "old")
    await ApiKey.objects.filter(pk=key.pk).aupdate(revoked=True)

    response = await chat(AsyncClient(), HI, headers={"Authorization": f"Bearer {raw}"})

    assert response.status_code == 401


@db
async def test_bearer_key_over_websocket(people):
    _, raw = await sync_to_async(ApiKey.objects.issue)(people["bob"], "bot")
    socket = await open_socket()
    socket.scope["headers"].append((b"authorization", f"Bearer {raw}".encode()))
    bad = await open_socket()
    bad.scope["headers"].append((b"authorization", b"Bearer cpx_wrong"))

    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()
    await bad.connect()

    assert frames[-1]["event"] == "completed"
    assert await bad.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}


@db
def test_admin_shows_a_new_key_once_and_stores_only_its_hash(people):
    c = Client()
    c.force_login(people["superuser"])

    response = c.post(
        "/admin/chatproxy/apikey/add/", {"user": people["alice"].pk, "name": "ci"}, follow=True
    )

    shown = [str(m) for m in response.context["messages"] if "cpx_" in str(m)]
    assert len(shown) == 2  # the one-time key, and Django's "added" line with its prefix only
    raw = shown[0].split(": ")[-1]
    assert shown[0].startswith("Copy this API key now") and raw not in shown[1]
    key = ApiKey.objects.get()
    assert ApiKey.objects.user_for(raw) == people["alice"]
    listing = c.get("/admin/chatproxy/apikey/").content.decode()
    detail = c.get(f"/admin/chatproxy/apikey/{key.pk}/change/").content.decode()
    assert raw not in listing and raw not in detail


# Limits.


@db
async def test_model_allowed_only_for_members_of_its_group(people, settings, upstream):
    settings.CHATPROXY_GROUP_MODELS = {"pro": ["gpt-pro"]}
    pro = await Group.objects.acreate(name="pro")
    await sync_to_async(people["alice"].groups.add)(pro)
    body = {**HI, "model": "gpt-pro"}

    member = await chat(await client_for(people["alice"]), body)
    outsider = await chat(await client_for(people["bob"]), body)

    assert (await read_events(member))[0]["model"] == "gpt-pro"
    assert outsider.status_code == 400
    assert orjson.loads(outsider.content)["error"]["code"] == "model_not_allowed"


@db
async def test_rate_limit_answers_429_with_retry_after(people, settings):
    settings.CHATPROXY_RATE_LIMIT = (2, 60)
    client = await client_for(people["alice"])

    first, second = [await read_events(await chat(client, HI)) for _ in range(2)]
    third = await chat(client, HI)
    others = await chat(await client_for(people["bob"]), HI)

    assert first[-1]["event"] == second[-1]["event"] == "completed"
    assert third.status_code == 429
    assert orjson.loads(third.content)["error"]["code"] == "rate_limited"
    assert 1 <= int(third["Retry-After"]) <= 60
    assert others.status_code == 200
    await read_body(others)


@db
async def test_rate_limit_applies_to_the_websocket(people, settings):
    settings.CHATPROXY_RATE_LIMIT = (1, 60)
    socket = await open_socket(await session_cookie(people["alice"]))
    await socket.connect()

    await socket.send_json_to({"type": "chat", **HI})
    await frames_until_terminal(socket)
    await socket.send_json_to({"type": "chat", **HI})
    refused = await socket.receive_json_from(timeout=5)
    await socket.disconnect()

    assert refused["error"]["code"] == "rate_limited" and refused["retry_after"] >= 1


@db
async def test_concurrent_stream_cap_answers_429(people, settings, upstream):
    settings.CHATPROXY_MAX_STREAMS = 1
    upstream.enqueue(Reply(tokens=["slow "] * 100, delay=0.02))
    socket = await open_socket(await session_cookie(people["alice"]))
    await socket.connect()
    await socket.send_json_to({"type": "chat", **HI})
    await socket.receive_json_from(timeout=5)  # analyzing: the answer is streaming

    second = await chat(await client_for(people["alice"]), HI)
    someone_else = await chat(await client_for(people["bob"]), HI)
    await socket.send_json_to({"type": "cancel"})
    await frames_until_terminal(socket)
    await socket.disconnect()

    assert second.status_code == 429
    assert orjson.loads(second.content)["error"]["code"] == "too_many_streams"
    assert second["Retry-After"] == "5"
    assert someone_else.status_code == 200
    await read_body(someone_else)


# Secrets: the API key never reaches a client or the logs.


@db
@pytest.mark.parametrize(("reply", "code", "partial"), FAILURES)
async def test_api_key_never_appears_in_responses_or_logs(
    people, upstream, caplog, reply, code, partial
):
    upstream.enqueue(reply)
    caplog.set_level(logging.INFO)

    body = await read_body(await chat(await client_for(people["alice"]), HI))
    socket = await open_socket(await session_cookie(people["alice"]))
    await socket.connect()
    upstream.enqueue(reply)
    await socket.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert code.encode() in body and frames[-1]["error"]["code"] == code
    everything = body.decode() + str(frames) + caplog.text
    assert KEY not in everything
    assert KEY[:12] not in everything
    assert "upstream exploded" not in body.decode() + str(frames)


@db
def test_api_key_never_appears_in_admin(people):
    c = Client()
    c.force_login(people["superuser"])

    pages = [c.get(url).content.decode() for url in ("/admin/", "/admin/chatproxy/conversation/")]

    assert all(KEY not in page for page in pages)


# Data: privacy mode, retention, escaping.


@db
async def test_store_content_off_keeps_metadata_only(people, settings, upstream):
    settings.CHATPROXY_STORE_CONTENT = False
    client = await client_for(people["alice"])
    first = await read_events(await chat(client, HI))
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Echo: Hi"},
        {"role": "user", "content": "More"},
    ]

    second = await read_events(
        await chat(client, {"conversation_id": first[0]["conversation_id"], "messages": history})
    )

    assert second[-1]["event"] == "completed"
    assert (await upstream.wait_for_request(2)).json["messages"] == history
    rows = [m async for m in Message.objects.all()]
    assert rows and all(m.content == "" and m.raw_content == "" for m in rows)
    answers = [m for m in rows if m.role == "assistant" and m.status]  # not the sent history
    assert [(m.status, bool(m.total_tokens)) for m in answers] == [("completed", True)] * 2
    assert (await Conversation.objects.aget()).title == ""


@db
def test_clearconversations_deletes_only_old_ones(people, capsys):
    from chatproxy.models import Owner

    old_id, _ = Conversation.objects.start_turn(
        Owner(user_id=people["alice"].pk), None, HI["messages"], "gpt-test"
    )
    new_id, _ = Conversation.objects.start_turn(
        Owner(user_id=people["alice"].pk), None, HI["messages"], "gpt-test"
    )
    Conversation.objects.filter(pk=old_id).update(
        updated_at=timezone.now() - datetime.timedelta(days=40)
    )

    call_command("clearconversations", "--days", "30")

    assert list(Conversation.objects.values_list("pk", flat=True)) == [new_id]
    assert Message.objects.filter(conversation_id=old_id).count() == 0
    assert "Deleted 1 conversations older than 30 days." in capsys.readouterr().out
    with pytest.raises(CommandError, match="--days must be 1 or more"):
        call_command("clearconversations", "--days", "0")


@db
def test_model_text_is_escaped_in_admin(people):
    from chatproxy.models import Owner

    _, answer_id = Conversation.objects.start_turn(
        Owner(user_id=people["alice"].pk),
        None,
        [{"role": "user", "content": "<script>alert(1)</script>"}],
        "gpt-test",
    )
    Message.objects.filter(pk=answer_id).update(content='<img src=x onerror="alert(2)">')
    c = Client()
    c.force_login(people["superuser"])

    html = c.get(
        f"/admin/chatproxy/conversation/{Message.objects.get(pk=answer_id).conversation_id}/change/"
    ).content.decode()

    assert (
        "<script>alert(1)</script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    )
    assert '<img src=x onerror="alert(2)">' not in html


@db
async def test_rate_limit_holds_under_concurrent_requests(people, settings):
    settings.CHATPROXY_RATE_LIMIT = (5, 60)
    client = await client_for(people["alice"])

    responses = await asyncio.gather(*(chat(client, HI) for _ in range(20)))

    accepted = [r for r in responses if r.status_code == 200]
    for response in accepted:
        await read_body(response)
    assert len(accepted) == 5
    assert {r.status_code for r in responses} == {200, 429}


@db
async def test_stream_cap_holds_under_concurrent_requests(people, settings, upstream):
    settings.CHATPROXY_MAX_STREAMS = 2
    upstream.default_reply = lambda body: Reply(tokens=["slow "] * 20, delay=0.02)
    client = await client_for(people["alice"])

    responses = await asyncio.gather(*(chat(client, HI) for _ in range(10)))

    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    for response in accepted:
        assert (await read_events(response))[-1]["event"] == "completed"
    assert (len(accepted), len(refused)) == (2, 8)
    assert {orjson.loads(r.content)["error"]["code"] for r in refused} == {"too_many_streams"}


RESUME_ALICES = {"anonymous": 401, "alice": 200, "bob": 404, "staff": 404, "superuser": 404}
CANCEL_ALICES = {"anonymous": 401, "alice": 409, "bob": 404, "staff": 404, "superuser": 404}
READ_ALICES = {"anonymous": 401, "alice": 200, "bob": 404, "staff": 404, "superuser": 404}


@db
@pytest.mark.parametrize("who", RESUME_ALICES)
async def test_matrix_resume_cancel_and_read_alices_conversation(people, who):
    conversation_id = await alices_conversation(people)
    client = await client_for(people[who])

    resumed = await client.get(f"/completions/{conversation_id}/stream")
    cancelled = await client.post(f"/completions/{conversation_id}/cancel")
    read = await client.get(f"/conversations/{conversation_id}")

    assert resumed.status_code == RESUME_ALICES[who]
    if resumed.status_code == 200:
        assert (await read_events(resumed))[-1]["event"] == "completed"
    # Alice's answer is finished, so there is nothing to stop: 409, not 404.
    assert cancelled.status_code == CANCEL_ALICES[who]
    assert read.status_code == READ_ALICES[who]


@db
async def test_bearer_key_reads_its_users_conversations(people):
    conversation_id = await alices_conversation(people)
    _, raw = await sync_to_async(ApiKey.objects.issue)(people["alice"], "reader")
    _, bobs = await sync_to_async(ApiKey.objects.issue)(people["bob"], "reader")
    client = AsyncClient()

    mine = await client.get("/conversations", headers={"Authorization": f"Bearer {raw}"})
    theirs = await client.get(
        f"/conversations/{conversation_id}", headers={"Authorization": f"Bearer {bobs}"}
    )

    assert [c["id"] for c in orjson.loads(mine.content)["conversations"]] == [conversation_id]
    assert theirs.status_code == 404
