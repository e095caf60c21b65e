"""``taskit top`` against real backends on free ports: the columns of issue 14 by value
(workers from the handshake, reported load, credit, service time), and the rows of a
name that is re-resolved (joins marked +, leaves marked - and shown once)."""

from __future__ import annotations

import re
import threading
import time

import pytest

from taskit import cli
from taskit.codecs import MsgpackCodec
from taskit.frontend import FrontEnd
from tests.conftest import free_port
from tests.integration._cli_helpers import run


def _tasks(gate: threading.Event) -> dict:
    def nap(seconds):
        time.sleep(seconds)
        return "napped"

    def hold():
        gate.wait(30)
        return "held"

    return {"nap": nap, "hold": hold, "echo": lambda x: x}


def _wait_for(predicate, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _rows(screen: str) -> dict[str, list[str]]:
    """BACKEND -> the row's cells (the mark column, blank or +/-, is left out)."""
    lines = screen.splitlines()
    header = next(i for i, line in enumerate(lines) if "BACKEND" in line)
    rows = {}
    for line in lines[header + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        if cells[0] in ("+", "-"):
            cells = cells[1:] + [cells[0]]  # the mark, if any, goes last
        rows[cells[0]] = cells
    return rows


def _columns(screen: str, name: str) -> dict[str, str]:
    header = next(line for line in screen.splitlines() if "BACKEND" in line).split()
    return dict(zip(header, _rows(screen)[name], strict=False))


def test_top_shows_workers_load_credit_and_service_time_by_value(serve):
    gate = threading.Event()
    be = serve(_tasks(gate), host="127.0.0.1", workers=3)
    with FrontEnd([be.endpoint]) as fe:
        try:
            for _ in range(6):  # one at a time: no queueing, the time in the backend is service
                assert fe.call("nap", [0.02]) == "napped"
            held = [fe.submit("hold") for _ in range(5)]  # 3 running, 2 queued behind them
            _wait_for(lambda: be.task_count == 5)
            out = run(["top", f"127.0.0.1:{be.port}", "--once"])
            assert out.returncode == 0, out.stderr
            assert "1/1 backends up" in out.stdout
            row = _columns(out.stdout, f"127.0.0.1:{be.port}")
            assert row["STATE"] == "up"
            assert row["WORKERS"] == "3"  # from the handshake
            assert (row["QUEUED"], row["RUNNING"]) == ("2", "3")  # the load it reports
            # calls it holds / one client's credit: 3 workers x prefetch 8 (20 ms calls
            # are far more than the 2 ms window per worker)
            assert row["CREDIT"] == "5/24"
            service = re.fullmatch(r"(\d+\.\d)ms", row["SERVICE"])
            assert service and 20.0 <= float(service.group(1)) < 500.0, row["SERVICE"]
            assert (row["DONE"], row["FAILED"]) == ("6", "0")
            assert row["RATE/S"] == "-"  # one sample: no rate yet
            out = run(["top", f"127.0.0.1:{be.port}", "--once", "--prefetch", "2"])
            assert _columns(out.stdout, f"127.0.0.1:{be.port}")["CREDIT"] == "5/6"
        finally:
            gate.set()
        assert [f.result(30) for f in held] == ["held"] * 5


def test_top_credit_limit_covers_two_ms_of_quick_calls_per_worker(serve):
    be = serve(_tasks(threading.Event()), host="127.0.0.1", workers=2)
    with FrontEnd([be.endpoint], codec=MsgpackCodec) as fe:
        for i in range(300):  # one at a time: the time in the backend is the service time
            assert fe.call("echo", [i]) == i
    out = run(["top", f"127.0.0.1:{be.port}", "--once"])
    row = _columns(out.stdout, f"127.0.0.1:{be.port}")
    held, limit = map(int, row["CREDIT"].split("/"))
    assert held == 0 and row["DONE"] == "300"
    # microsecond calls: more than prefetch 8 per worker, at most 256 (dispatch's rule)
    assert 2 * 8 < limit <= 2 * 256, row


def test_top_marks_the_rows_that_join_and_leave_as_a_name_is_re_resolved(serve):
    port = free_port()
    gate = threading.Event()
    a = serve(_tasks(gate), host="127.0.0.1", port=port, workers=2)
    b = serve(_tasks(gate), host="127.0.0.2", port=port, workers=4)
    records = {"fleet": ["127.0.0.1"]}
    fe = FrontEnd(
        [f"fleet:{port}"], resolve_every=0.05, resolver=lambda host, p: records.get(host, [])
    )
    top = cli._Top(prefetch=8)
    try:
        screen, down = top.render(cli._top_answers(fe), fe.backends_status(), "t0")
        assert not down and "1/1 backends up" in screen and "joined" not in screen
        assert list(_rows(screen)) == [f"127.0.0.1:{port}"]
        assert _columns(screen, f"127.0.0.1:{port}")["WORKERS"] == "2"

        records["fleet"] = ["127.0.0.1", "127.0.0.2"]  # a machine joined the service
        _wait_for(lambda: b.endpoint in fe.backends)
        screen, down = top.render(cli._top_answers(fe), fe.backends_status(), "t1")
        assert not down and "2/2 backends up - 1 joined, 0 left" in screen
        rows = _rows(screen)
        assert rows[f"127.0.0.2:{port}"][-1] == "+"  # marked on the refresh it joined
        assert rows[f"127.0.0.1:{port}"][-1] != "+"
        assert _columns(screen, f"127.0.0.2:{port}")["WORKERS"] == "4"

        records["fleet"] = ["127.0.0.2"]  # and one left it
        _wait_for(lambda: a.endpoint not in fe.backends)
        screen, down = top.render(cli._top_answers(fe), fe.backends_status(), "t2")
        assert not down and "1/1 backends up - 1 joined, 1 left" in screen
        rows = _rows(screen)
        assert rows[f"127.0.0.1:{port}"][1:2] == ["left"] and rows[f"127.0.0.1:{port}"][-1] == "-"
        assert rows[f"127.0.0.2:{port}"][-1] != "+"  # joined on the previous refresh only

        screen, _ = top.render(cli._top_answers(fe), fe.backends_status(), "t3")
        assert list(_rows(screen)) == [f"127.0.0.2:{port}"]  # a row that left goes away
    finally:
        fe.close()


def test_top_shows_a_backend_stopping_gracefully_and_what_it_still_runs(serve):
    gate = threading.Event()
    be = serve(_tasks(gate), host="127.0.0.1", workers=2)
    name = f"127.0.0.1:{be.port}"
    top = cli._Top(prefetch=8)
    with FrontEnd([be.endpoint]) as fe, FrontEnd([be.endpoint]) as watcher:
        try:
            screen, _ = top.render(cli._top_answers(watcher), watcher.backends_status(), "t")
            assert _columns(screen, name)["STATE"] == "up"
            held = fe.submit("hold")
            _wait_for(lambda: be.task_count == 1)
            be.stop_server(wait=False)
            rows: list[dict[str, str]] = []

            def stopping() -> bool:
                screen, down = top.render(cli._top_answers(watcher), watcher.backends_status(), "t")
                rows.append(_columns(screen, name))
                return not down and rows[-1]["STATE"] == "stopping"

            _wait_for(stopping)
            assert (rows[-1]["RUNNING"], rows[-1]["CREDIT"]) == ("1", "1/16")
        finally:
            gate.set()
        assert held.result(30) == "held"


def test_top_follows_a_name_with_resolve_every(serve):
    be = serve(_tasks(threading.Event()), host="127.0.0.1")
    out = run(
        [
            "top",
            f"localhost:{be.port}",
            "--resolve-every",
            "0.05",
            "--iterations",
            "2",
            "--interval",
            "0.2",
        ]
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("1/1 backends up") == 2  # localhost stays one backend
    assert "joined" not in out.stdout
    assert set(_rows(out.stdout)) == {f"localhost:{be.port}"}


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_top_refuses_a_bad_resolve_every_or_prefetch_in_one_line(value):
    for option in ("--resolve-every", "--prefetch"):
        out = run(["top", "127.0.0.1:1", option, value, "--once"])
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert option in out.stderr
