"""doc/scaling.md's code runs as written, adapted only to free ports, loopback
addresses for its machines and a temporary folder; its command lines are ones
the taskit command accepts; its `taskit top` sample has today's columns."""

from __future__ import annotations

import re
import shlex
import time

import pytest

from taskit import cli
from tests.conftest import free_port
from tests.integration._cli_helpers import ROOT, free_port_range

SCALING = (ROOT / "doc" / "scaling.md").read_text()
TASKS = {"add": lambda a, b: a + b}


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", SCALING, re.M | re.S)


def python_block(containing: str) -> str:
    found = [b for b in blocks("python") if containing in b]
    assert len(found) == 1, f"one python block with {containing!r} in doc/scaling.md"
    return found[0]


def adapted(block: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert old in block, f"{old!r} is no longer in the doc's block; adapt this test"
        block = block.replace(old, new)
    return block


def run_block(code: str) -> dict:
    namespace: dict = {"__name__": "doc_scaling"}
    exec(compile(code, "doc/scaling.md", "exec"), namespace)
    return namespace


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_every_python_block_is_one_of_those_run_below():
    assert len(blocks("python")) == 4


def test_a_client_of_a_port_range(serve):
    base = free_port_range(4)
    for port in range(base, base + 4):
        serve(TASKS, host="127.0.0.1", port=port)
    code = adapted(python_block("range(54543, 54547)"), ("54543, 54547", f"{base}, {base + 4}"))
    fe = run_block(code)["fe"]
    try:
        assert len(fe.backends) == 4 and fe.work("add", 1, 2) == 3
    finally:
        fe.close()


def test_a_client_of_a_dns_name(serve):
    be = serve(TASKS, host="127.0.0.1")
    code = adapted(
        python_block("resolve_every=10)"),
        ("taskit.prod.svc.cluster.local:54543", f"localhost:{be.port}"),
    )
    fe = run_block(code)["fe"]  # the block's own fe.work("add", 2, 3) ran
    try:
        assert fe.resolve_every == 10 and fe.work("add", 2, 3) == 5
    finally:
        fe.close()


def test_a_client_of_a_registry(serve, tmp_path):
    port = free_port()
    for host in ("127.0.0.1", "127.0.0.2"):
        serve(TASKS, host=host, port=port)
    (tmp_path / "taskit.hosts").write_text("127.0.0.1\n127.0.0.2\n")
    code = adapted(
        python_block("resolver=registry"),
        ("/etc/taskit/", f"{tmp_path}/"),
        ("54543", str(port)),
    )
    fe = run_block(code)["fe"]
    try:
        assert sorted(fe.backends) == [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:{port}"]
        assert fe.work("add", 2, 3) == 5
    finally:
        fe.close()


def test_draining_by_hand(serve):
    port = free_port()
    for host in ("127.0.0.1", "127.0.0.2"):
        serve(TASKS, host=host, port=port)
    code = adapted(
        python_block("remove_backends"),
        ("10.0.0.5:54543", f"127.0.0.1:{port}"),
        ("10.0.0.6:54543", f"127.0.0.2:{port}"),
    )
    fe = run_block(code)["fe"]
    try:
        _wait_for(lambda: fe.backends == [f"tcp://127.0.0.1:{port}"])  # as the comment says
        assert fe.work("add", 2, 3) == 5
    finally:
        fe.close()


def test_command_lines_are_accepted_by_the_taskit_command():
    lines = [
        line.split("#")[0].strip().rstrip("&").strip()
        for block in blocks("")
        for line in block.splitlines()
        if line.startswith("taskit ")
    ]
    assert any(line.startswith("taskit top") for line in lines)
    parser = cli.build_parser()
    for line in lines:
        parser.parse_args(shlex.split(line)[1:])  # a usage error exits: the test fails


@pytest.mark.parametrize("doc", ["scaling.md", "operations.md"])
def test_the_top_sample_has_the_columns_taskit_top_shows(doc):
    text = (ROOT / "doc" / doc).read_text()
    lines = text.splitlines()
    title = next(i for i, line in enumerate(lines) if line.startswith("taskit top - "))
    header = lines[title + 2]
    assert header.split() == [h for h in cli._TOP_HEADERS if h]
