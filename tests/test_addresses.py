"""The client address per-address limits count: IPv4 as is, IPv6 by its /64."""

from __future__ import annotations

from typing import Any

import pytest

from blogchat.addresses import client_address


@pytest.mark.parametrize(
    ("client", "address"),
    [
        (("203.0.113.7", 51234), "203.0.113.7"),
        (("2001:db8:1:2:3:4:5:6", 443), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:ffff::1", 443), "2001:db8:1:2::/64"),
        (("::ffff:203.0.113.7", 443), "203.0.113.7"),
        (("::1", 1), "::/64"),
        (None, "unknown"),
        (("", 0), "unknown"),
        (("testclient", 50000), "testclient"),
    ],
)
def test_the_client_address_of_a_scope(client: Any, address: str) -> None:
    for kind in ("http", "websocket"):
        assert client_address({"type": kind, "client": client}) == address


def test_two_addresses_of_one_ipv6_subscriber_are_one_client() -> None:
    first = client_address({"type": "http", "client": ("2001:db8:aa:bb::1", 1)})
    second = client_address({"type": "websocket", "client": ("2001:db8:aa:bb:9::2", 2)})
    neighbour = client_address({"type": "http", "client": ("2001:db8:aa:bc::1", 1)})
    assert first == second != neighbour
