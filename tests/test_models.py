"""The turn's writes skip the ORM's query compiler; what they store must be what the ORM stores."""

from __future__ import annotations

import datetime
import sqlite3
import uuid
from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from chatproxy.models import Conversation, Message
from chatproxy.owners import Owner
from chatproxy.rows import insert_rows, row_exists, update_row
from chatproxy.turns import TurnOutcome

pytestmark = pytest.mark.django_db

FINAL = {
    "content": "Grüße, \"quoted\" and 'single' — \U0001f600",
    "raw_content": "line one\nline two",
    "status": "completed",
    "finish_reason": "stop",
    "response_id": "chatcmpl-1",
    "error_code": "",
    "prompt_tokens": 12,
    "completion_tokens": 0,
    "total_tokens": 12,
    "first_token_ms": 35,
    "duration_ms": 120,
    "cost": Decimal("0.001234"),
    "metadata": {"sources": ["/sky"], "nested": {"ü": [1, 2.5, None, True]}},
    "finished_at": datetime.datetime(2026, 11, 27, 12, 30, 45, 123456, tzinfo=datetime.UTC),
}


def stored(pk: uuid.UUID) -> dict[str, object]:
    """The row as the ORM reads it back, less what differs between two rows by design."""
    row = Message.objects.filter(pk=pk).values().get()
    for name in ("id", "position", "created_at"):
        del row[name]
    return row


def test_inserted_and_updated_rows_read_back_as_the_orm_writes_them(user):
    conversation = Conversation.objects.create(owner=user, title="t")
    by_orm = Message(conversation=conversation, position=0, role="user", content="Hi ü")
    by_sql = Message(conversation=conversation, position=1, role="user", content="Hi ü")

    Message.objects.bulk_create([by_orm])
    insert_rows(Message, [by_sql])

    assert stored(by_sql.pk) == stored(by_orm.pk)
    saved = Message.objects.get(pk=by_sql.pk)
    assert saved.created_at == by_sql.created_at is not None  # auto_now_add, as bulk_create
    Message.objects.filter(pk=by_orm.pk).update(**FINAL)
    update_row(Message, by_sql.pk, FINAL)
    assert stored(by_sql.pk) == stored(by_orm.pk)
    assert {k: stored(by_sql.pk)[k] for k in FINAL} == FINAL


def test_rows_are_inserted_in_batches_the_database_accepts(user):
    conversation = Conversation.objects.create(owner=user)
    rows = [
        Message(conversation=conversation, position=i, role="user", content=f"m{i}")
        for i in range(100)
    ]
    connection.ensure_connection()
    sqlite = connection.connection if connection.vendor == "sqlite" else None
    limit = sqlite.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) if sqlite else 0
    if sqlite:  # SQLite's historical limit, the one Django plans for
        sqlite.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    try:
        insert_rows(Message, rows)  # ~20 parameters a row: 2,000 in all
    finally:
        if sqlite:
            sqlite.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, limit)

    assert Message.objects.filter(conversation=conversation).count() == 100


def test_update_row_changes_only_the_row_it_names(user):
    first, _ = Conversation.objects.start_turn(Owner(user_id=user.pk), None, [], "m")
    second, _ = Conversation.objects.start_turn(Owner(user_id=user.pk), None, [], "m")

    update_row(Conversation, first, {"status": "failed", "title": "x"})

    assert Conversation.objects.get(pk=first).status == "failed"
    assert Conversation.objects.get(pk=second).status == "streaming"


def test_inserting_no_rows_runs_no_statement():
    with CaptureQueriesContext(connection) as queries:
        insert_rows(Message, [])

    assert len(queries) == 0


def test_checkpoint_saves_streaming_answers_and_leaves_finished_ones_alone(user):
    owner = Owner(user_id=user.pk)
    first = Conversation.objects.start_turn(owner, None, [{"role": "user", "content": "a"}], "m")
    second = Conversation.objects.start_turn(owner, None, [{"role": "user", "content": "b"}], "m")
    Message.objects.finish_turn(*second, TurnOutcome(content="final", status="completed"))

    Message.objects.checkpoint({first[1]: "partial a", second[1]: "partial b"})

    assert Message.objects.get(pk=first[1]).content == "partial a"
    assert Message.objects.get(pk=second[1]).content == "final"


def test_update_row_applies_only_if_its_conditions_hold(user):
    conversation, _ = Conversation.objects.start_turn(Owner(user_id=user.pk), None, [], "m")

    update_row(Conversation, conversation, {"title": "not this"}, model="other")
    update_row(Conversation, conversation, {"title": "this"}, model="m", status="streaming")

    assert Conversation.objects.get(pk=conversation).title == "this"


PARTS = [
    {"type": "text", "text": "What time is it here?"},
    {"type": "image_url", "image_url": {"url": "https://img.example.com/clock.png"}},
]
CALLS = [{"id": "call_1", "name": "get_time", "arguments": '{"zone": "UTC"}'}]


def saved_conversation(user):
    conversation = Conversation.objects.create(owner=user)
    rows = [
        {"role": "user", "content": "What time is it here?", "parts": PARTS},
        {"role": "assistant", "content": "", "tool_calls": CALLS, "reasoning": "Ask the clock."},
        {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is noon.", "reasoning": "Read it out."},
        {"role": "assistant", "content": ""},  # failed before its first token: left out
    ]
    for position, fields in enumerate(rows):
        Message.objects.create(conversation=conversation, position=position, **fields)
    return conversation


def test_history_rebuilds_every_role_in_the_upstream_format_in_order(user):
    conversation = saved_conversation(user)

    assert Conversation.objects.history(Owner(user_id=user.pk), conversation.pk) == [
        {"role": "user", "content": PARTS},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
    ]


def test_history_sends_reasoning_back_only_under_the_field_the_setting_names(user, settings):
    settings.CHATPROXY_REASONING_FIELD = "reasoning_content"
    conversation = saved_conversation(user)

    history = Conversation.objects.history(Owner(user_id=user.pk), conversation.pk)

    assert [m.get("reasoning_content") for m in history] == [
        None,
        "Ask the clock.",
        None,
        "Read it out.",
    ]


def test_row_exists_answers_as_the_orms_exists(user, other_user):
    conversation = Conversation.objects.create(owner=user)

    for pk, owner in [
        (conversation.pk, user.pk),
        (conversation.pk, other_user.pk),
        (uuid.uuid4(), user.pk),
    ]:
        expected = Conversation.objects.filter(pk=pk, owner=owner).exists()
        assert row_exists(Conversation, pk, owner=owner) is expected
    assert row_exists(Conversation, conversation.pk, owner=user.pk)
