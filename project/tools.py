"""The demo project's server tools: one needs no data, one reads the asking user's own rows."""

from __future__ import annotations

from datetime import UTC, datetime

from chatproxy.models import Conversation
from chatproxy.tools import tool


@tool
def current_time() -> str:
    """The current date and time on the server, in UTC."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@tool
def count_my_conversations(turn) -> int:  # noqa: ANN001
    """How many conversations the asking user has."""
    # The turn's owner, never an argument the model could choose: another user's
    # conversations are out of the tool's reach.
    return Conversation.objects.owned_by(turn.owner).count()
