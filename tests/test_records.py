"""Checkpoints of many streaming answers go to the database together."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async

from chatproxy import records
from chatproxy.models import Conversation, Message
from chatproxy.owners import Owner

db = pytest.mark.django_db(transaction=True)


async def streaming_answers(user, count):
    owner = Owner(user_id=user.pk)
    start = sync_to_async(Conversation.objects.start_turn)
    started = [await start(owner, None, [], "m") for _ in range(count)]
    return [answer for _, answer in started]


@db
async def test_checkpoints_queued_together_are_written_in_one_batch(user):
    answers = await streaming_answers(user, 20)
    batch = records.Checkpoints()

    writes = {batch.add(answer, f"text of {answer}") for answer in answers}
    assert len(writes) == 1  # one write, one transaction, for all twenty
    await asyncio.gather(*writes)

    saved = {m.pk: m.content async for m in Message.objects.filter(pk__in=answers)}
    assert saved == {answer: f"text of {answer}" for answer in answers}


@db
async def test_checkpoints_queued_while_a_batch_is_written_go_in_the_next(user):
    first, second, third = await streaming_answers(user, 3)
    batch = records.Checkpoints()

    written = batch.add(first, "one")
    await asyncio.sleep(0)  # one turn of the loop: the writer takes the first batch
    later = {batch.add(second, "two"), batch.add(third, "three")}
    assert later.isdisjoint({written}) and len(later) == 1
    await asyncio.gather(written, *later)

    saved = {m.pk: m.content async for m in Message.objects.filter(pk__in=[first, second, third])}
    assert saved == {first: "one", second: "two", third: "three"}
