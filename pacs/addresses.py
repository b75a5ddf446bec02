"""Peer addresses checked against configured hosts and networks.

DICOM's calling AE title and HL7's sending application are whatever the
peer says; the connection's source address is the one thing a peer on the
hospital network cannot simply claim. Host names are resolved (and kept a
minute: a modality's DHCP lease may move it) so that the registry can name
a modality by its DNS name.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Iterable

# Seconds a host name's addresses are kept.
RESOLVE_TTL = 60.0
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        found = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    # A v4 peer on a dual-stack socket arrives as ::ffff:a.b.c.d.
    mapped = getattr(found, "ipv4_mapped", None)
    return mapped or found


class _Resolver:
    """Host name -> addresses, cached for :data:`RESOLVE_TTL` seconds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}

    def addresses(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(host)
        if cached and now - cached[0] < RESOLVE_TTL:
            return cached[1]
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
            found = frozenset(str(_address(str(info[4][0])) or info[4][0]) for info in infos)
        except OSError:
            found = frozenset()  # unresolvable now: matches nothing
        with self._lock:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[host] = (now, found)
        return found


_resolver = _Resolver()


def host_matches(address: str, host: str) -> bool:
    """Whether the peer *address* is *host*: an address, a network in CIDR
    notation, or a name resolving to the address."""
    peer = _address(address)
    if peer is None or not host.strip():
        return False
    host = host.strip()
    if "/" in host:
        try:
            return peer in ipaddress.ip_network(host, strict=False)
        except ValueError:
            return False
    wanted = _address(host)
    if wanted is not None:
        return peer == wanted
    return str(peer) in _resolver.addresses(host)


class Allowlist:
    """Comma-separated hosts and networks; empty allows every address."""

    def __init__(self, spec: str | Iterable[str]) -> None:
        items = spec.split(",") if isinstance(spec, str) else spec
        self.hosts = [item.strip() for item in items if item.strip()]

    def __bool__(self) -> bool:
        return bool(self.hosts)

    def allows(self, address: str) -> bool:
        """True when *address* is on the list (or the list is empty)."""
        return not self.hosts or any(host_matches(address, host) for host in self.hosts)

    def check(self) -> list[str]:
        """Entries that are neither an address, a network nor a resolvable name."""
        bad = []
        for host in self.hosts:
            if "/" in host:
                try:
                    ipaddress.ip_network(host, strict=False)
                except ValueError:
                    bad.append(host)
            elif _address(host) is None and not _resolver.addresses(host):
                bad.append(host)
        return bad


def is_loopback(host: str) -> bool:
    """Whether a listener bound to *host* is reachable from this machine only."""
    found = _address(host)
    return found is not None and found.is_loopback or host.strip() == "localhost"
