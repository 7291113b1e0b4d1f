"""Progress written to a log file (nohup, CI): lines at each tenth and at least every minute, where rich's live bar
writes nothing until it ends."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

from rich.console import Console

from tailor.cli._options import LoggedProgress


def logged(total: int) -> tuple[LoggedProgress, io.StringIO, list[float]]:
    out, now = io.StringIO(), [0.0]
    bar = LoggedProgress(Console(file=out, width=200), "fit perfit", 0, total, every=60.0, clock=lambda: now[0])
    return bar, out, now


def test_a_line_at_the_start_at_every_tenth_and_at_the_end() -> None:
    bar, out, now = logged(20)
    for _ in range(20):
        now[0] += 1.0
        bar(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "fit perfit: 0/20, 0 s"
    assert lines[1] == "fit perfit: 2/20, 2 s, eta 18 s"
    assert lines[-1] == "fit perfit: 20/20, 20 s"
    assert len(lines) == 11


def test_a_slow_bar_still_writes_a_line_every_minute() -> None:
    bar, out, now = logged(1000)
    now[0] = 30.0
    bar(1)
    assert len(out.getvalue().splitlines()) == 1  # neither a tenth nor a minute yet
    now[0] = 61.0
    bar(1)
    bar(0)
    assert out.getvalue().splitlines()[1:] == ["fit perfit: 2/1000, 61 s, eta 30439 s"]


def test_a_bar_that_does_not_advance_still_writes_its_minute_line() -> None:
    bar, out, now = logged(206)  # a fit whose first batch of users takes minutes
    now[0] = 59.0
    bar.beat()
    assert len(out.getvalue().splitlines()) == 1
    now[0] = 60.0
    bar.beat()
    bar.beat()  # nothing new within the minute
    assert out.getvalue().splitlines()[1:] == ["fit perfit: 0/206, 60 s"]
    bar(206)
    now[0] = 500.0
    bar.beat()  # a finished bar stays quiet
    assert out.getvalue().splitlines()[-1] == "fit perfit: 206/206, 60 s"


def heartbeats(monkeypatch) -> list[str]:
    """Logged bars with a fast heartbeat, on a console that writes nowhere: the description of each bar the heartbeat
    asks for a line, in order."""
    from tailor.cli import _options

    beats: list[str] = []
    monkeypatch.setattr(_options, "HEARTBEAT_S", 0.01)
    monkeypatch.setattr(_options.LoggedProgress, "beat", lambda self: beats.append(self.description))
    monkeypatch.setattr(_options, "console", Console(file=io.StringIO()))
    return beats


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_logged_bars_get_their_heartbeat_until_the_work_ends(monkeypatch) -> None:
    from tailor.cli._options import progress_bars

    beats = heartbeats(monkeypatch)
    with progress_bars() as start:
        start("eval", 0, 3)
        wait_for(lambda: bool(beats))
    assert beats, "the heartbeat thread never asked the bar for a line"
    after = len(beats)
    time.sleep(0.05)
    assert len(beats) == after  # stopped with the work


def test_only_the_newest_bar_gets_the_heartbeat(monkeypatch) -> None:
    """A bar that its phase left below its total (a fit that kept an earlier step) stays quiet once the next starts."""
    from tailor.cli._options import progress_bars

    beats = heartbeats(monkeypatch)
    with progress_bars() as start:
        start("fit", 1, 3)
        start("personalize", 0, 3)
        wait_for(lambda: beats.count("personalize") >= 3)
    assert beats.count("personalize") >= 3
    assert "fit" not in beats[beats.index("personalize"):]
