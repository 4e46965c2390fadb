"""Many turns at once on the default SQLite setup: every answer saved whole."""

from __future__ import annotations

import asyncio

import pytest

from chatproxy.models import Message
from tests.conftest import answer_text, chat, read_events

pytestmark = pytest.mark.django_db(transaction=True)


async def test_200_concurrent_turns_all_saved_complete(client, upstream):
    async def turn(i: int) -> tuple[str, str]:
        events = await read_events(
            await chat(client, {"messages": [{"role": "user", "content": f"n{i}"}]})
        )
        assert events[-1]["event"] == "completed", events[-1]
        return events[-1]["message_id"], answer_text(events)

    results = await asyncio.gather(*(turn(i) for i in range(200)))

    assert sorted(text for _, text in results) == sorted(f"Echo: n{i}" for i in range(200))
    saved = {str(m.pk): m async for m in Message.objects.filter(role="assistant")}
    assert len(saved) == 200
    for message_id, text in results:
        assert saved[message_id].content == text
        assert saved[message_id].status == "completed"
