"""daemonizing/: taskitd driven for real (start -> status -> restart -> stop, kill),
and the taskitctl / port_expander.py wrappers with the original command lines."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from tests.integration._cli_helpers import (
    ROOT,
    TASKS_SOURCE,
    Backend,
    alive,
    children,
    env,
    free_port_range,
    kill_tree,
    run,
)

TASKITD = ROOT / "daemonizing" / "taskitd"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="init.d is Linux")


@pytest.fixture
def service(tmp_path):
    """A temporary taskitd setup: config file, pid file, log, two random ports."""
    (tmp_path / "svc_tasks.py").write_text(TASKS_SOURCE)
    base = free_port_range(2)
    config = tmp_path / "taskitd.conf"
    config.write_text(
        "TASKIT_MODULE=svc_tasks\n"
        f"TASKIT_PORTS={base}-{base + 1}\n"
        "TASKIT_OPTIONS='--workers 2 --grace 10'\n"
        f"TASKITD_WORKDIR={tmp_path}\n"
        f"TASKITD_PIDFILE={tmp_path / 'run' / 'taskitd.pid'}\n"
        f"TASKITD_LOG={tmp_path / 'taskitd.log'}\n"
        "START_TIMEOUT=60\n"
        "STOP_TIMEOUT=30\n"
    )
    (tmp_path / "run").mkdir()
    e = env()
    e["TASKITD_CONFIG"] = str(config)
    e["TASKIT"] = shlex.join([sys.executable, "-m", "taskit.cli"])
    svc = {
        "env": e,
        "ports": (base, base + 1),
        "pidfile": tmp_path / "run" / "taskitd.pid",
        "log": tmp_path / "taskitd.log",
        "dir": tmp_path,
    }
    yield svc
    pidfile = svc["pidfile"]
    if pidfile.exists():  # a failed test left it running: clean up by pid
        pid = int(pidfile.read_text())
        if alive(pid):
            kill_tree(pid)


def taskitd(svc, *args, timeout=120):
    return subprocess.run(
        ["sh", str(TASKITD), *args],
        env=svc["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=svc["dir"],
    )


needs_distributed = pytest.mark.skipif(
    not all((ROOT / "taskit" / m).exists() for m in ("backend.py", "frontend.py")),
    reason="BackEnd/FrontEnd not landed yet",
)


@needs_distributed
def test_taskitd_start_status_restart_stop(service):
    p1, p2 = service["ports"]
    down = taskitd(service, "status")
    assert down.returncode == 3 and "not running" in down.stdout

    started = taskitd(service, "start")
    assert started.returncode == 0, started.stdout + started.stderr + service["log"].read_text()
    pid = int(service["pidfile"].read_text())
    assert alive(pid)
    assert f"127.0.0.1:{p1} --> up, 0 jobs running" in started.stdout
    assert f"127.0.0.1:{p2} --> up, 0 jobs running" in started.stdout
    backends = children(pid)
    assert len(backends) == 2 and all(alive(b) for b in backends)

    again = taskitd(service, "start")  # idempotent
    assert again.returncode == 0 and "already running" in again.stdout
    assert int(service["pidfile"].read_text()) == pid

    status = taskitd(service, "status")
    assert status.returncode == 0
    assert f"running (pid {pid})" in status.stdout
    assert f"127.0.0.1:{p2} --> up" in status.stdout

    # the backends really serve the configured module
    called = run(["call", f"127.0.0.1:{p2}", "add", "20", "22"])
    assert called.returncode == 0 and called.stdout.strip() == "42"

    restarted = taskitd(service, "restart")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    new_pid = int(service["pidfile"].read_text())
    assert new_pid != pid and alive(new_pid) and not alive(pid)
    assert not any(alive(b) for b in backends)
    backends = children(new_pid)

    stopped = taskitd(service, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"127.0.0.1:{p1} --> stopped" in stopped.stdout
    assert "taskitd stopped" in stopped.stdout
    assert not alive(new_pid) and not any(alive(b) for b in backends)
    assert not service["pidfile"].exists()
    assert taskitd(service, "status").returncode == 3
    assert "serving" in service["log"].read_text()  # the backends' log went to TASKITD_LOG


@needs_distributed
@pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")
def test_taskitd_controls_curve_backends_with_its_ctl_options(service):
    d = service["dir"]
    keys = {n: run(["keygen", str(d / n)]).stdout.strip() for n in ("backend", "ops")}
    (d / "clients").write_text(keys["ops"] + "\n")
    config = Path(service["env"]["TASKITD_CONFIG"])
    config.write_text(
        config.read_text().replace(
            "TASKIT_OPTIONS='--workers 2 --grace 10'",
            "TASKIT_OPTIONS='--workers 2 --grace 10 --curve-secret-file backend.key "
            "--curve-clients-file clients'\n"
            f"TASKIT_CTL_OPTIONS='--curve-server-key {keys['backend']} "
            "--curve-secret-file ops.key'",
        )
    )
    p1, _ = service["ports"]
    started = taskitd(service, "start")
    assert started.returncode == 0, started.stdout + started.stderr + service["log"].read_text()
    assert f"127.0.0.1:{p1} --> up, 0 jobs running" in started.stdout
    plain = run(["call", f"127.0.0.1:{p1}", "add", "1", "2", "--connect-timeout", "1"])
    assert plain.returncode == 1  # no CurveZMQ keys: the backend is out of reach
    stopped = taskitd(service, "stop")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert f"127.0.0.1:{p1} --> stopped" in stopped.stdout


@needs_distributed
def test_taskitd_kill_and_hard_restart(service):
    p1, _ = service["ports"]
    assert taskitd(service, "start").returncode == 0
    pid = int(service["pidfile"].read_text())
    hard = taskitd(service, "hard-restart")
    assert hard.returncode == 0, hard.stdout + hard.stderr
    assert f"127.0.0.1:{p1} --> terminated" in hard.stdout
    new_pid = int(service["pidfile"].read_text())
    assert new_pid != pid and not alive(pid) and alive(new_pid)
    backends = children(new_pid)
    killed = taskitd(service, "kill")
    assert killed.returncode == 0 and "terminated" in killed.stdout
    assert not alive(new_pid) and not any(alive(b) for b in backends)
    assert taskitd(service, "status").returncode == 3


@needs_distributed
def test_taskitd_leaves_another_process_backend_alone(service):
    """A port already served by an unrelated backend: start used to say "started"
    (any backend answering <status> counted) and stop then sent it <stop>."""
    p1, p2 = service["ports"]
    other = Backend(service["dir"], "svc_tasks", "--port", str(p2))
    try:
        other.wait_serving()
        started = taskitd(service, "start")
        assert started.returncode == 1, started.stdout + started.stderr
        assert "taskitd started" not in started.stdout
        stranger = f"127.0.0.1:{p2} --> served by another process (pid {other.proc.pid})"
        assert stranger in started.stderr
        assert not service["pidfile"].exists()
        assert run(["ctl", "status", f"127.0.0.1:{p1}", "--connect-timeout", "0.5"]).returncode == 1

        stopped = taskitd(service, "stop")  # nothing of ours runs: nothing is stopped
        assert stopped.returncode == 0 and "not running" in stopped.stdout
        killed = taskitd(service, "kill")
        assert killed.returncode == 0 and "not running" in killed.stdout
        assert other.proc.poll() is None
        assert run(["call", f"127.0.0.1:{p2}", "add", "1", "2"]).stdout == "3\n"
    finally:
        other.stop()


def test_taskitd_refuses_bad_usage_and_missing_module(service, tmp_path):
    usage = taskitd(service, "dance")
    assert usage.returncode == 2 and "Usage:" in usage.stderr
    service["env"]["TASKITD_CONFIG"] = str(tmp_path / "none.conf")
    service["env"]["TASKITD_PIDFILE"] = str(service["pidfile"])
    service["env"].pop("TASKIT_MODULE", None)
    unconfigured = taskitd(service, "start")
    assert unconfigured.returncode == 6 and "set TASKIT_MODULE" in unconfigured.stderr


def test_taskitd_start_fails_fast_when_the_module_is_broken(service, tmp_path):
    (tmp_path / "svc_tasks.py").write_text("raise RuntimeError('broken on purpose')\n")
    failed = taskitd(service, "start")
    assert failed.returncode == 1
    assert "failed to start" in failed.stderr
    assert "broken on purpose" in service["log"].read_text()
    assert not service["pidfile"].exists()


@needs_distributed
def test_taskitctl_and_port_expander_keep_the_original_command_lines(tmp_path):
    daemonizing = ROOT / "daemonizing"
    out = subprocess.run(
        [sys.executable, str(daemonizing / "port_expander.py"), "10.1.2.3", "54543-54545"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert out.returncode == 0
    assert out.stdout.split() == ["10.1.2.3:54543", "10.1.2.3:54544", "10.1.2.3:54545"]
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import port_expander; print(port_expander.get_ports('54543,54545'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
        cwd=daemonizing,
    )
    assert imported.stdout.strip() == "[54543, 54545]"
    base = free_port_range(1)
    ctl = subprocess.run(
        [
            sys.executable,
            str(daemonizing / "taskitctl"),
            "status",
            "127.0.0.1",
            str(base),
            "--connect-timeout",
            "0.5",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert ctl.stdout.strip() == f"127.0.0.1:{base} --> down"
    assert ctl.returncode == 1
    usage = subprocess.run(
        [sys.executable, str(daemonizing / "taskitctl")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env(),
    )
    assert usage.returncode == 2 and "usage: taskitctl" in usage.stderr


def test_systemd_unit_verifies(tmp_path):
    """The template unit parses (systemd-analyze verify), instantiated for one port."""
    import shutil

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "taskit@54543.service"
    unit.write_text((ROOT / "daemonizing" / "taskit@.service").read_text())
    out = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # Complaints about this machine (no 'taskit' user, no /srv/taskit) are not errors
    # in the unit; anything about its own syntax is.
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if "taskit@" in line and ("Unknown" in line or "Invalid" in line or "Failed" in line)
    ]
    assert not problems, out.stdout + out.stderr
    text = unit.read_text()
    assert "--port %i" in text and "Restart=on-failure" in text and "KillSignal=SIGTERM" in text
