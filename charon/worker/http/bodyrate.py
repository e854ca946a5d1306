"""How long a request body may take (issue #10, exhaustion).

One deadline, recomputed each turn the body advances: the body-idle limit (`idle` after the
last bytes), the minimum rate (`body_min_rate` bytes per second on average, after `idle`
seconds of grace from the request head: a client trickling a byte now and then never lets
the idle limit fire) and the whole body's limit (`body`, off by default). Past it: 408.
"""

from __future__ import annotations

import time

from charon.config.model import Timeouts


def body_wait(timeouts: Timeouts, started: float, received: int) -> float:
    """Seconds from now until the body of a request whose head came at `started`
    (time.monotonic) and of which `received` bytes came so far is late; may be negative."""
    wait = timeouts.idle
    if timeouts.body_min_rate or timeouts.body:
        since = time.monotonic() - started
        if timeouts.body_min_rate:
            wait = min(wait, timeouts.idle + received / timeouts.body_min_rate - since)
        if timeouts.body:
            wait = min(wait, timeouts.body - since)
    return wait
