"""The config a reload sends the workers: equal parts shared (charon/config/sharing.py), so it
pickles smaller and unpickles faster, and equal to the loaded one."""

from __future__ import annotations

import pickle

from charon.config import load_config_text
from charon.config.sharing import share_equal

HOSTS = 50


def text() -> str:
    parts = ['[server]\nlisten = ["127.0.0.1:8080"]\nworkers = 2\n']
    for i in range(HOSTS):
        parts.append(
            f'[[hosts]]\ndomains = ["h{i}.test", "*.h{i}.test"]\n'
            f'upstream = "http://127.0.0.1:{20000 + i % 5}"\n'
            f'[[hosts.locations]]\npath = "/ws"\nupstream = "http://127.0.0.1:9000"\n'
        )
    return "\n".join(parts)


def test_shared_config_is_equal_and_pickles_smaller() -> None:
    config = load_config_text(text(), "a.toml")
    shared = share_equal(config)
    assert shared == config
    after = pickle.loads(pickle.dumps(shared, pickle.HIGHEST_PROTOCOL))
    assert after == config
    # One object per distinct value, also after the trip the workers' copy takes.
    assert len({id(h.timeouts) for h in after.hosts}) == 1
    assert len({id(h.websocket) for h in after.hosts}) == 1
    assert len({id(h.upstream) for h in after.hosts}) == 5
    assert len({id(h.locations[0].upstream) for h in after.hosts}) == 1
    plain = len(pickle.dumps(config, pickle.HIGHEST_PROTOCOL))
    assert len(pickle.dumps(shared, pickle.HIGHEST_PROTOCOL)) < plain / 2
