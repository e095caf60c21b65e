"""taskit.progress: a tqdm bar on terminals when enabled, a no-op otherwise."""

from __future__ import annotations

import io
import threading

import pytest

from taskit.progress import ProgressBar, progress_bar, tqdm_available


class _TTY(io.StringIO):
    """A text stream that claims to be a terminal, so tqdm draws into it."""

    def isatty(self) -> bool:
        return True


def test_disabled_is_noop_but_counts():
    out = _TTY()
    with progress_bar(total=3, enabled=False, file=out) as bar:
        assert isinstance(bar, ProgressBar)
        assert not bar.active
        bar.update()
        bar.update(2)
    assert bar.count == 3
    assert out.getvalue() == ""


def test_not_a_terminal_is_noop():
    out = io.StringIO()  # isatty() is False: logs and CI stay clean
    bar = progress_bar(total=5, enabled=True, file=out)
    assert not bar.active
    bar.update(5)
    bar.close()
    assert out.getvalue() == ""


@pytest.mark.skipif(not tqdm_available(), reason="tqdm (the 'progress' extra) not installed")
def test_terminal_draws_tqdm_bar():
    out = _TTY()
    with progress_bar(total=4, desc="work", file=out) as bar:
        assert bar.active
        for _ in range(4):
            bar.update()
    text = out.getvalue()
    assert "work" in text
    assert "4/4" in text


def test_missing_tqdm_falls_back(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *a, **kw):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError("no tqdm here")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    bar = progress_bar(total=2, enabled=True, file=_TTY())
    assert not bar.active
    assert not tqdm_available()
    bar.update(2)
    bar.close()
    assert bar.count == 2


def test_update_thread_safe_and_close_idempotent():
    bar = progress_bar(total=None, enabled=False)
    threads = [
        threading.Thread(target=lambda: [bar.update() for _ in range(1000)], name=f"t{i}")
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bar.count == 4000
    bar.close()
    bar.close()
    bar.update()  # after close: ignored, no error
    assert bar.count == 4000
