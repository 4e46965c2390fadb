"""The docs keep up with the code: every setting, error code, event and check id is in them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatproxy.conf import Settings
from chatproxy.exceptions import ERROR_CODES

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
SETTINGS = sorted(name for name in dir(Settings) if name.startswith("CHATPROXY_"))


def page(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(first_cell: str, text: str) -> list[str]:
    return re.findall(rf"^\| `({first_cell})` \|", text, flags=re.MULTILINE)


def test_every_setting_is_in_the_settings_table():
    table = page("settings.md").split("\n## System checks\n", 1)[0]
    assert sorted(table_rows("CHATPROXY_[A-Z_]+", table)) == SETTINGS


@pytest.mark.parametrize("code", sorted(ERROR_CODES))
def test_every_error_code_is_in_the_error_table(code):
    assert f"| `{code}` |" in section(page("protocol.md"), "Errors")


def test_error_table_lists_no_unknown_code():
    listed = set(
        re.findall(
            r"^\| `([a-z_]+)` \| (?:\d{3}|in-band|saved only) \|", page("protocol.md"), re.MULTILINE
        )
    )
    assert listed == set(ERROR_CODES)


@pytest.mark.parametrize("event", ["analyzing", "answering", "ping", "completed", "error"])
def test_every_event_is_in_the_event_table(event):
    assert f"| `{event}` |" in section(page("protocol.md"), "Response")
    assert f"| `{event}` |" in README  # the front door's summary too


@pytest.mark.parametrize("event", ["reasoning", "tool_call"])
def test_every_additive_event_is_in_the_protocol_event_table(event):
    assert f"| `{event}` |" in section(page("protocol.md"), "Response")


def test_protocol_transcripts_are_valid_ndjson_ending_in_completed():
    import orjson

    blocks = section(page("protocol.md"), "Response").split("```")[1::2]
    transcripts = [[orjson.loads(line) for line in block.strip().splitlines()] for block in blocks]
    kinds = [{event["event"] for event in events} for events in transcripts]
    assert {"tool_call", "completed"} <= kinds[0] and {"reasoning", "answering"} <= kinds[1]
    assert all(events[-1]["event"] == "completed" for events in transcripts)


def test_every_check_id_is_documented():
    source = (ROOT / "chatproxy" / "checks.py").read_text()
    ids = sorted(set(re.findall(r'id="(chatproxy\.[EW]\d{3})"', source)))
    assert ids and ids == sorted(table_rows(r"chatproxy\.[EW]\d{3}", page("settings.md")))


@pytest.mark.django_db(transaction=True)
async def test_readme_transcript_is_what_the_demo_model_streams(client, settings):
    import orjson

    from tests.conftest import chat, read_events

    settings.CHATPROXY_API_KEY = ""  # the demo project without OPENAI_API_KEY
    del settings.CHATPROXY_MODELS
    del settings.CHATPROXY_DEFAULT_MODEL
    block = README.split("```", 2)[1]
    shown = [orjson.loads(line) for line in block.splitlines() if line.startswith("{")]
    cut = re.search(r"middle (\d+) `reasoning` and (\d+) `answering` lines are cut", README)
    assert cut is not None

    body = {"messages": [{"role": "user", "content": "Hi"}]}
    events = await read_events(await chat(client, body))

    def without_ids(event: dict) -> dict:
        return {k: v for k, v in event.items() if k not in ("conversation_id", "message_id")}

    real = [without_ids(e) for e in events]
    assert [without_ids(e) for e in shown] == [
        *real[:3],
        *real[3 + int(cut[1]) : -3 - int(cut[2])],
        *real[-3:],
    ]


def test_demo_server_tunes_the_garbage_collector_as_the_deployment_section_says():
    # In a child process: importing project.asgi freezes the importing process's objects.
    code = "import gc, project.asgi; print(gc.get_threshold(), gc.get_freeze_count())"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings"},
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip

    threshold, frozen = done.stdout.strip().rsplit(" ", 1)
    assert threshold == "(10000, 10, 10)"
    assert int(frozen) > 10_000  # Django, the SDK and the app, as loaded at start-up
    deployment = page("deployment.md")
    assert "gc.freeze()" in deployment and "gc.set_threshold(10_000, 10, 10)" in deployment


def test_conversations_page_requests_are_what_the_server_accepts():
    import orjson

    from chatproxy.payload import validate_request

    blocks = [
        orjson.loads(b) for b in re.findall(r"```json\n(.*?)```", page("conversations.md"), re.S)
    ]
    requests = [b for b in blocks if "regenerate" in b or "edit" in b]
    assert len(requests) == 2
    parsed = [validate_request(b) for b in requests]
    assert parsed[0].regenerate is not None and parsed[0].messages == []
    assert parsed[1].edit is not None and parsed[1].messages[0]["role"] == "user"
    transcript = next(b for b in blocks if "messages" in b and "active_leaf" in b)
    assert transcript["messages"][-1]["id"] in transcript["messages"][-1]["siblings"]
    listing = next(b for b in blocks if "branches" in b)
    assert [b["active"] for b in listing["branches"]] == [False, True]
