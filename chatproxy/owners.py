"""Who a conversation belongs to: a user, or for anonymous chat a session (:class:`Owner`)."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from typing import Any

from django.conf import settings


@dataclasses.dataclass(frozen=True, slots=True)
class Owner:
    """Who a conversation belongs to: a user, or for anonymous chat a session.

    An anonymous visitor without a session yet (``is_new``) owns nothing; the turn that is
    accepted for them creates the session. ``address`` is, for anonymous chat, a digest of the
    client's network address (``auth.address_key``): the limits count it too.
    """

    user_id: int | None = None
    session_key: str | None = None
    address: str = ""
    # The API key a bearer request came with (budgets count per key); not part of who owns.
    api_key_id: int | None = dataclasses.field(default=None, compare=False)

    @property
    def is_new(self) -> bool:
        return self.user_id is None and not self.session_key

    @property
    def key(self) -> str:
        """A string naming the owner, for cache keys and idempotency keys."""
        if self.user_id is not None:
            return f"user:{self.user_id}"
        return f"session:{self.session_key}"

    @property
    def upstream_user(self) -> str:
        """A stable name for the owner that the upstream gets as ``user`` (for its abuse
        monitoring): keyed with SECRET_KEY, so it reveals neither the user id nor the session."""
        key = f"chatproxy.user:{self.key}".encode()
        return hmac.new(settings.SECRET_KEY.encode(), key, hashlib.sha256).hexdigest()[:32]

    def filter(self) -> dict[str, Any]:
        if self.user_id is not None:
            return {"owner_id": self.user_id}
        if self.is_new:
            return {"pk__in": []}
        return {"owner__isnull": True, "session_key": self.session_key}


def owner_label(username: str | None, session_key: str) -> str:
    """Name a conversation's owner for staff: the user name; for anonymous chat, a short keyed
    digest of the session, which tells sessions apart without showing the session key (a
    credential)."""
    if username is not None:
        return username
    if not session_key:
        return "anonymous"
    digest = Owner(session_key=session_key).upstream_user[:8]
    return f"anonymous {'socket' if session_key.startswith('ws-') else 'session'} {digest}"
