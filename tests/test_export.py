"""Exports: JSONL in the chat fine-tuning format with chatproxy's metadata beside it, and CSV
with a row per message; streamed, behind a permission of their own, metadata only when content
is not stored."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import AsyncClient, Client

from chatproxy.feedback import Rating
from chatproxy.models import Conversation, Message
from chatproxy.review import Annotation

pytestmark = pytest.mark.django_db
LIST = "/admin/chatproxy/conversation/"


@pytest.fixture
def conversation(user):
    conversation = Conversation.objects.create(
        owner=user, title="Time", model="gpt-test", status="completed"
    )
    rows = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": '=HYPERLINK("x") What time is it?'},
        {
            "role": "assistant",
            "content": "",
            "status": "completed",
            "tool_calls": [{"id": "call_1", "name": "get_time", "arguments": '{"zone":"UTC"}'}],
            "finish_reason": "tool_calls",
        },
        {"role": "tool", "content": "12:00", "tool_call_id": "call_1"},
        {
            "role": "assistant",
            "content": "It is noon.",
            "raw_content": "It is 12:00.",
            "status": "completed",
            "model": "gpt-test",
            "total_tokens": 30,
            "cost": Decimal("0.000200"),
        },
        {
            "role": "assistant",
            "content": "",
            "status": "failed",
            "error_code": "upstream_timeout",
        },
    ]
    for position, fields in enumerate(rows):
        Message.objects.create(conversation=conversation, position=position, **fields)
    answer = conversation.messages.get(position=4)
    Rating.objects.create(message=answer, conversation=conversation, value="up", comment="Nice")
    Annotation.objects.create(conversation=conversation, kind="flag", value="needs_review")
    return conversation


def jsonl(**options) -> list[dict]:
    out = io.StringIO()
    call_command("exporttranscripts", stdout=out, **options)
    return [orjson.loads(line) for line in out.getvalue().splitlines()]


def test_jsonl_has_the_messages_in_the_fine_tuning_format_with_tool_calls(conversation):
    (line,) = jsonl()

    assert line["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": '=HYPERLINK("x") What time is it?'},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"zone":"UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
        {"role": "assistant", "content": "It is noon."},
    ]  # the failed answer, with nothing said, is left out of the messages


def test_jsonl_keeps_chatproxys_metadata_beside_the_messages(conversation):
    meta = jsonl()[0]["chatproxy"]

    assert meta["conversation_id"] == str(conversation.pk)
    assert (meta["title"], meta["owner"], meta["model"]) == ("Time", "alice", "gpt-test")
    assert [m["position"] for m in meta["messages"]] == [0, 1, 2, 3, 4, 5]
    answer = meta["messages"][4]
    assert answer["rating"] == {"value": "up", "comment": "Nice"}
    assert (answer["total_tokens"], answer["cost"]) == (30, "0.000200")
    assert answer["changed_by_interceptors"] and answer["upstream_content"] == "It is 12:00."
    assert meta["messages"][5]["error_code"] == "upstream_timeout"
    assert [(m["kind"], m["value"]) for m in meta["review"]] == [("flag", "needs_review")]


def test_csv_has_one_row_per_message_and_no_cell_a_spreadsheet_would_run(conversation):
    out = io.StringIO()
    call_command("exporttranscripts", format="csv", stdout=out)

    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["role"] for r in rows] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
        "assistant",
    ]
    assert rows[1]["content"] == '\'=HYPERLINK("x") What time is it?'
    assert rows[2]["tool_calls"] == "get_time" and rows[3]["tool_call_id"] == "call_1"
    assert (rows[4]["rating"], rows[4]["rating_comment"], rows[4]["cost"]) == (
        "up",
        "Nice",
        "0.000200",
    )
    assert rows[0]["owner"] == "alice"


def test_without_stored_content_the_export_holds_metadata_only(conversation, settings):
    settings.CHATPROXY_STORE_CONTENT = False
    Annotation.objects.create(conversation=conversation, kind="note", note="Says noon.")

    (line,) = jsonl()
    out = io.StringIO()
    call_command("exporttranscripts", format="csv", stdout=out)

    assert "messages" not in line and line["chatproxy"]["title"] == ""
    text = orjson.dumps(line).decode() + out.getvalue()
    for said in ("Be brief", "What time", '12:00"', "noon", "Nice", 'Time"'):
        assert said not in text
    assert line["chatproxy"]["messages"][4]["total_tokens"] == 30
    assert [m["kind"] for m in line["chatproxy"]["review"]] == ["flag", "note"]


def test_the_command_filters_and_writes_a_file(conversation, user, tmp_path):
    Conversation.objects.create(owner=user, title="Other", model="gpt-other", status="failed")
    other = Conversation.objects.get(title="Other")
    Message.objects.create(conversation=other, position=0, role="user", content="Hi")
    path = tmp_path / "out.jsonl"

    call_command("exporttranscripts", output=str(path), model="gpt-test")
    flagged = jsonl(flag="needs_review")
    failed = jsonl(status="failed")

    lines = path.read_bytes().splitlines()
    assert [orjson.loads(x)["chatproxy"]["title"] for x in lines] == ["Time"]
    assert [x["chatproxy"]["title"] for x in flagged] == ["Time"]
    assert [x["chatproxy"]["title"] for x in failed] == ["Other"]


def test_the_command_says_how_to_write_a_date():
    with pytest.raises(CommandError, match="Give dates as YYYY-MM-DD, not 'yesterday'."):
        call_command("exporttranscripts", "--since", "yesterday")


def staff(django_user_model, username, *codenames):
    user = django_user_model.objects.create_user(username, password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def test_the_admin_action_streams_the_selected_conversations(conversation, django_user_model):
    c = Client()
    c.force_login(staff(django_user_model, "exporter", "view_conversation", "export_conversation"))

    response = c.post(LIST, {"action": "export_jsonl", "_selected_action": [str(conversation.pk)]})

    assert response.status_code == 200 and response.streaming
    assert response["Content-Type"] == "application/jsonl"
    assert response["Content-Disposition"].startswith('attachment; filename="conversations-')
    lines = b"".join(response.streaming_content).splitlines()
    assert [orjson.loads(x)["chatproxy"]["conversation_id"] for x in lines] == [
        str(conversation.pk)
    ]


def test_staff_without_the_export_permission_are_not_offered_the_action(
    conversation, django_user_model
):
    c = Client()
    c.force_login(staff(django_user_model, "reader", "view_conversation"))

    page = c.get(LIST).content.decode()
    response = c.post(LIST, {"action": "export_csv", "_selected_action": [str(conversation.pk)]})

    assert "export_csv" not in page
    assert not response.streaming


@pytest.mark.django_db(transaction=True)
async def test_under_asgi_the_export_streams_from_an_async_iterator(
    conversation, django_user_model
):
    exporter = await sync_to_async(staff)(
        django_user_model, "exporter", "view_conversation", "export_conversation"
    )
    c = AsyncClient()
    await c.aforce_login(exporter)

    response = await c.post(
        LIST, {"action": "export_csv", "_selected_action": [str(conversation.pk)]}
    )

    assert response.is_async  # a sync iterator would be read whole first, with a warning
    body = b"".join([chunk async for chunk in response.streaming_content]).decode()
    assert body.startswith("conversation_id,title,owner,message_id,") and "It is noon." in body
