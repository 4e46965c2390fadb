"""Budgets: the reservation before the upstream call, its settlement, the refusal, the
periods, the sweep, and what ``GET budgets`` tells the caller."""

from __future__ import annotations

import asyncio
import datetime
from decimal import Decimal

import httpx2
import orjson
import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import Group
from django.db import connection
from django.test import AsyncClient
from django.utils import timezone

from chatproxy.checks import check_settings
from chatproxy.models import ApiKey, Budget, Conversation, Message, Period, Scope, Spend, Status
from chatproxy.owners import Owner
from tests.conftest import (
    assert_no_leaks,
    chat,
    counted_queries,
    doc_blocks,
    frames_until_terminal,
    open_socket,
    read_body,
    read_events,
    session_cookie,
    shared_database_name,
    snapshot,
)
from tests.fake_upstream import Reply
from tests.server import ServerProcess

db = pytest.mark.django_db(transaction=True)
HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
# What HELLO reserves: "Hi" is 1 token, its message 4 more, then its 20 completion tokens.
HELLO_RESERVES = 25


def budgets(settings, **budgets):
    settings.CHATPROXY_BUDGETS = budgets
    settings.CHATPROXY_RATE_LIMIT = None


@sync_to_async
def spends() -> list[Spend]:
    return list(Spend.objects.order_by("created_at"))


@sync_to_async
def spend_at(user, tokens: int, when: datetime.datetime) -> None:
    Spend.objects.create(user=user, tokens=tokens, cost=0, settled=True, created_at=when)


async def refusal(response) -> tuple[int, str, str, str]:
    body = response.json()["error"]
    return response.status_code, body["code"], body["message"], response.get("Retry-After", "")


@db
async def test_a_turn_over_budget_is_refused_with_what_is_left_and_makes_no_request(
    client, upstream, settings, user
):
    budgets(settings, user=[{"period": "day", "tokens": 100}])
    now = timezone.now()
    await spend_at(user, 90, now)

    status, code, message, retry = await refusal(await chat(client, HELLO))

    midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    resets = midnight + datetime.timedelta(days=1)
    assert (status, code) == (429, "budget_exceeded")
    assert message.startswith(
        "Your daily budget has 10 of 100 tokens left; this request may use up to 25 tokens "
        f"(0.000000 in cost). It resets at {resets.isoformat()} (in "
    )
    assert abs(int(retry) - (resets - now).total_seconds()) <= 2
    assert upstream.requests == []


@db
async def test_a_turn_reserves_its_worst_case_then_settles_to_its_usage(client, upstream, settings):
    budgets(settings, user=[{"period": "day", "tokens": 1000}])
    settings.CHATPROXY_PRICES = {"gpt-test": {"prompt": 1.0, "completion": 2.0}}
    upstream.enqueue(Reply(tokens=["a", "b", "c"]))

    events = await read_events(await chat(client, HELLO))

    usage = events[-1]["usage"]
    [spend] = await spends()
    assert spend.settled
    assert spend.tokens == usage["prompt_tokens"] + usage["completion_tokens"]
    expected = (Decimal(usage["prompt_tokens"]) + 2 * Decimal(3)) / 1_000_000
    assert spend.cost == expected.quantize(Decimal("0.000001"))
    assert upstream.requests[0].json["max_tokens"] == 20


@db
async def test_without_max_tokens_the_budget_cap_is_reserved_and_sent(client, upstream, settings):
    budgets(settings, user=[{"period": "day", "tokens": 1000}])
    settings.CHATPROXY_BUDGET_MAX_TOKENS = 300
    upstream.enqueue(Reply(usage=False))
    body = {"messages": [{"role": "user", "content": "Hi"}]}

    await read_body(await chat(client, body))

    assert upstream.requests[0].json["max_tokens"] == 300
    # Without usage, settled as the prompt's estimate and the text: "Hello there." (12 / 4).
    [spend] = await spends()
    assert (spend.settled, spend.tokens) == (True, 5 + 3)


@db
async def test_many_concurrent_turns_never_pass_the_budget_by_more_than_one_reservation(
    upstream, settings, user
):
    budget = 20 * HELLO_RESERVES
    budgets(settings, user=[{"period": "day", "tokens": budget}])
    client = AsyncClient()
    await client.aforce_login(user)
    # Answers that use their whole reservation, so every accepted turn spends its worst case.
    upstream.enqueue(*[Reply(tokens=["x"] * 20) for _ in range(200)])

    async def turn() -> int:
        response = await chat(client, HELLO)
        if response.status_code == 200:
            await read_body(response)
        return response.status_code

    codes = await asyncio.gather(*(turn() for _ in range(200)))

    spent = sum(s.tokens for s in await spends())
    assert codes.count(429) > 0
    assert spent <= budget + HELLO_RESERVES
    assert all(s.settled for s in await spends())


@db
async def test_a_new_period_starts_with_the_whole_budget(client, upstream, settings, user):
    budgets(settings, user=[{"period": "day", "tokens": 100}])
    start = timezone.localtime().replace(hour=0, minute=0, second=0, microsecond=0)
    await spend_at(user, 100, start - datetime.timedelta(seconds=1))

    response = await chat(client, HELLO)
    await read_body(response)

    assert response.status_code == 200
    await spend_at(user, 100, start)
    assert (await refusal(await chat(client, HELLO)))[1] == "budget_exceeded"


@db
async def test_a_rolling_window_frees_when_its_oldest_spend_leaves(
    client, upstream, settings, user
):
    budgets(settings, user=[{"period": "rolling", "window": 3600, "tokens": 100}])
    now = timezone.now()
    await spend_at(user, 50, now - datetime.timedelta(seconds=3601))
    await spend_at(user, 90, now - datetime.timedelta(seconds=600))

    status, code, _, retry = await refusal(await chat(client, HELLO))

    assert (status, code) == (429, "budget_exceeded")
    assert 2990 <= int(retry) <= 3001


@db
async def test_an_admin_budget_replaces_the_settings_for_its_target(
    client, upstream, settings, user
):
    budgets(settings, user=[{"period": "day", "tokens": 10}])
    await Budget.objects.acreate(scope=Scope.USER, user=user, period=Period.DAY, tokens=1000)

    response = await chat(client, HELLO)
    await read_body(response)

    assert response.status_code == 200


@db
async def test_a_group_budget_counts_its_members_together_and_the_tightest_wins(
    client, upstream, settings, user, other_user
):
    staff = await Group.objects.acreate(name="staff")
    await sync_to_async(staff.user_set.add)(user, other_user)
    budgets(
        settings,
        user=[{"period": "day", "tokens": 10_000}],
        groups={"staff": [{"period": "week", "tokens": 100}]},
    )
    await spend_at(other_user, 90, timezone.now())

    status, code, message, _ = await refusal(await chat(client, HELLO))

    assert (status, code) == (429, "budget_exceeded")
    assert message.startswith(
        "The weekly budget of the group 'staff' has 10 of 100 tokens left; this request may use "
        "up to 25 tokens"
    )


@db
async def test_a_cost_budget_refuses_what_the_prices_say_it_may_cost(client, upstream, settings):
    budgets(settings, site=[{"period": "month", "cost": "0.0001"}])
    settings.CHATPROXY_PRICES = {"gpt-test": {"prompt": 1.0, "completion": 10.0}}

    status, code, message, _ = await refusal(await chat(client, HELLO))

    assert (status, code) == (429, "budget_exceeded")
    assert message.startswith(
        "The site's monthly budget has 0.000100 of 0.000100 in cost left; this request may use up "
        "to 25 tokens (0.000205 in cost)."
    )


@db
async def test_a_failed_answer_settles_to_its_estimated_prompt_and_its_text(
    client, upstream, settings
):
    budgets(settings, user=[{"period": "day", "tokens": 1000}])
    upstream.enqueue(Reply(tokens=["abcd", "efgh", "ijkl"], fail="drop", fail_after=2))

    events = await read_events(await chat(client, HELLO))

    assert events[-1]["event"] == "error"
    [spend] = await spends()
    assert (spend.settled, spend.tokens) == (True, 5 + 2)


@db
async def test_an_interrupted_answer_settles_to_what_it_used(
    client, upstream, settings, saved_answers
):
    budgets(settings, user=[{"period": "day", "tokens": 1000}])
    upstream.enqueue(Reply(tokens=["abcd"] * 200, delay=0.02))
    stream = (await chat(client, HELLO | {"detach": True})).streaming_content
    conversation_id = orjson.loads(await anext(stream))["conversation_id"]
    assert b"answering" in await anext(stream)

    cancelled = await client.post(f"/completions/{conversation_id}/cancel")
    answer = await asyncio.wait_for(saved_answers.get(), 10)
    await stream.aclose()

    assert cancelled.status_code == 202

    [spend] = await spends()
    assert answer.status == Status.INTERRUPTED
    assert (spend.settled, spend.tokens) == (True, 5 + len(answer.content) // 4)


@db
def test_the_stale_answer_sweep_releases_a_dead_workers_reservation(user):
    owner = Owner(user_id=user.pk)
    _, answer_id = Conversation.objects.start_turn(
        owner, None, [{"role": "user", "content": "Hi"}], "gpt-4o-mini"
    )
    Spend.objects.create(answer_id=answer_id, user=user, tokens=500, cost=Decimal("0.01"))
    long_ago = timezone.now() - datetime.timedelta(hours=1)
    Message.objects.filter(pk=answer_id).update(created_at=long_ago)

    assert Message.objects.interrupt_stale(60) == 1

    spend = Spend.objects.get()
    assert (spend.settled, spend.tokens, spend.cost) == (True, 0, 0)


# A server that ignores max_tokens: HELLO reserves 20 completion tokens, this sends 200 of
# four characters each, slowly enough to be stopped long before it ends.
RUNAWAY = Reply(tokens=["abcd"] * 200, delay=0.005)
# The error event docs/budgets.md shows, whose message is HELLO's.
[DOCUMENTED_STOP] = doc_blocks("budgets.md", "An answer past its reservation")
PAST_RESERVATION = orjson.loads(DOCUMENTED_STOP)["error"]["message"]


async def assert_stopped_saved_and_settled(upstream, answer_id: str, delivered: str) -> None:
    """The upstream was hung up on, the answer saved ``failed`` with what the client got, and
    its spend settled to the prompt's estimate and the text received (a token per 4 chars)."""
    assert await upstream.requests[-1].wait_closed_by_client()
    answer = await Message.objects.aget(pk=answer_id)
    assert (answer.status, answer.error_code) == (Status.FAILED, "reservation_exceeded")
    assert answer.error_message == PAST_RESERVATION
    assert answer.content == delivered
    assert len(delivered) > 20 * 4 and delivered == "abcd" * (len(delivered) // 4)
    spend = await Spend.objects.aget(answer_id=answer_id)
    assert (spend.settled, spend.tokens) == (True, 5 + len(delivered) // 4)


@db
async def test_an_answer_past_its_reservation_is_stopped_saved_and_charged(
    client, upstream, settings
):
    budgets(settings, user=[{"period": "day", "tokens": 100_000}])
    await read_body(await chat(client, HELLO))  # warm the pooled upstream connection
    before = await snapshot()
    upstream.enqueue(RUNAWAY)

    events = await read_events(await chat(client, HELLO))

    assert events[-1] == orjson.loads(DOCUMENTED_STOP) | {
        "conversation_id": events[0]["conversation_id"],
        "message_id": events[0]["message_id"],
    }
    delivered = "".join(e["content"] for e in events if e["event"] == "answering")
    await assert_stopped_saved_and_settled(upstream, events[0]["message_id"], delivered)
    await assert_no_leaks(before)


@db
async def test_a_socket_answer_past_its_reservation_is_stopped_saved_and_charged(
    upstream, settings, user
):
    budgets(settings, user=[{"period": "day", "tokens": 100_000}])
    upstream.enqueue(RUNAWAY)
    socket = await open_socket(await session_cookie(user))
    await socket.connect()

    await socket.send_json_to({"type": "chat", **HELLO, "request_id": "r1"})
    frames = await frames_until_terminal(socket)
    await socket.disconnect()

    assert frames[-1]["event"] == "error" and frames[-1]["request_id"] == "r1"
    assert frames[-1]["error"] == {"code": "reservation_exceeded", "message": PAST_RESERVATION}
    delivered = "".join(f["content"] for f in frames if f["event"] == "answering")
    await assert_stopped_saved_and_settled(upstream, frames[0]["message_id"], delivered)


@db
async def test_a_usage_past_the_reservation_stops_the_answer_though_its_text_is_short(
    client, upstream, settings
):
    budgets(settings, user=[{"period": "day", "tokens": 100_000}])
    # 30 one-character tokens: 8 by the estimate, but the usage chunk counts 30 of them.
    upstream.enqueue(Reply(tokens=["x"] * 30))

    events = await read_events(await chat(client, HELLO))

    assert events[-1]["error"]["code"] == "reservation_exceeded"
    answer = await Message.objects.aget(pk=events[0]["message_id"])
    spend = await Spend.objects.aget(answer=answer)
    assert (answer.status, answer.content, answer.completion_tokens) == (
        Status.FAILED,
        "x" * 30,
        30,
    )
    assert (spend.settled, spend.tokens) == (True, answer.prompt_tokens + 30)


@db
async def test_an_answer_within_its_reservation_is_not_stopped(client, upstream, settings):
    budgets(settings, user=[{"period": "day", "tokens": 100_000}])
    # Exactly its 20 tokens, by the usage chunk and by the estimate (80 characters).
    upstream.enqueue(Reply(tokens=["abcd"] * 20))

    events = await read_events(await chat(client, HELLO))

    assert events[-1]["event"] == "completed"
    assert events[-1]["usage"]["completion_tokens"] == 20


@db
async def test_the_openai_api_answers_a_stopped_answer_with_a_502(upstream, settings, user):
    budgets(settings, user=[{"period": "day", "tokens": 100_000}])
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "sdk")
    upstream.enqueue(RUNAWAY)

    response = await AsyncClient().post(
        "/v1/chat/completions",
        orjson.dumps({"model": "gpt-test", **HELLO}),
        "application/json",
        headers=bearer(raw),
    )

    assert response.status_code == 502
    assert response.json()["error"] == {
        "message": PAST_RESERVATION,
        "type": "server_error",
        "param": None,
        "code": "reservation_exceeded",
    }
    assert await upstream.requests[0].wait_closed_by_client()


# What budgets add to a turn: the user's groups, the admin's budgets, the spend so far (one
# statement for all of them), the reservation, its settlement; and the locks on PostgreSQL.
BUDGET_STATEMENTS = {"sqlite": 5, "postgresql": 6}


@db
async def test_budgets_add_a_constant_number_of_statements_per_turn(client, upstream, settings):
    settings.CHATPROXY_RATE_LIMIT = None
    counts = []
    for configured in [None, {"user": [{"period": "day", "tokens": 10**6}]}] * 2 + [
        {"site": [{"period": "month", "tokens": 10**6}], "user": [{"period": "day", "cost": 5}]}
    ]:
        settings.CHATPROXY_BUDGETS = configured
        upstream.enqueue(Reply())
        with counted_queries() as statements:
            await read_body(await chat(client, HELLO))
        counts.append(len(statements))

    base = counts[0]
    extra = BUDGET_STATEMENTS[connection.vendor]
    assert counts == [base, base + extra, base, base + extra, base + extra]


@db
async def test_get_budgets_tells_the_caller_what_is_used_left_and_when_it_resets(
    client, upstream, settings, user
):
    budgets(settings, user=[{"period": "day", "tokens": 100, "cost": "1.5"}])
    now = timezone.now()
    await spend_at(user, 30, now)

    response = await client.get("/budgets")

    midnight = timezone.localtime(now).replace(hour=0, minute=0, second=0, microsecond=0)
    assert response.status_code == 200
    assert response.json() == {
        "budgets": [
            {
                "scope": "user",
                "name": "alice",
                "label": "Your daily budget",
                "period": "day",
                "tokens": {"limit": 100, "used": 30, "remaining": 70},
                "cost": {"limit": "1.500000", "used": "0.000000", "remaining": "1.500000"},
                "resets_at": (midnight + datetime.timedelta(days=1)).isoformat(),
            }
        ]
    }


@db
async def test_get_budgets_is_empty_when_budgets_are_off(client):
    response = await client.get("/budgets")

    assert (response.status_code, response.json()) == (200, {"budgets": []})


@db
async def test_a_budgets_frame_tells_the_socket_its_budgets(upstream, settings, user):
    budgets(settings, site=[{"period": "week", "tokens": 5000}])
    await spend_at(user, 40, timezone.now())
    socket = await open_socket(await session_cookie(user))
    await socket.connect()

    await socket.send_json_to({"type": "budgets", "request_id": "b1"})
    reply = await socket.receive_json_from()
    await socket.disconnect()

    assert reply["event"] == "budgets" and reply["request_id"] == "b1"
    assert [(b["scope"], b["tokens"]) for b in reply["budgets"]] == [
        ("site", {"limit": 5000, "used": 40, "remaining": 4960})
    ]


@db
async def test_get_budgets_counts_only_what_counts_against_the_caller(
    client, settings, user, other_user
):
    budgets(settings, user=[{"period": "day", "tokens": 100}])
    await spend_at(other_user, 70, timezone.now())

    [shown] = (await client.get("/budgets")).json()["budgets"]

    assert shown["tokens"] == {"limit": 100, "used": 0, "remaining": 100}


def test_the_documented_settings_pass_the_checks(settings):
    [example] = doc_blocks("budgets.md", "Settings")
    names: dict[str, object] = {}
    exec(example, names)  # the page's own block
    settings.CHATPROXY_BUDGETS = names["CHATPROXY_BUDGETS"]

    assert [m.id for m in check_settings()] == []


@db
async def test_the_documented_refusal_is_what_a_turn_over_budget_gets(client, settings, user):
    budgets(settings, user=[{"period": "day", "tokens": 200_000}])
    settings.CHATPROXY_PRICES = {"gpt-test": {"prompt": 0.15, "completion": 0.60}}
    await spend_at(user, 199_880, timezone.now())

    response = await chat(client, HELLO | {"max_tokens": 4096})

    documented = doc_blocks("budgets.md", "The refusal")[0].split("\n\n", 1)[1]
    error = orjson.loads(documented)["error"]
    assert response.json()["error"]["code"] == error["code"]
    assert (
        response.json()["error"]["message"].split(" It resets")[0]
        == (error["message"].split(" It resets")[0])
    )


@db
@pytest.mark.server
@pytest.mark.skipif(connection.vendor != "postgresql", reason="the row locks are PostgreSQL's")
async def test_two_workers_never_pass_the_budget_by_more_than_one_reservation(
    upstream, user, django_db_blocker
):
    budget = 20 * HELLO_RESERVES
    database = await sync_to_async(shared_database_name)(django_db_blocker)
    settings = {
        "CHATPROXY_BUDGETS": {"user": [{"period": "day", "tokens": budget}]},
        "CHATPROXY_RATE_LIMIT": None,
        "CHATPROXY_MAX_STREAMS": None,
    }
    workers = [ServerProcess(database, upstream.base_url, settings) for _ in range(2)]
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "workers")
    headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
    # Answers that use their whole reservation, slowly enough that many are in flight at once.
    upstream.enqueue(*[Reply(tokens=["x"] * 20, delay=0.005) for _ in range(200)])
    await asyncio.gather(*(asyncio.to_thread(worker.start) for worker in workers))
    try:
        async with httpx2.AsyncClient(timeout=60) as http:

            async def turn(i: int) -> int:
                url = f"{workers[i % 2].url}/completions"
                response = await http.post(url, content=orjson.dumps(HELLO), headers=headers)
                return response.status_code

            codes = await asyncio.gather(*(turn(i) for i in range(200)))
    finally:
        await asyncio.gather(*(asyncio.to_thread(worker.stop) for worker in workers))

    spent = sum(s.tokens for s in await spends())
    assert set(codes) == {200, 429} and codes.count(200) >= 20
    assert spent <= budget + HELLO_RESERVES


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


@db
async def test_an_api_keys_budget_counts_only_what_that_key_spent(upstream, settings, user):
    budgets(settings, api_key=[{"period": "day", "tokens": 30}])
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "backend")
    _, other = await sync_to_async(ApiKey.objects.issue)(user, "batch")
    client = AsyncClient()
    upstream.enqueue(Reply(tokens=["x"] * 20), Reply())

    await read_body(await chat(client, HELLO, headers=bearer(raw)))  # 1 + 20 of its 30 tokens
    refused = await refusal(await chat(client, HELLO, headers=bearer(raw)))
    other_key = await chat(client, HELLO, headers=bearer(other))
    await read_body(other_key)
    [shown] = (await client.get("/budgets", headers=bearer(raw))).json()["budgets"]

    assert refused[:2] == (429, "budget_exceeded")
    assert refused[2].startswith("The daily budget of this API key has 9 of 30 tokens left;")
    assert other_key.status_code == 200
    assert (shown["scope"], shown["tokens"]) == (
        "api_key",
        {"limit": 30, "used": 21, "remaining": 9},
    )


@db
async def test_an_admin_budget_on_a_key_replaces_the_settings_for_it(upstream, settings, user):
    budgets(settings, api_key=[{"period": "day", "tokens": 10}])
    key, raw = await sync_to_async(ApiKey.objects.issue)(user, "backend")
    await Budget.objects.acreate(scope=Scope.API_KEY, api_key=key, period=Period.DAY, tokens=900)

    response = await chat(AsyncClient(), HELLO, headers=bearer(raw))
    await read_body(response)

    assert response.status_code == 200


@db
def test_the_admin_lists_what_each_budget_has_spent_this_period(admin_client, user):
    Budget.objects.create(scope=Scope.USER, user=user, period=Period.DAY, tokens=500)
    Spend.objects.create(user=user, tokens=120, cost=0)

    page = admin_client.get("/admin/chatproxy/budget/").content.decode()

    assert "120 tokens" in page


def spend_now(user, tokens: int, cost: str = "0", when: datetime.datetime | None = None) -> None:
    Spend.objects.create(
        user=user,
        tokens=tokens,
        cost=Decimal(cost),
        settled=True,
        created_at=when or timezone.now(),
    )


def spenders(page, table: str) -> list[tuple[str, int, Decimal, list[str]]]:
    return [(s.name, s.tokens, s.cost, s.limits) for s in page.context_data["summary"][table]]


@db
def test_the_admin_sums_spend_per_user_and_group_beside_their_budgets(
    admin_client, settings, user, other_user
):
    budgets(settings, user=[{"period": "day", "tokens": 500}])
    settings.CHATPROXY_BUDGETS["groups"] = {"staff": [{"period": "week", "cost": "2"}]}
    Budget.objects.create(scope=Scope.USER, user=other_user, period=Period.MONTH, tokens=1000)
    staff = Group.objects.create(name="staff")
    staff.user_set.add(user, other_user)
    month = timezone.localtime().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend_now(user, 400, "0.5", when=month - datetime.timedelta(days=8))  # in no period shown
    spend_now(user, 120, "0.01")
    spend_now(user, 30)
    spend_now(other_user, 70, "0.02")

    page = admin_client.get("/admin/chatproxy/spend/")

    assert page.status_code == 200
    assert spenders(page, "users") == [
        ("alice", 150, Decimal("0.01"), ["daily: 150 of 500 tokens"]),
        ("bob", 70, Decimal("0.02"), ["monthly: 70 of 1000 tokens"]),
    ]
    assert spenders(page, "groups") == [
        ("staff", 220, Decimal("0.03"), ["weekly: 0.030000 of 2.000000 in cost"]),
    ]
    html = page.content.decode()
    assert "Spend per user, today" in html
    assert '<th scope="row">staff</th><td>220</td>' in html


@db
def test_the_admin_sums_spend_over_the_chosen_period(admin_client, settings, user):
    budgets(settings, user=[{"period": "day", "tokens": 500}])
    month = timezone.localtime().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    spend_now(user, 400, when=month - datetime.timedelta(seconds=1))
    spend_now(user, 25, when=month)
    spend_now(user, 30)

    this_month = admin_client.get("/admin/chatproxy/spend/?period=month")

    # The daily budget counts its own period: the spend at the month's start only on the 1st.
    today = 55 if timezone.localtime().day == 1 else 30
    assert spenders(this_month, "users") == [
        ("alice", 55, Decimal(0), [f"daily: {today} of 500 tokens"])
    ]
    assert "Spend per user, this month" in this_month.content.decode()


@db
def test_the_admin_lists_spend_without_limits_when_budgets_are_off(admin_client, user):
    spend_now(user, 30)

    page = admin_client.get("/admin/chatproxy/spend/")

    assert spenders(page, "users") == [("alice", 30, Decimal(0), [])]
