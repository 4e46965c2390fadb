"""OpenTelemetry spans of a turn, its upstream calls and its tool runs, read from the SDK's
in-memory exporter; no message text in them unless CHATPROXY_TRACE_CONTENT allows it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.conftest import KEY, chat, read_events
from tests.fake_upstream import Reply
from tests.server import ROOT

db = pytest.mark.django_db(transaction=True)

HI = {"messages": [{"role": "user", "content": "Hi from Alice"}]}
EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)  # once per process: only this module sets one


@pytest.fixture(autouse=True)
def traces_on(settings):
    settings.CHATPROXY_TRACES = True
    EXPORTER.clear()
    yield
    EXPORTER.clear()


def spans() -> dict[str, list]:
    """The finished spans by kind: the turn's (internal), the upstream calls', the tools'."""
    found = EXPORTER.get_finished_spans()
    return {
        "turn": [s for s in found if s.name.startswith("chat") and s.kind is SpanKind.INTERNAL],
        "calls": [s for s in found if s.kind is SpanKind.CLIENT],
        "tools": [s for s in found if s.name.startswith("execute_tool")],
    }


@db
async def test_a_turn_is_a_span_with_its_upstream_call_as_a_child(client, upstream):
    events = await read_events(await chat(client, HI))

    found = spans()
    (turn,), (call,) = found["turn"], found["calls"]
    assert turn.name == call.name == "chat gpt-test"
    assert call.parent.span_id == turn.context.span_id
    usage = events[-1]["usage"]
    assert dict(turn.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.conversation.id": events[0]["conversation_id"],
        "chatproxy.message_id": events[0]["message_id"],
        "chatproxy.status": "completed",
        "gen_ai.response.model": "gpt-test",
        "chatproxy.upstream": "default",
        "gen_ai.response.finish_reasons": ("stop",),
        "gen_ai.usage.input_tokens": usage["prompt_tokens"],
        "gen_ai.usage.output_tokens": usage["completion_tokens"],
    }
    assert call.attributes["server.address"] == "127.0.0.1"
    assert call.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert turn.status.status_code is StatusCode.UNSET


@db
async def test_spans_carry_no_message_text_by_default(client, upstream):
    upstream.enqueue(Reply(tokens=["Secret ", "answer"]))

    await read_events(await chat(client, HI))

    values = [str(v) for span in EXPORTER.get_finished_spans() for v in span.attributes.values()]
    assert values and not [v for v in values if "Alice" in v or "Secret" in v]


@db
async def test_message_text_goes_in_spans_only_when_allowed(client, upstream, settings):
    settings.CHATPROXY_TRACE_CONTENT = True
    upstream.enqueue(Reply(tokens=["Secret ", "answer"]))

    await read_events(await chat(client, HI))

    (turn,) = spans()["turn"]
    assert "Hi from Alice" in turn.attributes["gen_ai.input.messages"]
    assert turn.attributes["gen_ai.output.messages"] == (
        '[{"role":"assistant","content":"Secret answer"}]'
    )


@db
async def test_an_upstream_failure_marks_the_call_and_the_turn(client, upstream):
    upstream.enqueue(Reply(status=500))

    await read_events(await chat(client, HI))

    found = spans()
    for span in (*found["turn"], *found["calls"]):
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == "upstream_error"


@db
async def test_a_failover_is_an_event_on_the_upstream_call(client, settings, upstream, backup):
    settings.CHATPROXY_UPSTREAMS = {
        "primary": {"base_url": upstream.base_url, "api_key": KEY, "cooldown": 0},
        "backup": {"base_url": backup.base_url, "api_key": KEY, "priority": 1},
    }
    upstream.enqueue(Reply(status=503))

    await read_events(await chat(client, HI))

    (call,) = spans()["calls"]
    assert call.attributes["chatproxy.upstream"] == "backup"
    assert [(e.name, dict(e.attributes)) for e in call.events] == [
        (
            "chatproxy.failover",
            {
                "chatproxy.upstream": "primary",
                "error.type": "upstream_error",
                "chatproxy.next": "backup",
            },
        )
    ]


@db
async def test_each_tool_run_and_each_step_is_a_span_of_the_turn(client, upstream, settings):
    settings.CHATPROXY_TOOLS = ["tests.sample_tools.weather"]
    oslo = {"id": "call_1", "name": "weather", "arguments": '{"city": "Oslo"}'}
    upstream.enqueue(Reply(tokens=["Let me look."], tool_calls=[oslo]), Reply(tokens=["Sunny."]))

    await read_events(await chat(client, HI))

    found = spans()
    (turn,), (tool,) = found["turn"], found["tools"]
    assert len(found["calls"]) == 2
    assert tool.name == "execute_tool weather"
    assert tool.parent.span_id == turn.context.span_id
    assert dict(tool.attributes) == {
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "weather",
        "gen_ai.tool.call.id": "call_1",
    }
    assert all(call.parent.span_id == turn.context.span_id for call in found["calls"])


# In a process of its own, where opentelemetry cannot be imported: as if not installed.
WITHOUT_OTEL = """
import sys
sys.modules["opentelemetry"] = None
import django
from django.conf import settings
django.setup()
settings.CHATPROXY_TRACES = True
from chatproxy.checks import check_settings
print(*[m.id for m in check_settings()])
"""


def test_traces_without_opentelemetry_installed_is_an_error(tmp_path):
    # On SQLite and in-memory layers of its own, whatever the suite runs on.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env |= {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "CHATPROXY_TEST_DATABASE_NAME": str(tmp_path / "db.sqlite3"),
    }
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_OTEL],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["chatproxy.E065"]
