"""doc/operations.md's recipes say what the code and scripts really do: the
commands it shows run as written (adapted only to a temporary home and free
ports), and the systemd recipe matches the unit file."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest

from taskit.pool import default_size
from tests.integration._cli_helpers import (
    ROOT,
    TASKS_SOURCE,
    alive,
    env,
    free_port_range,
    kill_tree,
)

OPERATIONS = (ROOT / "doc" / "operations.md").read_text()
UNIT = (ROOT / "daemonizing" / "taskit@.service").read_text()


def section(title: str) -> str:
    """The text of the doc's section ``title`` (## to ######), to the next such heading
    (a shell comment in a code block starts with one #)."""
    m = re.search(rf"^#{{2,6}} {re.escape(title)}\n(.*?)(?=^#{{2,6}} |\Z)", OPERATIONS, re.M | re.S)
    assert m, f"no section {title!r} in doc/operations.md"
    return m.group(1)


def code_block(text: str) -> str:
    m = re.search(r"^```\n(.*?)^```", text, re.M | re.S)
    assert m
    return m.group(1)


def test_systemd_recipe_creates_the_units_working_directory():
    unit_dir = re.search(r"^WorkingDirectory=(\S+)", UNIT, re.M).group(1)
    useradd = next(
        line for line in OPERATIONS.splitlines() if "useradd" in line and "--system" in line
    )
    args = shlex.split(useradd)
    assert "--create-home" in args or "-m" in args, useradd  # --system alone makes no home
    home = args[args.index("--home-dir") + 1]
    assert home == unit_dir


def test_unit_documentation_names_nothing_that_is_not_installed():
    for line in UNIT.splitlines():
        if line.startswith("Documentation="):
            assert all(u.startswith(("http://", "https://", "man:")) for u in line[14:].split())


def test_workers_default_is_what_the_doc_says():
    cpus = os.cpu_count() or 1
    assert default_size("thread") == min(32, cpus + 4)
    assert default_size("process") == cpus
    row = next(line for line in OPERATIONS.splitlines() if line.startswith("| `--workers N`"))
    assert "min(32, CPUs + 4)` threads" in row and "one process per CPU" in row


def test_port_expander_one_liner_runs_as_documented():
    line = next(line for line in OPERATIONS.splitlines() if "import port_expander" in line).strip()
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    out = subprocess.run(
        ["sh", "-c", line],
        cwd=ROOT,  # a checkout's root, where the doc's commands run
        env=dict(env(), PATH=path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[54543, 54545]"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="init.d is Linux")
def test_unprivileged_taskitd_example_runs(tmp_path):
    block = code_block(section("Without root"))
    base = free_port_range(2)
    taskit = shlex.join([sys.executable, "-m", "taskit.cli"])
    script = (
        block.replace("55001-55002", f"{base}-{base + 1}")
        .replace("55001", str(base))
        .replace("TASKIT=$HOME/venv/bin/taskit", f"TASKIT='{taskit}'")
        .replace("daemonizing/taskitd", f"sh {shlex.quote(str(ROOT / 'daemonizing' / 'taskitd'))}")
        .replace("taskit call", f"{taskit} call")
    )
    (tmp_path / "tasks.py").write_text(TASKS_SOURCE)
    home = tmp_path / "home"
    home.mkdir()
    e = dict(env(), HOME=str(home))
    e.pop("TASKITD_CONFIG", None)
    try:
        out = subprocess.run(
            ["sh", "-e", "-c", script],
            cwd=tmp_path,
            env=e,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "5" in out.stdout.split(), out.stdout
        assert "taskitd stopped" in out.stdout, out.stdout
        assert (home / "taskit" / "taskitd.log").exists()
    finally:
        pidfile = home / "taskit" / "taskitd.pid"
        if pidfile.exists():  # a failed run left it running: stop it by its pid
            pid = int(pidfile.read_text())
            if alive(pid):
                kill_tree(pid)


CTRL_C_IN_MAP = """
import signal
import threading

from taskit.backend import BackEnd
from taskit.frontend import FrontEnd

signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started in background
# Calls after the first ten wait here until Ctrl-C is handled: the map cannot end
# on its own before the signal comes, however late a busy machine delivers it.
gate = threading.Event()


def nap(x):
    if x >= 10:
        gate.wait(60)
    threading.Event().wait(0.02)
    return x


if __name__ == "__main__":
    with BackEnd({"nap": nap}, port=0, workers=2, inline=False) as b:
        with FrontEnd([("127.0.0.1", b.port)]) as fe:
            try:
                for i, _ in enumerate(fe.map("nap", range(300))):
                    if i == 3:
                        print("ready", flush=True)
            except KeyboardInterrupt:
                print("interrupted", b.task_count > 0, flush=True)
                gate.set()
            print("usable", fe.call("nap", (7,), timeout=120), flush=True)
"""


def test_ctrl_c_in_a_long_map_is_what_index_md_says(tmp_path):
    # doc/index.md: Ctrl-C ends the map at once, the FrontEnd stays usable, and the
    # calls already sent keep running on the backend.
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_IN_MAP)
    p = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env()
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(30)
    assert p.returncode == 0
    assert out.split("\n")[:2] == ["interrupted True", "usable 7"], out
