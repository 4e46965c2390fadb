"""The chat page and its JSON views: owner scoping, one 404 for unknown and foreign ids, and
what an anonymous visitor gets with and without CHATPROXY_ALLOW_ANONYMOUS."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib.staticfiles import finders
from django.test import AsyncClient
from django.utils import timezone

from chatproxy.feedback import Rating
from chatproxy.models import Conversation, Message
from tests.conftest import chat, read_events

pytestmark = pytest.mark.django_db(transaction=True)

NOT_FOUND = {
    "error": {
        "code": "conversation_not_found",
        "message": "No conversation with that id belongs to you. Pick one from the list.",
    }
}


async def make_conversation(owner: Any = None, title: str = "Hi", **fields: Any) -> Conversation:
    fields = {"model": "gpt-test", "status": "completed", **fields}
    return await Conversation.objects.acreate(owner=owner, title=title, **fields)


async def test_conversation_list_holds_only_the_owners_conversations_latest_first(
    client, user, other_user
):
    now = timezone.now()
    older = await make_conversation(user, "Older")
    newer = await make_conversation(user, "Newer", status="interrupted")
    await make_conversation(other_user, "Bob's")
    await make_conversation(None, "Anonymous", session_key="abc")
    await Conversation.objects.filter(pk=older.pk).aupdate(updated_at=now)
    await Conversation.objects.filter(pk=newer.pk).aupdate(
        updated_at=now + datetime.timedelta(seconds=1)
    )

    response = await client.get("/conversations")

    assert response.status_code == 200
    assert response.json() == {
        "conversations": [
            {
                "id": str(newer.pk),
                "title": "Newer",
                "status": "interrupted",
                "model": "gpt-test",
                "updated_at": (now + datetime.timedelta(seconds=1)).isoformat(),
            },
            {
                "id": str(older.pk),
                "title": "Older",
                "status": "completed",
                "model": "gpt-test",
                "updated_at": now.isoformat(),
            },
        ],
        "page": 1,
        "next_page": None,
    }


async def test_conversation_list_holds_at_most_fifty(client, user):
    rows = [Conversation(owner=user, title=f"c{i}") for i in range(51)]
    await sync_to_async(Conversation.objects.bulk_create)(rows)

    response = await client.get("/conversations")

    assert len(response.json()["conversations"]) == 50


async def saved_ids(conversation) -> list[str]:
    rows = Message.objects.filter(conversation=conversation).order_by("position")
    return [str(pk) async for pk in rows.values_list("pk", flat=True)]


async def test_an_answers_rating_comes_with_the_transcript(client, user):
    conversation = await make_conversation(user, "Rated")
    answer = await Message.objects.acreate(
        conversation=conversation, position=0, role="assistant", content="Hi.", status="completed"
    )
    await Rating.objects.acreate(message=answer, conversation=conversation, value="up")

    response = await client.get(f"/conversations/{conversation.pk}")

    assert response.json()["messages"][0]["rating"] == {
        "message_id": str(answer.pk),
        "value": "up",
        "comment": "",
    }


async def test_conversation_returns_its_transcript_in_order(client, user):
    conversation = await make_conversation(user, "Capital")
    for position, role, content, status in [
        (1, "assistant", "Paris.", "completed"),
        (0, "user", "Capital of France?", ""),
        (2, "user", "And Spain?", ""),
        (3, "assistant", "Mad", "interrupted"),
    ]:
        await Message.objects.acreate(
            conversation=conversation, position=position, role=role, content=content, status=status
        )

    response = await client.get(f"/conversations/{conversation.pk}")

    assert response.status_code == 200
    body = response.json()
    assert [m["id"] for m in body["messages"]] == await saved_ids(conversation)
    assert body["id"] == str(conversation.pk) and body["title"] == "Capital"
    assert body["active_leaf"] == body["messages"][-1]["id"]
    assert without_ids(body["messages"]) == [
        {"role": "user", "content": "Capital of France?", "status": ""},
        {"role": "assistant", "content": "Paris.", "status": "completed"},
        {"role": "user", "content": "And Spain?", "status": ""},
        {"role": "assistant", "content": "Mad", "status": "interrupted"},
    ]


def without_ids(messages):
    """The messages of a transcript without their ids and parents' ids."""
    return [{k: v for k, v in m.items() if k not in ("id", "parent_id")} for m in messages]


async def test_someone_elses_conversation_is_the_same_404_as_an_unknown_one(client, other_user):
    foreign = await make_conversation(other_user, "Bob's")

    responses = [
        await client.get(f"/conversations/{foreign.pk}"),
        await client.get(f"/conversations/{uuid.uuid4()}"),
    ]

    assert [r.status_code for r in responses] == [404, 404]
    assert [r.json() for r in responses] == [NOT_FOUND, NOT_FOUND]


async def test_conversation_views_answer_only_their_methods(client, user):
    conversation = await make_conversation(user)

    response = await client.post("/conversations", {})
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": "Read conversations with GET."}
    }
    response = await client.post(f"/conversations/{conversation.pk}", {})
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD, PATCH, DELETE"


async def test_page_renders_with_its_assets_endpoints_and_csrf_token(client):
    response = await client.get("/")

    assert response.status_code == 200
    html = response.content.decode()
    for asset in ("chatproxy/chat.css", "chatproxy/chat.js", "chatproxy/client.js"):
        assert f'"/static/{asset}"' in html
        assert finders.find(asset), asset
    assert 'data-completions-url="/completions"' in html
    assert 'data-conversations-url="/conversations"' in html
    assert 'data-websocket-path="/ws/chat/"' in html
    assert "Signed in as alice" in html
    assert response.cookies["csrftoken"].value
    assert '<meta name="csrf-token" content="' in html


async def test_page_sends_an_anonymous_visitor_to_log_in():
    response = await AsyncClient().get("/?q=1")

    assert response.status_code == 302
    assert response["Location"] == "/accounts/login/?next=/%3Fq%3D1"


async def test_conversation_views_need_a_login_without_anonymous_chat(user):
    conversation = await make_conversation(user)
    anonymous = AsyncClient()

    responses = [
        await anonymous.get("/conversations"),
        await anonymous.get(f"/conversations/{conversation.pk}"),
    ]

    assert [r.status_code for r in responses] == [401, 401]
    assert responses[0].json() == {
        "error": {
            "code": "authentication_required",
            "message": "Log in to chat: this endpoint needs a user.",
        }
    }


async def test_anonymous_chat_reads_only_its_own_sessions_conversations(settings, upstream, user):
    settings.CHATPROXY_ALLOW_ANONYMOUS = True
    visitor, stranger = AsyncClient(), AsyncClient()
    users_conversation = await make_conversation(user)

    page = await visitor.get("/")
    assert page.status_code == 200
    assert "Signed in as" not in page.content.decode()
    assert "sessionid" not in page.cookies  # a page view costs no session row
    assert (await visitor.get("/conversations")).json()["conversations"] == []
    first = await chat(visitor, {"messages": [{"role": "user", "content": "Hi"}]})
    assert first.cookies["sessionid"].value  # the first turn starts the session it is filed under
    mine = (await read_events(first))[0]["conversation_id"]

    listed = (await visitor.get("/conversations")).json()["conversations"]
    assert [c["id"] for c in listed] == [mine]
    assert (await visitor.get(f"/conversations/{mine}")).status_code == 200
    assert (await stranger.get("/conversations")).json()["conversations"] == []
    assert (await stranger.get(f"/conversations/{mine}")).json() == NOT_FOUND
    assert (await visitor.get(f"/conversations/{users_conversation.pk}")).json() == NOT_FOUND


async def test_conversation_returns_parts_reasoning_and_tool_calls_where_there_are_some(
    client, user
):
    conversation = await make_conversation(user, "Time")
    image = {"type": "image_url", "image_url": {"url": "https://a.example/c.png"}}
    parts = [{"type": "text", "text": "When?"}, image]
    calls = [{"id": "call_1", "name": "get_time", "arguments": "{}"}]
    for position, fields in enumerate(
        [
            {"role": "user", "content": "When?", "parts": parts},
            {"role": "assistant", "reasoning": "Ask.", "tool_calls": calls, "status": "completed"},
            {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
        ]
    ):
        await Message.objects.acreate(conversation=conversation, position=position, **fields)

    response = await client.get(f"/conversations/{conversation.pk}")

    body = response.json()
    assert [m["id"] for m in body["messages"]] == await saved_ids(conversation)
    assert without_ids(body["messages"]) == [
        {"role": "user", "content": "When?", "status": "", "parts": parts},
        {
            "role": "assistant",
            "content": "",
            "status": "completed",
            "reasoning": "Ask.",
            "tool_calls": calls,
        },
        {"role": "tool", "content": "12:00", "status": "", "tool_call_id": "call_1"},
    ]


async def test_page_offers_its_tool_and_images_only_where_the_settings_allow(client, settings):
    html = (await client.get("/")).content.decode()
    assert 'data-offer-tools="true"' in html and 'data-max-images="4"' in html
    assert 'id="chatproxy-image"' in html

    settings.CHATPROXY_PARAMETERS = {"temperature": (0.0, 1.0)}
    settings.CHATPROXY_MAX_IMAGES = 0
    html = (await client.get("/")).content.decode()
    assert "data-offer-tools" not in html and 'id="chatproxy-image"' not in html
