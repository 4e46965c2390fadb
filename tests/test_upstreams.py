"""Several upstreams: routing by model and alias, failover before the first byte (never after),
cooldowns shared through the cache, what each answer records, and the system checks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import httpx2
import orjson
import pytest
from asgiref.sync import sync_to_async
from django.core.cache import caches
from django.core.management import call_command
from django.core.management.base import SystemCheckError

from chatproxy.checks import check_settings
from chatproxy.models import ApiKey, Message
from chatproxy.upstreams import COOLDOWN_KEY, routes
from tests.conftest import KEY, answer_text, chat, read_events, shared_database_name
from tests.fake_upstream import Reply
from tests.server import ServerProcess, free_port

db = pytest.mark.django_db(transaction=True)

HI = {"messages": [{"role": "user", "content": "Hi"}]}
BACKUP_KEY = "sk-backup-NEVER-LEAK-fedcba9876543210"


def two_upstreams(primary_url: str, backup_url: str, **primary: object) -> dict[str, dict]:
    return {
        "primary": {"base_url": primary_url, "api_key": KEY, "timeout": 5.0, **primary},
        "backup": {"base_url": backup_url, "api_key": BACKUP_KEY, "priority": 1},
    }


@pytest.fixture(autouse=True)
def no_cooldowns():
    """No cooldown carried from one test to the next (the cache outlives them)."""
    keys = [COOLDOWN_KEY + name for name in ("primary", "backup")]
    caches["default"].delete_many(keys)
    yield
    caches["default"].delete_many(keys)


@pytest.fixture
def primary_and_backup(settings, upstream, backup):
    settings.CHATPROXY_UPSTREAMS = two_upstreams(upstream.base_url, backup.base_url)
    return upstream, backup


async def answer() -> Message:
    return await Message.objects.aget(role="assistant")


def cooling(name: str) -> bool:
    return bool(caches["default"].get(COOLDOWN_KEY + name))


FAULTS = [
    pytest.param({}, Reply(status=429, headers={"Retry-After": "0"}), id="429"),
    pytest.param({}, Reply(status=500), id="500"),
    pytest.param({}, Reply(status=503), id="503"),
    pytest.param({"timeout": 0.3}, Reply(fail="stall_head"), id="timeout"),
]


@db
@pytest.mark.parametrize(("options", "fault"), FAULTS)
async def test_a_failing_upstream_hands_the_turn_to_the_next(
    client, settings, upstream, backup, options, fault
):
    settings.CHATPROXY_UPSTREAMS = two_upstreams(upstream.base_url, backup.base_url, **options)
    upstream.enqueue(fault)
    backup.enqueue(Reply(tokens=["from ", "backup"]))

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed"
    assert answer_text(events) == "from backup"
    assert len(upstream.requests) == 1 and len(backup.requests) == 1
    assert backup.requests[0].headers["authorization"] == f"Bearer {BACKUP_KEY}"
    saved = await answer()
    assert (saved.upstream, saved.upstream_model, saved.model) == ("backup", "gpt-test", "gpt-test")
    assert cooling("primary") and not cooling("backup")


@db
async def test_an_unreachable_upstream_hands_the_turn_to_the_next(client, settings, backup):
    nobody = f"http://127.0.0.1:{free_port()}/v1"
    settings.CHATPROXY_UPSTREAMS = two_upstreams(nobody, backup.base_url)

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed"
    assert (await answer()).upstream == "backup"
    assert cooling("primary")


@db
@pytest.mark.parametrize("status", [400, 401])
async def test_a_refused_request_does_not_fail_over(client, primary_and_backup, status):
    primary, backup = primary_and_backup
    primary.enqueue(Reply(status=status))

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "error"
    assert backup.requests == []
    assert not cooling("primary")


@db
async def test_an_answer_never_switches_upstream_after_its_first_byte(client, primary_and_backup):
    primary, backup = primary_and_backup
    primary.enqueue(Reply(tokens=["a", "b", "c"], fail="drop", fail_after=2))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_disconnected"
    assert answer_text(events) == "ab"
    assert backup.requests == []
    saved = await answer()
    assert (saved.status, saved.content, saved.upstream) == ("failed", "ab", "primary")


@db
async def test_the_last_upstreams_failure_is_the_turns_error(client, primary_and_backup):
    primary, backup = primary_and_backup
    primary.enqueue(Reply(status=503))
    backup.enqueue(Reply(status=429, headers={"Retry-After": "0"}))

    events = await read_events(await chat(client, HI))

    assert events[-1]["error"]["code"] == "upstream_rate_limited"
    assert len(primary.requests) == len(backup.requests) == 1


@db
async def test_an_upstream_cooling_down_is_tried_after_the_others(client, primary_and_backup):
    primary, backup = primary_and_backup
    primary.enqueue(Reply(status=503))

    await read_events(await chat(client, HI))
    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed"
    assert len(primary.requests) == 1  # the second turn went to the backup first
    assert len(backup.requests) == 2


@db
async def test_when_every_upstream_is_cooling_down_they_are_still_tried(client, primary_and_backup):
    primary, backup = primary_and_backup
    caches["default"].set_many({COOLDOWN_KEY + "primary": 1, COOLDOWN_KEY + "backup": 1}, 30)

    events = await read_events(await chat(client, HI))

    assert events[-1]["event"] == "completed"
    assert len(primary.requests) == 1 and backup.requests == []


@db
async def test_each_upstream_serves_only_its_models(client, settings, upstream, backup):
    settings.CHATPROXY_UPSTREAMS = {
        "primary": {"base_url": upstream.base_url, "api_key": KEY, "models": ["gpt-test"]},
        "backup": {"base_url": backup.base_url, "api_key": BACKUP_KEY, "models": ["gpt-other"]},
    }

    await read_events(await chat(client, {**HI, "model": "gpt-other"}))

    assert upstream.requests == []
    assert backup.requests[0].json["model"] == "gpt-other"
    assert (await answer()).upstream == "backup"


@db
async def test_a_model_no_upstream_serves_ends_the_turn_with_model_not_served(
    client, settings, upstream
):
    settings.CHATPROXY_UPSTREAMS = {
        "primary": {"base_url": upstream.base_url, "api_key": KEY, "models": ["gpt-test"]}
    }

    events = await read_events(await chat(client, {**HI, "model": "gpt-other"}))

    assert events[-1]["error"] == {
        "code": "model_not_served",
        "message": "No upstream serves the model 'gpt-other'. Tell the site's administrator.",
    }
    assert upstream.requests == []
    assert (await answer()).upstream == ""


@db
async def test_an_alias_and_an_upstreams_own_model_name_reach_the_upstream(
    client, settings, upstream, backup
):
    settings.CHATPROXY_MODELS = ["gpt-test", "fast"]
    settings.CHATPROXY_MODEL_ALIASES = {"fast": "small"}
    settings.CHATPROXY_UPSTREAMS = {
        "primary": {"base_url": upstream.base_url, "api_key": KEY, "models": ["gpt-test"]},
        "vendor": {
            "base_url": backup.base_url,
            "api_key": BACKUP_KEY,
            "models": {"small": "vendor/small-v2"},
        },
    }

    events = await read_events(await chat(client, {**HI, "model": "fast"}))

    assert events[0]["model"] == "fast"
    assert backup.requests[0].json["model"] == "vendor/small-v2"
    saved = await answer()
    assert (saved.model, saved.upstream, saved.upstream_model) == (
        "fast",
        "vendor",
        "vendor/small-v2",
    )


@db
async def test_an_upstream_sends_its_own_headers_and_key_from_the_environment(
    client, settings, upstream, monkeypatch
):
    monkeypatch.setenv("CHATPROXY_TEST_VENDOR_KEY", "sk-from-env")
    settings.CHATPROXY_UPSTREAMS = {
        "vendor": {
            "base_url": upstream.base_url,
            "api_key_env": "CHATPROXY_TEST_VENDOR_KEY",
            "headers": {"X-Title": "chatproxy tests"},
        }
    }

    await read_events(await chat(client, HI))

    sent = upstream.requests[0].headers
    assert (sent["authorization"], sent["x-title"]) == ("Bearer sk-from-env", "chatproxy tests")


@db
async def test_the_single_upstream_settings_are_the_default_upstream(client, upstream):
    await read_events(await chat(client, HI))

    saved = await answer()
    assert (saved.upstream, saved.upstream_model) == ("default", "gpt-test")
    assert upstream.requests[0].headers["authorization"] == f"Bearer {KEY}"


@db
@pytest.mark.server
async def test_a_cooldown_one_worker_sets_is_seen_by_another(
    client, settings, upstream, backup, user, django_db_blocker, tmp_path
):
    # A cache both processes share, as Redis is in production (and in CI).
    shared = {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                          "LOCATION": str(tmp_path / "cache")}}  # fmt: skip
    upstreams = two_upstreams(upstream.base_url, backup.base_url)
    settings.CACHES, settings.CHATPROXY_UPSTREAMS = shared, upstreams
    database = await sync_to_async(shared_database_name)(django_db_blocker)
    worker = ServerProcess(
        database, upstream.base_url, {"CACHES": shared, "CHATPROXY_UPSTREAMS": upstreams}
    )
    await asyncio.to_thread(worker.start)
    try:
        _, raw = await sync_to_async(ApiKey.objects.issue)(user, "worker")
        upstream.enqueue(Reply(status=503))
        async with httpx2.AsyncClient(base_url=worker.url, timeout=10) as http:
            response = await http.post(
                "/completions",
                content=orjson.dumps(HI),
                headers={"Authorization": f"Bearer {raw}", "Content-Type": "application/json"},
            )
        other = [orjson.loads(line) for line in response.content.splitlines()]
        assert other[-1]["event"] == "completed"

        events = await read_events(await chat(client, HI))  # this process: another worker
    finally:
        await asyncio.to_thread(worker.stop)

    assert events[-1]["event"] == "completed"
    assert len(upstream.requests) == 1  # only the other worker's failed call
    assert len(backup.requests) == 2


def ids() -> list[str]:
    return [m.id for m in check_settings()]


def test_two_served_upstreams_pass_the_checks(settings):
    settings.CHATPROXY_UPSTREAMS = two_upstreams("http://a.invalid/v1", "http://b.invalid/v1")
    assert ids() == []


@pytest.mark.parametrize(
    "upstreams",
    [
        ["http://a.invalid/v1"],
        {"a": "http://a.invalid/v1"},
        {"a": {"api_key": "k"}},
        {"a": {"base_url": "http://a.invalid/v1", "api_key": "k", "key": "k"}},
        {"a": {"base_url": "http://a.invalid/v1", "api_key": "k", "timeout": -1}},
        {"a": {"base_url": "http://a.invalid/v1", "api_key": "k", "weight": 0}},
        {"a": {"base_url": "http://a.invalid/v1", "api_key": "k", "models": "gpt-test"}},
        {"a": {"base_url": "http://a.invalid/v1", "api_key": "k", "headers": {"X-N": 1}}},
    ],
)
def test_a_malformed_upstream_is_an_error(settings, upstreams):
    settings.CHATPROXY_UPSTREAMS = upstreams
    assert ids() == ["chatproxy.E060"]


def test_an_upstream_with_no_key_is_an_error(settings):
    os.environ.pop("CHATPROXY_TEST_UNSET_KEY", None)
    settings.CHATPROXY_UPSTREAMS = {
        "bare": {"base_url": "http://a.invalid/v1"},
        "env": {"base_url": "http://b.invalid/v1", "api_key_env": "CHATPROXY_TEST_UNSET_KEY"},
    }
    messages = check_settings()
    assert [m.id for m in messages] == ["chatproxy.E061", "chatproxy.E061"]
    assert "CHATPROXY_TEST_UNSET_KEY is empty or unset" in messages[1].msg


def test_a_model_no_upstream_serves_is_an_error(settings):
    settings.CHATPROXY_GROUP_MODELS = {"pro": ["gpt-pro"]}
    settings.CHATPROXY_UPSTREAMS = {
        "a": {"base_url": "http://a.invalid/v1", "api_key": "k", "models": ["gpt-test"]}
    }
    messages = check_settings()
    assert [m.id for m in messages] == ["chatproxy.E062"]
    assert "['gpt-other', 'gpt-pro']" in messages[0].msg


def test_an_alias_to_a_served_model_passes_the_checks(settings):
    settings.CHATPROXY_MODEL_ALIASES = {"gpt-other": "gpt-test"}
    settings.CHATPROXY_UPSTREAMS = {
        "a": {"base_url": "http://a.invalid/v1", "api_key": "k", "models": ["gpt-test"]}
    }
    assert ids() == []


def test_malformed_aliases_are_an_error(settings):
    settings.CHATPROXY_MODEL_ALIASES = {"fast": None}
    assert ids() == ["chatproxy.E063"]


def test_check_command_fails_on_an_upstream_with_no_key(settings):
    settings.CHATPROXY_UPSTREAMS = {"bare": {"base_url": "http://a.invalid/v1"}}
    with pytest.raises(SystemCheckError, match="chatproxy.E061"):
        call_command("check")


def test_the_documented_two_provider_configuration_passes_the_checks(settings, monkeypatch):
    page = (Path(__file__).parent.parent / "docs" / "upstreams.md").read_text()
    example: dict[str, object] = {}
    exec(page.split("```python\n", 1)[1].split("```", 1)[0], example)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-a")
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-b")
    for name, value in example.items():
        if name.startswith("CHATPROXY_"):
            setattr(settings, name, value)

    assert ids() == []
    assert [(r.upstream.name, r.model) for r in routes("fast")] == [
        ("openai", "gpt-4o-mini"),
        ("openrouter", "openai/gpt-4o-mini"),
    ]
    assert [(r.upstream.name, r.model) for r in routes("llama")] == [
        ("vllm", "meta-llama/Llama-3.1-8B-Instruct")
    ]


@db
async def test_the_admin_lists_each_answers_upstream_and_filters_by_it(
    client, primary_and_backup, admin_client
):
    primary, _ = primary_and_backup
    primary.enqueue(Reply(tokens=["first"]), Reply(status=503))
    await read_events(await chat(client, HI))
    await read_events(await chat(client, HI))  # failed over: the backup's

    everything = await sync_to_async(admin_client.get)("/admin/chatproxy/message/?role=assistant")
    backup_only = await sync_to_async(admin_client.get)(
        "/admin/chatproxy/message/?role=assistant&upstream=backup"
    )

    assert everything.status_code == backup_only.status_code == 200
    assert "upstream" in everything.context["cl"].list_display
    assert everything.context["cl"].result_count == 2
    assert [m.upstream for m in backup_only.context["cl"].result_list] == ["backup"]
