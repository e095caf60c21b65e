"""taskit.ports: the port expander shared by the CLI, taskitctl and taskitd."""

from __future__ import annotations

import pytest

from taskit.errors import PortSpecError, TaskItError
from taskit.ports import MAX_PORTS, expand, get_ports, parse_address, parse_targets


@pytest.mark.parametrize(
    "spec, ports",
    [
        ("54543", [54543]),
        ("54543,54545", [54543, 54545]),
        ("54543-54546", [54543, 54544, 54545, 54546]),
        (" 80 , 54543-54544 ", [80, 54543, 54544]),
        ("7-7", [7]),
        ("5,3-5,3", [5, 3, 4]),  # order kept, duplicates dropped
        (54543, [54543]),
    ],
)
def test_get_ports_expands_lists_and_inclusive_ranges(spec, ports):
    assert get_ports(spec) == ports


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "empty"),
        ("abc", "not a number"),
        ("54543,", "empty item"),
        ("0", "out of range"),
        ("65536", "out of range"),
        ("54546-54543", "backwards"),
        ("1-5000", "at most"),
        ("1-1000,2000-2100", "more than"),
        ("1-2-3", "not a number"),
    ],
)
def test_get_ports_rejects_bad_specs_with_a_named_error(spec, words):
    with pytest.raises(PortSpecError, match=words) as info:
        get_ports(spec)
    assert isinstance(info.value, TaskItError) and isinstance(info.value, ValueError)


def test_max_ports_is_allowed_exactly():
    assert len(get_ports(f"1-{MAX_PORTS}")) == MAX_PORTS


def test_expand_prints_host_port_pairs():
    assert expand("10.0.0.1", "54543-54544") == ["10.0.0.1:54543", "10.0.0.1:54544"]


def test_expand_refuses_a_host_with_a_port():
    with pytest.raises(PortSpecError, match="give ports separately"):
        expand("localhost:54543", "54543")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("example.org", ("example.org", 54543)),
        ("example.org:8000", ("example.org", 8000)),
        ("tcp://127.0.0.1:9", ("127.0.0.1", 9)),
        ("[::1]:7000", ("::1", 7000)),
        ("[::1]", ("::1", 54543)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text, 54543) == expected


@pytest.mark.parametrize(
    "text", ["", ":80", "host:x", "host:70000", "127.0.0.1:55001:1", "127.0.0.1:", "[::1", "[::1]x"]
)
def test_parse_address_rejects_garbage(text):
    with pytest.raises(PortSpecError):
        parse_address(text, 54543)


@pytest.mark.parametrize(
    "address, ports, expected",
    [
        ("h", None, [("h", 54543)]),
        ("h:9", None, [("h", 9)]),
        ("h", "9", [("h", 9)]),
        ("h", "9-10", [("h", 9), ("h", 10)]),
        ("h:9,11", None, [("h", 9), ("h", 11)]),
        ("tcp://h:9", None, [("h", 9)]),
        ("[::1]:9", None, [("::1", 9)]),
        ("::1", "9", [("::1", 9)]),
    ],
)
def test_parse_targets_is_one_grammar_for_host_port_and_host_ports(address, ports, expected):
    assert parse_targets(address, ports, 54543) == expected


@pytest.mark.parametrize(
    "address, ports, match",
    [
        ("127.0.0.1:55001:1", None, "one ':' at most"),
        ("127.0.0.1:", None, "no port after ':'"),
        ("h:9", "10", "ports given twice"),
        ("h", "x", "not a number"),
    ],
)
def test_parse_targets_refuses_malformed_addresses(address, ports, match):
    with pytest.raises(PortSpecError, match=match):
        parse_targets(address, ports, 54543)
