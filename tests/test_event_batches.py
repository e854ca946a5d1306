"""The RECORDS batch format: REQUEST records travel as columns, other records as arrays, and
the supervisor's decoding gives back every record, field for field, in the order of time."""

from __future__ import annotations

import msgpack

from charon.events.publisher import RequestColumns, _array_header
from charon.events.schema import REQUEST, REQUEST_COLUMNS, WS_OPEN, unpack_records


def _batch(columns: RequestColumns, events: list[tuple]) -> bytes:
    packer = msgpack.Packer(autoreset=False)
    for event in events:
        packer.pack(event)
    packed_columns = msgpack.packb(columns.pack() if len(columns) else None)
    return _array_header(2) + packed_columns + _array_header(len(events)) + packer.bytes()


def _add(columns: RequestColumns, record: tuple) -> None:
    for (name, _), value in zip(REQUEST_COLUMNS, record, strict=True):
        getattr(columns, name).append(value)


REQUESTS = [
    (1.25, "app.example.com", "GET", 200, 0.0015, 13, "127.0.0.1", "/small"),
    (1.5, "_other", "OTHER", 404, 0.25, 2**40, "::1", "/caf\u00e9?q=\u00ff"),
    (3.0, "app.example.com", "POST", 502, 0.0, 0, "10.0.0.1", ""),
]


def test_requests_and_events_round_trip_in_time_order() -> None:
    columns = RequestColumns()
    for record in REQUESTS:
        _add(columns, record)
    ws_open = (WS_OPEN, 2.0, "app.example.com", "127.0.0.1", "/ws", "chat")
    events = unpack_records(_batch(columns, [ws_open]))
    assert events == [
        [REQUEST, *REQUESTS[0]],
        [REQUEST, *REQUESTS[1]],
        list(ws_open),
        [REQUEST, *REQUESTS[2]],
    ]
    assert len(columns) == 0  # packed and emptied for the next batch


def test_a_path_with_a_nul_keeps_every_field() -> None:
    columns = RequestColumns()
    nul = (2.0, "h", "GET", 200, 0.1, 1, "127.0.0.1", "/a\0b")
    _add(columns, REQUESTS[0])
    _add(columns, nul)
    assert unpack_records(_batch(columns, [])) == [[REQUEST, *REQUESTS[0]], [REQUEST, *nul]]


def test_a_batch_without_requests() -> None:
    ws_open = (WS_OPEN, 2.0, "h", "127.0.0.1", "/ws", "")
    assert unpack_records(_batch(RequestColumns(), [ws_open])) == [list(ws_open)]
