"""Which backends a client's backend specs stand for, now and after a re-resolution.

Pure logic around one injectable resolver (``socket.getaddrinfo`` by default).
A spec whose host name resolves to several addresses is that many backends,
one ``tcp://ADDRESS:PORT`` endpoint each (how round-robin DNS, Consul and
Kubernetes headless Services list a fleet); a name that resolves to one
address keeps its own endpoint (``tcp://NAME:PORT``, which ZeroMQ resolves;
with a resolver of the user's, its address is used instead),
and so do literal addresses, ``ipc://`` and ``inproc://``. A name that does not
resolve (yet) keeps its own endpoint too: ZeroMQ keeps trying it.

:meth:`Membership.refresh` resolves every name again and returns the
endpoints that joined and those that left; the client connects the first and
drains the second (no new calls; calls in flight finish).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Membership", "Resolver", "system_resolver"]

# host, port -> the addresses it stands for (IPv4 by default, as ZeroMQ without IPv6)
Resolver = Callable[[str, int], Iterable[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """The IPv4 addresses of ``host`` (``socket.getaddrinfo``), in the order given,
    without repeats; [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def _split_tcp(endpoint: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``tcp://`` endpoint whose host is a name, else None."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[6:].rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        return None  # a literal address: nothing to resolve
    except ValueError:
        pass
    if host in ("*", "") or not port.isdigit():
        return None
    return host, int(port)


def _endpoint(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


class Membership:
    """The endpoints each configured spec stands for (see the module docstring).

    ``add(endpoint)`` registers a spec (already parsed into an endpoint) and
    returns the endpoints it stands for now; ``refresh()`` re-resolves every name.
    Not thread-safe; ``refresh`` may block on DNS, so drivers call it off their
    I/O thread and apply the result under their lock.
    """

    def __init__(self, resolver: Resolver | None = None) -> None:
        self.resolver: Resolver = resolver or system_resolver
        # A resolver of the user's (Consul, a registry) knows names ZeroMQ cannot
        # resolve: its answers are always used as addresses.
        self.custom = resolver is not None
        self.specs: dict[str, list[str]] = {}  # spec endpoint -> the endpoints it is now

    def add(self, spec: str) -> list[str]:
        """Register ``spec``; the endpoints it stands for now (already known: [])."""
        if spec in self.specs:
            return []
        now = self._resolve(spec, None)
        self.specs[spec] = now
        return [e for e in now if not self._claimed(e, spec)]

    def remove(self, spec: str) -> list[str]:
        """Unregister ``spec`` (an endpoint given or one it expanded to); the
        endpoints no spec stands for any more."""
        owner = spec if spec in self.specs else self.owner(spec)
        if owner is None:
            return []
        if owner != spec:  # one address of a name: only that one leaves
            self.specs[owner] = [e for e in self.specs[owner] if e != spec]
            return [] if self._claimed(spec, None) else [spec]
        gone = self.specs.pop(owner)
        return [e for e in gone if not self._claimed(e, None)]

    def owner(self, endpoint: str) -> str | None:
        """The spec that ``endpoint`` came from, or None."""
        for spec, endpoints in self.specs.items():
            if endpoint in endpoints:
                return spec
        return None

    def endpoints(self) -> list[str]:
        """Every endpoint the specs stand for now, without repeats, in order."""
        out: dict[str, None] = {}
        for endpoints in self.specs.values():
            for e in endpoints:
                out.setdefault(e, None)
        return list(out)

    def refresh(self) -> tuple[list[str], list[str]]:
        """Resolve every name again: ``(joined, left)`` endpoints."""
        before = set(self.endpoints())
        for spec in list(self.specs):
            if _split_tcp(spec) is not None:
                self.specs[spec] = self._resolve(spec, self.specs[spec])
        after = self.endpoints()
        return [e for e in after if e not in before], sorted(before.difference(after))

    @property
    def dynamic(self) -> bool:
        """True when some spec is a host name (re-resolving can change anything)."""
        return any(_split_tcp(spec) is not None for spec in self.specs)

    def _resolve(self, spec: str, current: list[str] | None) -> list[str]:
        """What ``spec`` stands for now, given what it stood for (None: new)."""
        named = _split_tcp(spec)
        if named is None:
            return [spec]
        host, port = named
        try:
            addresses = list(dict.fromkeys(self.resolver(host, port)))
        except Exception:  # a resolver that fails is a name that does not resolve now
            addresses = []
        if not addresses:  # a DNS hiccup must not drain a fleet: keep what it was
            return current or [spec]
        if len(addresses) == 1 and not self.custom and (current is None or current == [spec]):
            return [spec]  # one address: ZeroMQ resolves the name itself, as we did
        # Once a fleet, always addresses: shrinking to one does not churn connections.
        return [_endpoint(a, port) for a in addresses]

    def _claimed(self, endpoint: str, other_than: Any) -> bool:
        return any(
            endpoint in endpoints for spec, endpoints in self.specs.items() if spec != other_than
        )
