"""Prometheus metrics: what a turn, a failover and a follower count, and who may read them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx2
import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from prometheus_client import REGISTRY

from chatproxy.checks import check_settings
from chatproxy.models import ApiKey
from tests.conftest import KEY, chat, read_events, shared_database_name
from tests.fake_upstream import Reply
from tests.server import ROOT, ServerProcess

db = pytest.mark.django_db(transaction=True)

HI = {"messages": [{"role": "user", "content": "Hi"}]}
TOKEN = "metrics-token-0123456789"
ANSWER = {"model": "gpt-test", "upstream": "default"}


@pytest.fixture(autouse=True)
def metrics_on(settings):
    settings.CHATPROXY_METRICS = True
    settings.CHATPROXY_METRICS_TOKEN = TOKEN


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Counts:
    """The samples named, before and after: ``delta()`` is what happened in between."""

    def __init__(self, **samples: tuple[str, dict[str, str]]) -> None:
        self.samples = samples
        self.before = {key: sample(n, **labels) for key, (n, labels) in samples.items()}

    def delta(self) -> dict[str, float]:
        return {
            key: sample(n, **labels) - self.before[key] for key, (n, labels) in self.samples.items()
        }


@db
async def test_a_completed_turn_counts_once_with_its_tokens_and_times(client, upstream):
    counts = Counts(
        turns=("chatproxy_turns_total", {"status": "completed", **ANSWER}),
        prompt=("chatproxy_tokens_total", {"kind": "prompt", **ANSWER}),
        completion=("chatproxy_tokens_total", {"kind": "completion", **ANSWER}),
        durations=("chatproxy_turn_duration_seconds_count", ANSWER),
        first_tokens=("chatproxy_time_to_first_token_seconds_count", ANSWER),
        streaming=("chatproxy_streaming_answers", {}),
    )

    events = await read_events(await chat(client, HI))

    usage = events[-1]["usage"]
    assert counts.delta() == {
        "turns": 1,
        "prompt": usage["prompt_tokens"],
        "completion": usage["completion_tokens"],
        "durations": 1,
        "first_tokens": 1,
        "streaming": 0,
    }


@db
async def test_a_running_turn_counts_as_streaming_until_it_ends(client, upstream):
    before = sample("chatproxy_streaming_answers")
    upstream.enqueue(Reply(tokens=["a", "b"], first_delay=0.2))

    response = await chat(client, HI)
    lines = aiter(response.streaming_content)
    assert orjson.loads(await anext(lines))["event"] == "analyzing"
    during = sample("chatproxy_streaming_answers")
    async for _ in lines:
        pass

    assert (during - before, sample("chatproxy_streaming_answers") - before) == (1, 0)


@db
async def test_an_answer_failing_mid_stream_counts_as_an_upstream_error(client, upstream):
    counts = Counts(
        turns=("chatproxy_turns_total", {"status": "failed", **ANSWER}),
        errors=(
            "chatproxy_upstream_errors_total",
            {"upstream": "default", "code": "upstream_disconnected"},
        ),
    )
    upstream.enqueue(Reply(tokens=["a", "b", "c"], fail="drop", fail_after=1))

    await read_events(await chat(client, HI))

    assert counts.delta() == {"turns": 1, "errors": 1}


@db
async def test_a_failover_counts_the_failing_upstream_and_its_code(
    client, settings, upstream, backup
):
    settings.CHATPROXY_UPSTREAMS = {
        "primary": {"base_url": upstream.base_url, "api_key": KEY, "cooldown": 0},
        "backup": {"base_url": backup.base_url, "api_key": KEY, "priority": 1},
    }
    failed = {"upstream": "primary", "code": "upstream_rate_limited"}
    counts = Counts(
        failovers=("chatproxy_failovers_total", failed),
        errors=("chatproxy_upstream_errors_total", failed),
        served=(
            "chatproxy_turns_total",
            {"status": "completed", "model": "gpt-test", "upstream": "backup"},
        ),
    )
    upstream.enqueue(Reply(status=429, headers={"Retry-After": "0"}))

    await read_events(await chat(client, HI))

    assert counts.delta() == {"failovers": 1, "errors": 1, "served": 1}


@db
async def test_a_follower_counts_while_it_follows(client, upstream):
    upstream.enqueue(Reply(tokens=["a", "b"], first_delay=0.5))
    response = await chat(client, HI)
    lines = aiter(response.streaming_content)
    conversation = orjson.loads(await anext(lines))["conversation_id"]
    rest = asyncio.ensure_future(read_rest(lines))
    await upstream.wait_for_request()  # the turn runs, and takes followers
    before = sample("chatproxy_followers")

    follow = await client.get(f"/completions/{conversation}/stream")
    during = sample("chatproxy_followers")  # attached before the response's first byte
    await read_events(follow)
    await rest

    assert (during - before, sample("chatproxy_followers") - before) == (1, 0)


async def read_rest(lines) -> None:
    async for _ in lines:
        pass


@db
async def test_the_endpoint_serves_prometheus_text_to_the_token(upstream):
    response = await AsyncClient().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=")
    assert b"# TYPE chatproxy_turns_total counter" in response.content


@db
@pytest.mark.parametrize("authorization", ["", "Bearer wrong", f"Basic {TOKEN}", TOKEN])
async def test_the_endpoint_refuses_anyone_without_the_token(authorization):
    headers = {"Authorization": authorization} if authorization else {}

    response = await AsyncClient().get("/metrics", headers=headers)

    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "metrics_token_required"


@db
async def test_the_endpoint_is_not_found_while_metrics_are_off(settings):
    settings.CHATPROXY_METRICS = False

    response = await AsyncClient().get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})

    assert response.status_code == 404
    assert orjson.loads(response.content)["error"] == {
        "code": "metrics_off",
        "message": "Metrics are off. Install chatproxy[prometheus] and set "
        "CHATPROXY_METRICS = True.",
    }


@db
@pytest.mark.server
async def test_several_workers_add_up_in_multiprocess_mode(
    upstream, user, django_db_blocker, tmp_path, monkeypatch
):
    # Set for the workers only: this process imported prometheus_client in single-process mode.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    database = await sync_to_async(shared_database_name)(django_db_blocker)
    settings = {"CHATPROXY_METRICS": True, "CHATPROXY_METRICS_TOKEN": TOKEN}
    workers = [ServerProcess(database, upstream.base_url, settings) for _ in range(2)]
    _, raw = await sync_to_async(ApiKey.objects.issue)(user, "workers")
    headers = {"Authorization": f"Bearer {raw}", "Content-Type": "application/json"}
    await asyncio.gather(*(asyncio.to_thread(worker.start) for worker in workers))
    try:
        async with httpx2.AsyncClient(timeout=10) as http:
            for worker in workers:
                turn = await http.post(
                    f"{worker.url}/completions", content=orjson.dumps(HI), headers=headers
                )
                assert turn.content.splitlines()[-1].startswith(b'{"event":"completed"')
            scraped = await http.get(
                f"{workers[0].url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
            )
    finally:
        await asyncio.gather(*(asyncio.to_thread(worker.stop) for worker in workers))

    line = 'chatproxy_turns_total{model="gpt-test",status="completed",upstream="default"} 2.0'
    assert line in scraped.text.splitlines()


def test_metrics_without_a_token_is_a_warning(settings):
    settings.CHATPROXY_METRICS_TOKEN = ""
    assert [m.id for m in check_settings()] == ["chatproxy.W060"]


# In a process of its own, where prometheus-client cannot be imported: as if not installed.
WITHOUT_PROMETHEUS = """
import sys
sys.modules["prometheus_client"] = None
import django
from django.conf import settings
django.setup()
settings.CHATPROXY_METRICS, settings.CHATPROXY_METRICS_TOKEN = True, "t"
from chatproxy.checks import check_settings
print(*[m.id for m in check_settings()])
"""


def test_metrics_without_prometheus_client_installed_is_an_error(tmp_path):
    # On SQLite and in-memory layers of its own, whatever the suite runs on.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CHATPROXY_TEST_DATABASE_NAME": str(tmp_path / "db.sqlite3"),
    }
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PROMETHEUS],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["chatproxy.E064"]
