"""The port expander: turn ``54543``, ``54543,54545`` or ``54543-54546`` into ports.

This is the original ``daemonizing/port_expander.py`` as a module, so the
``taskit`` command, ``taskitctl`` and ``taskitd`` share one parser. Pure
functions, no I/O.
"""

from __future__ import annotations

import ipaddress

from taskit.errors import PortSpecError

__all__ = ["get_ports", "expand", "parse_address", "parse_targets"]

_MAX_PORT = 65535
# A typo such as 5000-50000 would fork tens of thousands of backends.
MAX_PORTS = 1024


def _port(text: str, spec: str) -> int:
    try:
        port = int(text.strip())
    except ValueError:
        raise PortSpecError(
            f"{text.strip()!r} in port list {spec!r} is not a number; "
            "write ports as 54543, 54543,54545 or 54543-54546"
        ) from None
    if not 1 <= port <= _MAX_PORT:
        raise PortSpecError(f"port {port} in {spec!r} is out of range (1-{_MAX_PORT})")
    return port


def get_ports(spec: str | int) -> list[int]:
    """The ports named by ``spec``, in order, without duplicates.

    ``spec`` is a comma-separated list of ports and inclusive ranges
    (``"54543"``, ``"54543,54545"``, ``"54543-54546"``, ``"80,54543-54545"``);
    an int is a single port. Raises :class:`PortSpecError` for anything
    malformed, out of range, reversed, or naming more than 1024 ports.
    """
    if isinstance(spec, int) and not isinstance(spec, bool):
        return [_port(str(spec), str(spec))]
    if not isinstance(spec, str) or not spec.strip():
        raise PortSpecError(f"empty or non-text port list {spec!r}; write e.g. 54543-54546")
    ports: list[int] = []
    seen: set[int] = set()
    for part in spec.split(","):
        if not part.strip():
            raise PortSpecError(f"empty item in port list {spec!r}")
        if "-" in part:
            first_text, _, last_text = part.partition("-")
            first, last = _port(first_text, spec), _port(last_text, spec)
            if last < first:
                raise PortSpecError(
                    f"range {part.strip()!r} in {spec!r} runs backwards; write {last}-{first}"
                )
            if last - first + 1 > MAX_PORTS:
                raise PortSpecError(
                    f"range {part.strip()!r} names {last - first + 1} ports; "
                    f"at most {MAX_PORTS} are allowed"
                )
        else:
            first = last = _port(part, spec)
        for port in range(first, last + 1):
            if port not in seen:
                seen.add(port)
                ports.append(port)
        if len(ports) > MAX_PORTS:
            raise PortSpecError(f"{spec!r} names more than {MAX_PORTS} ports")
    return ports


def expand(host: str, spec: str | int) -> list[str]:
    """``["host:port", ...]`` for every port of ``spec`` (see :func:`get_ports`)."""
    if not host or ":" in host and not host.startswith("["):
        # "host:port" here is almost always a mistake for "host PORTS".
        raise PortSpecError(f"host {host!r} must be a bare name or address; give ports separately")
    return [f"{host}:{port}" for port in get_ports(spec)]


def _split_address(text: str) -> tuple[str, str | None]:
    """``(host, port text or None)`` from ``host``, ``host:port``, ``[ipv6]:port``,
    a bare IPv6 address, each optionally after ``tcp://``. Refuses an empty host,
    an empty port (``host:``) and extra colons (``host:1:2``)."""
    rest = text.strip()
    if rest.startswith("tcp://"):
        rest = rest[len("tcp://") :]
    if rest.startswith("["):  # [ipv6]:port
        host, close, tail = rest[1:].partition("]")
        if not close or tail and not tail.startswith(":"):
            raise PortSpecError(f"bad address {text!r}; write [IPv6]:PORT, e.g. [::1]:54543")
        port_text = tail[1:] if tail else None
    elif rest.count(":") > 1:
        try:
            ipaddress.IPv6Address(rest)
        except ValueError:
            raise PortSpecError(
                f"bad address {text!r}: one ':' at most; write HOST:PORT, HOST PORTS, "
                "or [IPv6]:PORT"
            ) from None
        host, port_text = rest, None
    else:
        host, colon, port_text = rest.partition(":")
        port_text = port_text if colon else None
    if not host:
        raise PortSpecError(f"no host in address {text!r}; write HOST or HOST:PORT")
    if port_text is not None and not port_text.strip():
        raise PortSpecError(f"no port after ':' in {text!r}; write HOST:PORT or just HOST")
    return host, port_text


def parse_address(text: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` from ``"host"``, ``"host:port"`` or ``"tcp://host:port"``.

    Raises :class:`PortSpecError` for an empty host, a bad or empty port, or
    extra colons (a bare IPv6 address is a host: give ``[::1]:port`` for a port).
    """
    host, port_text = _split_address(text)
    return host, _port(port_text, text) if port_text is not None else default_port


def parse_targets(address: str, ports: str | None, default_port: int) -> list[tuple[str, int]]:
    """The ``(host, port)`` pairs named by ``ADDRESS [PORTS]``, the one address
    grammar of the ``taskit`` commands: ``HOST`` (the default port),
    ``HOST:PORT``, ``HOST:PORTS`` (``host:54543-54546``) or ``HOST PORTS``
    (``ports`` given apart). Raises :class:`PortSpecError` for anything
    malformed, or for ports given both ways.
    """
    host, port_text = _split_address(address)
    if port_text is not None and ports is not None:
        raise PortSpecError(
            f"ports given twice ({address!r} and {ports!r}); write HOST:PORT or HOST PORTS"
        )
    spec = port_text if port_text is not None else ports
    if spec is None:
        return [(host, default_port)]
    return [(host, port) for port in get_ports(spec)]
