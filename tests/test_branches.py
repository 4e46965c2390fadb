"""Conversations as trees: regenerate and edit add siblings, and upstream gets the path."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import AsyncClient

from chatproxy.branches import chain_unlinked, children, leaves, newest_leaf, path
from chatproxy.models import Conversation, Message
from tests.conftest import answer_text, chat, counted_queries, read_body, read_events
from tests.fake_upstream import Reply

db = pytest.mark.django_db(transaction=True)

HI = {"messages": [{"role": "user", "content": "Hi"}]}


async def ask(client, upstream, body, reply):
    upstream.enqueue(Reply(tokens=[reply]))
    events = await read_events(await chat(client, body))
    assert events[-1]["event"] == "completed", events
    return events


async def two_turns(client, upstream):
    """A conversation: Hi / A1 / More / A2; returns its id and the events of both turns."""
    first = await ask(client, upstream, HI, "A1")
    conversation_id = first[0]["conversation_id"]
    more = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "More"}]}
    second = await ask(client, upstream, more, "A2")
    return conversation_id, first, second


async def rows(conversation_id):
    return [m async for m in Message.objects.filter(conversation_id=conversation_id)]


@db
async def test_regenerate_answers_the_same_question_again_beside_the_old_answer(client, upstream):
    conversation_id, _, second = await two_turns(client, upstream)
    old = second[0]["message_id"]

    again = await ask(
        client, upstream, {"conversation_id": conversation_id, "regenerate": old}, "A2 again"
    )

    assert answer_text(again) == "A2 again"
    sent = upstream.requests[-1].json["messages"]
    assert sent == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "More"},
    ]
    saved = {str(m.pk): m for m in await rows(conversation_id)}
    new = saved[again[0]["message_id"]]
    assert saved[old].content == "A2"  # nothing overwritten
    assert new.parent_id == saved[old].parent_id
    conversation = await Conversation.objects.aget(pk=conversation_id)
    assert conversation.active_leaf_id == new.pk


@db
async def test_edit_adds_a_sibling_question_and_answers_it_from_the_path_before(client, upstream):
    conversation_id, _, second = await two_turns(client, upstream)
    more = (await rows(conversation_id))[2]
    assert more.content == "More"

    edited = await ask(
        client,
        upstream,
        {
            "conversation_id": conversation_id,
            "edit": str(more.pk),
            "messages": [{"role": "user", "content": "Less"}],
        },
        "A3",
    )

    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Less"},
    ]
    saved = {m.content: m for m in await rows(conversation_id)}
    assert set(saved) == {"Hi", "A1", "More", "A2", "Less", "A3"}
    assert saved["Less"].parent_id == saved["More"].parent_id == saved["A1"].pk
    assert str(saved["A3"].pk) == edited[0]["message_id"]
    assert saved["A3"].parent_id == saved["Less"].pk


@db
async def test_a_turn_after_an_edit_continues_the_new_branch_only(client, upstream):
    conversation_id, first, _ = await two_turns(client, upstream)
    hi = (await rows(conversation_id))[0]
    await ask(
        client,
        upstream,
        {
            "conversation_id": conversation_id,
            "edit": str(hi.pk),
            "messages": [{"role": "user", "content": "Hello"}],
        },
        "B1",
    )
    assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "Hello"}]

    follow = {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "And?"}]}
    await ask(client, upstream, follow, "B2")

    assert upstream.requests[-1].json["messages"] == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "B1"},
        {"role": "user", "content": "And?"},
    ]
    roots = [m.content for m in await rows(conversation_id) if m.parent_id is None]
    assert roots == ["Hi", "Hello"]


@db
async def test_regenerating_a_regenerated_answer_keeps_every_sibling(client, upstream):
    conversation_id, first, _ = await two_turns(client, upstream)
    body = {"conversation_id": conversation_id, "regenerate": first[0]["message_id"]}
    again = await ask(client, upstream, body, "A1 bis")
    body["regenerate"] = again[0]["message_id"]
    await ask(client, upstream, body, "A1 ter")

    assert upstream.requests[-1].json["messages"] == [{"role": "user", "content": "Hi"}]
    saved = await rows(conversation_id)
    hi = saved[0]
    answers = [m.content for m in saved if m.parent_id == hi.pk]
    assert answers == ["A1", "A1 bis", "A1 ter"]


def branch_error(response):
    body = response.json()
    return response.status_code, body["error"]["code"]


@db
async def test_regenerate_naming_a_question_is_400(client, upstream):
    conversation_id, _, _ = await two_turns(client, upstream)
    question = (await rows(conversation_id))[0]

    response = await chat(
        client, {"conversation_id": conversation_id, "regenerate": str(question.pk)}
    )

    assert branch_error(response) == (400, "invalid_branch")
    assert "edit" in response.json()["error"]["message"]


@db
async def test_edit_naming_an_answer_is_400(client, upstream):
    conversation_id, first, _ = await two_turns(client, upstream)
    body = {
        "conversation_id": conversation_id,
        "edit": first[0]["message_id"],
        "messages": [{"role": "user", "content": "x"}],
    }

    response = await chat(client, body)

    assert branch_error(response) == (400, "invalid_branch")
    assert "regenerate" in response.json()["error"]["message"]


@db
async def test_a_message_of_another_conversation_is_404(client, upstream):
    conversation_id, _, _ = await two_turns(client, upstream)
    other = await ask(client, upstream, HI, "elsewhere")

    body = {"conversation_id": conversation_id, "regenerate": other[0]["message_id"]}
    response = await chat(client, body)

    assert branch_error(response) == (404, "message_not_found")
    assert len(upstream.requests) == 3


@pytest.mark.parametrize(
    "body",
    [
        {"regenerate": "00000000-0000-0000-0000-000000000000"},
        {"regenerate": 5, "conversation_id": "00000000-0000-0000-0000-000000000000"},
        {
            "regenerate": "00000000-0000-0000-0000-000000000000",
            "edit": "00000000-0000-0000-0000-000000000000",
            "conversation_id": "00000000-0000-0000-0000-000000000000",
        },
        {
            "regenerate": "00000000-0000-0000-0000-000000000000",
            "conversation_id": "00000000-0000-0000-0000-000000000000",
            "messages": [{"role": "user", "content": "x"}],
        },
    ],
)
@db
async def test_a_malformed_branch_request_is_400(client, body):
    assert branch_error(await chat(client, body)) == (400, "invalid_branch")


@db
async def test_regenerate_in_someone_elses_conversation_is_404(client, upstream, other_user):
    conversation_id, first, _ = await two_turns(client, upstream)
    other = AsyncClient()
    await other.aforce_login(other_user)
    body = {"conversation_id": conversation_id, "regenerate": first[0]["message_id"]}

    assert branch_error(await chat(other, body)) == (404, "conversation_not_found")


# A continued turn's statements, whichever way it branches: as many as before the tree (its
# opening reads the conversation's leaf and its rows, two queries, as it read them before).
TURN_STATEMENTS = {"sqlite": 13, "postgresql": 11}


@db
async def test_regenerate_and_edit_cost_the_statements_of_any_continued_turn(client, upstream):
    conversation_id, first, second = await two_turns(client, upstream)
    more = (await rows(conversation_id))[2]
    bodies = [
        {"conversation_id": conversation_id, "messages": [{"role": "user", "content": "Go"}]},
        {"conversation_id": conversation_id, "regenerate": second[0]["message_id"]},
        {
            "conversation_id": conversation_id,
            "edit": str(more.pk),
            "messages": [{"role": "user", "content": "Edited"}],
        },
    ]
    counts = []
    for body in bodies:
        upstream.enqueue(Reply(tokens=["ok"]))
        with counted_queries() as statements:
            await read_body(await chat(client, body))
        counts.append(len(statements))

    assert counts == [TURN_STATEMENTS[connection.vendor]] * 3


@pytest.mark.django_db(transaction=True)
def test_the_migration_puts_existing_conversations_on_one_branch(django_user_model):
    executor = MigrationExecutor(connection)
    executor.migrate([("chatproxy", "0008_review")])
    old = executor.loader.project_state([("chatproxy", "0008_review")]).apps
    OldConversation = old.get_model("chatproxy", "Conversation")
    OldMessage = old.get_model("chatproxy", "Message")
    conversation = OldConversation.objects.create(title="before")
    for position, (role, content) in enumerate(
        [("user", "Hi"), ("assistant", "A1"), ("user", "More"), ("assistant", "A2")]
    ):
        OldMessage.objects.create(
            conversation=conversation, position=position, role=role, content=content
        )
    empty = OldConversation.objects.create(title="empty")

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(executor.loader.graph.leaf_nodes())

    saved = list(Message.objects.filter(conversation_id=conversation.pk))
    assert [m.parent_id for m in saved] == [None, saved[0].pk, saved[1].pk, saved[2].pk]
    assert Conversation.objects.get(pk=conversation.pk).active_leaf_id == saved[3].pk
    assert Conversation.objects.get(pk=empty.pk).active_leaf_id is None


# The pure tree functions


def ids(n):
    return [uuid.UUID(int=i + 1) for i in range(n)]


def test_path_walks_from_the_root_to_the_leaf_and_survives_a_cycle():
    a, b, c = ids(3)
    rows = {a: (a, None), b: (b, a), c: (c, b)}

    assert path(rows, c) == [rows[a], rows[b], rows[c]]
    assert path(rows, None) == []
    looped = {a: (a, b), b: (b, a)}
    assert len(path(looped, a)) == 2


def test_newest_leaf_follows_the_newest_child_and_leaves_lists_every_branch_end():
    q, a1, a2, f = ids(4)
    tree = children([(q, None), (a1, q), (a2, q), (f, a1)])

    assert newest_leaf(tree, q) == a2
    assert newest_leaf(tree, a1) == f
    assert sorted(leaves(tree)) == sorted([f, a2])


def test_rows_written_without_parents_are_read_as_one_branch():
    a, b, c = ids(3)

    chained = chain_unlinked([(a, None, "x"), (b, None, "y"), (c, None, "z")])

    assert chained == [(a, None, "x"), (b, a, "y"), (c, b, "z")]
    linked = [(a, None), (b, a)]
    assert chain_unlinked(linked) is linked
