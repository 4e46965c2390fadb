"""Titles the model writes: the ``Title`` interceptor (off unless configured).

By default a conversation's title is its first message, cut to fit (``start_turn``). With
``Title`` in CHATPROXY_INTERCEPTORS, once the first answer of a new conversation is complete,
the model is asked for a short title in a side call of its own, which replaces that one. It
runs in a task after the turn, so the client never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING, Any

from . import database, upstream
from .conf import conf
from .content import text_of
from .exceptions import UpstreamError
from .interception import Interceptor
from .models import TITLE_LENGTH, Conversation

if TYPE_CHECKING:
    from .turns import Turn

logger = logging.getLogger("chatproxy.titles")

PROMPT = (
    "Write a title of at most {words} words for the conversation below, in its language. "
    "Answer with the title only: no quotes, no full stop."
)
# What of the exchange the title call sends: enough to know the topic, little to pay for.
EXCERPT = 1000

# The titles being made; kept so their tasks are not garbage-collected before they end.
_making: set[asyncio.Task[None]] = set()


class Title(Interceptor):
    """Ask the model for a short title after a new conversation's first answer. Options:
    ``model`` (default: the turn's model), ``words`` (at most this many, 6)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model = options.get("model")
        self.words = int(options.get("words", 6))

    async def after_response(self, turn: Turn) -> None:
        if turn.request.conversation_id is not None or turn.conversation_id is None:
            return  # only a conversation's first turn
        if conf.demo or not conf.CHATPROXY_STORE_CONTENT:
            return  # no model to ask; or no text to ask it about
        question = next((m for m in reversed(turn.request.messages) if m["role"] == "user"), None)
        if question is None or not turn.state.text:
            return
        content = question["content"]
        asked = content if isinstance(content, str) else text_of(content)
        task = asyncio.create_task(
            self.make(turn.conversation_id, self.model or turn.model, asked, turn.state.text)
        )
        _making.add(task)
        task.add_done_callback(_making.discard)

    async def make(self, conversation_id: uuid.UUID, model: str, asked: str, answer: str) -> None:
        """Ask for the title and save it, unless the owner renamed the conversation since."""
        messages = [
            {"role": "system", "content": PROMPT.format(words=self.words)},
            {"role": "user", "content": f"{asked[:EXCERPT]}\n\n{answer[:EXCERPT]}"},
        ]
        try:
            written = await upstream.complete(model, messages, max_tokens=8 * self.words + 16)
        except UpstreamError as exc:
            logger.info("No title for conversation %s: %s", conversation_id, exc.code)
            return
        title = " ".join(written.strip().strip("\"'«»“”").split()).rstrip(".")[:TITLE_LENGTH]
        if title:
            await database.run(_retitle, conversation_id, title)


def _retitle(conversation_id: uuid.UUID, title: str) -> None:
    # Only over the title made from the first message: a rename meanwhile wins.
    conversation = Conversation.objects.filter(pk=conversation_id).first()
    if conversation is None:
        return
    first = conversation.messages.filter(role="user").order_by("position").first()
    made = "" if first is None else " ".join(first.content.split())[:TITLE_LENGTH]
    Conversation.objects.filter(pk=conversation_id, title=made).update(title=title)


async def settled() -> None:
    """Wait until the titles being made are saved (tests; a shutdown that wants them)."""
    while _making:
        await asyncio.wait(set(_making))
