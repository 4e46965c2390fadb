"""The WebSocket origin check: Django's CSRF origin rule, applied at the handshake."""

from __future__ import annotations

import pytest
from channels.testing import WebsocketCommunicator

from tests.conftest import asgi_application

pytestmark = pytest.mark.django_db(transaction=True)


async def handshake(origin: str | None, host: str = "testserver", scheme: str = "ws", **headers):
    """Whether the project's WebSocket stack accepts a handshake (it is refused with 403)."""
    sent = [(b"host", host.encode())]
    if origin is not None:
        sent.append((b"origin", origin.encode()))
    sent += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    socket = WebsocketCommunicator(asgi_application(), "/ws/chat/", headers=sent)
    socket.scope["scheme"] = scheme
    connected, _ = await socket.connect()
    await socket.disconnect()
    return connected


async def test_the_sites_own_origin_is_accepted():
    assert await handshake("http://testserver")


async def test_the_sites_own_origin_with_its_port_is_accepted():
    assert await handshake("http://127.0.0.1:8000", host="127.0.0.1:8000")


@pytest.mark.parametrize(
    "origin",
    [
        "http://testserver:8001",  # another port of the same host: another site
        "https://testserver",  # another scheme
        "http://evil.example",
        "http://sub.testserver",
        "null",  # a sandboxed page or a file
        "http://testserver, http://evil.example",  # two Origin headers, as Django joins them
    ],
)
async def test_another_origin_is_refused(origin):
    assert not await handshake(origin)


async def test_a_secure_socket_accepts_only_the_https_origin():
    assert await handshake("https://testserver", scheme="wss")
    assert not await handshake("http://testserver", scheme="wss")


async def test_the_proxys_scheme_header_counts_when_secure_proxy_ssl_header_says_so(settings):
    assert not await handshake("https://testserver", x_forwarded_proto="https")

    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

    assert await handshake("https://testserver", x_forwarded_proto="https")
    assert not await handshake("http://testserver", x_forwarded_proto="https")


async def test_the_proxys_host_header_counts_when_use_x_forwarded_host_says_so(settings):
    settings.ALLOWED_HOSTS = ["testserver", "chat.example.com"]
    assert not await handshake("http://chat.example.com", x_forwarded_host="chat.example.com")

    settings.USE_X_FORWARDED_HOST = True

    assert await handshake("http://chat.example.com", x_forwarded_host="chat.example.com")


async def test_a_trusted_origin_is_accepted(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://app.example.com"]

    assert await handshake("https://app.example.com")
    assert not await handshake("http://app.example.com")
    assert not await handshake("https://other.example.com")


async def test_a_trusted_wildcard_origin_accepts_its_subdomains(settings):
    settings.CSRF_TRUSTED_ORIGINS = ["https://*.example.com"]

    assert await handshake("https://chat.example.com")
    assert await handshake("https://a.b.example.com")
    assert not await handshake("http://chat.example.com")
    assert not await handshake("https://chat.example.com:8443")
    assert not await handshake("https://example.com.evil.io")


async def test_a_host_outside_allowed_hosts_is_refused_whatever_the_origin():
    # DNS rebinding: a page on evil.example whose name now points at this server.
    assert not await handshake("http://evil.example", host="evil.example")
    assert not await handshake(None, host="evil.example")


async def test_a_handshake_without_origin_is_let_through():
    assert await handshake(None)
