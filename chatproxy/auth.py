"""Who is chatting: a bearer API key, or the session's user, shared by HTTP and WebSocket."""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async

from .exceptions import RequestError
from .models import ApiKey


async def user_from_bearer(authorization: str) -> Any | None:
    """Return the user of an ``Authorization: Bearer <key>`` header; None if there is no
    bearer header; raise ``invalid_api_key`` for a key that is unknown or revoked."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    user = await sync_to_async(ApiKey.objects.user_for)(key.strip())
    if user is None:
        raise RequestError(
            "invalid_api_key",
            "The API key is unknown or revoked. Ask the site's staff for a new one.",
            status=401,
        )
    return user
