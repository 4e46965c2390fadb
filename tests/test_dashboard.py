"""The dashboard: a period's figures aggregated in the database, each as an SVG chart drawn on
the server with a text table beside it."""

from __future__ import annotations

import datetime
import re
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from chatproxy.dashboard import answers, figures
from chatproxy.models import Conversation, DailyUsage, Message
from tests.conftest import chat, counted_queries, read_events
from tests.fake_upstream import Reply

pytestmark = pytest.mark.django_db
URL = "/admin/chatproxy/conversation/dashboard/"
HI = {"messages": [{"role": "user", "content": "Hi"}]}


def answer(conversation, position, days_ago, **fields):
    message = Message.objects.create(
        conversation=conversation,
        position=position,
        role="assistant",
        status=fields.pop("status", "completed"),
        model=conversation.model,
        **fields,
    )
    at = timezone.now() - datetime.timedelta(days=days_ago)
    Message.objects.filter(pk=message.pk).update(created_at=at)
    return at.date().isoformat()


@pytest.fixture
def history(user, other_user):
    alices = Conversation.objects.create(owner=user, model="gpt-a")
    bobs = Conversation.objects.create(owner=other_user, model="gpt-b")
    anonymous = Conversation.objects.create(session_key="s" * 32, model="gpt-a")
    Message.objects.create(conversation=alices, position=99, role="user", content="Hi")
    today = answer(alices, 0, 0, total_tokens=100, cost=Decimal("0.01"), first_token_ms=95)
    answer(alices, 1, 0, total_tokens=50, cost=Decimal("0.02"), first_token_ms=301)
    yesterday = answer(bobs, 0, 1, total_tokens=500, first_token_ms=1000)
    answer(bobs, 1, 1, status="failed", error_code="upstream_timeout")
    answer(anonymous, 0, 1, total_tokens=20, status="failed", error_code="upstream_timeout")
    answer(alices, 2, 40, total_tokens=9999)  # outside the last 30 days
    DailyUsage.objects.rebuild(answers())  # written around finish_turn, so counted here
    return today, yesterday


def table(result, title):
    return next(s["rows"] for s in result["sections"] if s["title"] == title)


def test_figures_per_day_by_model_and_errors_for_the_period(history):
    today, yesterday = history

    result = figures(30)

    assert result["totals"] == {
        "turns": 5,
        "tokens": 670,
        "cost": Decimal("0.03"),
        "errors": 2,
    }
    assert table(result, "Turns per day") == [[yesterday, 3], [today, 2]]
    assert table(result, "Tokens per day") == [[yesterday, 520], [today, 150]]
    assert table(result, "By model") == [
        ["gpt-a", 3, 170, "0.030000"],
        ["gpt-b", 2, 500, "0.000000"],
    ]
    assert table(result, "Errors by code") == [["upstream_timeout", 2]]
    assert table(result, "Top users by tokens") == [
        ["bob", 500, 2],
        ["alice", 150, 2],
        ["anonymous sessions (all)", 20, 1],
    ]


def test_time_to_first_token_percentiles_per_day_to_ten_ms(history):
    today, yesterday = history

    rows = table(figures(30), "Time to first token, p95 per day (ms)")

    assert rows == [[yesterday, 1010, 1010], [today, 100, 310]]


def test_the_period_is_chosen_from_a_fixed_list(history, django_user_model):
    c = Client()
    c.force_login(django_user_model.objects.create_superuser("root", password="pw"))

    week = c.get(URL, {"days": "7"}).content.decode()
    odd = c.get(URL, {"days": "5"}).content.decode()
    year = c.get(URL, {"days": "365"}).content.decode()

    assert "In the last 7 days: <strong>5</strong> turns" in week
    assert "In the last 30 days:" in odd
    assert "In the last 365 days: <strong>6</strong> turns" in year
    assert '<option value="365" selected>' in year


def test_every_chart_is_inline_svg_with_a_table_and_nothing_from_elsewhere(
    history, django_user_model
):
    staff = django_user_model.objects.create_user("reader", password="pw", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_conversation"))
    c = Client()
    c.force_login(staff)

    html = c.get(URL).content.decode()

    main = html.split('id="content-main"')[1].split("</main>")[0]
    assert main.count('<svg viewBox="0 0 640') == main.count("<table>") == 7
    assert '<svg viewBox="0 0 640 220" role="img" aria-label="Turns per day"' in main
    assert "<script" not in main
    urls = re.findall(r'(?:src|href)="(https?:[^"]+)"', html)
    assert urls == []


def test_an_empty_period_says_so(django_user_model):
    c = Client()
    c.force_login(django_user_model.objects.create_superuser("root", password="pw"))

    html = c.get(URL).content.decode()

    assert html.count("<p>Nothing in this period.</p>") == 7


def test_staff_who_cannot_read_transcripts_cannot_see_the_dashboard(django_user_model):
    c = Client()
    c.force_login(django_user_model.objects.create_user("clerk", password="pw", is_staff=True))

    assert c.get(URL).status_code == 403


def test_the_conversation_list_links_to_the_dashboard(django_user_model):
    c = Client()
    c.force_login(django_user_model.objects.create_superuser("root", password="pw"))

    assert (
        f'<a href="{URL}">Dashboard</a>' in c.get("/admin/chatproxy/conversation/").content.decode()
    )


def test_generatetranscripts_fills_a_table_in_the_order_of_time(capsys):
    from django.core.management import call_command

    call_command("generatetranscripts", conversations=30, messages=4, days=10, users=3)

    assert capsys.readouterr().out == "Created 30 conversations with 120 messages.\n"
    assert Message.objects.count() == 120 and Conversation.objects.count() == 30
    oldest = Conversation.objects.order_by("created_at").first().created_at
    assert timezone.now() - oldest < datetime.timedelta(days=10)
    assert set(Message.objects.values_list("role", flat=True)) == {"user", "assistant"}
    assert figures(30)["totals"]["turns"] == 60


def cells():
    return sorted(DailyUsage.objects.values_list("day", "kind", "label", "turns", "tokens", "cost"))


@pytest.mark.django_db(transaction=True)
async def test_a_finished_turn_is_on_the_dashboard_at_once(client, upstream, user):
    upstream.enqueue(Reply(tokens=["Hel", "lo"]))
    upstream.enqueue(Reply(status=500))
    await read_events(await chat(client, HI))
    await read_events(await chat(client, HI))

    result = await sync_to_async(figures)(7)

    assert result["totals"]["turns"] == 2 and result["totals"]["errors"] == 1
    assert result["totals"]["tokens"] == 3  # the usage of the answer that finished
    assert table(result, "Top users by tokens") == [["alice", 3, 2]]
    assert len(table(result, "Time to first token, p95 per day (ms)")) == 1
    counted = await sync_to_async(cells)()
    await sync_to_async(DailyUsage.objects.rebuild)(answers())
    assert await sync_to_async(cells)() == counted  # the same as recounting the messages


@pytest.mark.django_db(transaction=True)
async def test_finishing_a_turn_counts_it_in_one_statement(client, upstream):
    await read_events(await chat(client, HI))  # the rollup's SQL is built on the first
    with counted_queries() as statements:
        await read_events(await chat(client, HI))

    upserts = [s for s in statements if "chatproxy_dailyusage" in s]
    assert len(upserts) == 1 and upserts[0].startswith('INSERT INTO "chatproxy_dailyusage"')
