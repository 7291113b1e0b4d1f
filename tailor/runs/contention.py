"""Whether other processes shared the CPU while something ran: seconds measured then are not speed figures.

The machine's busy CPU time (every core, every process, from /proc/stat) less this process tree's own (rusage of the
process and its finished children), over the wall time: the cores everything else used on average. The load average
cannot tell: right after one run ends it still counts that run's threads for a minute or more.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

BUSY_OTHERS = 0.2
"""Work is contended when other processes used more than this many cores, on average, while it ran."""


def busy_cpu_s() -> float | None:
    """Seconds of CPU the whole machine has been busy (every core, every process), or None where /proc/stat is not."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


def others_cores(busy: tuple[float | None, float | None], own: tuple[float, float], wall: float) -> float | None:
    """Cores used, on average over `wall` seconds, by everything but the measured work (None where it cannot be
    measured)."""
    if busy[0] is None or busy[1] is None or wall <= 0:
        return None
    return max(0.0, (busy[1] - busy[0]) - (own[1] - own[0])) / wall


class Watch:
    """Started when the work starts; when it ends, `seconds()` is its wall time and `others()` the cores other
    processes used meanwhile (one clock for both)."""

    def __init__(self) -> None:
        self.busy, self.own, self.start = busy_cpu_s(), own_cpu_s(), time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def others(self) -> float | None:
        return others_cores((self.busy, busy_cpu_s()), (self.own, own_cpu_s()), self.seconds())


def contended(others: float | None) -> bool:
    """Unmeasured counts as contended: a figure is a speed measurement only when it is known not to be."""
    return others is None or others > BUSY_OTHERS
