"""taskit.log: the TaskIt 4.0 logger tree and the bridge with stdlib logging."""

from __future__ import annotations

import io
import logging
import re
import threading

import pytest

from taskit import log as tlog
from taskit.log import (
    DEBUG,
    ERROR,
    IMPORTANT,
    IMPORTANT_LEVEL,
    INFO,
    FileLogger,
    LoggerNode,
    LoggingLogger,
    OutToError,
    OutToLog,
    Splitter,
    TaskItHandler,
    from_logging_level,
    null_logger,
    to_logging_level,
)


class Recorder:
    """A TaskIt logger that remembers its events."""

    def __init__(self):
        self.events = []
        self.closed = False
        self._lock = threading.Lock()

    def __call__(self, importance, msg):
        with self._lock:
            self.events.append((importance, msg))
        return True

    def close(self):
        self.closed = True


class RecordingFile(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1
        super().flush()


class FixedTimeLogger(FileLogger):
    def _time(self):
        return "T"


# --- names -------------------------------------------------------------------


def test_level_names_are_the_original_strings():
    assert (DEBUG, INFO, ERROR, IMPORTANT) == ("DEBUG", "INFO", "ERROR", "IMPORTANT")
    for name in tlog.__all__:
        assert hasattr(tlog, name)


def test_null_logger_accepts_everything_and_closes():
    assert null_logger(INFO, "x") is None
    assert null_logger("ANYTHING", object()) is None
    assert null_logger.close() is None


# --- OutToLog / OutToError ---------------------------------------------------


def test_out_to_log_logs_complete_lines_and_buffers_partial_ones():
    rec = Recorder()
    out = OutToLog(rec)
    assert out.write("hel") == 3
    assert rec.events == []
    out.write("lo\nwor")
    assert rec.events == [(INFO, "hello")]
    out.write("ld\n\nlast")
    assert rec.events == [(INFO, "hello"), (INFO, "world"), (INFO, "")]
    out.flush()  # does not split the pending line
    assert len(rec.events) == 3
    out.close()
    assert rec.events[-1] == (INFO, "last")
    assert out.closed and not rec.closed  # the logger is not ours to close
    out.close()  # idempotent, logs nothing more
    assert len(rec.events) == 4
    with pytest.raises(ValueError, match="closed"):
        out.write("more")


def test_out_to_log_works_as_print_target_and_with_writelines():
    rec = Recorder()
    out = OutToLog(rec, level=DEBUG)
    print("a", 1, file=out)
    out.writelines(["b\n", "c", "\n"])
    assert rec.events == [(DEBUG, "a 1"), (DEBUG, "b"), (DEBUG, "c")]
    assert out.writable() and not out.isatty()


def test_out_to_log_close_without_pending_text_logs_nothing():
    rec = Recorder()
    out = OutToLog(rec)
    out.write("x\n")
    out.close()
    assert rec.events == [(INFO, "x")]


def test_out_to_error_logs_at_error():
    rec = Recorder()
    err = OutToError(rec)
    err.write("oops\n")
    assert rec.events == [(ERROR, "oops")]


def test_out_to_log_lines_stay_whole_across_threads():
    rec = Recorder()
    out = OutToLog(rec)
    n, lines = 8, 200

    def writer(i):
        for j in range(lines):
            print(f"thread{i}-line{j}", file=out)  # write(text) then write("\n")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    msgs = [m for _, m in rec.events]
    # print's two writes (text, then "\n") may interleave between threads, so one
    # event can hold two texts -- but every event is made of whole texts only
    assert len(msgs) == n * lines
    tokens = []
    for m in msgs:
        assert re.fullmatch(r"(thread\d+-line\d+)*", m), m
        tokens += re.findall(r"thread\d+-line\d+", m)
    assert sorted(tokens) == sorted(f"thread{i}-line{j}" for i in range(n) for j in range(lines))


# --- Splitter ----------------------------------------------------------------


def test_splitter_fans_out_write_flush_close():
    a, b = RecordingFile(), RecordingFile()
    s = Splitter([a, b])
    assert s.write("x\n") == 2
    s.flush()
    assert a.getvalue() == b.getvalue() == "x\n"
    assert a.flushes == b.flushes == 1
    s.close()
    assert a.closed and b.closed


def test_splitter_writelines_gives_every_file_a_one_shot_iterator():
    a, b = io.StringIO(), io.StringIO()
    Splitter((a, b)).writelines(line for line in ["1\n", "2\n"])
    assert a.getvalue() == b.getvalue() == "1\n2\n"


def test_splitter_default_files_are_not_shared():
    s1, s2 = Splitter(), Splitter()
    s1.files.append(io.StringIO())
    assert s2.files == []
    s2.write("nothing happens")


def test_splitter_feeds_a_file_logger():
    a, b = io.StringIO(), io.StringIO()
    FixedTimeLogger(Splitter([a, b]), flush=1)(INFO, "both")
    assert a.getvalue() == b.getvalue() == "INFO (T)\tboth\n"


# --- LoggerNode --------------------------------------------------------------


def test_logger_node_forwards_allowed_events_only():
    r1, r2 = Recorder(), Recorder()
    node = LoggerNode([r1], allowed=(ERROR, IMPORTANT))
    node.add_children(r2)
    assert node(ERROR, "e") is True
    assert node(INFO, "i") is False
    assert r1.events == r2.events == [(ERROR, "e")]


def test_logger_node_allows_everything_by_default_and_closes_children():
    r = Recorder()
    node = LoggerNode(children=(r,))
    assert node("CUSTOM", 1) is True
    assert r.events == [("CUSTOM", 1)]
    node.close()  # a node has nothing of its own to close
    assert not r.closed
    node.close_children()
    assert r.closed


def test_logger_tree_sieves_downwards():
    low, high = Recorder(), Recorder()
    root = LoggerNode([low, LoggerNode([high], allowed=[ERROR])])
    root(INFO, "a")
    root(ERROR, "b")
    assert low.events == [(INFO, "a"), (ERROR, "b")]
    assert high.events == [(ERROR, "b")]


# --- FileLogger --------------------------------------------------------------


def test_file_logger_default_format_has_level_time_and_message():
    f = io.StringIO()
    FileLogger(f)(INFO, "hello %s")
    line = f.getvalue()
    assert line.startswith("INFO (") and line.endswith(")\thello %s\n")
    stamp = line[len("INFO (") : line.index(")")]
    # '%a %d %B %Y, %H:%M:%S', e.g. 'Wed 25 November 2026, 12:33:56'
    assert stamp.count(":") == 2 and "," in stamp and len(stamp.split()) == 5


def test_file_logger_overridable_time_and_format():
    f = io.StringIO()
    FixedTimeLogger(f)(ERROR, ("a", 1))
    assert f.getvalue() == "ERROR (T)\t('a', 1)\n"

    class Csv(FileLogger):
        def _format(self, level, msg):
            return f"{level},{msg}\n"

    g = io.StringIO()
    Csv(g)(DEBUG, "x")
    assert g.getvalue() == "DEBUG,x\n"


def test_file_logger_flushes_every_n_lines():
    f = RecordingFile()
    logger = FixedTimeLogger(f, flush=3)
    for i in range(7):
        logger(INFO, i)
    assert f.flushes == 2
    assert logger.count == 1
    assert logger.flush == 3  # the original attribute name holds the setting


def test_file_logger_flush_zero_never_flushes():
    f = RecordingFile()
    logger = FixedTimeLogger(f, flush=0)
    for i in range(10):
        logger(INFO, i)
    assert f.flushes == 0 and logger.count == 0
    assert f.getvalue().count("\n") == 10


def test_file_logger_filters_and_forwards_to_children():
    f = io.StringIO()
    child = Recorder()
    logger = FixedTimeLogger(f, allowed=[ERROR], children=[child])
    assert logger(INFO, "no") is False
    assert logger(ERROR, "yes") is True
    assert f.getvalue() == "ERROR (T)\tyes\n"
    assert child.events == [(ERROR, "yes")]


def test_file_logger_close_closes_the_file_not_the_children():
    f = io.StringIO()
    child = Recorder()
    logger = FileLogger(f, children=[child])
    logger.close()
    assert f.closed and not child.closed
    logger.close_children()
    assert child.closed


def test_file_logger_lines_stay_whole_across_threads():
    f = RecordingFile()
    logger = FixedTimeLogger(f, flush=10)
    n, per = 8, 250

    def writer(i):
        for j in range(per):
            logger(INFO, f"{i}:{j}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    lines = f.getvalue().splitlines()
    assert len(lines) == n * per
    assert set(lines) == {f"INFO (T)\t{i}:{j}" for i in range(n) for j in range(per)}
    assert f.flushes == n * per // 10


# --- level mapping -----------------------------------------------------------


def test_level_mapping_both_ways():
    assert to_logging_level(DEBUG) == logging.DEBUG
    assert to_logging_level(INFO) == logging.INFO
    assert to_logging_level(IMPORTANT) == IMPORTANT_LEVEL
    assert to_logging_level(ERROR) == logging.ERROR
    assert to_logging_level("WARNING") == logging.WARNING
    assert to_logging_level("CRITICAL") == logging.CRITICAL
    assert to_logging_level("whatever") == logging.INFO
    assert logging.INFO < IMPORTANT_LEVEL < logging.WARNING
    assert logging.getLevelName(IMPORTANT_LEVEL) == "IMPORTANT"

    assert from_logging_level(logging.DEBUG) == DEBUG
    assert from_logging_level(5) == DEBUG
    assert from_logging_level(logging.INFO) == INFO
    assert from_logging_level(IMPORTANT_LEVEL) == IMPORTANT
    assert from_logging_level(logging.WARNING) == IMPORTANT
    assert from_logging_level(logging.ERROR) == ERROR
    assert from_logging_level(logging.CRITICAL) == ERROR


# --- LoggingLogger -----------------------------------------------------------


def test_logging_logger_forwards_with_mapped_levels(caplog):
    bridge = LoggingLogger(logging.getLogger("test.bridge"))
    with caplog.at_level(logging.DEBUG, logger="test.bridge"):
        for imp in (DEBUG, INFO, IMPORTANT, ERROR):
            assert bridge(imp, f"{imp} 100% done") is True
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        ("test.bridge", logging.DEBUG, "DEBUG 100% done"),
        ("test.bridge", logging.INFO, "INFO 100% done"),
        ("test.bridge", IMPORTANT_LEVEL, "IMPORTANT 100% done"),
        ("test.bridge", logging.ERROR, "ERROR 100% done"),
    ]
    assert caplog.records[2].levelname == "IMPORTANT"
    bridge.close()  # nothing to release; the stdlib logger keeps working


def test_logging_logger_by_name_with_custom_levels_and_non_string_messages(caplog):
    bridge = LoggingLogger("test.named", levels={IMPORTANT: logging.WARNING})
    assert bridge.logger is logging.getLogger("test.named")
    assert "test.named" in repr(bridge)
    with caplog.at_level(logging.DEBUG, logger="test.named"):
        bridge(IMPORTANT, ("tuple", 1))
    assert caplog.records[0].levelno == logging.WARNING
    assert caplog.records[0].getMessage() == "('tuple', 1)"


def test_logging_logger_returns_false_below_the_threshold(caplog):
    bridge = LoggingLogger("test.threshold")
    with caplog.at_level(logging.ERROR, logger="test.threshold"):
        assert bridge(INFO, "dropped") is False
        assert bridge(ERROR, "kept") is True
    assert [r.getMessage() for r in caplog.records] == ["kept"]


def test_logging_logger_as_a_child_of_a_logger_node(caplog):
    tree = LoggerNode([LoggingLogger("test.tree")], allowed=[ERROR])
    with caplog.at_level(logging.DEBUG, logger="test.tree"):
        tree(INFO, "no")
        tree(ERROR, "yes")
    assert [r.getMessage() for r in caplog.records] == ["yes"]


# --- TaskItHandler -----------------------------------------------------------


@pytest.fixture
def std_logger():
    logger = logging.getLogger("test.handler")
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    added = []
    yield logger, added
    for h in added:
        logger.removeHandler(h)
        h.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


def test_taskit_handler_feeds_a_taskit_logger(std_logger):
    logger, added = std_logger
    rec = Recorder()
    handler = TaskItHandler(rec)
    added.append(handler)
    logger.addHandler(handler)
    logger.debug("d %d", 1)
    logger.info("i")
    logger.log(IMPORTANT_LEVEL, "imp")
    logger.warning("w")
    logger.error("e")
    logger.critical("c")
    assert rec.events == [
        (DEBUG, "d 1"),
        (INFO, "i"),
        (IMPORTANT, "imp"),
        (IMPORTANT, "w"),
        (ERROR, "e"),
        (ERROR, "c"),
    ]


def test_taskit_handler_includes_tracebacks_and_respects_formatter_and_level(std_logger):
    logger, added = std_logger
    f = io.StringIO()
    handler = TaskItHandler(FixedTimeLogger(f, flush=1), level=logging.INFO)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    added.append(handler)
    logger.addHandler(handler)
    logger.debug("below level")
    try:
        raise KeyError("k")
    except KeyError:
        logger.exception("failed")
    text = f.getvalue()
    assert "below level" not in text
    assert text.startswith("ERROR (T)\ttest.handler: failed\nTraceback")
    assert "KeyError: 'k'" in text


def test_taskit_handler_custom_levels(std_logger):
    logger, added = std_logger
    rec = Recorder()
    handler = TaskItHandler(rec, levels={logging.WARNING: "WARN"})
    added.append(handler)
    logger.addHandler(handler)
    logger.warning("w")
    logger.info("i")
    assert rec.events == [("WARN", "w"), (INFO, "i")]


def test_bridge_loop_does_not_recurse(std_logger):
    # stdlib logger -> TaskItHandler -> LoggingLogger -> same stdlib logger -> (dropped)
    logger, added = std_logger
    rec = Recorder()
    handler = TaskItHandler(LoggerNode([rec, LoggingLogger(logger)]))
    added.append(handler)
    logger.addHandler(handler)
    logger.info("once")
    assert rec.events == [(INFO, "once")]


def test_taskit_handler_reports_failing_loggers_via_handle_error(std_logger, monkeypatch):
    logger, added = std_logger

    def broken(importance, msg):
        raise OSError("disk full")

    handler = TaskItHandler(broken)
    seen = []
    monkeypatch.setattr(handler, "handleError", lambda record: seen.append(record.getMessage()))
    added.append(handler)
    logger.addHandler(handler)
    logger.error("lost")  # must not raise into the caller
    assert seen == ["lost"]
    logger.error("again")  # the re-entrancy guard was reset after the failure
    assert seen == ["lost", "again"]


def test_taskit_handler_close_logger_option():
    rec1, rec2 = Recorder(), Recorder()
    TaskItHandler(rec1).close()
    TaskItHandler(rec2, close_logger=True).close()
    assert not rec1.closed and rec2.closed


def test_the_json_formatter_writes_one_object_per_record_with_the_call_fields():
    import json

    from taskit.log import JSONFormatter

    fmt = JSONFormatter()
    record = logging.LogRecord("taskit.backend", logging.INFO, __file__, 1, "task %r", ("t",), None)
    record.task, record.call_id, record.peer, record.duration = "t", 7, "00ab", 0.25
    out = json.loads(fmt.format(record))
    assert out["level"] == "INFO" and out["logger"] == "taskit.backend"
    assert out["message"] == "task 't'"
    assert (out["task"], out["call_id"], out["peer"], out["duration"]) == ("t", 7, "00ab", 0.25)
    assert out["time"].endswith("Z") and "T" in out["time"]
    try:
        raise KeyError("k")
    except KeyError:
        import sys

        bare = logging.LogRecord("x", logging.ERROR, __file__, 1, "%s", (object(),), sys.exc_info())
    line = fmt.format(bare)
    assert "\n" not in line  # one line, the traceback inside the object
    out = json.loads(line)
    assert "KeyError: 'k'" in out["exception"]
    assert "task" not in out and "call_id" not in out
