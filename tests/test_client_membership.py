"""Backend specs to endpoints, with an injectable resolver (and the real one for
localhost): names that stand for several addresses, re-resolution, removal."""

from __future__ import annotations

from taskit._client.membership import Membership, system_resolver


class FakeDNS:
    def __init__(self, **records):
        self.records = {k.replace("_", "-"): list(v) for k, v in records.items()}

    def __call__(self, host, port):
        return self.records.get(host, [])


def test_a_name_with_several_addresses_is_that_many_backends():
    dns = FakeDNS(fleet=["10.0.0.1", "10.0.0.2"])
    m = Membership(dns)
    assert m.add("tcp://fleet:5000") == ["tcp://10.0.0.1:5000", "tcp://10.0.0.2:5000"]
    assert m.add("tcp://fleet:5000") == []  # known already


def test_literal_addresses_ipc_and_names_that_do_not_resolve_stay_as_given():
    m = Membership(FakeDNS(one=["10.0.0.9"]))
    assert m.add("tcp://127.0.0.1:1") == ["tcp://127.0.0.1:1"]
    assert m.add("ipc:///tmp/x") == ["ipc:///tmp/x"]
    assert m.add("tcp://nowhere:3") == ["tcp://nowhere:3"]  # ZeroMQ keeps trying it
    # a resolver of the user's knows names ZeroMQ does not: its address is used
    assert m.add("tcp://one:2") == ["tcp://10.0.0.9:2"]
    assert not Membership().dynamic


def test_with_the_system_resolver_a_name_of_one_address_stays_a_name():
    m = Membership()
    assert m.add("tcp://localhost:5") == ["tcp://localhost:5"]
    assert m.refresh() == ([], [])


def test_refresh_reports_joins_and_leaves():
    dns = FakeDNS(fleet=["10.0.0.1", "10.0.0.2"])
    m = Membership(dns)
    m.add("tcp://fleet:5000")
    assert m.dynamic
    dns.records["fleet"] = ["10.0.0.2", "10.0.0.3"]
    assert m.refresh() == (["tcp://10.0.0.3:5000"], ["tcp://10.0.0.1:5000"])
    dns.records["fleet"] = ["10.0.0.3"]  # shrinks to one: stays an address, no churn
    assert m.refresh() == ([], ["tcp://10.0.0.2:5000"])
    dns.records["fleet"] = []  # a DNS failure keeps the fleet as it was
    assert m.refresh() == ([], [])
    assert m.endpoints() == ["tcp://10.0.0.3:5000"]


def test_a_name_that_grows_from_one_address_to_several_expands():
    dns = FakeDNS(svc=["10.0.0.1"])
    m = Membership(dns)
    assert m.add("tcp://svc:7") == ["tcp://10.0.0.1:7"]
    dns.records["svc"] = ["10.0.0.1", "10.0.0.2"]
    assert m.refresh() == (["tcp://10.0.0.2:7"], [])


def test_remove_takes_a_spec_or_one_of_its_addresses():
    m = Membership(FakeDNS(fleet=["10.0.0.1", "10.0.0.2"]))
    m.add("tcp://fleet:5000")
    m.add("tcp://127.0.0.1:9")
    assert m.remove("tcp://10.0.0.1:5000") == ["tcp://10.0.0.1:5000"]
    assert m.remove("tcp://fleet:5000") == ["tcp://10.0.0.2:5000"]
    assert m.remove("tcp://fleet:5000") == []
    assert m.endpoints() == ["tcp://127.0.0.1:9"]


def test_a_failing_resolver_is_a_name_that_does_not_resolve():
    def broken(host, port):
        raise OSError("resolver down")

    assert Membership(broken).add("tcp://x:1") == ["tcp://x:1"]


def test_the_system_resolver_resolves_localhost_to_ipv4_loopback():
    assert system_resolver("localhost", 1) == ["127.0.0.1"]
