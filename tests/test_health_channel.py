"""Health messages on the worker's control channel (worker/control.py), over a real socketpair:
verdicts applied to the HealthBoard and acknowledged, verdicts waiting before the channel
starts applied at once, passive mark-downs sent up, config answers and health messages never
interleaved when the socket is full, and the store's watchers."""

from __future__ import annotations

import asyncio
import pickle
import socket
from typing import Any

import pytest

from charon.supervisor.health.store import MemoryStore, Verdict
from charon.worker.control import (
    APPLIED,
    DOWN,
    HEALTH,
    VERDICTS,
    ControlChannel,
    MessageReader,
    decode_health,
    encode,
    encode_health,
)
from charon.worker.upstreams.health import HealthBoard

pytestmark = pytest.mark.timeout(30)

KEY = ("chat.test", "http://127.0.0.1:3000")


def read_messages(sock: socket.socket, reader: MessageReader, want: int) -> list[tuple[int, Any]]:
    messages: list[tuple[int, Any]] = []
    sock.settimeout(5)
    while len(messages) < want:
        data = sock.recv(1 << 20)
        assert data, "channel closed"
        for version, payload in reader.feed(data):
            messages.append((version, decode_health(payload) if version == HEALTH else payload))
    return messages


def test_verdicts_applied_acknowledged_and_reports_sent() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        supervisor, worker = socket.socketpair()
        clock = [100.0]
        board = HealthBoard(lambda: clock[0])
        before = board.health(KEY)
        # Sent before the channel starts (at spawn): applied by start(), before any request.
        supervisor.sendall(encode_health([VERDICTS, 0, [[*KEY, False, 4.0, 0.0]]]))
        channel = ControlChannel(loop, worker.detach(), lambda config: "", board)
        channel.start()
        assert not before.checked_up and not before.available(clock[0])
        assert before.changed_at == 96.0  # since 4 s, in this worker's clock
        reader = MessageReader()
        assert read_messages(supervisor, reader, 1) == [(HEALTH, [APPLIED, 0])]

        # Back up, with a passive mark-down by another worker for 2.5 s more.
        supervisor.sendall(encode_health([VERDICTS, 7, [[*KEY, True, 0.0, 2.5],
                                                        ["other", "http://x:1", True, 0, 0]]]))
        await asyncio.sleep(0.05)
        assert before.checked_up and before.down_until == 102.5
        assert not before.available(101.0) and before.available(102.5)
        assert board.health(("other", "http://x:1")).available(clock[0])
        assert read_messages(supervisor, reader, 1) == [(HEALTH, [APPLIED, 7])]

        # Down here already (shared): this worker's own failure marks nothing new.
        assert not before.failed(clock[0], 1, 10.0)
        # This worker's passive checks: report_down goes up without waiting.
        other = board.health(("other", "http://x:1"))
        assert other.failed(clock[0], 1, 10.0)
        board.report_down(other.key, other.down_until)
        [(version, message)] = read_messages(supervisor, reader, 1)
        assert version == HEALTH and message == [DOWN, "other", "http://x:1", 10.0]

        # A config still works beside them, answered in order.
        supervisor.sendall(encode(3, pickle.dumps(None)))
        await asyncio.sleep(0.05)
        assert read_messages(supervisor, reader, 1) == [(3, b"")]
        channel.close()
        assert board.reporter is None
        supervisor.close()

    asyncio.run(scenario())


def test_a_full_socket_keeps_messages_whole() -> None:
    """When the supervisor does not read, answers and reports wait in order in the out-buffer
    and reach it whole once it reads again."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        supervisor, worker = socket.socketpair()
        supervisor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        board = HealthBoard(loop.time)
        channel = ControlChannel(loop, worker.detach(), lambda config: "x" * 3000, board)
        channel.start()
        sent = 0
        for i in range(400):  # long error answers and reports, far beyond the socket's buffers
            supervisor.sendall(encode(i + 1, pickle.dumps(None)))
            board.report_down((f"g{i}", "http://a:1"), loop.time() + 5)
            sent += 2
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert channel._out, "the test should have filled the socket"
        reader = MessageReader()
        got = await asyncio.to_thread(read_messages, supervisor, reader, sent)
        answers = [v for v, _ in got if v != HEALTH]
        reports = [m[1] for v, m in got if v == HEALTH]
        assert answers == list(range(1, 401))
        assert reports == [f"g{i}" for i in range(400)]
        channel.close()
        supervisor.close()

    asyncio.run(scenario())


def test_bad_health_message_is_skipped() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        supervisor, worker = socket.socketpair()
        board = HealthBoard(loop.time)
        channel = ControlChannel(loop, worker.detach(), lambda config: "", board)
        channel.start()
        supervisor.sendall(encode(HEALTH, b"\xc1") + encode_health([VERDICTS, 1, [[1]]])
                           + encode_health([VERDICTS, 2, [[*KEY, False, 0, 0]]]))
        await asyncio.sleep(0.05)
        assert not board.health(KEY).checked_up  # the good one after two bad ones
        assert read_messages(supervisor, MessageReader(), 1) == [(HEALTH, [APPLIED, 2])]
        channel.close()
        supervisor.close()

    asyncio.run(scenario())


def test_memory_store_tells_watchers() -> None:
    store = MemoryStore()
    seen: list[tuple[Any, bool]] = []
    store.watch(lambda key, verdict: seen.append((key, verdict.up)))
    store.put(KEY, Verdict(False, 1.0, "down"))
    assert store.get(KEY) == Verdict(False, 1.0, "down")
    assert seen == [(KEY, False)] and store.items() == [(KEY, Verdict(False, 1.0, "down"))]
    store.remove(KEY)
    assert store.get(KEY) is None
    assert Verdict(True, 0, "", down_until=10.0).healthy(5.0) is False
    assert Verdict(True, 0, "", down_until=10.0).healthy(10.0) is True
