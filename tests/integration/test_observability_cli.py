"""The optional extras and the command line: with prometheus_client and OpenTelemetry
absent (or present and unused) a call round trip imports neither; the metrics options
then say how to install them; `taskit backend --metrics-port --log-format json`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request

import pytest

from tests.integration._cli_helpers import TASKS_SOURCE, Backend, env, wait_until

BOUND = 60.0

ROUND_TRIP = """
import sys
from taskit.backend import BackEnd
from taskit.frontend import FrontEnd

with BackEnd({"add": lambda a, b: a + b}, port=0) as be:
    with FrontEnd([("127.0.0.1", be.port)], codec="msgpack") as fe:
        assert [fe.work("add", i, 1) for i in range(20)] == list(range(1, 21))
        assert fe.submit("add", 1, 1).result(10) == 2
loaded = sorted(
    m for m, mod in sys.modules.items()
    if mod is not None and m.split(".")[0] in ("prometheus_client", "opentelemetry")
)
print(loaded)
"""

# Make both packages unimportable in the child, as if not installed.
BLOCK = "import sys\nsys.modules['prometheus_client'] = sys.modules['opentelemetry'] = None\n"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=BOUND, env=env()
    )


@pytest.mark.parametrize("blocked", [True, False], ids=["absent", "installed-unused"])
def test_a_round_trip_imports_neither_extra(blocked):
    out = python((BLOCK if blocked else "") + ROUND_TRIP)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_without_the_extra_the_metrics_options_say_what_to_install():
    out = python(
        BLOCK
        + """
from taskit.backend import BackEnd
from taskit.frontend import FrontEnd
for make in (lambda: BackEnd({}, port=0, metrics_port=0),
             lambda: FrontEnd([], metrics_registry=object())):
    try:
        make()
    except ImportError as e:
        print(e)
"""
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "metrics_port needs the prometheus_client package: pip install 'taskit[metrics]'",
        "metrics_registry needs the prometheus_client package: pip install 'taskit[metrics]'",
    ]


def test_the_metrics_port_option_without_the_extra_is_one_line_and_status_2(tmp_path):
    (tmp_path / "jobs.py").write_text(TASKS_SOURCE)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK + "from taskit.cli import main\nsys.exit(main())",
            "backend",
            str(tmp_path / "jobs.py"),
            "--port",
            "0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=BOUND,
        env=env(),
    )
    assert out.returncode == 2
    assert out.stderr == (
        "taskit backend: --metrics-port needs the prometheus_client package: "
        "pip install 'taskit[metrics]'\n"
    )


def test_a_backend_command_serves_metrics_and_logs_json_lines(tmp_path):
    pytest.importorskip("prometheus_client")
    from taskit.frontend import FrontEnd

    (tmp_path / "jobs.py").write_text(TASKS_SOURCE)
    backend = Backend(
        tmp_path,
        "jobs.py",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
    )
    try:

        def records() -> list[dict]:
            return [json.loads(line) for line in backend.log().splitlines()]

        def serving():
            if backend.proc.poll() is not None:
                raise AssertionError(f"backend exited:\n{backend.log()}")
            return [r for r in records() if r["logger"] == "taskit.cli"]

        (started,) = wait_until(serving, BOUND, "backend serving")
        port = int(started["message"].rsplit(":", 1)[1])
        (metrics,) = [r for r in records() if r["message"].startswith("metrics on http://")]
        metrics_port = int(re.search(r":(\d+)/metrics", metrics["message"]).group(1))
        with FrontEnd([("127.0.0.1", port)], timeout=BOUND) as fe:
            assert fe.work("add", 2, 3) == 5
            with pytest.raises(Exception, match="no good"):
                fe.work("fail", "no good")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=BOUND) as r:
            page = r.read().decode()
        assert 'taskit_calls_answered_total{task="add"} 1.0' in page
        assert 'taskit_calls_failed_total{error="ValueError",task="fail"} 1.0' in page
    finally:
        backend.stop()

    lines = records()  # every line of stderr is one JSON object
    for r in lines:
        assert {"time", "level", "logger", "message"} <= r.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"])
    (answered,) = [r for r in lines if r.get("task") == "add"]
    assert answered["level"] == "DEBUG" and answered["logger"] == "taskit.backend"
    assert isinstance(answered["call_id"], int) and answered["duration"] >= 0
    assert re.fullmatch(r"[0-9a-f]+", answered["peer"])
    failed = [r for r in lines if r.get("task") == "fail" and r["level"] == "INFO"]
    assert len(failed) == 1 and "ValueError: no good" in failed[0]["message"]
    assert failed[0]["peer"] == answered["peer"]  # the same client, the same connection


@pytest.mark.slow
def test_supervised_backends_serve_metrics_on_consecutive_ports(tmp_path):
    pytest.importorskip("prometheus_client")
    from tests.integration._cli_helpers import free_port_range

    (tmp_path / "jobs.py").write_text(TASKS_SOURCE)
    ports, metrics = free_port_range(2), free_port_range(2)
    backend = Backend(
        tmp_path,
        "jobs.py",
        "--ports",
        f"{ports}-{ports + 1}",
        "--metrics-port",
        str(metrics),
        "--log-format",
        "json",
    )
    try:

        def scrape(port):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if backend.proc.poll() is not None:
                    raise AssertionError(f"exited:\n{backend.log()}") from None
                return None

        for i in range(2):
            page = wait_until(lambda i=i: scrape(metrics + i), BOUND, f"metrics of backend {i}")
            assert "taskit_pool_size" in page
    finally:
        backend.stop()
    for line in backend.log().splitlines():  # the supervisor's and the children's lines
        json.loads(line)
