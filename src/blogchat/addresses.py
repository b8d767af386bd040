"""Where a request or WebSocket comes from: the client address that per-address limits count."""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

# One IPv6 subscriber usually holds a whole /64 (often far more), so counting single IPv6
# addresses would give each attacker 2**64 fresh counters.
IPV6_PREFIX = 64
UNKNOWN = "unknown"


def client_address(scope: Scope) -> str:
    """The client address of an HTTP or WebSocket scope, as per-address limits key it.

    This is the peer uvicorn reports, after its proxy-header handling replaced a trusted
    proxy's address with the client named in `X-Forwarded-For` (only proxies listed in
    `FORWARDED_ALLOW_IPS` are trusted). An IPv6 address stands for its /64 network.
    """
    client = scope.get("client")
    host = str(client[0]) if client else ""
    if not host:
        return UNKNOWN
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a Unix socket path, or a name a test client made up
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)
