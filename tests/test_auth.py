"""The client address the limits count: X-Forwarded-For only from a trusted proxy."""

from __future__ import annotations

import pytest

from chatproxy.auth import address_key, client_address, scope_address_key

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::1"]


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "expected"),
    [
        # Not from a trusted proxy: the header is ignored, whatever it says.
        ("203.0.113.5", "198.51.100.1", "203.0.113.5"),
        ("203.0.113.5", "", "203.0.113.5"),
        # From a trusted proxy: the right-most address that is not a trusted proxy.
        ("10.0.0.2", "198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1, 10.1.2.3", "198.51.100.1"),
        ("2001:db8:ffff::1", "2001:db8:1::7", "2001:db8:1::7"),
        # Only proxies in the chain: the left-most is all that is known.
        ("10.0.0.2", "10.9.9.9", "10.9.9.9"),
        # No header, or garbage where a proxy would have written an address: the proxy itself.
        ("10.0.0.2", "", "10.0.0.2"),
        ("10.0.0.2", "unknown", "10.0.0.2"),
        ("10.0.0.2", "198.51.100.1, nonsense", "10.0.0.2"),
        # Ports and mapped addresses are the address.
        ("10.0.0.2", "198.51.100.1:4711", "198.51.100.1"),
        ("10.0.0.2", "[2001:db8:1::7]:443", "2001:db8:1::7"),
        ("::ffff:203.0.113.5", "198.51.100.1", "203.0.113.5"),
    ],
)
def test_client_address_reads_x_forwarded_for_only_from_a_trusted_proxy(
    settings, peer, forwarded_for, expected
):
    settings.CHATPROXY_TRUSTED_PROXIES = PROXIES

    assert client_address(peer, forwarded_for) == expected


def test_without_trusted_proxies_the_peer_is_the_client(settings):
    assert client_address("10.0.0.2", "198.51.100.1") == "10.0.0.2"


def test_an_ipv6_client_is_counted_by_its_64_and_no_address_is_kept():
    key = address_key("2001:db8:1:2:aaaa::1")

    assert key == address_key("2001:db8:1:2:ffff::9") != address_key("2001:db8:1:3::1")
    assert address_key("203.0.113.5") != address_key("203.0.113.6")
    assert len(key) == 32 and "2001" not in key


def test_a_websocket_scope_gives_the_same_key_as_its_request_would(settings):
    settings.CHATPROXY_TRUSTED_PROXIES = PROXIES
    scope = {
        "client": ["10.0.0.2", 50000],
        "headers": [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"198.51.100.1")],
    }

    assert scope_address_key(scope) == address_key("198.51.100.1")
    assert scope_address_key({"headers": []}) == address_key("")
