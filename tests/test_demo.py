"""The offline demo model answers through the real SDK path when no API key is set."""

from __future__ import annotations

import pytest

from chatproxy.demo import demo_reply
from chatproxy.models import Message
from tests.conftest import answer_text, chat, read_events

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def demo(settings):
    settings.CHATPROXY_API_KEY = ""
    del settings.CHATPROXY_MODELS
    del settings.CHATPROXY_DEFAULT_MODEL


async def test_demo_model_streams_a_deterministic_multi_sentence_reply(demo, client, upstream):
    messages = [{"role": "user", "content": "Hi there"}]

    events = await read_events(await chat(client, {"messages": messages}))

    assert events[0]["model"] == "chatproxy-demo"
    answering = [e for e in events if e["event"] == "answering"]
    assert len(answering) > 10
    text = answer_text(events)
    assert text == demo_reply(messages)
    assert text.count(". ") >= 2 and "Hi there" in text
    completed = events[-1]
    assert completed["event"] == "completed" and completed["finish_reason"] == "stop"
    assert completed["usage"]["completion_tokens"] == len(answering)
    assert upstream.requests == []  # the demo never touches the network
    answer = await Message.objects.aget(role="assistant")
    assert (answer.content, answer.model, answer.status) == (text, "chatproxy-demo", "completed")


async def test_demo_model_is_named_when_it_answers_for_a_configured_model(settings, client):
    # The install guide's settings, without a key: the demo answers, and says it does.
    settings.CHATPROXY_API_KEY = ""
    settings.CHATPROXY_MODELS = ["gpt-4o-mini"]
    settings.CHATPROXY_DEFAULT_MODEL = "gpt-4o-mini"

    events = await read_events(
        await chat(client, {"messages": [{"role": "user", "content": "Hi"}]})
    )

    assert events[0]["event"] == "analyzing" and events[0]["model"] == "chatproxy-demo"
    assert events[-1]["event"] == "completed"
    answer = await Message.objects.select_related("conversation").aget(role="assistant")
    assert (answer.model, answer.conversation.model) == ("chatproxy-demo", "chatproxy-demo")


async def test_demo_model_refuses_other_models(demo, client):
    response = await chat(
        client, {"messages": [{"role": "user", "content": "Hi"}], "model": "gpt-4o"}
    )

    assert response.status_code == 400
    assert b"model_not_allowed" in response.content
