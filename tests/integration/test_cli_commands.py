"""The taskit command run as a subprocess against real backends on random ports:
backend, call, ctl, top, ports."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import zmq

from tests.integration._cli_helpers import (
    TASKIT,
    TASKS_SOURCE,
    Backend,
    alive,
    children,
    env,
    free_port_range,
    run,
    wait_until,
)

pytest.importorskip("taskit.frontend", reason="the FrontEnd has not landed yet")
pytest.importorskip("taskit.backend", reason="the BackEnd has not landed yet")


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "cli_tasks.py").write_text(TASKS_SOURCE)
    return tmp_path


@pytest.fixture
def start(workdir):
    started = []

    def start_backend(*args, count=1):
        b = Backend(workdir, *args)
        started.append(b)
        b.ports = b.wait_serving(count)
        return b

    yield start_backend
    for b in started:
        b.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One backend for the read-only commands (call, status, tasks, stats, top)."""
    workdir = tmp_path_factory.mktemp("shared")
    (workdir / "cli_tasks.py").write_text(TASKS_SOURCE)
    b = Backend(workdir, "cli_tasks", "--port", "0", "--workers", "4")
    try:
        b.port = b.wait_serving()[0]
        yield b
    finally:
        b.stop()


# --- taskit call ----------------------------------------------------------------------


def test_call_prints_the_result_with_json_parsed_arguments(shared):
    addr = f"127.0.0.1:{shared.port}"
    out = run(["call", addr, "add", "2", "3"])
    assert out.returncode == 0, out.stderr
    assert out.stdout == "5\n"
    out = run(["call", addr, "shout", "hello world"])
    assert out.stdout == "HELLO WORLD\n"
    out = run(["call", addr, "add", "[1]", "[2, 3]", "--json"])
    assert json.loads(out.stdout) == [1, 2, 3]
    out = run(["call", addr, "add", '"4"', "-k", "b=2"])  # '"4"' is a string: '4' + 2 fails
    assert out.returncode == 1 and "TypeError" in out.stderr
    out = run(["call", addr, "add", "-k", "a=x", "-k", "b=y", "--json"])
    assert json.loads(out.stdout) == "xy"


def test_call_exits_1_with_the_remote_traceback_on_error(shared):
    out = run(["call", f"127.0.0.1:{shared.port}", "fail", "boom"])
    assert out.returncode == 1
    assert out.stdout == ""
    assert "ValueError" in out.stderr and "boom" in out.stderr
    assert "Traceback" in out.stderr and "raise ValueError(message)" in out.stderr


def test_call_of_an_unknown_task_names_it(shared):
    out = run(["call", f"127.0.0.1:{shared.port}", "nope"])
    assert out.returncode == 1 and "UnknownTask" in out.stderr and "nope" in out.stderr


def test_call_to_a_backend_that_is_down_fails_in_bounded_time():
    port = free_port_range(1)
    t0 = time.monotonic()
    out = run(
        ["call", f"127.0.0.1:{port}", "add", "1", "2", "--connect-timeout", "1", "--timeout", "3"]
    )
    assert out.returncode == 1
    assert out.stderr.startswith("taskit call:")
    assert time.monotonic() - t0 < 30


# --- taskit ctl / top ---------------------------------------------------------------


def test_ctl_status_tasks_and_stats(shared):
    port = shared.port
    down = free_port_range(1)
    out = run(["ctl", "status", "127.0.0.1", f"{port},{down}", "--connect-timeout", "3"])
    assert out.stdout.splitlines() == [
        f"127.0.0.1:{port} --> up, 0 jobs running",
        f"127.0.0.1:{down} --> down",
    ]
    assert out.returncode == 1  # one is down
    out = run(["ctl", "tasks", "127.0.0.1", str(port)])
    assert out.returncode == 0
    names = out.stdout.split("-->")[1].strip().split(", ")
    assert {"add", "shout", "fail", "hold", "pid"} <= set(names)

    assert run(["call", f"127.0.0.1:{port}", "add", "1", "1"]).returncode == 0
    run(["call", f"127.0.0.1:{port}", "fail", "x"])
    out = run(["ctl", "stats", "127.0.0.1", str(port)])
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:3] == ["BACKEND", "STATE", "IN"]
    assert lines[1].split()[:2] == [f"127.0.0.1:{port}", "up"]
    task_lines = {
        line.split()[1]: line.split()
        for line in lines
        if line.startswith("127.0.0.1") and len(line.split()) == 5
    }
    assert int(task_lines["fail"][3]) >= 1  # FAILED column of the per-task table
    out = run(["ctl", "stats", "127.0.0.1", str(port), "--json"])
    stats = json.loads(out.stdout)[f"127.0.0.1:{port}"]
    assert stats["tasks"]["add"]["calls"] >= 1 and stats["failed"] >= 1


def test_ctl_status_counts_jobs_in_flight(shared):
    port = shared.port
    # `call` blocks on hold(); run it in the background and watch status count it
    holder = subprocess.Popen(
        [*TASKIT, "call", f"127.0.0.1:{port}", "hold", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
        text=True,
    )
    try:
        wait_until(
            lambda: "up, 1 job running" in run(["ctl", "status", "127.0.0.1", str(port)]).stdout,
            60,
            "one job in flight",
        )
    finally:
        assert run(["call", f"127.0.0.1:{port}", "release"]).returncode == 0
        out, _ = holder.communicate(timeout=60)
    assert out.strip() == "held"
    assert run(["ctl", "status", "127.0.0.1", str(port)]).stdout.strip().endswith("0 jobs running")


def test_top_once_and_bounded_iterations_show_the_rate(shared):
    port = shared.port
    out = run(["top", "127.0.0.1", str(port), "--once"])
    assert out.returncode == 0
    assert "1/1 backends up" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("127.")]
    header = next(line for line in out.stdout.splitlines() if "BACKEND" in line).split()
    rate = header.index("RATE/S")
    assert rows[0][1] == "up" and rows[0][rate] == "-"  # no rate from a single sample
    out = run(["top", "127.0.0.1", str(port), "--iterations", "2", "--interval", "0.2"])
    assert out.stdout.count("backends up") == 2
    rows = [line.split() for line in out.stdout.splitlines() if line.strip().startswith("127.")]
    assert re.fullmatch(r"\d+\.\d", rows[1][rate])  # a rate on the second table


def test_ports_command():
    out = run(["ports", "127.0.0.1", "54543,54545-54546"])
    assert out.stdout.split() == ["127.0.0.1:54543", "127.0.0.1:54545", "127.0.0.1:54546"]


# --- taskit backend life cycle ----------------------------------------------------


@pytest.mark.parametrize("command, outcome", [("stop", "stopped"), ("kill", "terminated")])
def test_ctl_stop_and_kill_end_the_backend(start, command, outcome):
    b = start("cli_tasks.py", "--port", "0")
    out = run(["ctl", command, "127.0.0.1", str(b.ports[0])])
    assert out.stdout.strip() == f"127.0.0.1:{b.ports[0]} --> {outcome}"
    assert b.proc.wait(30) == 0


def test_sigterm_stops_a_backend_gracefully_and_removes_its_pid_file(start, workdir):
    pid_file = workdir / "b.pid"
    b = start("cli_tasks.py", "--port", "0", "--pid-file", str(pid_file))
    assert int(pid_file.read_text()) == b.proc.pid
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0
    assert not pid_file.exists()


def test_a_port_range_runs_one_supervised_process_per_port(start):
    base = free_port_range(2)
    b = start("cli_tasks.py", "--ports", f"{base}-{base + 1}", "--workers", "2", count=2)
    assert sorted(b.ports) == [base, base + 1]
    pids = {}
    for port in (base, base + 1):
        out = run(["call", f"127.0.0.1:{port}", "pid"])
        pids[port] = int(out.stdout)
    assert len(set(pids.values())) == 2 and set(pids.values()) == set(children(b.proc.pid))

    os.kill(pids[base], signal.SIGKILL)  # a backend dies: the supervisor restarts it

    def restarted():
        out = run(["call", f"127.0.0.1:{base}", "pid", "--connect-timeout", "1", "--timeout", "5"])
        return out.returncode == 0 and int(out.stdout) != pids[base] and int(out.stdout)

    new_pid = wait_until(restarted, 60, "restart")
    assert "died (signal 9); restarting" in b.log()
    assert alive(pids[base + 1])  # the other one untouched

    # stopping every backend on purpose ends the supervisor too (exit 0)
    out = run(["ctl", "stop", "127.0.0.1", f"{base}-{base + 1}"])
    assert out.returncode == 0 and out.stdout.count("--> stopped") == 2
    assert b.proc.wait(30) == 0
    assert not alive(new_pid) and not alive(pids[base + 1])


def test_sigterm_to_the_supervisor_stops_every_backend(start):
    base = free_port_range(2)
    b = start("cli_tasks.py", "--ports", f"{base},{base + 1}", count=2)
    kids = children(b.proc.pid)
    assert len(kids) == 2
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(30) == 0
    assert not any(alive(k) for k in kids)


def refused_add(addr, *options):
    """`taskit call ADDR add 1 2 OPTIONS`, bounded for a backend that will not answer."""
    return run(
        ["call", addr, "add", "1", "2", "--connect-timeout", "1", "--timeout", "3", *options]
    )


def test_a_key_file_is_required_to_talk_to_a_keyed_backend(start, workdir):
    key = workdir / "key"
    key.write_text("correct horse battery staple\n")
    b = start("cli_tasks.py", "--port", "0", "--key-file", str(key))
    addr = f"127.0.0.1:{b.ports[0]}"
    ok = run(["call", addr, "add", "1", "2", "--key-file", str(key)])
    assert ok.returncode == 0 and ok.stdout == "3\n"
    wrong = workdir / "wrong"
    wrong.write_text("guess")
    assert refused_add(addr, "--key-file", str(wrong)).returncode == 1
    status = run(["ctl", "status", "127.0.0.1", str(b.ports[0]), "--key-file", str(key)])
    assert "up, 0 jobs running" in status.stdout


def test_keygen_writes_a_private_secret_and_a_public_key(workdir):
    out = run(["keygen", str(workdir / "backend")])
    assert out.returncode == 0, out.stderr
    secret, public = workdir / "backend.key", workdir / "backend.pub"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert public.read_text().strip() == out.stdout.strip() and len(out.stdout.strip()) == 40
    secret_line = [ln for ln in secret.read_text().splitlines() if len(ln) == 40][-1]
    assert zmq.curve_public(secret_line.encode()) == out.stdout.strip().encode()
    again = run(["keygen", str(workdir / "backend")])
    assert again.returncode == 1 and "exists" in again.stderr  # never overwritten
    assert secret.read_text().endswith(secret_line + "\n")


@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")
def test_curve_backend_admits_only_listed_clients(start, workdir):
    keys = {
        name: run(["keygen", str(workdir / name)]).stdout.strip()
        for name in ("backend", "ops", "stranger")
    }
    (workdir / "clients").write_text(f"# who may call\n{keys['ops']}\n")
    b = start(
        "cli_tasks.py",
        "--port",
        "0",
        "--curve-secret-file",
        str(workdir / "backend.key"),
        "--curve-clients-file",
        str(workdir / "clients"),
    )
    addr = f"127.0.0.1:{b.ports[0]}"
    as_ops = [
        "--curve-server-key",
        keys["backend"],
        "--curve-secret-file",
        str(workdir / "ops.key"),
    ]
    ok = run(["call", addr, "add", "1", "2", *as_ops])
    assert ok.returncode == 0 and ok.stdout == "3\n", ok.stderr
    status = run(["ctl", "status", "127.0.0.1", str(b.ports[0]), *as_ops])
    assert "up, 0 jobs running" in status.stdout
    stranger = ["--curve-secret-file", str(workdir / "stranger.key")]
    for who in (stranger, []):  # an unlisted key, a fresh key pair
        assert refused_add(addr, "--curve-server-key", keys["backend"], *who).returncode == 1
    assert refused_add(addr).returncode == 1  # no CurveZMQ at all


def test_curve_key_files_are_checked(start, workdir):
    (workdir / "bad.key").write_text("not a key\n")
    out = run(
        ["backend", "cli_tasks.py", "--port", "0", "--curve-secret-file", str(workdir / "bad.key")],
        cwd=workdir,
    )
    assert out.returncode == 1 and "line 1" in out.stderr
    out = run(
        [
            "backend",
            "cli_tasks.py",
            "--port",
            "0",
            "--curve-clients-file",
            str(workdir / "bad.key"),
        ],
        cwd=workdir,
    )
    assert out.returncode == 1 and "--curve-secret-file" in out.stderr


def test_process_pool_backend_runs_tasks_in_other_processes(start):
    b = start("cli_tasks.py", "--port", "0", "--pool", "process", "--workers", "1")
    out = run(["call", f"127.0.0.1:{b.ports[0]}", "pid"])
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) != b.proc.pid


def test_backend_exits_1_when_the_port_is_taken(start):
    b = start("cli_tasks.py", "--port", "0")
    again = run(["backend", "cli_tasks.py", "--port", str(b.ports[0])], cwd=b.log_path.parent)
    assert again.returncode == 1
    assert "cannot bind" in again.stderr
    assert "--port 0" in again.stderr and "port=0" not in again.stderr  # the CLI's words


def test_a_non_local_host_gets_the_address_hint_not_the_port_in_use_one(workdir):
    # 192.0.2.1 (TEST-NET-1, RFC 5737) is never an address of this machine: EADDRNOTAVAIL
    out = run(
        ["backend", "cli_tasks.py", "--host", "192.0.2.1", "--port", "0", "--log-level", "ERROR"],
        cwd=workdir,
    )
    assert out.returncode == 1
    assert "not one of this machine's" in out.stderr
    assert "another server" not in out.stderr


def test_backend_and_cli_start_lines_count_the_same_tasks(start):
    b = start("cli_tasks.py", "--port", "0")
    ours = re.search(r"taskit\.cli\[\d+\]: serving (\d+) tasks", b.log())
    library = re.search(r"taskit\.backend\[\d+\]: backend serving (\d+) tasks", b.log())
    assert ours and library and ours.group(1) == library.group(1) == "6"


def test_a_port_range_with_a_taken_port_fails_after_a_few_tries(start, workdir):
    """Used to retry the taken port forever (backoff to 30 s) and never exit."""
    other = start("cli_tasks.py", "--port", "0")
    taken = other.ports[0]
    free = free_port_range(1)
    t0 = time.monotonic()
    out = run(["backend", "cli_tasks.py", "--ports", f"{free},{taken}"], cwd=workdir, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"127.0.0.1:{taken} cannot start" in out.stderr
    assert out.stderr.count(f"cannot bind tcp://127.0.0.1:{taken}") == 5
    assert time.monotonic() - t0 < 60
    assert other.proc.poll() is None  # the other service is untouched
    assert run(["call", f"127.0.0.1:{taken}", "add", "1", "2"]).stdout == "3\n"


def test_stats_names_the_process_and_ctl_owner_leaves_other_backends_alone(start):
    b = start("cli_tasks.py", "--port", "0")
    port = b.ports[0]
    stats = json.loads(run(["ctl", "stats", f"127.0.0.1:{port}", "--json"]).stdout)
    assert stats[f"127.0.0.1:{port}"]["pid"] == b.proc.pid
    assert stats[f"127.0.0.1:{port}"]["ppid"] == os.getpid()
    mine = run(["ctl", "status", f"127.0.0.1:{port}", "--owner", str(b.proc.pid)])
    assert mine.returncode == 0 and mine.stdout.strip().endswith("up, 0 jobs running")
    for command in ("stop", "kill", "status"):
        other = run(["ctl", command, "127.0.0.1", str(port), "--owner", str(os.getpid() + 1)])
        assert other.returncode == 1
        assert other.stdout.strip() == (
            f"127.0.0.1:{port} --> served by another process (pid {b.proc.pid}); left alone"
        )
    assert run(["call", f"127.0.0.1:{port}", "add", "1", "2"]).stdout == "3\n"  # still serving
    assert b.proc.poll() is None
    # its supervisor's pid counts as the owner too (the backend's ppid): here, us
    assert run(["ctl", "stop", f"127.0.0.1:{port}", "--owner", str(os.getpid())]).returncode == 0
    assert b.proc.wait(60) == 0


# --- one address grammar, the words of the command line ------------------------------


def test_call_ctl_and_top_take_host_port_and_host_ports(shared):
    port = shared.port
    assert run(["call", "127.0.0.1", str(port), "add", "1", "2"]).stdout == "3\n"
    assert run(["call", f"127.0.0.1:{port}", "add", "1", "2"]).stdout == "3\n"
    for address in ([f"127.0.0.1:{port}"], ["127.0.0.1", str(port)]):
        status = run(["ctl", "status", *address])
        assert status.stdout.strip() == f"127.0.0.1:{port} --> up, 0 jobs running", status
        top = run(["top", *address, "--once"])
        assert top.returncode == 0 and "1/1 backends up" in top.stdout


def test_top_once_exits_1_when_a_backend_is_down_like_ctl():
    port = free_port_range(1)
    out = run(["top", f"127.0.0.1:{port}", "--once", "--connect-timeout", "0.5"])
    assert out.returncode == 1 and "0/1 backends up" in out.stdout


def test_an_argument_that_looks_like_json_but_is_not_gets_a_warning_or_raw(shared):
    addr = f"127.0.0.1:{shared.port}"
    out = run(["call", addr, "shout", "[1,2"])
    assert out.returncode == 0 and out.stdout == "[1,2\n"
    assert "looks like JSON but does not parse" in out.stderr and "--raw" in out.stderr
    out = run(["call", addr, "shout", '{"a": 1}', "--raw"])
    assert out.returncode == 0 and out.stdout == '{"A": 1}\n' and out.stderr == ""


def test_library_hints_come_in_the_words_of_the_command_line(start):
    addr = f"127.0.0.1:{start('cli_tasks.py', '--port', '0').ports[0]}"
    late = run(["call", addr, "hold", "30", "--timeout", "0.2"])
    assert run(["call", addr, "release"]).returncode == 0
    assert late.returncode == 1
    assert "--timeout" in late.stderr and "timeout=" not in late.stderr
    big = run(["call", addr, "shout", "x" * 200, "--max-message-size", "100"])
    assert big.returncode == 1
    assert "--max-message-size (100 bytes)" in big.stderr, big.stderr
    assert "max_message_size" not in big.stderr


def test_keygen_creates_a_missing_folder_private(workdir):
    name = workdir / "ops-keys" / "sub" / "ops"
    out = run(["keygen", str(name)])
    assert out.returncode == 0, out.stderr
    for folder in (name.parent.parent, name.parent):
        assert folder.stat().st_mode & 0o777 == 0o700
    assert name.with_suffix(".key").stat().st_mode & 0o777 == 0o600
    assert name.with_suffix(".pub").read_text().strip() == out.stdout.strip()


# --- bad input: one line, never a traceback -------------------------------------------


def _write_pipe_closed(args, cwd=None):
    """Run ``taskit ARGS`` with a stdout whose reader has already left (`| head`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run(
            [*TASKIT, *args], stdout=w, stderr=subprocess.PIPE, text=True, timeout=60, env=env()
        )
    finally:
        os.close(w)


def test_output_to_a_closed_pipe_ends_quietly(shared):
    addr = f"127.0.0.1:{shared.port}"
    for args in (
        ["ports", "127.0.0.1", "1-1000"],
        ["call", addr, "add", "1", "2"],
        ["top", addr, "--once"],
    ):
        out = _write_pipe_closed(args)
        assert out.stderr == "", (args, out.stderr)
        assert out.returncode == 1, args


def test_a_broken_tasks_file_is_one_line_then_only_its_own_frames(workdir):
    (workdir / "syntax_tasks.py").write_text("def ok():\n    return 1\n\ndef f(:\n    pass\n")
    out = run(["backend", "syntax_tasks.py", "--port", "0"], cwd=workdir)
    assert out.returncode == 1
    first = out.stderr.splitlines()[0]
    assert first == f"taskit backend: {workdir / 'syntax_tasks.py'}:4: SyntaxError: invalid syntax"
    assert "Traceback" not in out.stderr and "importlib" not in out.stderr

    (workdir / "helper_mod.py").write_text("def boom():\n    return 1 / 0\n\nVALUE = boom()\n")
    (workdir / "import_tasks.py").write_text("import helper_mod\n\ndef ok():\n    return 1\n")
    out = run(["backend", "import_tasks.py", "--port", "0"], cwd=workdir)
    assert out.returncode == 1
    lines = out.stderr.splitlines()
    assert lines[0] == (
        f"taskit backend: {workdir / 'helper_mod.py'}:2: ZeroDivisionError: division by zero"
    )
    assert "Traceback" not in out.stderr
    frames = [line for line in lines if line.lstrip().startswith("File ")]
    assert [f.split('"')[1] for f in frames] == [
        str(workdir / "import_tasks.py"),
        str(workdir / "helper_mod.py"),
        str(workdir / "helper_mod.py"),
    ]


def _bad_inputs(workdir):
    """(argv, what stderr's one line must contain) for every subcommand."""
    (workdir / "secret.pub").write_text("x" * 40 + "\n")
    (workdir / "ops.key").write_text("# CurveZMQ secret key: keep it private\n" + "x" * 40 + "\n")
    (workdir / "taken.key").write_text("")
    (workdir / "taken.pub").write_text("")
    good = ["cli_tasks.py"]
    return [
        ([], "required: COMMAND"),
        (["dance"], "invalid choice"),
        ([*("backend", *good), "--port", "99999"], "not a port 0-65535"),
        ([*("backend", *good), "--port", "-1"], "not a port"),
        ([*("backend", *good), "--ports", "5-1"], "runs backwards"),
        ([*("backend", *good), "--workers", "0"], "not a whole number >= 1"),
        ([*("backend", *good), "--grace", "-1"], "seconds > 0"),
        ([*("backend", *good), "--max-message-size", "1X"], "not a size"),
        ([*("backend", *good), "--key-file", "missing"], "cannot read the key file"),
        ([*("backend", *good), "--curve-secret-file", "secret.pub"], "public key file"),
        (
            [
                *("backend", *good),
                "--curve-secret-file",
                "ops.key",
                "--curve-clients-file",
                "ops.key",
            ],
            "holds a secret key",
        ),
        ([*("backend", *good), "--port", "0", "--pid-file", "no/such/p"], "--pid-file"),
        (["backend", "no_such_module_xyz"], "no module named"),
        (["backend", "cli_tasks.py:nope"], "has no attribute"),
        (["backend", "cli_tasks.py", "--codec", "nosuch"], "nosuch"),
        (["ctl", "status", "127.0.0.1:55001:1"], "one ':' at most"),
        (["ctl", "status", "127.0.0.1:"], "no port after ':'"),
        (["ctl", "status", "127.0.0.1:1", "2"], "ports given twice"),
        (["ctl", "status", "h", "1", "--connect-timeout", "-1"], "seconds > 0"),
        (["ctl", "status", "h", "1", "--owner", "0"], ">= 1"),
        (["ctl", "status", "h", "1", "--key-file", "missing"], "cannot read the key file"),
        (["ctl", "restart", "h", "1"], "invalid choice"),
        (["call", "127.0.0.1:55001:1", "add"], "one ':' at most"),
        (["call", "127.0.0.1:", "add"], "no port after ':'"),
        (["call", "h:1", "add", "--timeout", "-1"], "seconds > 0"),
        (["call", "h:1", "add", "--timeout", "nan"], "seconds > 0"),
        (["call", "h:1", "add", "--connect-timeout", "0"], "seconds > 0"),
        (["call", "h:1", "add", "-k", "novalue"], "NAME=VALUE"),
        (["call", "h", "1"], "no TASK after the ports"),
        (["call", "h:1", "add", "--max-message-size", "-5"], "not a size"),
        (["call", "h:1", "add", "--codec", "nosuch"], "nosuch"),
        (["call", "h:1", "add", "--curve-secret-file", "ops.key"], "--curve-server-key"),
        (["ports", "h", "5-1"], "runs backwards"),
        (["ports", "h:1", "2"], "give ports separately"),
        (["ports", "h", "x"], "not a number"),
        (["keygen", ""], "names no file"),
        (["keygen", "x.key"], "without extension"),
        (["keygen", "x.pub"], "without extension"),
        (["keygen", "folder/"], "names no file"),
        (["keygen", "taken"], "exists"),
        (["top", "h", "1", "--interval", "-1"], "seconds > 0"),
        (["top", "h", "1", "--interval", "0"], "seconds > 0"),
        (["top", "h", "1", "--iterations", "-1"], ">= 0"),
        (["top", "h:1:2"], "one ':' at most"),
        (["top", "h", "1", "--once", "--iterations", "3"], "not allowed with"),
    ]


def test_every_subcommand_refuses_bad_input_in_one_line_without_a_traceback(workdir):
    cases = _bad_inputs(workdir)
    helped = run(["--help"]).stdout
    commands = re.findall(r"^    ([a-z]+) ", helped, re.MULTILINE)
    assert len(commands) >= 6 and set(commands) <= {argv[0] for argv, _ in cases if argv}
    for argv, expected in cases:
        out = run(argv, cwd=workdir)
        assert out.returncode != 0, argv
        assert "Traceback" not in out.stderr, (argv, out.stderr)
        lines = out.stderr.splitlines()
        assert len(lines) == 1, (argv, out.stderr)
        assert lines[0].startswith("taskit") and expected in lines[0], (argv, lines[0])
