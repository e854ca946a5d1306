"""Feeding llhttp a bounded amount of work per loop turn (issue #10, exhaustion).

llhttp (through httptools) parses whatever it is given in one call and cannot be paused from a
callback, so one read of pipelined requests or of tiny chunks used to become thousands of
callbacks in one turn of the loop. The client connection instead feeds each read in slices:

- A read that fits a slice (nearly every read) is fed whole: one length check.
- After a slice, parsing stops, and reading pauses, when enough pipelined requests are queued
  (the rest of the read waits, unparsed, until the queue drains) or when the slice did much
  work (many messages or chunks: the rest is parsed in a later turn, after other connections).
  A slice is SLICE bytes, or BODY_SLICE when it begins in body data, so a turn parses at most
  about 11,000 one-byte chunks (a few ms to a few tens of ms).
- Body pieces are collected and written to the backend once per turn, not once per chunk.
- A chunk-size line (with its extensions) or a trailer line longer than LINE_LIMIT is refused:
  llhttp skips extensions without telling, so the length of the line being parsed is the
  bytes past the last LF once parsing of a chunked body is between data (a line ends at an
  LF; extensions cannot hold one). A slice that begins between data is at most LINE_LIMIT + 1
  bytes past what was seen of the line, so a longer line always ends a slice unfinished.
  Slices that begin in body data are BODY_SLICE long (4 KiB ones cost a chunked upload of
  64 KiB chunks 2.3x the CPU): a line wholly inside such a slice is not measured, so the cap
  is exact for lines that begin a read or a slice, and BODY_SLICE for the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

import httptools
from httptools import HttpParserError, HttpParserUpgrade

if TYPE_CHECKING:
    from charon.worker.context import WorkerContext
    from charon.worker.http.exchange import Exchange

SLICE = 4 * 1024  # outside body data: bounds the work done per slice
BODY_SLICE = 64 * 1024  # from within body data: one callback per slice, or per big chunk
LINE_LIMIT = 4 * 1024  # a chunk-size line with its extensions, or a trailer field line
TURN_EVENTS = 64  # messages and chunks begun in a turn beyond which the rest of a read waits
MAX_QUEUED = 16  # pipelined requests parsed ahead of the active one


class SlicedFeed(asyncio.Protocol):
    """The slice loop; ClientConnection supplies the parsing and what to do with a stop."""

    __slots__ = ("_rest", "_rest_pos", "_rest_due", "slice", "between", "line", "events",
                 "body", "body_size")

    ctx: WorkerContext  # (the client connection's)
    parser: httptools.HttpRequestParser
    exchanges: deque[Exchange]
    closing: bool

    def __init__(self) -> None:
        self._rest = b""  # a read's unparsed rest (reading is paused meanwhile)
        self._rest_pos = 0
        self._rest_due = False  # a call of feed_rest is scheduled
        self.slice = SLICE  # bytes fed at most per slice (BODY_SLICE when in body data)
        # Parsing a request's body is between data: a chunk-size line or a trailer comes.
        self.between = False
        self.line = 0  # bytes of that line seen so far
        self.events = 0  # messages and chunks begun this turn
        self.body: list[bytes] = []  # body pieces parsed this turn, not yet passed on
        self.body_size = 0

    # -- supplied by the client connection ------------------------------------------------

    def parse_failed(self, exc: Exception, data: bytes, pos: int) -> None:
        """llhttp stopped at `pos` + the offset in the exception, on an upgrade or an error."""
        raise NotImplementedError

    def line_too_long(self) -> None:
        raise NotImplementedError


    def wait_for_rest(self) -> None:
        """Pause reading until the rest is parsed."""
        raise NotImplementedError

    def rest_parsed(self) -> None:
        """Resume reading."""
        raise NotImplementedError

    # -- llhttp's body callbacks ---------------------------------------------------------------

    def on_body(self, data: bytes) -> None:
        self.between = False
        self.slice = BODY_SLICE
        self.body.append(data)
        self.body_size += len(data)

    def on_chunk_header(self) -> None:
        self.events += 1
        self.between = True  # (for trailers after the last chunk; else body data comes)

    def on_chunk_complete(self) -> None:
        self.between = True
        self.slice = SLICE

    # -- the loop ---------------------------------------------------------------------------

    def parse(self, piece: bytes | memoryview, data: bytes, pos: int) -> bool:
        """Feed one slice to llhttp; False when parsing of this read must end here."""
        try:
            self.parser.feed_data(piece)
            return True
        except (HttpParserError, HttpParserUpgrade) as exc:
            self.parse_failed(exc, data, pos)
            return False

    def flush_body(self) -> None:
        body, self.body = self.body, []
        if self.exchanges:
            self.exchanges[-1].request_body(body, self.body_size)
        self.body_size = 0

    def must_wait(self) -> int:
        """Why the rest of a read must wait after a slice: 0 (it need not), 1 (the queue of
        pipelined requests is full: until it drains), 2 (the turn's work is done: next turn),
        3 (the connection is closing: dropped)."""
        if self.closing:
            return 3
        if len(self.exchanges) >= MAX_QUEUED:
            return 1
        return 2 if self.events > TURN_EVENTS else 0

    def feed(self, data: bytes, pos: int) -> None:
        end = len(data)
        view = None
        while True:
            n = self.slice + 1 - self.line
            stop = end if end - pos <= n else pos + n
            if pos == 0 and stop == end:
                piece: bytes | memoryview = data
            else:
                view = view or memoryview(data)
                piece = view[pos:stop]
            if not self.parse(piece, data, pos):
                return
            if self.between:
                if self.line_ends(data, pos, stop):
                    return
            elif self.line:
                self.line = 0
            pos = stop
            if pos >= end:
                break
            wait = self.must_wait()
            if wait:
                if wait != 3:
                    self._rest, self._rest_pos = data, pos
                    self.wait_for_rest()
                    if wait == 2:
                        self.schedule_rest()
                break
        if self.body:
            self.flush_body()

    def line_ends(self, data: bytes, pos: int, stop: int) -> bool:
        """After a slice that ended between a chunked body's data: the line being parsed is
        what follows the last LF. True if it is too long (the request is refused)."""
        lf = data.rfind(b"\n", pos, stop)
        self.line = stop - lf - 1 if lf >= 0 else self.line + stop - pos
        if self.line <= LINE_LIMIT:
            return False
        self.body = []
        self.line_too_long()
        return True

    def schedule_rest(self) -> None:
        if self._rest and not self._rest_due:
            self._rest_due = True
            self.ctx.loop.call_soon(self.feed_rest)

    def feed_rest(self) -> None:
        """Parse on in a new turn (reading stays paused until the whole read is parsed)."""
        self._rest_due = False
        data, pos = self._rest, self._rest_pos
        if not data:
            return
        self.events = 0
        wait = self.must_wait()
        if wait == 1:
            return  # the queue filled up again meanwhile
        self._rest = b""
        if wait == 3:
            return
        self.feed(data, pos)
        if not self._rest:
            self.rest_parsed()

    def take_rest(self, data: bytes) -> bytes:
        """Bytes read while a rest waited (only the front door's first read can be): joined."""
        rest, self._rest = self._rest[self._rest_pos :], b""
        return rest + data
