"""Every door checked, per user: authentication, ownership, limits, secrets, data."""

from __future__ import annotations

import asyncio
import datetime
import logging
import re

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group, Permission
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import AsyncClient, Client
from django.utils import timezone

from chatproxy.feedback import Rating
from chatproxy.models import ApiKey, Conversation, Message, Spend
from tests import sample_tools
from tests.conftest import (
    FAILURES,
    KEY,
    ClientAt,
    chat,
    frames_until_terminal,
    open_socket,
    read_body,
    read_events,
    session_cookie,
    staff_with,
)
from tests.fake_upstream import Reply

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
# The dashboard shows what transcripts do (and who spends the most): the view permission.
DASHBOARD = {"anonymous": 302, "alice": 302, "clerk": 403, "staff": 200, "superuser": 200}


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


# Approving a server tool call: only the conversation's owner runs it.

APPROVE_ALICES = CONTINUE_ALICES


async def alices_call_waiting_for_approval(people, upstream, settings) -> str:
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.refund"]
    sample_tools.refunds.clear()
    refund = {"id": "r", "name": "refund", "arguments": '{"amount": 5}'}
    upstream.enqueue(Reply(tokens=[], tool_calls=[refund]))
    events = await read_events(await chat(await client_for(people["alice"]), HI))
    assert events[-1]["finish_reason"] == "approval_required"
    upstream.enqueue(Reply(tokens=["Refunded."]))
    return events[0]["conversation_id"]


@db
@pytest.mark.parametrize("who", APPROVE_ALICES)
async def test_matrix_http_approve_alices_tool_call(people, upstream, settings, who):
    conversation_id = await alices_call_waiting_for_approval(people, upstream, settings)
    body = {"conversation_id": conversation_id, "approvals": [{"id": "r", "approved": True}]}

    response = await chat(await client_for(people[who]), body)

    assert response.status_code == APPROVE_ALICES[who]
    if response.status_code == 200:
        assert (await read_events(response))[-1]["event"] == "completed"
        assert sample_tools.refunds == [5]
    else:
        assert sample_tools.refunds == []
        assert len(upstream.requests) == 1


@db
@pytest.mark.parametrize("who", APPROVE_ALICES)
async def test_matrix_websocket_approve_alices_tool_call(people, upstream, settings, who):
    conversation_id = await alices_call_waiting_for_approval(people, upstream, settings)
    user = people[who]
    socket = await open_socket(await session_cookie(user) if user else "")
    await socket.connect()

    if user is None:
        assert await socket.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}
        return
    approvals = [{"id": "r", "approved": True}]
    frame = {"type": "chat", "conversation_id": conversation_id, "approvals": approvals}
    await socket.send_json_to(frame)
    last = (await frames_until_terminal(socket))[-1]
    await socket.disconnect()

    if APPROVE_ALICES[who] == 200:
        assert last["event"] == "completed"
        assert sample_tools.refunds == [5]
    else:
        assert last["error"]["code"] == "conversation_not_found"
        assert sample_tools.refunds == []


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
    answer = await Message.objects.aget(conversation_id=conversation_id, role="assistant")
    branch = await sync_to_async(c.get)(
        f"/admin/chatproxy/conversation/{conversation_id}/change/?branch={answer.pk}"
    )

    assert listing.status_code == detail.status_code == branch.status_code == ADMIN_LIST[who]
    assert ('id="chatproxy-branches"' in branch.content.decode()) == (ADMIN_LIST[who] == 200)


@db
@pytest.mark.parametrize("who", DASHBOARD)
def test_matrix_admin_dashboard(people, django_user_model, who):
    people["clerk"] = django_user_model.objects.create_user("clerk", is_staff=True)
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])

    response = c.get("/admin/chatproxy/conversation/dashboard/")

    assert response.status_code == DASHBOARD[who]


# Ratings and review marks have admin lists of their own (their own view permissions), and
# nobody adds or edits one there: users rate over the API, reviewers mark on the transcript.
FEEDBACK_LISTS = {
    "anonymous": (302, 302),
    "alice": (302, 302),
    "staff": (403, 403),
    "superuser": (200, 403),
}


@db
@pytest.mark.parametrize("who", FEEDBACK_LISTS)
@pytest.mark.parametrize("model", ["rating", "annotation"])
def test_matrix_admin_ratings_and_review_marks(people, who, model):
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])

    listing = c.get(f"/admin/chatproxy/{model}/")
    adding = c.get(f"/admin/chatproxy/{model}/add/")

    assert (listing.status_code, adding.status_code) == FEEDBACK_LISTS[who]


# Budgets are set by those with the model's permissions (a superuser here); users only read
# their own, over GET budgets.
BUDGET_PAGES = {"anonymous": (302, 302), "alice": (302, 302), "staff": (403, 403)}
BUDGET_PAGES["superuser"] = (200, 200)


@db
@pytest.mark.parametrize("who", BUDGET_PAGES)
def test_matrix_admin_budgets(people, who):
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])

    listing = c.get("/admin/chatproxy/budget/")
    adding = c.get("/admin/chatproxy/budget/add/")

    assert (listing.status_code, adding.status_code) == BUDGET_PAGES[who]


# Spend (what each turn spent, summed per user and group) is read with its view permission;
# nobody adds, edits or deletes a row: the budgets count them. The budget list links to it
# only for those who may read it.
SPEND_PAGES = {
    # who: (the spend list, its add page, a row's delete page, the budget list links to it)
    "anonymous": (302, 302, 302, False),
    "alice": (302, 302, 302, False),
    "staff": (403, 403, 403, False),
    "accountant": (200, 403, 403, True),
    "superuser": (200, 403, 403, True),
}


@db
@pytest.mark.parametrize("who", SPEND_PAGES)
def test_matrix_admin_spend(people, django_user_model, who):
    people["accountant"] = staff_with("accountant", ["view_spend", "view_budget"])
    row = Spend.objects.create(user=people["alice"], tokens=10, cost=0)
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])

    listing = c.get("/admin/chatproxy/spend/")
    adding = c.get("/admin/chatproxy/spend/add/")
    deleting = c.get(f"/admin/chatproxy/spend/{row.pk}/delete/")
    budgets = c.get("/admin/chatproxy/budget/")

    linked = ">Spend per user and group</a>" in budgets.content.decode()
    assert (listing.status_code, adding.status_code, deleting.status_code, linked) == (
        SPEND_PAGES[who]
    )


# Staff review: reading needs the view permission; adding marks needs the review permission.
REVIEW = {
    # who: (the change page offers the review form, a POSTed note is saved)
    "anonymous": (302, False),
    "alice": (302, False),
    "staff": (200, False),
    "reviewer": ("form", True),
    "superuser": ("form", True),
}


@db
@pytest.mark.parametrize("who", REVIEW)
def test_matrix_admin_review(people, django_user_model, who):
    people["reviewer"] = staff_with("reviewer", ["view_conversation", "review_conversation"])
    conversation = Conversation.objects.create(owner=people["alice"], title="Hi")
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])
    url = f"/admin/chatproxy/conversation/{conversation.pk}/"

    page = c.get(f"{url}change/")
    c.post(f"{url}review/", {"note": "seen"})

    shown = "form" if b"chatproxy-review-form" in page.content else page.status_code
    saved = conversation.annotations.filter(note="seen").exists()
    assert (shown, saved) == REVIEW[who]


# Exporting takes a permission of its own: a file of transcripts leaves the admin's audit.
EXPORT = {
    "anonymous": 302,
    "alice": 302,
    "staff": "refused",
    "reviewer": "refused",
    "exporter": "exported",
    "superuser": "exported",
}


@db
@pytest.mark.parametrize("who", EXPORT)
def test_matrix_admin_export(people, django_user_model, who):
    for name, codenames in [
        ("reviewer", ["view_conversation", "review_conversation"]),
        ("exporter", ["view_conversation", "export_conversation"]),
    ]:
        people[name] = staff_with(name, codenames)
    conversation = Conversation.objects.create(owner=people["alice"], title="Hi")
    c = Client()
    if people[who] is not None:
        c.force_login(people[who])

    outcomes = set()
    for action in ("export_jsonl", "export_csv"):
        response = c.post(
            "/admin/chatproxy/conversation/",
            {"action": action, "_selected_action": [str(conversation.pk)]},
        )
        if response.status_code != 200:
            outcomes.add(response.status_code)
        else:
            outcomes.add("exported" if response.streaming else "refused")
    assert outcomes == {EXPORT[who]}


# A key acts as its user on the chat API, transcripts included: whoever may make one for alice
# may read hers, so that takes a permission of its own (or a superuser).
API_KEYS = {
    # who: (the key list, adding a key for alice, revoking alice's key)
    "anonymous": (302, 302, 302),
    "alice": (302, 302, 302),
    "bob": (302, 302, 302),
    "staff": (403, 403, 403),
    "key clerk": (403, "refused", 403),
    "key issuer": (403, "issued", 403),
    "key keeper": (200, 403, "revoked"),
    "superuser": (200, "issued", "revoked"),
}


@pytest.fixture
def key_people(people, django_user_model):
    """``people`` and three staff with API-key permissions only."""
    grants = {
        "key clerk": ["add_apikey"],
        "key issuer": ["add_apikey", "issue_apikey_for_others"],
        "key keeper": ["view_apikey", "change_apikey"],
    }
    for who, codenames in grants.items():
        people[who] = staff_with(who.replace(" ", "_"), codenames)
    return people


@db
@pytest.mark.parametrize("who", API_KEYS)
def test_matrix_admin_api_keys(key_people, who):
    alice = key_people["alice"]
    key, _ = ApiKey.objects.issue(alice, "alices")
    c = Client()
    if key_people[who] is not None:
        c.force_login(key_people[who])

    listing = c.get("/admin/chatproxy/apikey/")
    added = c.post("/admin/chatproxy/apikey/add/", {"user": alice.pk, "name": "new"})
    revoked = c.post(f"/admin/chatproxy/apikey/{key.pk}/change/", {"name": "x", "revoked": "on"})

    issued = ApiKey.objects.filter(user=alice, name="new").exists()
    key.refresh_from_db()
    outcome = (
        listing.status_code,
        ("issued" if issued else "refused") if added.status_code == 200 else added.status_code,
        "revoked" if key.revoked else revoked.status_code,
    )
    assert outcome == API_KEYS[who]


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

    response = c.post("/admin/chatproxy/apikey/add/", {"user": people["alice"].pk, "name": "ci"})

    html = response.content.decode()
    raw = re.search(r"cpx_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", html).group()
    assert html.count(raw) == 1
    assert "no-store" in response["Cache-Control"]
    key = ApiKey.objects.get()
    assert ApiKey.objects.user_for(raw) == people["alice"]
    assert key.hashed != raw and raw not in key.hashed
    # Nowhere else: not in the pages after it, nor in a message, the session or a cookie.
    for url in ("/admin/", "/admin/chatproxy/apikey/", f"/admin/chatproxy/apikey/{key.pk}/change/"):
        later = c.get(url)
        assert raw not in later.content.decode()
        assert all(raw not in str(m) for m in later.context["messages"])
    cookies = [*response.cookies.values(), *c.cookies.values()]
    assert not [cookie.key for cookie in cookies if raw in cookie.value]
    assert not [s for s in Session.objects.all() if raw in str(s.get_decoded())]


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
    # The sliding window counts up to a tenth of a period more than the period itself.
    assert 1 <= int(third["Retry-After"]) <= 66
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


# Caching: every answer depends on who asks, and may hold a transcript.

PRIVATE = "private, no-store"
PRIVATE_STREAM = "private, no-store, no-transform"
# (who, method, path, status, Cache-Control); "alice's key" sends her bearer key, no cookie.
CACHING = [
    ("alice", "POST", "/completions", 200, PRIVATE_STREAM),
    ("alice's key", "POST", "/completions", 200, PRIVATE_STREAM),
    ("anonymous", "POST", "/completions", 401, PRIVATE),
    ("alice", "GET", "/completions", 405, PRIVATE),
    ("alice", "GET", "/completions/{id}/stream", 200, PRIVATE_STREAM),
    ("bob", "GET", "/completions/{id}/stream", 404, PRIVATE),
    ("alice", "POST", "/completions/{id}/cancel", 409, PRIVATE),
    ("staff", "GET", "/completions/{id}/watch", 200, PRIVATE_STREAM),
    ("bob", "GET", "/completions/{id}/watch", 404, PRIVATE),
    ("alice", "GET", "/conversations", 200, PRIVATE),
    ("alice's key", "GET", "/conversations", 200, PRIVATE),
    ("anonymous", "GET", "/conversations", 401, PRIVATE),
    ("alice", "GET", "/conversations/{id}", 200, PRIVATE),
    ("alice's key", "GET", "/conversations/{id}", 200, PRIVATE),
    ("bob", "GET", "/conversations/{id}", 404, PRIVATE),
    ("alice", "POST", "/conversations/{id}", 405, PRIVATE),
    ("alice", "GET", "/", 200, PRIVATE),
    ("alice", "POST", "/messages/{id}/rating", 415, PRIVATE),
    ("alice", "GET", "/messages/{id}/rating", 405, PRIVATE),
    ("alice", "GET", "/budgets", 200, PRIVATE),
    ("alice's key", "GET", "/budgets", 200, PRIVATE),
    ("anonymous", "GET", "/budgets", 401, PRIVATE),
    ("alice", "POST", "/budgets", 405, PRIVATE),
]


@db
@pytest.mark.parametrize(("who", "method", "path", "status", "cache_control"), CACHING)
async def test_private_answers_are_never_stored_and_vary_on_who_asks(
    people, who, method, path, status, cache_control
):
    conversation_id = await alices_conversation(people)
    headers = {}
    if who == "alice's key":
        _, raw = await sync_to_async(ApiKey.objects.issue)(people["alice"], "backend")
        client, headers = AsyncClient(), {"Authorization": f"Bearer {raw}"}
    else:
        client = await client_for(people[who])
    url = path.format(id=conversation_id)

    if method == "POST" and path == "/completions":
        response = await chat(client, HI, headers=headers)
    else:
        response = await client.generic(method, url, headers=headers)
    if response.streaming:
        await read_body(response)

    assert response.status_code == status
    assert response["Cache-Control"] == cache_control
    assert {v.strip() for v in response["Vary"].split(",")} >= {"Cookie", "Authorization"}


# Ratings: only the owner of an answer rates it; for anyone else it does not exist.
RATE_ALICES = {"anonymous": 401, "alice": 200, "bob": 404, "staff": 404, "superuser": 404}
RATE_ALICES_OVER_A_SOCKET = {
    "anonymous": 4401,
    "alice": "rated",
    "bob": "message_not_found",
    "staff": "message_not_found",
    "superuser": "message_not_found",
}


async def alices_answer(people) -> str:
    events = await read_events(await chat(await client_for(people["alice"]), HI))
    return events[-1]["message_id"]


@db
@pytest.mark.parametrize("who", RATE_ALICES)
async def test_matrix_http_rate_alices_answer(people, who):
    answer = await alices_answer(people)
    client = await client_for(people[who])

    response = await client.post(
        f"/messages/{answer}/rating", {"value": "down"}, content_type="application/json"
    )

    assert response.status_code == RATE_ALICES[who]
    assert await Rating.objects.filter(value="down").aexists() == (response.status_code == 200)


@db
@pytest.mark.parametrize("who", RATE_ALICES_OVER_A_SOCKET)
async def test_matrix_websocket_rate_alices_answer(people, who):
    answer = await alices_answer(people)
    user = people[who]
    socket = await open_socket(await session_cookie(user) if user else "")
    await socket.connect()

    if user is None:
        closed = await socket.receive_output(timeout=5)
        assert closed["code"] == RATE_ALICES_OVER_A_SOCKET[who]
        return
    await socket.send_json_to({"type": "rate", "message_id": answer, "value": "down"})
    frame = await socket.receive_json_from(timeout=5)
    await socket.disconnect()

    outcome = frame["event"] if frame["event"] == "rated" else frame["error"]["code"]
    assert outcome == RATE_ALICES_OVER_A_SOCKET[who]
    assert await Rating.objects.filter(value="down").aexists() == (outcome == "rated")


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
    from chatproxy.owners import Owner

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
    from chatproxy.owners import Owner

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


HEALTH = {"anonymous": 200, "alice": 200, "bob": 200, "staff": 200, "superuser": 200}


@db
@pytest.mark.parametrize("who", HEALTH)
async def test_matrix_health_and_readiness_are_open_and_the_same_for_everyone(people, who):
    client = await client_for(people[who])

    for path in ("/health", "/health/ready"):
        response = await client.get(path)
        assert response.status_code == HEALTH[who]
        assert orjson.loads(response.content) == {"status": "ok"}  # nothing about anyone


METRICS = {"anonymous": 401, "alice": 401, "bob": 401, "staff": 401, "superuser": 200}


@db
@pytest.mark.parametrize("who", METRICS)
async def test_matrix_metrics_need_the_token_or_a_superuser(people, settings, who):
    settings.CHATPROXY_METRICS, settings.CHATPROXY_METRICS_TOKEN = True, "scrape-token-0123"
    client = await client_for(people[who])

    response = await client.get("/metrics")
    with_token = await client.get("/metrics", headers={"Authorization": "Bearer scrape-token-0123"})

    assert response.status_code == METRICS[who]
    assert with_token.status_code == 200


@db
async def test_matrix_metrics_need_a_superuser_when_no_token_is_set(people, settings):
    settings.CHATPROXY_METRICS = True
    # An empty token must never match an empty or bare "Bearer" header.
    for header in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer"}):
        response = await (await client_for(people["staff"])).get("/metrics", headers=header)
        assert response.status_code == 401


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


@db
def test_createapikey_prints_a_working_key_once_and_stores_only_its_hash(people, capsys):
    from chatproxy.models import ApiKey

    call_command("createapikey", "alice", "--name", "nightly report")

    raw = capsys.readouterr().out.strip()
    key = ApiKey.objects.get()
    assert (key.user, key.name) == (people["alice"], "nightly report")
    assert raw.startswith("cpx_") and raw not in key.hashed
    assert ApiKey.objects.user_for(raw) == people["alice"]
    with pytest.raises(CommandError, match="No user 'nobody'"):
        call_command("createapikey", "nobody")


# With anonymous chat on: every identity that comes from a cookie is CSRF-checked.

ANONYMOUS_NEW_CHAT = {
    "cookieless": 200,
    "session_without_token": 403,
    "session_with_token": 200,
    "alice_without_token": 403,
    "alice_with_token": 200,
}
# Each tries to stop the anonymous visitor's (finished) conversation.
ANONYMOUS_CANCEL = {
    "cookieless": 404,
    "session_without_token": 403,
    "session_with_token": 409,
    "alice_without_token": 403,
    "alice_with_token": 404,
}
TOKEN = "k" * 32


async def anonymous_visitor() -> tuple[AsyncClient, str]:
    """A strict client whose anonymous session (made by its first turn) owns a conversation."""
    visitor = AsyncClient(enforce_csrf_checks=True)
    events = await read_events(await chat(visitor, HI))
    assert visitor.cookies["sessionid"].value
    visitor.cookies["csrftoken"] = TOKEN
    return visitor, events[0]["conversation_id"]


async def strict_client_for(who: str, people, visitor: AsyncClient) -> tuple[AsyncClient, dict]:
    if who.startswith("session"):
        client = visitor
    else:
        client = AsyncClient(enforce_csrf_checks=True)
        if who.startswith("alice"):
            await client.aforce_login(people["alice"])
            client.cookies["csrftoken"] = TOKEN
    return client, ({"X-CSRFToken": TOKEN} if who.endswith("with_token") else {})


@db
@pytest.mark.parametrize("who", ANONYMOUS_NEW_CHAT)
async def test_matrix_anonymous_chat_new_conversation_needs_csrf_with_a_cookie(
    people, settings, who
):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, _ = await anonymous_visitor()
    client, headers = await strict_client_for(who, people, visitor)

    response = await chat(client, HI, headers=headers)

    assert response.status_code == ANONYMOUS_NEW_CHAT[who]
    if response.status_code == 200:
        assert (await read_events(response))[-1]["event"] == "completed"
    else:
        assert orjson.loads(response.content)["error"] == {
            "code": "csrf_failed",
            "message": "CSRF check failed. Send the csrftoken cookie's value in the "
            "X-CSRFToken header.",
        }


@db
@pytest.mark.parametrize("who", ANONYMOUS_CANCEL)
async def test_matrix_anonymous_chat_cancel_needs_csrf_with_a_cookie(people, settings, who):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, conversation_id = await anonymous_visitor()
    client, headers = await strict_client_for(who, people, visitor)

    response = await client.post(f"/completions/{conversation_id}/cancel", headers=headers)

    assert response.status_code == ANONYMOUS_CANCEL[who]


@db
async def test_a_cross_site_form_post_cannot_stop_an_anonymous_answer(settings, upstream):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, _ = await anonymous_visitor()
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(40)], delay=0.02))
    response = await chat(visitor, HI, headers={"X-CSRFToken": TOKEN})
    lines = response.streaming_content.__aiter__()
    analyzing = orjson.loads(await anext(lines))
    await anext(lines)  # the answer streams

    # What a form on another site sends: the visitor's cookies, a form body, no token.
    forged = await visitor.post(
        f"/completions/{analyzing['conversation_id']}/cancel",
        "x=1",
        content_type="application/x-www-form-urlencoded",
    )
    rest = [orjson.loads(line) for chunk in [c async for c in lines] for line in chunk.splitlines()]

    assert forged.status_code == 403
    assert rest[-1]["event"] == "completed"
    answer = await Message.objects.aget(pk=analyzing["message_id"])
    assert answer.status == "completed"


# With anonymous chat on: limits per client address, a cap for all anonymous streams, and no
# session row until a turn is accepted.


def from_address(address: str) -> AsyncClient:
    """A cookieless client whose requests come from ``address``."""
    return ClientAt(address)


async def session_count() -> int:
    from django.contrib.sessions.models import Session

    return await Session.objects.acount()


@db
async def test_cookieless_requests_are_rate_limited_per_address(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_RATE_LIMIT = (3, 60)

    answers = [await chat(from_address("198.51.100.7"), HI) for _ in range(6)]
    elsewhere = await chat(from_address("198.51.100.8"), HI)

    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429, 429]
    for response in [*answers[:3], elsewhere]:
        assert (await read_events(response))[-1]["event"] == "completed"
    assert orjson.loads(answers[3].content)["error"]["code"] == "rate_limited"
    assert int(answers[3]["Retry-After"]) >= 1
    assert await session_count() == 4  # one per accepted turn, none for the refused ones


@db
async def test_a_spoofed_x_forwarded_for_is_ignored_without_trusted_proxies(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_RATE_LIMIT = (2, 60)

    answers = [
        await chat(from_address("198.51.100.9"), HI, headers={"X-Forwarded-For": f"10.0.0.{i}"})
        for i in range(4)
    ]

    assert [a.status_code for a in answers] == [200, 200, 429, 429]
    for response in answers[:2]:
        await read_body(response)


@db
async def test_behind_a_trusted_proxy_each_forwarded_client_is_counted_on_its_own(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_RATE_LIMIT = (1, 60)
    settings.CHATPROXY_TRUSTED_PROXIES = ["192.0.2.0/24"]
    proxy = "192.0.2.10"

    def through_proxy(chain: str):
        return chat(from_address(proxy), HI, headers={"X-Forwarded-For": chain})

    first = await through_proxy("203.0.113.1")
    second = await through_proxy("203.0.113.2")
    # The client claims to be someone else; the proxy appended the address it really saw.
    spoofing = await through_proxy("203.0.113.2, 203.0.113.1")

    assert [first.status_code, second.status_code, spoofing.status_code] == [200, 200, 429]
    for response in (first, second):
        await read_body(response)


@db
async def test_concurrent_cookieless_streams_are_capped_per_address(settings, upstream):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_MAX_STREAMS = 3
    upstream.default_reply = lambda body: Reply(tokens=["slow "] * 20, delay=0.02)

    responses = await asyncio.gather(*(chat(from_address("198.51.100.20"), HI) for _ in range(8)))

    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    for response in accepted:
        assert (await read_events(response))[-1]["event"] == "completed"
    assert (len(accepted), len(refused)) == (3, 5)
    assert {orjson.loads(r.content)["error"]["code"] for r in refused} == {"too_many_streams"}


@db
async def test_anonymous_streams_have_a_cap_across_all_addresses(people, settings, upstream):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_MAX_ANONYMOUS_STREAMS = 2
    upstream.default_reply = lambda body: Reply(tokens=["slow "] * 20, delay=0.02)

    responses = await asyncio.gather(
        *(chat(from_address(f"198.51.100.{30 + i}"), HI) for i in range(5))
    )
    user = await chat(await client_for(people["alice"]), HI)

    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    for response in [*accepted, user]:
        assert (await read_events(response))[-1]["event"] == "completed"
    assert (len(accepted), len(refused)) == (2, 3)
    assert orjson.loads(refused[0].content)["error"] == {
        "code": "too_many_anonymous_streams",
        "message": "The site is answering as many visitors without an account as it can "
        "(2 at once). Try again in a moment, or log in.",
    }
    assert refused[0]["Retry-After"] == "5"


@db
async def test_anonymous_sockets_are_rate_limited_per_address(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    settings.CHATPROXY_RATE_LIMIT = (1, 60)
    first, second = await open_socket(), await open_socket()
    for socket in (first, second):  # each owns its turns under a key of its own
        socket.scope["client"] = ["198.51.100.40", 50000]
        await socket.connect()

    await first.send_json_to({"type": "chat", **HI})
    frames = await frames_until_terminal(first)
    await second.send_json_to({"type": "chat", **HI})
    refused = await second.receive_json_from(timeout=5)
    await first.disconnect()
    await second.disconnect()

    assert frames[-1]["event"] == "completed"
    assert refused["error"]["code"] == "rate_limited"


@db
async def test_the_chat_page_creates_no_session_for_a_visitor(settings):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True

    pages = [await AsyncClient().get("/") for _ in range(20)]

    assert {page.status_code for page in pages} == {200}
    assert all(page.cookies["csrftoken"].value for page in pages)
    assert not any("sessionid" in page.cookies for page in pages)
    assert await session_count() == 0


# Each reads the anonymous visitor's conversation: the resume, the JSON view, a socket's resume.
ANONYMOUS_READ = {"cookieless": 404, "session": 200, "alice": 404}


@db
@pytest.mark.parametrize("who", ANONYMOUS_READ)
async def test_matrix_anonymous_chat_resume_and_read_the_visitors_conversation(
    people, settings, who
):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, conversation_id = await anonymous_visitor()
    client = {"session": visitor, "alice": await client_for(people["alice"])}.get(who)
    client = client or AsyncClient()
    cookie = "; ".join(f"{k}={v.value}" for k, v in client.cookies.items())
    socket = await open_socket(cookie)
    await socket.connect()

    resumed = await client.get(f"/completions/{conversation_id}/stream")
    read = await client.get(f"/conversations/{conversation_id}")
    await socket.send_json_to({"type": "resume", "conversation_id": conversation_id})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert resumed.status_code == read.status_code == ANONYMOUS_READ[who]
    if resumed.status_code == 200:
        assert (await read_events(resumed))[-1]["event"] == "completed"
    last = frames[-1]
    expected = "completed" if ANONYMOUS_READ[who] == 200 else "conversation_not_found"
    assert (last["event"] if last["event"] == "completed" else last["error"]["code"]) == expected


# The doors of issue 21 (conversations users steer), on alice's conversation.

STEER_ALICES = {"anonymous": 401, "alice": 200, "bob": 404, "staff": 404, "superuser": 404}


async def alices_turn(people) -> tuple[str, str, str]:
    """Alice's conversation, its answer's id and its question's id."""
    events = await read_events(await chat(await client_for(people["alice"]), HI))
    conversation_id, answer = events[0]["conversation_id"], events[0]["message_id"]
    question = await Message.objects.aget(conversation_id=conversation_id, role="user")
    return conversation_id, answer, str(question.pk)


@db
@pytest.mark.parametrize("who", STEER_ALICES)
async def test_matrix_http_steer_alices_conversation(people, who):
    conversation_id, answer, question = await alices_turn(people)
    client = await client_for(people[who])
    base = f"/conversations/{conversation_id}"
    edit = {"edit": question, "messages": [{"role": "user", "content": "Hello"}]}

    responses = {
        "regenerate": await chat(
            client, {"conversation_id": conversation_id, "regenerate": answer}
        ),
        "edit": await chat(client, {"conversation_id": conversation_id, **edit}),
        "branches": await client.get(f"{base}/branches"),
        "switch": await client.post(f"{base}/branch", {"message_id": answer}, "application/json"),
        "rename": await client.patch(base, {"title": "Renamed"}, "application/json"),
    }
    for response in responses.values():
        if response.status_code == 200 and response.streaming:
            assert (await read_events(response))[-1]["event"] == "completed"
    deleted = await client.delete(base)

    assert {door: r.status_code for door, r in responses.items()} == dict.fromkeys(
        responses, STEER_ALICES[who]
    )
    assert deleted.status_code == STEER_ALICES[who]
    exists = await Conversation.objects.filter(pk=conversation_id).aexists()
    assert exists == (STEER_ALICES[who] != 200)


LIST_OF_ALICES = {"anonymous": 401, "alice": 1, "bob": 0, "staff": 0, "superuser": 0}


@db
@pytest.mark.parametrize("who", LIST_OF_ALICES)
async def test_matrix_http_list_and_search_show_only_ones_own(people, who):
    await alices_turn(people)
    client = await client_for(people[who])

    listed, searched = await client.get("/conversations"), await client.get("/conversations?q=Hi")

    if LIST_OF_ALICES[who] == 401:
        assert listed.status_code == searched.status_code == 401
        return
    assert len(listed.json()["conversations"]) == LIST_OF_ALICES[who]
    assert len(searched.json()["conversations"]) == LIST_OF_ALICES[who]


SOCKET_STEER = ("conversation", "rename", "switch", "branches", "delete")


@db
@pytest.mark.parametrize("who", ["alice", "bob", "staff", "superuser"])
async def test_matrix_websocket_steer_alices_conversation(people, who):
    conversation_id, answer, question = await alices_turn(people)
    socket = await open_socket(await session_cookie(people[who]))
    await socket.connect()
    edit = {"type": "chat", "conversation_id": conversation_id, "edit": question, **HI}
    await socket.send_json_to(edit)
    edited = await frames_until_terminal(socket)
    replies = {}
    for kind in SOCKET_STEER:
        frame = {"type": kind, "conversation_id": conversation_id}
        frame |= {"title": "x", "message_id": answer}
        await socket.send_json_to(frame)
        replies[kind] = await socket.receive_json_from(timeout=5)
    await socket.send_json_to({"type": "conversations"})
    replies["conversations"] = await socket.receive_json_from(timeout=5)
    await socket.disconnect()

    if who == "alice":
        assert [replies[k]["event"] for k in SOCKET_STEER] == [
            "conversation", "renamed", "switched", "branches", "deleted"
        ]  # fmt: skip
        assert edited[-1]["event"] == "completed"
        assert not await Conversation.objects.filter(pk=conversation_id).aexists()
    else:
        codes = {replies[k]["error"]["code"] for k in SOCKET_STEER}
        assert codes == {"conversation_not_found"}
        assert replies["conversations"]["conversations"] == []
        assert edited[-1]["error"]["code"] == "conversation_not_found"
        assert await Conversation.objects.filter(pk=conversation_id).aexists()


# Each changes the visitor's (or alice's) conversation with a cookie: CSRF is checked.
STEER_CSRF = {
    "session_without_token": 403,
    "session_with_token": 200,
    "cookieless": 404,
}


@db
@pytest.mark.parametrize("who", STEER_CSRF)
async def test_matrix_anonymous_chat_rename_switch_and_delete_need_csrf_with_a_cookie(
    people, settings, who
):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, conversation_id = await anonymous_visitor()
    client, headers = await strict_client_for(who, people, visitor)
    answer = await Message.objects.aget(conversation_id=conversation_id, role="assistant")
    base = f"/conversations/{conversation_id}"

    renamed = await client.patch(base, {"title": "x"}, "application/json", headers=headers)
    switched = await client.post(
        f"{base}/branch", {"message_id": str(answer.pk)}, "application/json", headers=headers
    )
    deleted = await client.delete(base, headers=headers)

    assert [renamed.status_code, switched.status_code, deleted.status_code] == [STEER_CSRF[who]] * 3


@db
async def test_a_logged_in_rename_without_the_csrf_token_is_403(people):
    conversation_id, _, _ = await alices_turn(people)
    client = AsyncClient(enforce_csrf_checks=True)
    await client.aforce_login(people["alice"])

    response = await client.patch(
        f"/conversations/{conversation_id}", {"title": "x"}, "application/json"
    )

    assert response.status_code == 403
    assert orjson.loads(response.content)["error"]["code"] == "csrf_failed"


# The other protocols' doors (docs/protocols.md): server-sent events, the OpenAI-compatible
# API (API keys only) and the AI SDK's UI message stream (users only). "<name>'s key" sends
# that user's API key and no cookie.
SSE = {"Accept": "text/event-stream"}
UI_PARTS = [{"type": "text", "text": "Hi"}]
UI_HI = {"id": "chat-1", "messages": [{"id": "u", "role": "user", "parts": UI_PARTS}]}
PROTOCOL_PEOPLE = ["anonymous", "alice", "bob", "staff", "superuser", "alice's key", "bob's key"]


async def caller(people, who: str) -> tuple[AsyncClient, dict[str, str]]:
    """A client for ``who``, and the headers its requests carry."""
    if who.endswith("'s key"):
        _, raw = await sync_to_async(ApiKey.objects.issue)(people[who.split("'")[0]], "door")
        return AsyncClient(), {"Authorization": f"Bearer {raw}"}
    return await client_for(people[who]), {}


SSE_NEW_CHAT = {**NEW_CHAT, "alice's key": 200, "bob's key": 200}
SSE_RESUME_ALICES = {**RESUME_ALICES, "alice's key": 200, "bob's key": 404}


@db
@pytest.mark.parametrize("who", PROTOCOL_PEOPLE)
async def test_matrix_sse_new_conversation_and_resume_alices(people, who):
    conversation_id = await alices_conversation(people)
    client, headers = await caller(people, who)

    new = await chat(client, HI, headers={**headers, **SSE})
    resumed = await client.get(f"/completions/{conversation_id}/stream", headers={**headers, **SSE})

    assert (new.status_code, resumed.status_code) == (SSE_NEW_CHAT[who], SSE_RESUME_ALICES[who])
    for response in (new, resumed):
        if response.status_code == 200:
            assert response["Content-Type"] == "text/event-stream"
            assert b"event: completed" in await read_body(response)


# (a new call, a call continuing alice's conversation, the model list)
OPENAI_API = {
    "anonymous": (401, 401, 401),
    "alice": (401, 401, 401),  # a session is no API key
    "bob": (401, 401, 401),
    "staff": (401, 401, 401),
    "superuser": (401, 401, 401),
    "alice's key": (200, 200, 200),
    "bob's key": (200, 404, 200),
}


@db
@pytest.mark.parametrize("who", PROTOCOL_PEOPLE)
async def test_matrix_openai_api(people, who):
    conversation_id = await alices_conversation(people)
    client, headers = await caller(people, who)
    body = {"model": "gpt-test", "messages": HI["messages"]}

    def call(data: dict) -> object:
        return client.post(
            "/v1/chat/completions", orjson.dumps(data), "application/json", headers=headers
        )

    new = await call(body)
    continued = await call({**body, "metadata": {"conversation_id": conversation_id}})
    models = await client.get("/v1/models", headers=headers)

    outcome = (new.status_code, continued.status_code, models.status_code)
    assert outcome == OPENAI_API[who]
    for response in (new, continued, models):
        if response.status_code != 200:
            assert set(orjson.loads(response.content)["error"]) == {
                "message",
                "type",
                "param",
                "code",
            }


# (a turn of alice's chat id "chat-1": whose conversation it lands in)
UI_CHAT = {
    "anonymous": 401,
    "alice": "alice's",
    "bob": "their own",
    "staff": "their own",
    "superuser": "their own",
    "alice's key": "alice's",
    "bob's key": "their own",
}


@db
@pytest.mark.parametrize("who", PROTOCOL_PEOPLE)
async def test_matrix_ui_chat_with_alices_chat_id(people, who, upstream):
    alice = await client_for(people["alice"])
    first = await alice.post("/ui/chat", orjson.dumps(UI_HI), "application/json")
    alices = orjson.loads((await read_body(first)).split(b"\n\n")[0][6:])
    client, headers = await caller(people, who)

    response = await client.post(
        "/ui/chat", orjson.dumps(UI_HI), "application/json", headers=headers
    )

    if response.status_code != 200:
        assert response.status_code == UI_CHAT[who]
        return
    start = orjson.loads((await read_body(response)).split(b"\n\n")[0][6:])
    same = start["messageMetadata"]["conversationId"] == alices["messageMetadata"]["conversationId"]
    assert ("alice's" if same else "their own") == UI_CHAT[who]
    if not same:  # nothing of alice's chat reached the model
        assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "Hi"}]


# (resuming alice's streaming chat "chat-1", stopping it)
UI_STREAM = {
    "anonymous": (401, 401),
    "alice": (200, 202),
    "bob": (204, 404),
    "staff": (204, 404),
    "superuser": (204, 404),
    "alice's key": (200, 202),
    "bob's key": (204, 404),
}


@db
@pytest.mark.parametrize("who", PROTOCOL_PEOPLE)
async def test_matrix_ui_resume_and_cancel_alices_streaming_chat(people, who, upstream):
    upstream.enqueue(Reply(tokens=[f"w{i} " for i in range(200)], delay=0.02))
    alice = await client_for(people["alice"])
    running = await alice.post("/ui/chat", orjson.dumps(UI_HI), "application/json")
    stream = aiter(running.streaming_content)
    while b"text-delta" not in await anext(stream):
        pass
    client, headers = await caller(people, who)

    resumed = await client.get("/ui/chat/chat-1/stream", headers=headers)
    if resumed.status_code == 200:
        reader = aiter(resumed.streaming_content)
        assert b'"type":"start"' in await anext(reader)
        await reader.aclose()
    cancelled = await client.post("/ui/chat/chat-1/cancel", headers=headers)
    rest = b"".join([chunk async for chunk in stream])

    assert (resumed.status_code, cancelled.status_code) == UI_STREAM[who]
    assert (b'"type":"abort"' in rest) == (cancelled.status_code == 202)


@db
@pytest.mark.parametrize(("reply", "code", "partial"), FAILURES)
async def test_api_key_never_appears_in_the_other_protocols_answers(
    people, upstream, caplog, reply, code, partial
):
    caplog.set_level(logging.INFO)
    client, headers = await caller(people, "alice's key")
    bodies = []
    for path, data, extra in [
        ("/completions", HI, SSE),
        ("/v1/chat/completions", {**HI, "stream": True}, {}),
        ("/v1/chat/completions", HI, {}),
        ("/ui/chat", UI_HI, {}),
    ]:
        upstream.enqueue(reply)
        response = await client.post(
            path, orjson.dumps(data), "application/json", headers={**headers, **extra}
        )
        bodies.append((await read_body(response)) if response.streaming else response.content)

    assert all(code.encode() in body for body in bodies[:3])  # the UI part carries the message
    everything = b"".join(bodies).decode() + caplog.text
    assert KEY not in everything
    assert KEY[:12] not in everything
    assert "upstream exploded" not in b"".join(bodies).decode()
