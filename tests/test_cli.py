"""taskit.cli without sockets: task loading, argument parsing, output formatting."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import zmq

from taskit import cli
from taskit.errors import KeyFileError, TaskLoadError
from taskit.loader import describe_load_error


@pytest.fixture
def modfile(tmp_path, monkeypatch):
    """Write a module into tmp_path (on sys.path) and return its path; cleans sys.modules."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name, source):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        written.append(name)
        return path

    yield write
    for name in written:
        sys.modules.pop(name, None)


def test_public_functions_are_served_when_there_is_no_tasks_dict(modfile):
    modfile(
        "clitasks_a",
        """
        import os
        from os.path import join
        def add(a, b): return a + b
        def _private(): pass
        class NotAFunction: pass
        VALUE = 3
        """,
    )
    tasks = cli.load_tasks("clitasks_a")
    assert sorted(tasks) == ["add"]  # imported functions, privates, classes left out
    assert tasks["add"](2, 3) == 5


def test_a_tasks_dict_wins_and_may_hold_pass_backend_pairs(modfile):
    modfile(
        "clitasks_b",
        """
        def add(a, b): return a + b
        def sub(backend, f): return f()
        tasks = {"plus": add, "sub": (sub, True)}
        """,
    )
    tasks = cli.load_tasks("clitasks_b")
    assert sorted(tasks) == ["plus", "sub"]
    assert tasks["sub"][1] is True


def test_module_attr_serves_a_dict_or_one_callable(modfile):
    modfile(
        "clitasks_c",
        """
        def add(a, b): return a + b
        def mul(a, b): return a * b
        MATH = {"add": add}
        NUMBER = 4
        """,
    )
    assert list(cli.load_tasks("clitasks_c:MATH")) == ["add"]
    assert list(cli.load_tasks("clitasks_c:mul")) == ["mul"]
    with pytest.raises(TaskLoadError, match="must be a dict of tasks or a callable"):
        cli.load_tasks("clitasks_c:NUMBER")
    with pytest.raises(TaskLoadError, match="no attribute 'nope'"):
        cli.load_tasks("clitasks_c:nope")


def test_a_file_path_is_loaded_and_importable_by_its_name(tmp_path):
    path = tmp_path / "clitasks_file.py"
    path.write_text("def echo(x):\n    return x\n")
    try:
        tasks = cli.load_tasks(str(path))
        assert tasks["echo"]("hi") == "hi"
        # process-pool workers find the functions by module name
        assert sys.modules["clitasks_file"].echo is tasks["echo"]
    finally:
        sys.modules.pop("clitasks_file", None)
        sys.path.remove(str(tmp_path))


def test_bad_targets_raise_task_load_error_naming_the_fix(tmp_path, modfile):
    with pytest.raises(TaskLoadError, match="no module named 'no_such_module_xyz'"):
        cli.load_tasks("no_such_module_xyz")
    with pytest.raises(TaskLoadError, match="no such file"):
        cli.load_tasks(str(tmp_path / "missing.py"))
    with pytest.raises(TaskLoadError, match="names no module"):
        cli.load_tasks(":attr")
    modfile("clitasks_empty", "X = 1\n")
    with pytest.raises(TaskLoadError, match="no tasks"):
        cli.load_tasks("clitasks_empty")
    modfile("clitasks_bad", "tasks = {'x': 3}\n")
    with pytest.raises(TaskLoadError, match="not a callable"):
        cli.load_tasks("clitasks_bad")


def test_a_missing_dependency_of_the_module_keeps_its_own_error(modfile):
    modfile("clitasks_dep", "import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError) as info:
        cli.load_tasks("clitasks_dep")
    assert not isinstance(info.value, TaskLoadError)
    assert info.value.name == "no_such_dependency_xyz"


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("2.5", 2.5),
        ("true", True),
        ("null", None),
        ("[1, 2]", [1, 2]),
        ('{"a": 1}', {"a": 1}),
        ('"3"', "3"),
        ("hello", "hello"),
        ("hello world", "hello world"),
        ("", ""),
    ],
)
def test_call_arguments_are_json_where_they_parse(text, value):
    assert cli.parse_value(text) == value


@pytest.mark.parametrize("command", [[], ["backend"], ["ctl"], ["call"], ["ports"], ["top"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: taskit")


def test_usage_errors_exit_2_with_a_message(capsys):
    for argv in (
        ["ports", "h", "9-1"],
        ["ctl", "restart", "h", "1"],
        ["backend", "m", "--port", "1", "--ports", "1-2"],
        ["top", "h", "1", "--once", "--iterations", "3"],
        ["backend", "m", "--workers", "0"],
        [],
    ):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2, argv
    assert "runs backwards" in capsys.readouterr().err


def test_ports_command_prints_host_port_lines(capsys):
    assert cli.main(["ports", "10.0.0.1", "54543,54545-54546"]) == 0
    assert capsys.readouterr().out.split() == ["10.0.0.1:54543", "10.0.0.1:54545", "10.0.0.1:54546"]


def test_backend_with_a_bad_target_exits_1_with_the_reason(capsys):
    assert cli.main(["backend", "no_such_module_xyz", "--port", "1"]) == 1
    assert "no module named 'no_such_module_xyz'" in capsys.readouterr().err


def test_key_file_must_exist_and_not_be_empty(tmp_path):
    with pytest.raises(KeyFileError, match="cannot read the key file"):
        cli._read_key(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(KeyFileError, match="is empty"):
        cli._read_key(str(empty))
    good = tmp_path / "key"
    good.write_text("s3cret\n")
    assert cli._read_key(str(good)) == b"s3cret"


def test_stats_table_shows_down_backends_and_per_task_latency():
    answers = [
        (
            "h:1",
            {
                "uptime": 3725.2,
                "in_flight": 2,
                "done": 10,
                "failed": 1,
                "pool_size": 4,
                "queue_depth": 0,
                "tasks": {"add": {"calls": 11, "failed": 1, "mean_latency": 0.0015}},
            },
        ),
        ("h:2", RuntimeError("down")),
    ]
    table = cli._table([h for h, _ in cli._STAT_COLUMNS], cli._stats_rows(answers))
    lines = table.splitlines()
    assert lines[0].split()[:2] == ["BACKEND", "STATE"]
    assert lines[1].split() == ["h:1", "up", "2", "10", "1", "4", "0", "1:02:05"]
    assert lines[2].split()[:2] == ["h:2", "down"]
    assert cli._task_rows(answers) == [["h:1", "add", 11, 1, "1.50"]]


def _top_row(screen: str, name: str) -> dict[str, str]:
    lines = screen.splitlines()
    header = next(line for line in lines if "BACKEND" in line).split()
    cells = next(line.split() for line in lines if name in line.split())
    mark = cells.pop(0) if cells[0] in ("+", "-") else ""
    return dict(zip(header, cells, strict=True), mark=mark)


def _stats(uptime: float, calls: int, mean: float, **kw: object) -> dict:
    tasks = {"t": {"calls": calls, "failed": 0, "mean_latency": mean}}
    return {"uptime": uptime, "done": calls, "failed": 0, "in_flight": 0, "tasks": tasks, **kw}


def test_top_computes_rate_and_service_time_between_two_refreshes():
    top = cli._Top(prefetch=8)
    status = {"tcp://h:1": {"state": "up", "capacity": {"workers": 4}, "queued": 7, "running": 4}}
    # first screen: since the backend started: 100 calls of 10 ms each, one at a time
    screen, down = top.render([("tcp://h:1", _stats(10.0, 100, 0.010))], status, "t")
    row = _top_row(screen, "h:1")
    assert not down and "1/1 backends up" in screen
    assert (row["WORKERS"], row["QUEUED"], row["RUNNING"]) == ("4", "7", "4")
    assert row["SERVICE"] == "10.0ms" and row["RATE/S"] == "-" and row["CREDIT"] == "0/32"
    # 2 s later, 800 more calls, queued (40 ms each in the backend): the 4 workers were
    # busy all along, so one call kept one busy 4 x 2 s / 800 = 10 ms, not 40
    calls, seconds = 900, 100 * 0.010 + 800 * 0.040
    screen, _ = top.render([("tcp://h:1", _stats(12.0, calls, seconds / calls))], status, "t")
    row = _top_row(screen, "h:1")
    assert row["RATE/S"] == "400.0" and row["SERVICE"] == "10.0ms"
    # quick calls: the credit covers ~2 ms of work per worker (0.1 ms: 20 per worker)
    calls, seconds = 20900, seconds + 20000 * 0.0001
    stats = _stats(14.0, calls, seconds / calls, in_flight=9)
    screen, _ = top.render([("tcp://h:1", stats)], status, "t")
    row = _top_row(screen, "h:1")
    assert row["SERVICE"] == "100us" and row["CREDIT"] == "9/80"


def test_top_marks_joins_and_leaves_and_starts_again_for_a_restarted_backend():
    top = cli._Top(prefetch=8)
    up = {"state": "up", "capacity": {"workers": 2}}
    a, b = ("tcp://10.0.0.1:5", _stats(5.0, 10, 0.001)), ("tcp://10.0.0.2:5", _stats(5.0, 1, 0.001))
    screen, _ = top.render([a], {a[0]: up}, "t")
    assert _top_row(screen, "10.0.0.1:5")["mark"] == ""
    screen, _ = top.render([a, b], {a[0]: up, b[0]: up}, "t")
    assert _top_row(screen, "10.0.0.2:5")["mark"] == "+" and "1 joined, 0 left" in screen
    restarted = ("tcp://10.0.0.2:5", _stats(0.5, 1, 0.002))  # uptime went back: no rate
    screen, down = top.render([restarted], {b[0]: up}, "t")
    assert _top_row(screen, "10.0.0.1:5")["STATE"] == "left"
    assert _top_row(screen, "10.0.0.1:5")["mark"] == "-"
    assert _top_row(screen, "10.0.0.2:5")["RATE/S"] == "-" and not down
    assert "1/1 backends up - 1 joined, 1 left" in screen
    screen, down = top.render([(b[0], TimeoutError())], {b[0]: {"state": "down"}}, "t")
    assert _top_row(screen, "10.0.0.2:5")["STATE"] == "down" and down
    assert "10.0.0.1:5" not in screen  # a row that left is shown once


def test_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "taskit.cli", "ports", "h", "1-2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout.split() == ["h:1", "h:2"]


def test_call_has_a_default_timeout():
    # A shell user is never left waiting without a word (issue 16): a call that gets no
    # answer ends after --timeout, 60 s unless told otherwise.
    args = cli.build_parser().parse_args(["call", "127.0.0.1", "add"])
    assert args.timeout == cli.CALL_TIMEOUT == 60.0
    assert cli.build_parser().parse_args(["call", "h", "t", "--timeout", "2"]).timeout == 2.0


@pytest.mark.parametrize(
    "library, cli_words",
    [
        (
            "cannot bind tcp://*:1: in use; Choose another port, or port=0 for any free port",
            "cannot bind tcp://*:1: in use; Choose another port, or --port 0 for any free port",
        ),
        ("Pass a larger timeout= if it is slow.", "Pass a larger --timeout if it is slow."),
        (
            "pass key=... (the same on every FrontEnd)",
            "pass --key-file (the same on every FrontEnd)",
        ),
        ("over max_message_size (100 bytes)", "over --max-message-size (100 bytes)"),
        (
            "curve_serverkey must be 40 Z85 characters",
            "--curve-server-key must be 40 Z85 characters",
        ),
        ("connect_timeout=3", "--connect-timeout=3"),
        ("the --timeout and heartbeat_timeout stay", "the --timeout and heartbeat_timeout stay"),
    ],
)
def test_library_words_are_translated_into_option_names(library, cli_words):
    assert cli._in_cli_words(library) == cli_words


def test_ownership_is_the_pid_or_the_parent_pid_in_stats():
    assert cli._owned({"pid": 10, "ppid": 1}, 10)
    assert cli._owned({"pid": 11, "ppid": 10}, 10)  # a supervisor's backend
    assert not cli._owned({"pid": 11, "ppid": 12}, 10)
    assert not cli._owned({}, 10)  # an old backend that does not say: not provably ours
    assert cli._is_down(cli._Stranger(11))


def test_a_load_error_names_file_and_line_and_shows_only_the_users_frames(modfile):
    modfile("clitasks_raises", "def f():\n    raise KeyError('k')\n\nf()\n")
    with pytest.raises(KeyError) as info:
        cli.load_tasks("clitasks_raises")
    text = describe_load_error(info.value)
    first, *frames = text.splitlines()
    assert first.endswith("clitasks_raises.py:2: KeyError: 'k'")
    files = [f.split('"')[1] for f in frames if f.lstrip().startswith("File ")]
    assert files and all(f.endswith("clitasks_raises.py") for f in files), text
    assert any("raise KeyError('k')" in f for f in frames)


def test_a_curve_key_that_starts_with_a_dash_is_taken_as_the_value():
    # Z85 keys may start with '-' (about 1 in 85): argparse took such a value for an
    # option ("expected one argument"), which failed taskitd's CURVE test now and then.
    while not (key := zmq.curve_keypair()[0].decode()).startswith("-"):
        pass
    argv = ["ctl", "status", "127.0.0.1:1", "--curve-server-key", key, "--connect-timeout", "1"]
    args = cli.build_parser().parse_args(cli._glue_key_values(argv))
    assert args.curve_server_key == key and args.connect_timeout == 1.0
    assert cli._glue_key_values(["call", "h", "t", "--", "--curve-server-key", "x"]) == [
        "call",
        "h",
        "t",
        "--",
        "--curve-server-key",
        "x",
    ]
