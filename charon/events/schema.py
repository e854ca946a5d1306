"""The events workers send to the supervisor: msgpack arrays, one layout per kind.

Arrays, not maps: packing a tuple is several times cheaper than a dict on the request path, and
the field names live here, once, for both ends.

A message on the wire is one msgpack array, of one of two shapes:

- `[RECORDS, worker_id, pid, count, packed]`: a batch of `count` records for the live log
  (requests, tunnels, upstream errors), left packed: `packed` is the msgpack array
  `[request_columns, events]` (see `unpack_records`): the REQUEST records field by field (numbers
  as native arrays, text joined with NUL: the worker pays a list append per field and a C loop
  per batch, not msgpack's per-value dispatch for every request), then every other record as an
  array. The supervisor decodes it only when someone reads the live log: with nobody watching,
  a record costs it nothing but its share of one receive per batch. Workers send a batch at
  most every FLUSH_INTERVAL.
- `[CONTROL, worker_id, pid, [event, ...]]`: events the supervisor always acts on (METRICS).
"""

from __future__ import annotations

from array import array
from typing import Any

import msgpack

# Message tags: the first element of every message.
RECORDS = 0
CONTROL = 1

# Kinds: the first element of every event.
REQUEST = "req"
WS_OPEN = "ws_open"
WS_CLOSE = "ws_close"
UPSTREAM_ERROR = "upstream_error"
METRICS = "metrics"  # a worker's metric deltas and gauges, once a second
CONFIG_RELOAD = "reload"  # from the supervisor itself
WORKER_EXIT = "worker_exit"  # from the supervisor itself
CERTIFICATE = "certificate"  # from the supervisor itself: an ACME order's outcome
DROPPED = "dropped"  # made by the supervisor from a worker's METRICS (see admin/drops.py)
UPSTREAM_HEALTH = "upstream_health"  # from the supervisor itself: a target's health changed

FIELDS: dict[str, tuple[str, ...]] = {
    # denied: why a rule refused it (acl, auth, rate, connections, body_size); only in the
    # records of refused requests, which travel as whole events, not in the batch's columns
    REQUEST: (
        "time", "host", "method", "status", "duration", "response_bytes", "client_ip", "path",
        "denied",
    ),
    WS_OPEN: ("time", "host", "client_ip", "path", "subprotocol"),
    WS_CLOSE: (
        "time", "host", "client_ip", "path", "subprotocol", "duration", "messages_in",
        "messages_out", "bytes_in", "bytes_out", "close_code", "closed_by",
    ),
    # error: the kind (ERR_*); reason, phase: see worker/upstreams/failure.py; upstream: the
    # backend's host:port; message: the system's words ("connection refused")
    UPSTREAM_ERROR: (
        "time", "host", "error", "status", "client_ip", "path", "reason", "phase", "upstream",
        "message",
    ),
    # deltas: counters since the previous METRICS; gauges: values now (see worker/telemetry.py)
    METRICS: ("deltas", "gauges"),
    # version: the config version serving after it; workers: {worker id: version applied}
    CONFIG_RELOAD: ("time", "result", "path", "error", "version", "workers"),
    WORKER_EXIT: ("time", "worker_id", "pid", "status", "restart_in"),
    # event: obtained, renewed or failed; not_after: Unix time (None before the first one)
    CERTIFICATE: ("time", "event", "host", "issuer", "not_after", "error"),
    # `count` records lost by the worker `pid` between `since` and `time` (its last loss)
    DROPPED: ("time", "count", "since", "pid", "by"),
    # host: the Backends name (the proxy host's first domain, + a location's path); target: the
    # target URL as configured; healthy: whether it takes traffic now; reason: why it changed
    UPSTREAM_HEALTH: ("time", "host", "target", "healthy", "reason"),
}

# Upstream error kinds (the `kind` label of charon_upstream_errors_total; its finer `reason`
# label: REASONS in worker/upstreams/failure.py).
ERR_CONNECT = "connect"
ERR_TIMEOUT = "timeout"
ERR_BAD_RESPONSE = "bad_response"
ERR_CLOSED = "closed"
ERR_TLS = "tls"  # the TLS handshake with an https:// backend failed (its certificate, mostly)


# The columns of a batch's REQUEST records, in the order of FIELDS[REQUEST] (all but `denied`),
# with how each is packed: an array typecode for numbers, "" for text joined with NUL.
REQUEST_COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "d"), ("host", ""), ("method", ""), ("status", "H"), ("duration", "d"),
    ("response_bytes", "Q"), ("client_ip", ""), ("path", ""),
)


def pack_text(values: list[str]) -> str | list[str]:
    """A text column: one string joined with NUL, or a copy of the list in the rare batch where
    a value holds a NUL (a path can; host labels, methods and addresses cannot)."""
    joined = "\0".join(values)
    if joined.count("\0") != len(values) - 1:
        return list(values)  # a copy: the caller clears its list for the next batch
    return joined


def unpack_records(packed: bytes) -> list[list[Any]]:
    """A RECORDS batch as events (arrays as in FIELDS), in the order they happened."""
    columns, events = msgpack.unpackb(packed)
    if not columns:
        return events  # type: ignore[no-any-return]
    _count, *packed_columns = columns  # only batches with requests have columns
    values: list[list[Any]] = []
    for (_, typecode), column in zip(REQUEST_COLUMNS, packed_columns, strict=True):
        if typecode:
            numbers = array(typecode)
            numbers.frombytes(column)
            values.append(numbers.tolist())
        elif isinstance(column, str):
            values.append(column.split("\0"))
        else:
            values.append(column)
    requests = [[REQUEST, *fields] for fields in zip(*values, strict=True)]
    if not events:
        return requests
    return sorted(requests + events, key=lambda event: event[1])  # by time (stable)


def as_dict(event: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """An event as a named record: {"kind": ..., field: value, ...}."""
    kind = event[0]
    names = FIELDS.get(kind, ())
    record: dict[str, Any] = {"kind": kind}
    record.update(zip(names, event[1:], strict=False))
    return record
