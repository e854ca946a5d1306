"""The [timeouts] keys against slow clients (issue #10): send, body, body_min_rate."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_config import HOST, check_error, load, timeouts

from charon.config import Timeouts


def test_defaults() -> None:
    t = Timeouts()
    assert (t.send, t.body, t.body_min_rate) == (60.0, 0.0, 256)


def test_keys_parse_and_inherit(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[timeouts]\nsend = "30s"\nbody = "5m"\nbody_min_rate = "1KiB"\n'
        + HOST
        + 'timeouts = { body_min_rate = 0, body = "0s" }\n',
    )
    assert (config.timeouts.send, config.timeouts.body, config.timeouts.body_min_rate) == (
        30.0, 300.0, 1024,
    )
    host = config.hosts[0].timeouts
    assert (host.send, host.body, host.body_min_rate) == (30.0, 0.0, 0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('send = "0s"', '[timeouts] send: must be greater than 0, got "0s"'),
        ('body = "-1s"', '[timeouts] body: invalid duration "-1s": '
         'use e.g. "5s", "250ms", "2m", "1h", "1m30s"'),
        ("body_min_rate = -1", "[timeouts] body_min_rate: must be at least 0 bytes, got -1"),
        ('body_min_rate = "fast"', '[timeouts] body_min_rate: invalid size "fast": '
         'use a number of bytes or e.g. "64KiB", "16MiB"'),
    ],
)
def test_errors(tmp_path: Path, line: str, message: str) -> None:
    check_error(tmp_path, timeouts(line), 3, message)
