"""Who is chatting: a bearer API key, or the session's user, shared by HTTP and WebSocket.

With anonymous chat on, a visitor is also known by their network address (``client_address``,
the one place that reads ``X-Forwarded-For``), which the limits count; and a visitor without a
session gets one only from the first turn that is accepted, never from a page view or a
refused request.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.middleware.csrf import CsrfViewMiddleware
from django.utils.crypto import salted_hmac

from . import database
from .conf import conf
from .exceptions import RequestError
from .models import ApiKey
from .owners import Owner

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def key_from_bearer(authorization: str) -> ApiKey | None:
    """Return the key (with its user) of an ``Authorization: Bearer <key>`` header; None if
    there is no bearer header; raise ``invalid_api_key`` for a key that is unknown or revoked."""
    scheme, _, raw = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    key = ApiKey.objects.key_for(raw.strip())
    if key is None:
        raise RequestError(
            "invalid_api_key",
            "The API key is unknown or revoked. Ask the site's staff for a new one.",
            status=401,
        )
    return key


def identify(request: HttpRequest) -> tuple[Owner, Any]:
    """Return who is chatting and the user; raise if nobody may, or a cookie lacks CSRF.

    Synchronous, for chatproxy's database thread (``database.run``), where a turn does all of
    its reads and its first writes in one trip. An anonymous visitor without a session is an
    ``Owner`` that ``is_new``: it owns nothing, and ``open_session`` gives it a session once
    a turn of theirs is accepted.
    """
    bearer = key_from_bearer(request.headers.get("Authorization", ""))
    if bearer is not None:  # no cookie, so no CSRF to check
        return Owner(user_id=bearer.user.pk, api_key_id=bearer.pk), bearer.user
    user = request.user  # set by AuthenticationMiddleware, which loads the session
    if user.is_authenticated:
        _check_csrf(request)
        return Owner(user_id=user.pk), user
    if not conf.CHATPROXY_ALLOW_ANONYMOUS:
        raise RequestError(
            "authentication_required", "Log in to chat: this endpoint needs a user.", status=401
        )
    key = request.session.session_key  # None for no cookie, or one naming no session
    if key is not None:
        # An anonymous session is an identity carried by a cookie, which another site's form
        # would send too. (A cookieless request has none to forge.)
        _check_csrf(request)
    peer = request.META.get("REMOTE_ADDR", "")
    address = client_address(peer, request.headers.get("X-Forwarded-For", ""))
    return Owner(session_key=key, address=address_key(address)), user


async def authenticate(request: HttpRequest) -> tuple[Owner, Any]:
    """``identify()`` from async code, on chatproxy's database thread."""
    return await database.run(identify, request)


def open_session(request: HttpRequest, owner: Owner) -> Owner:
    """Give a new anonymous visitor a session (its cookie goes out with the response) and
    return the owner under it. Called once the visitor's first turn has passed the limits."""
    return dataclasses.replace(owner, session_key=session_key(request))


def _check_csrf(request: HttpRequest) -> None:
    """Refuse a request without the CSRF token, as Django's own views do (the middleware lets
    safe methods such as GET through)."""
    csrf = CsrfViewMiddleware(lambda r: HttpResponse())
    csrf.process_request(request)
    if csrf.process_view(request, _csrf_protected, (), {}) is not None:
        raise RequestError(
            "csrf_failed",
            "CSRF check failed. Send the csrftoken cookie's value in the X-CSRFToken header.",
            status=403,
        )


def _csrf_protected(request: HttpRequest) -> HttpResponse:
    """Stand in for a view when asking CsrfViewMiddleware, which skips csrf_exempt views."""
    raise NotImplementedError


def session_key(request: HttpRequest) -> str:
    """Return the session key that owns an anonymous user's conversations, creating it."""
    session = request.session
    if session.session_key is None:
        session["chatproxy"] = True  # marks the session modified, so the cookie is sent
        session.save()
    return str(session.session_key)


def client_address(peer: str, forwarded_for: str = "") -> str:
    """Return the client's IP address, for HTTP and WebSocket alike: the peer's, unless the
    peer is one of CHATPROXY_TRUSTED_PROXIES; then the right-most ``X-Forwarded-For`` address
    that is not a trusted proxy. The header is never read otherwise: anyone can send it."""
    proxies = _trusted_networks()
    address = _parse(peer)
    if address is None:
        return peer
    if not proxies or not _trusted(address, proxies):
        return str(address)
    for hop in reversed(forwarded_for.split(",")):
        forwarded = _parse(hop)
        if forwarded is None:  # not written by a proxy of ours: the last proxy is all we know
            break
        address = forwarded
        if not _trusted(address, proxies):
            break
    return str(address)


def address_key(address: str) -> str:
    """A keyed digest naming the network an address belongs to, for counting without storing
    the address. An IPv6 client is counted by its /64, as one host is given a whole /64."""
    parsed = _parse(address)
    network = address
    if isinstance(parsed, ipaddress.IPv6Address):
        network = str(ipaddress.IPv6Network(f"{parsed}/64", strict=False))
    return salted_hmac("chatproxy.address", network, algorithm="sha256").hexdigest()[:32]


def scope_address_key(scope: Mapping[str, Any]) -> str:
    """``address_key`` of a WebSocket's client, from its ASGI scope."""
    peer = (scope.get("client") or [""])[0] or ""
    forwarded = b",".join(v for k, v in scope.get("headers", []) if k == b"x-forwarded-for")
    return address_key(client_address(str(peer), forwarded.decode("latin-1")))


def _parse(text: str) -> IPAddress | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    networks = []
    for proxy in conf.CHATPROXY_TRUSTED_PROXIES:
        try:
            networks.append(ipaddress.ip_network(proxy, strict=False))
        except (TypeError, ValueError):  # reported by check chatproxy.E013
            continue
    return networks


def _trusted(
    address: IPAddress, proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    return any(address in network for network in proxies)
