"""The supervisor's respawn policy (charon/supervisor/respawn.py) as numbers: the delays a slot
waits after each death, and when the supervisor gives up. The processes themselves are in
test_supervisor.py."""

from __future__ import annotations

from charon.supervisor.respawn import CRASH_BACKOFF_MAX, STABLE_AFTER, Respawn


def test_workers_that_served_back_off_boundedly_and_never_make_it_give_up() -> None:
    respawn = Respawn()
    crashes = 0
    delays = []
    for _ in range(50):
        delay, crashes = respawn.delay(served=True, lived=1.0, crashes=crashes)
        delays.append(delay)
        assert not respawn.giving_up(serving=0)
    assert delays[:6] == [0.0, 0.25, 0.5, 1.0, 2.0, CRASH_BACKOFF_MAX]
    assert max(delays) == CRASH_BACKOFF_MAX
    # A worker that served a while before it died: its slot starts again at once.
    delay, crashes = respawn.delay(served=True, lived=STABLE_AFTER, crashes=crashes)
    assert (delay, crashes) == (0.0, 1)


def test_workers_that_never_served_make_it_give_up_after_five_in_a_row() -> None:
    respawn = Respawn()
    delays = [respawn.delay(served=False, lived=0.1, crashes=0)[0] for _ in range(4)]
    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert not respawn.giving_up(serving=0)
    respawn.delay(served=False, lived=0.1, crashes=0)
    assert not respawn.giving_up(serving=1)  # another worker serves: keep trying
    assert respawn.giving_up(serving=0)
    # A worker that served in between starts the count again.
    respawn.delay(served=True, lived=10.0, crashes=0)
    assert respawn.startup_failures == 0
