"""The ``taskit`` command: run backends, control them, call tasks, watch them.

::

    taskit backend MODULE[:ATTR] [--host H] [--port P | --ports 54543-54546] ...
    taskit ctl {stop|kill|status|stats|tasks} HOST[:PORT] [PORTS] [--owner PID]
    taskit call HOST[:PORT] [PORTS] TASK [ARG ...] [--json]
    taskit ports HOST PORTS
    taskit top HOST[:PORT] [PORTS] [--once | --iterations N] [--resolve-every S]
    taskit keygen NAME

Every command has ``--help``. Exit status: 0 success, 1 failure (remote
error, backend down, bad input), 2 usage error (argparse). A user error is
one line on stderr, in the words of the command line (``--port 0``, not
``port=0``), never a Python traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import pprint
import re
import signal
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from taskit._client.dispatch import DEFAULT_PREFETCH
from taskit._curve import is_z85_key
from taskit.errors import KeyFileError, PortSpecError, TaskItError
from taskit.loader import describe_load_error, load_tasks
from taskit.ports import expand, get_ports, parse_targets
from taskit.protocol import DEFAULT_PORT, KILL, STATS, STATUS, STOP, TASKS

__all__ = ["main", "build_parser", "load_tasks", "parse_value"]

log = logging.getLogger("taskit.cli")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
# `taskit call` gives up after this many seconds unless --timeout says otherwise: a
# shell user is never left waiting without a word.
CALL_TIMEOUT = 60.0


# --- shared helpers ---------------------------------------------------------------


def _read_key(path: str | None) -> bytes | None:
    """The shared HMAC key from ``path`` (surrounding whitespace removed)."""
    if path is None:
        return None
    try:
        key = Path(path).read_bytes().strip()
    except OSError as e:
        raise KeyFileError(f"cannot read the key file {path!r}: {e.strerror}") from e
    if not key:
        raise KeyFileError(f"the key file {path!r} is empty; put a long random secret in it")
    return key


_SECRET = "CurveZMQ secret key"
_SECRET_MARK = f"# {_SECRET}"  # the first line of the NAME.key files keygen writes


def _read_curve_keys(path: str | None, what: str) -> list[bytes]:
    """Z85 CurveZMQ keys (40 characters), one per line of ``path``; blank lines and
    comment lines (starting with '#' and not a key: '#' is a Z85 character) are
    skipped. Raises KeyFileError naming the file and the line."""
    if path is None:
        return []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeError) as e:
        raise KeyFileError(f"cannot read the {what} file {path!r}: {e}") from e
    if what != _SECRET and any(line.startswith(_SECRET_MARK) for line in lines):
        raise KeyFileError(
            f"{path!r} holds a secret key; list public keys here (the .pub files of "
            "'taskit keygen'), and keep secret keys private"
        )
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        # ('#' is a Z85 character: a key may start with it)
        is_key = text.isascii() and is_z85_key(text.encode())
        if not text or (text.startswith("#") and not is_key):
            continue
        if not is_key:
            raise KeyFileError(
                f"{path!r} line {number}: a {what} is 40 Z85 characters "
                "(as 'taskit keygen' writes), not this"
            )
        keys.append(text.encode("ascii"))
    if not keys:
        raise KeyFileError(f"the {what} file {path!r} holds no key")
    return keys


def _curve_secret(path: str | None) -> bytes | None:
    """The one CurveZMQ secret key in ``path`` (None without a path)."""
    if path is None:
        return None
    if path.endswith(".pub"):
        raise KeyFileError(
            f"{path!r} is a public key file; --curve-secret-file takes the secret key "
            "(NAME.key of 'taskit keygen NAME')"
        )
    keys = _read_curve_keys(path, _SECRET)
    if len(keys) != 1:
        raise KeyFileError(f"{path!r} must hold exactly one CurveZMQ secret key")
    return keys[0]


def _codec_names(text: str) -> list[str]:
    from taskit.codecs import get_codec

    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise TaskItError("--codec needs at least one codec name, e.g. json,msgpack")
    for name in names:
        get_codec(name)  # UnknownCodecError names the known ones
    return names


def _plural(count: Any, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _setup_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``: one human-readable line per record, or with ``fmt``
    ``"json"`` one JSON object per line (taskit.log.JSONFormatter)."""
    if fmt == "json":
        from taskit.log import JSONFormatter

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JSONFormatter())
        logging.basicConfig(level=level.upper(), handlers=[handler])
    else:
        logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def _frontend(addresses: Sequence[tuple[str, int]], args: argparse.Namespace) -> Any:
    from taskit.frontend import FrontEnd

    # The command reports every outcome itself; the FrontEnd's own log lines
    # ("backend ... disconnected" after a stop) would only repeat them on stderr.
    logging.getLogger("taskit").setLevel(logging.CRITICAL)

    kwargs: dict[str, Any] = {}
    if getattr(args, "codec", None):
        kwargs["codec"] = args.codec
    key = _read_key(getattr(args, "key_file", None))
    if key is not None:
        kwargs["key"] = key
    if getattr(args, "connect_timeout", None) is not None:
        kwargs["connect_timeout"] = args.connect_timeout
    if getattr(args, "max_message_size", None) is not None:
        kwargs["max_message_size"] = args.max_message_size or None
    if getattr(args, "resolve_every", None) is not None:
        kwargs["resolve_every"] = args.resolve_every
    if getattr(args, "curve_server_key", None):
        kwargs["curve_serverkey"] = args.curve_server_key
        secret = _curve_secret(args.curve_secret_file)
        if secret is not None:
            import zmq

            kwargs["curve_secretkey"] = secret
            kwargs["curve_publickey"] = zmq.curve_public(secret)
    elif getattr(args, "curve_secret_file", None):
        raise TaskItError("--curve-secret-file needs --curve-server-key (the backend's public key)")
    return FrontEnd(list(addresses), **kwargs)


def _targets(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The backends named by the ``HOST[:PORT] [PORTS]`` positionals (parse_targets)."""
    return parse_targets(args.address, args.ports, DEFAULT_PORT)


# --- taskit backend ---------------------------------------------------------------


def _cmd_backend(args: argparse.Namespace) -> int:
    if args.metrics_port is not None and not _have_prometheus():
        print(
            "taskit backend: --metrics-port needs the prometheus_client package: "
            "pip install 'taskit[metrics]'",
            file=sys.stderr,
        )
        return 2
    _setup_logging(args.log_level, args.log_format)
    ports = get_ports(args.ports) if args.ports else [args.port]
    # Load once here even when supervising: a typo fails now, not in N children.
    try:
        tasks = load_tasks(args.target)
    except TaskItError:
        raise
    except Exception as e:  # the module's own code failed: say where, in its frames only
        print(f"taskit backend: {describe_load_error(e)}", file=sys.stderr)
        return 1
    codecs = _codec_names(args.codec) if args.codec else None
    key = _read_key(args.key_file)
    curve = _backend_curve(args)
    if key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "serving on %s without --key-file: anyone who can reach these ports can call "
            "every task and stop the backend; see doc/security.md",
            args.host,
        )
    if len(ports) > 1:
        return _supervise(args, ports)
    return _serve(args, tasks, ports[0], codecs, key, curve)


def _have_prometheus() -> bool:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_curve(args: argparse.Namespace) -> dict[str, Any]:
    """BackEnd keyword arguments for --curve-secret-file / --curve-clients-file."""
    secret = _curve_secret(args.curve_secret_file)
    if secret is None:
        if args.curve_clients_file:
            raise TaskItError("--curve-clients-file needs --curve-secret-file")
        return {}
    import zmq

    curve: dict[str, Any] = {"curve_secretkey": secret, "curve_publickey": zmq.curve_public(secret)}
    if args.curve_clients_file:
        curve["curve_clients"] = _read_curve_keys(args.curve_clients_file, "CurveZMQ public key")
    return curve


def _write_pid_file(path: str | None) -> None:
    if path:
        try:
            Path(path).write_text(f"{os.getpid()}\n")
        except OSError as e:
            raise TaskItError(f"cannot write the --pid-file {path!r}: {e.strerror}") from e


def _remove_pid_file(path: str | None) -> None:
    # Only remove our own: a restarted instance may already have written its pid.
    if path:
        try:
            if Path(path).read_text().strip() == str(os.getpid()):
                os.unlink(path)
        except OSError:
            pass


def _serve(
    args: argparse.Namespace,
    tasks: dict[str, Any],
    port: int,
    codecs: list[str] | None,
    key: bytes | None,
    curve: dict[str, Any],
) -> int:
    from taskit.backend import ADMIN_TASKS, BackEnd

    served: dict[str, Any] = dict(ADMIN_TASKS)  # so `taskit ctl stop/kill` work
    served.update(tasks)
    kwargs: dict[str, Any] = {"workers": args.workers, "pool": args.pool}
    if args.max_message_size is not None:
        kwargs["max_message_size"] = args.max_message_size or None
    if codecs:
        kwargs["codecs"] = codecs
    if key is not None:
        kwargs["key"] = key
    if args.metrics_port is not None:
        kwargs["metrics_port"] = args.metrics_port
        kwargs["metrics_host"] = args.metrics_host
    backend = BackEnd(served, args.host, port, **kwargs, **curve)
    _write_pid_file(args.pid_file)  # first: a bad path fails before anything is bound
    try:
        backend.start()  # returns once bound, so the line below means "ready"
    except BaseException:
        _remove_pid_file(args.pid_file)
        raise

    def on_signal(signum: int, frame: Any) -> None:
        # The main thread only waits in join() below, so it never holds the
        # backend's lock here. First signal: graceful stop; second: end now.
        if stopping:
            backend.terminate_server()
        else:
            stopping.append(signum)
            log.info("signal %d: stopping gracefully (again to stop at once)", signum)
            backend.stop_server(wait=False)

    stopping: list[int] = []
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        log.info(
            "serving %s (%s) on %s",
            _plural(len(tasks), "task"),
            ", ".join(sorted(tasks)),
            backend.endpoint,
        )
        while not backend.join(1.0):  # a timed wait keeps signal handlers responsive
            pass
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        backend.close()
        _remove_pid_file(args.pid_file)
    return 0


def _supervise(args: argparse.Namespace, ports: list[int]) -> int:
    from taskit.supervisor import Supervisor

    base = [sys.executable, "-m", "taskit.cli", "backend", args.target, "--host", args.host]
    base += ["--pool", args.pool, "--log-level", args.log_level, "--log-format", args.log_format]
    if args.workers is not None:
        base += ["--workers", str(args.workers)]
    if args.codec:
        base += ["--codec", args.codec]
    if args.max_message_size is not None:
        base += ["--max-message-size", str(args.max_message_size)]
    for option, path in (
        ("--key-file", args.key_file),
        ("--curve-secret-file", args.curve_secret_file),
        ("--curve-clients-file", args.curve_clients_file),
    ):
        if path:
            base += [option, os.path.abspath(path)]
    env = dict(os.environ)
    # The children must import the same taskit and find the same task module we did,
    # whatever way this process found them (console script, -m, PYTHONPATH).
    taskit_root = str(Path(__file__).resolve().parent.parent)
    paths = [os.getcwd(), taskit_root, *env.get("PYTHONPATH", "").split(os.pathsep)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
    commands = {f"{args.host}:{port}": [*base, "--port", str(port)] for port in ports}
    if args.metrics_port is not None:  # one metrics port each: the next ones, or free ones
        for i, command in enumerate(commands.values()):
            metrics_port = args.metrics_port + i if args.metrics_port else 0
            command += ["--metrics-port", str(metrics_port), "--metrics-host", args.metrics_host]
    supervisor = Supervisor(commands, env=env, grace=args.grace)
    _write_pid_file(args.pid_file)
    try:
        log.info("supervising %d backends on %s ports %s", len(ports), args.host, args.ports)
        return supervisor.run()
    finally:
        _remove_pid_file(args.pid_file)


# --- taskit ctl -----------------------------------------------------------------


def _ask_all(fe: Any, targets: list[tuple[str, int]], admin: str) -> list[tuple[str, Any]]:
    """``(host:port, answer)`` per target, asked concurrently through ``fe``; the
    answer is the exception (or ``'down'``) when the backend did not answer."""
    from taskit._client.core import DOWN
    from taskit.errors import BackendLostError

    states = {ep: st["state"] for ep, st in fe.backends_status().items()}

    def ask(target: tuple[str, int]) -> Any:
        host, port = target
        if admin not in (STOP, KILL) and states.get(f"tcp://{host}:{port}") == DOWN:
            return "down"  # known down (e.g. on a previous refresh): do not wait for it
        try:
            if admin == STATUS:
                return fe.get_tasks(target)
            return fe.send_signal(target, admin)
        except BackendLostError as e:
            # A backend told to stop or die may close its connection before its
            # answer is read: it went away because it obeyed.
            return None if admin in (STOP, KILL) else e
        except (TimeoutError, TaskItError) as e:
            return e

    with ThreadPoolExecutor(min(16, len(targets)), thread_name_prefix="taskit-cli") as ex:
        answers = list(ex.map(ask, targets))
    return [(f"{h}:{p}", a) for (h, p), a in zip(targets, answers, strict=True)]


class _Stranger:
    """The answer of a backend that another process than ``--owner`` runs."""

    def __init__(self, pid: Any) -> None:
        self.pid = pid

    def __str__(self) -> str:
        return f"not ours (pid {self.pid})"


def _is_down(answer: Any) -> bool:
    """True for a backend that did not answer, or that is not ours: both fail the command."""
    return isinstance(answer, (BaseException, _Stranger)) or answer == "down"


def _owned(stats: Any, owner: int) -> bool:
    """True when the ``<stats>`` answer comes from process ``owner`` or one of its
    children (a ``taskit backend --ports`` supervisor's backends)."""
    return isinstance(stats, dict) and owner in (stats.get("pid"), stats.get("ppid"))


def _strangers(fe: Any, targets: list[tuple[str, int]], owner: int) -> dict[str, _Stranger]:
    """The targets answered by a backend that ``owner`` does not run (by ``<stats>``'
    pid and ppid); a backend that does not answer is not a stranger, just down."""
    return {
        name: _Stranger(stats.get("pid", "unknown"))
        for name, stats in _ask_all(fe, targets, STATS)
        if isinstance(stats, dict) and not _owned(stats, owner)
    }


def _fmt_duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


_STAT_COLUMNS = (
    ("BACKEND", None),
    ("STATE", None),
    ("IN FLIGHT", "in_flight"),
    ("DONE", "done"),
    ("FAILED", "failed"),
    ("POOL", "pool_size"),
    ("QUEUE", "queue_depth"),
    ("UPTIME", "uptime"),
)


def _stats_rows(answers: list[tuple[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, stats in answers:
        if _is_down(stats) or not isinstance(stats, dict):
            state = str(stats) if isinstance(stats, _Stranger) else "down"
            rows.append([name, state] + ["-"] * (len(_STAT_COLUMNS) - 2))
            continue
        row: list[Any] = [name, "up"]
        for _, key in _STAT_COLUMNS[2:]:
            value = stats.get(key, "-")
            row.append(_fmt_duration(value) if key == "uptime" else value)
        rows.append(row)
    return rows


def _task_rows(answers: list[tuple[str, Any]]) -> list[list[Any]]:
    rows = []
    for name, stats in answers:
        if not isinstance(stats, dict):
            continue
        per_task = stats.get("tasks") or {}
        for task, info in sorted(per_task.items()):
            if not isinstance(info, dict):
                info = {"calls": info}
            mean = info.get("mean_latency", info.get("mean"))
            rows.append(
                [
                    name,
                    task,
                    info.get("calls", info.get("count", "-")),
                    info.get("failed", "-"),
                    f"{mean * 1000:.2f}" if isinstance(mean, (int, float)) else "-",
                ]
            )
    return rows


def _cmd_ctl(args: argparse.Namespace) -> int:
    targets = _targets(args)
    admin = {"stop": STOP, "kill": KILL, "status": STATUS, "stats": STATS, "tasks": TASKS}[
        args.command
    ]
    with _frontend(targets, args) as fe:
        # With --owner, a backend of another process is never signalled, only reported.
        strangers = _strangers(fe, targets, args.owner) if args.owner is not None else {}
        ours = [t for t in targets if f"{t[0]}:{t[1]}" not in strangers]
        asked = dict(_ask_all(fe, ours, admin)) if ours else {}
    labels = [f"{host}:{port}" for host, port in targets]
    answers = [(n, strangers[n] if n in strangers else asked[n]) for n in labels]
    if args.command == "stats":
        if args.json:
            print(json.dumps({n: (None if _is_down(a) else a) for n, a in answers}, default=repr))
        else:
            print(_table([h for h, _ in _STAT_COLUMNS], _stats_rows(answers)))
            task_rows = _task_rows(answers)
            if task_rows:
                print()
                print(_table(["BACKEND", "TASK", "CALLS", "FAILED", "MEAN MS"], task_rows))
        return 1 if any(_is_down(a) for _, a in answers) else 0
    for name, answer in answers:
        if isinstance(answer, _Stranger):
            print(f"{name} --> served by another process (pid {answer.pid}); left alone")
        elif _is_down(answer):
            print(f"{name} --> down")
        elif args.command == "status":
            jobs = int(answer) if str(answer).isdigit() else answer
            print(f"{name} --> up, {_plural(jobs, 'job')} running")
        elif args.command == "stop":
            print(f"{name} --> stopped")
        elif args.command == "kill":
            print(f"{name} --> terminated")
        else:  # tasks: the user's, not the admin signals every backend here serves
            names = answer if isinstance(answer, (list, tuple)) else [answer]
            shown = [str(n) for n in names if not (str(n).startswith("<") and str(n).endswith(">"))]
            print(f"{name} --> {', '.join(shown)}")
    return 1 if any(_is_down(a) for _, a in answers) else 0


# --- taskit call ----------------------------------------------------------------


def parse_value(text: str) -> Any:
    """A command-line argument as JSON when it parses (``3``, ``[1,2]``,
    ``null``, ``'"3"'``), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


_PORTS_LIKE = re.compile(r"[0-9][0-9,\-]*")


def _call_value(text: str, raw: bool) -> Any:
    """An ARG of ``taskit call``: :func:`parse_value`, with a warning on stderr when
    it looks like JSON (``[``, ``{``, ``"``) but does not parse; with ``raw``, the string."""
    if raw:
        return text
    if text.lstrip()[:1] in ("[", "{", '"'):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            print(
                f"taskit call: warning: {text!r} looks like JSON but does not parse "
                f"({e.msg}, column {e.colno}); passing it as a string (--raw: every ARG "
                "as a string)",
                file=sys.stderr,
            )
            return text
    return parse_value(text)


def _cmd_call(args: argparse.Namespace) -> int:
    from taskit.errors import BackendProcessingError

    task, rest, ports = args.task, list(args.args), None
    if _PORTS_LIKE.fullmatch(task):  # HOST PORTS TASK [ARG ...]: no task is named 54543
        if not rest:
            raise TaskItError(f"no TASK after the ports {task!r}; write HOST[:PORT] TASK [ARG ...]")
        ports, task = task, rest.pop(0)
    targets = parse_targets(args.address, ports, args.default_port)
    call_args = [_call_value(a, args.raw) for a in rest]
    kwargs = {}
    for item in args.kwarg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise TaskItError(f"--kwarg {item!r} must look like NAME=VALUE")
        kwargs[name] = _call_value(value, args.raw)
    with _frontend(targets, args) as fe:
        try:
            result = fe.call(task, call_args, kwargs, timeout=args.timeout)
        except BackendProcessingError as e:
            print(str(e), file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result, default=repr))
    elif isinstance(result, str):
        print(result)
    else:
        print(pprint.pformat(result))
    return 0


# --- taskit keygen --------------------------------------------------------------


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0700 (they hold a secret
    key), saying so on stderr; nothing when it exists."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        print(f"taskit keygen: created {path} (mode 0700)", file=sys.stderr)


def _cmd_keygen(args: argparse.Namespace) -> int:
    import zmq

    if not zmq.has("curve"):
        raise TaskItError("this libzmq was built without CURVE: no CurveZMQ keys to make")
    name = args.name
    base = Path(name).name
    if not base or name.endswith(("/", os.sep)) or base in (".", ".."):
        raise TaskItError(f"NAME {name!r} names no file; write e.g. keys/backend")
    if base.endswith((".key", ".pub")):
        stem = name[: -len(".key")]
        raise TaskItError(
            f"NAME is without extension: 'taskit keygen {stem}' writes {stem}.key and {stem}.pub"
        )
    secret_path, public_path = Path(f"{name}.key"), Path(f"{name}.pub")
    for path in (secret_path, public_path):
        if path.exists():
            raise TaskItError(f"{path} exists; remove it or choose another NAME")
    _make_private_dirs(secret_path.parent)
    public, secret = zmq.curve_keypair()
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_SECRET_MARK}: keep it private\n{secret.decode()}\n")
    public_path.write_text(f"{public.decode()}\n")
    print(public.decode())
    return 0


# --- taskit ports ---------------------------------------------------------------


def _cmd_ports(args: argparse.Namespace) -> int:
    for line in expand(args.host, args.ports):
        print(line)
    return 0


# --- taskit top ------------------------------------------------------------------

_TOP_HEADERS = (
    "",
    "BACKEND",
    "STATE",
    "WORKERS",
    "QUEUED",
    "RUNNING",
    "CREDIT",
    "SERVICE",
    "RATE/S",
    "DONE",
    "FAILED",
    "UPTIME",
)


def _fmt_seconds(seconds: float | None) -> str:
    """A short duration: ``850us``, ``10.2ms``, ``1.50s``; ``-`` for None."""
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f}us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.1f}ms"
    return f"{seconds:.2f}s"


def _credit_limit(workers: int, service: float | None, prefetch: int) -> int:
    """The credit one client with ``prefetch`` gives a backend of ``workers`` whose calls
    take ``service`` seconds: the rule of taskit._client.dispatch (``prefetch`` calls per
    worker, or about WINDOW_SECONDS of work per worker when that is more)."""
    from taskit._client.dispatch import MAX_PER_WORKER, WINDOW_SECONDS

    per_worker = prefetch
    if service is not None and service > 0 and WINDOW_SECONDS / service > prefetch:
        per_worker = min(MAX_PER_WORKER, int(WINDOW_SECONDS / service))
    return max(1, workers) * per_worker


class _TopSample:
    """One backend's ``<stats>`` counters at one refresh (what the next one compares)."""

    __slots__ = ("uptime", "finished", "calls", "seconds")

    def __init__(self, stats: dict[str, Any]) -> None:
        self.uptime = float(stats.get("uptime") or 0.0)
        self.finished = int(stats.get("done") or 0) + int(stats.get("failed") or 0)
        self.calls, self.seconds = 0, 0.0
        for info in (stats.get("tasks") or {}).values():
            if isinstance(info, dict):
                calls = int(info.get("calls") or 0)
                self.calls += calls
                self.seconds += calls * float(info.get("mean_latency") or 0.0)

    def follows(self, before: _TopSample) -> bool:
        """True when ``before`` is an earlier sample of the same backend process
        (a restarted backend counts from zero again)."""
        return before.uptime < self.uptime and before.calls <= self.calls


class _Top:
    """What ``taskit top`` shows and remembers between refreshes.

    Per backend: its state as this client sees it (``up``, ``down``, ``stopping``,
    ``draining``, ...), its workers (from its handshake), the load it reported
    (queued, running), its credit (calls it holds, every client's, / what one client
    with ``prefetch`` may hold there), the time one call keeps a worker busy, the
    rate of finished calls, done, failed and uptime. Service time and rate come from
    ``<stats>`` counters between two refreshes (the first screen: since the backend
    started): the service time is the smaller of the time per call in the backend
    (queue and run) and worker-time per call (workers x interval / calls finished),
    both bounds that are tight when the backend is idle and busy respectively.

    Rows that appeared since the previous refresh (a name that now resolves to one
    more address, ``--resolve-every``) are marked ``+``; rows that are gone are
    shown once more, marked ``-`` with state ``left``.
    """

    def __init__(self, prefetch: int) -> None:
        self.prefetch = prefetch
        self.samples: dict[str, _TopSample] = {}
        self.seen: list[str] | None = None  # before the first screen: None
        self.joined = 0
        self.left = 0

    def render(
        self, answers: list[tuple[str, Any]], status: dict[str, dict[str, Any]], stamp: str
    ) -> tuple[str, bool]:
        """The screen for ``answers`` (endpoint, ``<stats>`` answer or the error) and
        the client's ``backends_status()``; and whether a backend is down."""
        current = [endpoint for endpoint, _ in answers]
        joined = set() if self.seen is None else set(current).difference(self.seen)
        gone = [] if self.seen is None else [e for e in self.seen if e not in current]
        self.joined += len(joined)
        self.left += len(gone)
        self.seen = current
        rows, up, down = [], 0, False
        for endpoint, stats in answers:
            mark = "+" if endpoint in joined else " "  # one column wide, marked or not
            row = self._row(endpoint, stats, status.get(endpoint) or {})
            up += row[1] in ("up", "stopping", "draining")
            down = down or row[1] in ("down", "rejected")
            rows.append([mark, *row])
        for endpoint in gone:
            self.samples.pop(endpoint, None)
            rows.append(["-", _top_name(endpoint), "left"] + ["-"] * (len(_TOP_HEADERS) - 3))
        head = f"taskit top - {stamp} - {up}/{len(current)} backends up"
        if self.joined or self.left:
            head += f" - {self.joined} joined, {self.left} left"
        return head + "\n\n" + _table(_TOP_HEADERS, rows), down

    def _row(self, endpoint: str, stats: Any, status: dict[str, Any]) -> list[Any]:
        name, seen_as = _top_name(endpoint), status.get("state")
        if not isinstance(stats, dict):
            self.samples.pop(endpoint, None)
            state = seen_as if seen_as in ("rejected", "draining", "stopping") else "down"
            return [name, state] + ["-"] * (len(_TOP_HEADERS) - 3)
        if stats.get("stopping"):
            state = "stopping"
        else:
            state = seen_as if seen_as in ("stopping", "draining") else "up"
        workers = (status.get("capacity") or {}).get("workers") or stats.get("pool_size")
        queued, running = status.get("queued"), status.get("running")
        if queued is None or running is None:  # no load reported yet: the pool's own
            queued, running = stats.get("queue_depth", "-"), stats.get("pool_running", "-")
        sample, before = _TopSample(stats), self.samples.get(endpoint)
        self.samples[endpoint] = sample
        since = before if before is not None and sample.follows(before) else None
        service = _service_time(sample, since, workers)
        rate = "-"
        if since is not None:
            rate = f"{(sample.finished - since.finished) / (sample.uptime - since.uptime):.1f}"
        credit = "-"
        if workers:
            limit = _credit_limit(int(workers), service, self.prefetch)
            credit = f"{stats.get('in_flight', 0)}/{limit}"
        return [
            name,
            state,
            workers or "-",
            queued,
            running,
            credit,
            _fmt_seconds(service),
            rate,
            stats.get("done", "-"),
            stats.get("failed", "-"),
            _fmt_duration(stats.get("uptime")),
        ]


def _service_time(now: _TopSample, before: _TopSample | None, workers: Any) -> float | None:
    """Seconds one call kept one worker busy between ``before`` and ``now`` (None: since
    the backend started): see :class:`_Top`. None when no call finished meanwhile."""
    calls = now.calls - (before.calls if before else 0)
    if calls <= 0:
        return None
    per_call = (now.seconds - (before.seconds if before else 0.0)) / calls
    if isinstance(workers, int) and workers > 0:
        elapsed = now.uptime - (before.uptime if before else 0.0)
        per_call = min(per_call, workers * elapsed / calls)
    return max(0.0, per_call)


def _top_name(endpoint: str) -> str:
    return endpoint[6:] if endpoint.startswith("tcp://") else endpoint


def _top_answers(fe: Any) -> list[tuple[str, Any]]:
    """``(endpoint, <stats> answer or the error)`` for every backend ``fe`` uses now,
    asked concurrently; a backend known to be down is not waited for."""
    from taskit._client.core import DOWN

    endpoints = fe.backends
    states = {ep: st["state"] for ep, st in fe.backends_status().items()}

    def ask(endpoint: str) -> Any:
        if states.get(endpoint) == DOWN:
            return "down"
        try:
            return fe.send_signal(endpoint, STATS)
        except (TimeoutError, TaskItError, ValueError) as e:  # ValueError: it just left
            return e

    if not endpoints:
        return []
    with ThreadPoolExecutor(min(16, len(endpoints)), thread_name_prefix="taskit-top") as ex:
        return list(zip(endpoints, ex.map(ask, endpoints), strict=True))


def _cmd_top(args: argparse.Namespace) -> int:
    targets = _targets(args)
    iterations = 1 if args.once else args.iterations
    clear = sys.stdout.isatty() and not args.no_clear
    top = _Top(args.prefetch)
    done = 0
    # One FrontEnd for the whole session: connections stay up between refreshes,
    # a backend seen down is shown down at once until it comes back, and with
    # --resolve-every it follows the names (joins and leaves).
    with _frontend(targets, args) as fe:
        try:
            while True:
                answers = _top_answers(fe)
                screen, down = top.render(answers, fe.backends_status(), time.strftime("%H:%M:%S"))
                if clear:
                    sys.stdout.write("\x1b[H\x1b[2J")
                print(screen, flush=True)
                done += 1
                if iterations and done >= iterations:
                    return 1 if down else 0  # as ctl
                if not clear:
                    print(flush=True)
                time.sleep(args.interval)  # display refresh period, not synchronisation
        except KeyboardInterrupt:
            return 0


# --- the parser -------------------------------------------------------------------


def _add_client_options(p: argparse.ArgumentParser, connect_timeout: float = 2.0) -> None:
    p.add_argument("--key-file", metavar="F", help="shared HMAC key (the backend's --key-file)")
    p.add_argument(
        "--curve-server-key",
        metavar="KEY",
        help="CurveZMQ: the backend's public key (Z85, its keygen .pub file's line)",
    )
    p.add_argument(
        "--curve-secret-file",
        metavar="F",
        help="CurveZMQ: this client's secret key file (default: a fresh key pair)",
    )
    p.add_argument(
        "--codec", metavar="NAME", help="codec of the requests (json or msgpack; default json)"
    )
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=connect_timeout,
        metavar="S",
        help=f"seconds to wait for a backend to be reachable (default {connect_timeout:g})",
    )
    _add_max_message_size(p)


def _add_max_message_size(p: argparse.ArgumentParser) -> None:
    from taskit.frontend import DEFAULT_MAX_MESSAGE_SIZE

    p.add_argument(
        "--max-message-size",
        type=_size,
        default=None,
        metavar="BYTES",
        help="largest message sent or accepted, e.g. 1048576 or 64M; 0 for no limit "
        f"(default {DEFAULT_MAX_MESSAGE_SIZE >> 20}M; the same on both sides)",
    )


def _seconds(text: str) -> float:
    """A duration option: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def _size(text: str) -> int:
    """A size option: bytes, or with a K, M or G suffix (powers of 1024); 0 allowed."""
    number, unit = text.strip(), 1
    if number[-1:].upper() in ("K", "M", "G"):
        unit = 1024 ** ("KMG".index(number[-1].upper()) + 1)
        number = number[:-1]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size in bytes (e.g. 1048576 or 64M)")
    return int(number) * unit


def _port_number(text: str) -> int:
    """--port: 0 (any free port) to 65535."""
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port 0-65535 (0: any free port)")
    return int(text)


def _count(text: str) -> int:
    """A whole number >= 0."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _ports_arg(text: str) -> str:
    try:
        get_ports(text)  # validate now so argparse reports it as a usage error
    except PortSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _address_arg(text: str) -> str:
    try:
        parse_targets(text, None, DEFAULT_PORT)  # validate now: a usage error, before any wait
    except PortSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


_ADDRESS_HELP = (
    f"HOST (port {DEFAULT_PORT}), HOST:PORT, HOST:PORTS, or HOST then PORTS; [IPv6]:PORT for IPv6"
)


def _add_address(p: argparse.ArgumentParser) -> None:
    """The HOST[:PORT] [PORTS] positionals of ctl and top (the grammar of parse_targets)."""
    p.add_argument("address", metavar="HOST[:PORT]", type=_address_arg, help=_ADDRESS_HELP)
    p.add_argument(
        "ports",
        metavar="PORTS",
        nargs="?",
        type=_ports_arg,
        help="54543, 54543,54545 or 54543-54546",
    )


def _add_targets(p: argparse.ArgumentParser) -> None:
    """The HOST PORTS positionals of ports (PORTS validated by _ports_arg)."""
    p.add_argument("host", metavar="HOST")
    p.add_argument("ports", metavar="PORTS", type=_ports_arg)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (status 2) pointing at --help."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``taskit`` argument parser (exposed for documentation and tests)."""
    parser = _Parser(
        prog="taskit",
        description="Run taskit backends, control them, call their tasks, watch them.",
        epilog="Run 'taskit COMMAND --help' for the options of a command.",
    )
    from taskit import __version__

    parser.add_argument("--version", action="version", version=f"taskit {__version__}")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "backend",
        help="serve the tasks of a module on one or more ports",
        description=(
            "Serve tasks over ZeroMQ. MODULE is an importable module or a path/to/file.py; "
            "the module's 'tasks' dict is served, else its public functions; MODULE:ATTR "
            "serves a dict or a single callable. With --ports naming several ports, one "
            "backend process runs per port under a supervisor that restarts any that dies; "
            "SIGTERM stops all of them gracefully. The admin signals "
            "(<stop> <kill> <status> <stats> <tasks>) are always served."
        ),
    )
    p.add_argument("target", metavar="MODULE[:ATTR]", help="module, module:attr or file.py[:attr]")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1; 0.0.0.0 for every interface)",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--port",
        type=_port_number,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 for any free port, logged at start)",
    )
    where.add_argument(
        "--ports",
        type=_ports_arg,
        metavar="PORTS",
        help="several ports: 54543,54545 or 54543-54546 (one process each)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="worker threads/processes per backend (default: CPU count + 4 threads, "
        "or CPU count processes)",
    )
    p.add_argument(
        "--pool",
        choices=("thread", "process"),
        default="thread",
        help="run tasks in threads (default) or processes (CPU-bound work)",
    )
    p.add_argument(
        "--codec", metavar="NAMES", help="codecs to accept, comma-separated (default json,msgpack)"
    )
    _add_max_message_size(p)
    p.add_argument("--key-file", metavar="F", help="shared HMAC key: every message must be signed")
    p.add_argument(
        "--curve-secret-file",
        metavar="F",
        help="CurveZMQ: encrypt every connection with this secret key (see 'taskit keygen')",
    )
    p.add_argument(
        "--curve-clients-file",
        metavar="F",
        help="CurveZMQ: admit only the client public keys in F (one per line)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default INFO)",
    )
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log lines on stderr: text (default) or json (one JSON object per line: time, "
        "level, logger, message, and task, call_id, peer, duration when known)",
    )
    p.add_argument(
        "--metrics-port",
        type=_port_number,
        metavar="N",
        help="serve Prometheus metrics on http://METRICS_HOST:N/metrics (0: a free port, "
        "logged at start; with --ports, N, N+1, ... one per backend); needs "
        "pip install 'taskit[metrics]'",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics are served on (default 127.0.0.1)",
    )
    p.add_argument("--pid-file", metavar="F", help="write the process id here while running")
    p.add_argument(
        "--grace",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="with --ports: seconds a backend gets to stop before SIGKILL",
    )
    p.set_defaults(func=_cmd_backend)

    p = sub.add_parser(
        "ctl",
        help="send stop/kill/status/stats/tasks to backends",
        description=(
            "Control backends, as the original taskitctl: 'HOST:PORT --> up, N jobs running', "
            "'--> stopped', '--> terminated' or '--> down'. Exit status 1 if any is down "
            "(or, with --owner, served by another process)."
        ),
    )
    p.add_argument("command", choices=("stop", "kill", "status", "stats", "tasks"))
    _add_address(p)
    p.add_argument("--json", action="store_true", help="stats: print one JSON object")
    p.add_argument(
        "--owner",
        type=_positive_int,
        metavar="PID",
        help="act only on backends run by process PID or its children (a 'taskit backend "
        "--ports' supervisor); another process's backend is reported and left alone",
    )
    _add_client_options(p)
    p.set_defaults(func=_cmd_ctl)

    p = sub.add_parser(
        "call",
        usage="taskit call [options] HOST[:PORT] [PORTS] TASK [ARG ...]",
        help="call a task and print its result",
        description=(
            "Call TASK on HOST[:PORT] (or on any of HOST PORTS) and print the result. Each ARG "
            "is parsed as JSON when it parses (3, 2.5, true, null, [1,2], '{\"a\":1}', '\"3\"'), "
            "else passed as a string (with a warning when it looks like JSON; --raw passes "
            "every ARG as a string). Exit status 1, with the remote traceback on stderr, when "
            "the task raises."
        ),
    )
    p.add_argument("address", metavar="HOST[:PORT]", type=_address_arg, help=_ADDRESS_HELP)
    p.add_argument("task", metavar="TASK")
    p.add_argument("args", metavar="ARG", nargs="*")
    p.add_argument(
        "-k",
        "--kwarg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="keyword argument (value parsed like ARG); repeatable",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--raw", action="store_true", help="pass every ARG as a string, unparsed")
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=CALL_TIMEOUT,
        metavar="S",
        help=f"give up after S seconds (default {CALL_TIMEOUT:g}; exit 1)",
    )
    p.add_argument("--default-port", type=int, default=DEFAULT_PORT, help=argparse.SUPPRESS)
    _add_client_options(p, connect_timeout=5.0)  # a backend started just before
    p.set_defaults(func=_cmd_call)

    p = sub.add_parser(
        "ports",
        help="expand a port list into HOST:PORT lines",
        description="The port expander: 'taskit ports HOST 54543-54545' prints HOST:PORT lines.",
    )
    _add_targets(p)
    p.set_defaults(func=_cmd_ports)

    p = sub.add_parser(
        "keygen",
        help="write a CurveZMQ key pair: NAME.key (secret) and NAME.pub",
        description=(
            "Write a new CurveZMQ key pair: NAME.key holds the secret key (mode 0600; give "
            "it to 'taskit backend --curve-secret-file' or a client's --curve-secret-file) "
            "and NAME.pub the public key, which is also printed (the backend's goes to "
            "clients' --curve-server-key, a client's into the backend's --curve-clients-file). "
            "Existing files are never overwritten."
        ),
    )
    p.add_argument("name", metavar="NAME", help="path and name of the pair, e.g. keys/backend")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser(
        "top",
        help="live view of backends: workers, load, credit, service time, rate",
        description=(
            "Refresh a table of backend statistics until Ctrl-C (or --iterations): per "
            "backend its state, WORKERS (from its handshake), the load it reports (QUEUED, "
            "RUNNING), CREDIT (calls it holds, every client's / what one client may hold "
            "there), SERVICE (time one call keeps a worker busy), RATE/S (calls finished), "
            "DONE, FAILED, UPTIME. A HOST name resolving to several addresses is one row "
            "each; with --resolve-every, rows that join are marked + and rows that leave -. "
            "With --once or --iterations, exit status 1 if a backend was down in the last "
            "table. doc/operations.md explains each column."
        ),
    )
    _add_address(p)
    p.add_argument(
        "--resolve-every",
        type=_seconds,
        default=None,
        metavar="S",
        help="resolve HOST again every S seconds, to follow a DNS name or Kubernetes "
        "headless Service as machines join and leave (default: resolve once)",
    )
    p.add_argument(
        "--prefetch",
        type=_positive_int,
        default=DEFAULT_PREFETCH,
        metavar="N",
        help=f"the clients' prefetch, for CREDIT's limit (default {DEFAULT_PREFETCH}, as theirs)",
    )
    p.add_argument(
        "--interval", type=_seconds, default=2.0, metavar="S", help="refresh period (default 2)"
    )
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--once", action="store_true", help="print one table and exit")
    bound.add_argument(
        "--iterations",
        type=_count,
        default=0,
        metavar="N",
        help="exit after N refreshes (default: run until Ctrl-C)",
    )
    p.add_argument("--no-clear", action="store_true", help="do not clear the screen between tables")
    _add_client_options(p)
    p.set_defaults(func=_cmd_top)
    return parser


# The library's words for what the command line calls options (longest first).
_CLI_WORDS = (
    ("port=0", "--port 0"),
    ("key=...", "--key-file"),
    ("key=", "--key-file"),
    ("timeout=", "--timeout"),
    ("connect_timeout", "--connect-timeout"),
    ("max_message_size", "--max-message-size"),
    ("metrics_port", "--metrics-port"),
    ("curve_serverkey", "--curve-server-key"),
    ("curve_secretkey", "--curve-secret-file"),
)
_LIBRARY_WORD = re.compile("|".join(rf"(?<![\w-]){re.escape(w)}" for w, _ in _CLI_WORDS))


def _in_cli_words(message: str) -> str:
    """``message`` with the library's option names (``port=0``, ``key=``) replaced by
    the command line's (``--port 0``, ``--key-file``)."""
    words = dict(_CLI_WORDS)
    return _LIBRARY_WORD.sub(lambda m: words[m.group(0)], message)


def _is_user_error(e: BaseException) -> bool:
    """Errors that bad input or the environment cause (a file, a port, a key): one
    line, not a traceback. Anything else is a bug and keeps its traceback."""
    if isinstance(e, (TaskItError, PortSpecError, ValueError, OSError)):
        return True
    zmq = sys.modules.get("zmq")
    return zmq is not None and isinstance(e, zmq.ZMQError)


# Options whose value is a Z85 key: its alphabet has '-', and argparse takes a value
# that starts with '-' for an option ("expected one argument"), about 1 key in 85.
_KEY_OPTIONS = ("--curve-server-key",)


def _glue_key_values(argv: list[str]) -> list[str]:
    """``--curve-server-key KEY`` as ``--curve-server-key=KEY``, whatever KEY starts with."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            out.append(arg)
            out.extend(it)
            break
        if arg in _KEY_OPTIONS:
            value = next(it, None)
            out.append(arg if value is None else f"{arg}={value}")
        else:
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``taskit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(_glue_key_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return status
    except BrokenPipeError:
        # The reader left (`taskit ports ... | head`): as the Python docs advise for
        # SIGPIPE, point stdout at devnull so the exit-time flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"taskit {args.cmd}: {_in_cli_words(str(e))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
