"""The raw request line of each request on a client connection, for the rule llhttp skips.

llhttp (httptools 0.9.0, a non-strict build) accepts extra spaces before and after the target
(`GET  / HTTP/1.1`) and reports only the method and the target. A server or proxy next to
Charon may split such a line differently, so it gets 400 (RFC 9112 3: single spaces).

httptools says neither where a message starts nor where it ends, so `RequestLines` follows the
byte stream beside llhttp, over the same bytes, and finds each request line itself:
- a message starts where the one before it ended, after the CR and LF bytes llhttp skips
  between messages (or at the connection's first byte);
- its request line ends at the first CRLF and its head at the first empty line after that
  (llhttp allows neither CR nor LF inside a line, so they are where llhttp ended them);
- its body is Content-Length bytes, or chunked: then the chunk-size lines are read here to
  skip the chunks (the data is never looked at), up to the empty line after the last chunk.
Several requests in one read, and lines, heads or bodies cut across reads, are followed alike.
A single-spaced line `METHOD TARGET HTTP/x.y` has its CRLF exactly len(METHOD) + len(TARGET)
+ 10 bytes after its start, which is all that is looked at in the common case; a line that is
not is scanned: it has extra spaces if it has more than two (a target has none; one is
HTTP/0.9, which plan_request answers 505). The head's empty line is searched for from a lower
bound taken from the fields' lengths, so only a few bytes are scanned. A line or head cut across
reads is scanned as the reads come.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from charon.worker.http.request import BODY_CHUNKED

if TYPE_CHECKING:
    from charon.worker.http.headers import Header
    from charon.worker.http.request import RequestPlan

_CR, _LF = 13, 10
_CRLF_BYTES = (b"\r", b"\n")
_UNKNOWN = -1
# A chunk-size or trailer line cut across reads is kept until its end; a longer one than this
# (llhttp has no limit on chunk extensions) stops the check for the rest of the connection.
_LINE_LIMIT = 64 * 1024


class RequestLines:
    __slots__ = (
        "data", "fed", "prev_cr", "next", "line_end", "cut", "spaces", "bad", "lost", "last3",
        "walk_at", "walk_trailers", "walk_stash",
    )

    def __init__(self) -> None:
        self.data = b""  # the bytes being fed to llhttp now (not kept after: memory)
        self.fed = 0  # the stream offset of data[0]
        self.prev_cr = False  # the read before ended in a head with a CR (a CRLF cut in two)
        self.next = 0  # the stream offset where the next message starts (before its CR/LFs)
        self.line_end = 0  # the stream offset of its CR (_UNKNOWN: not seen yet)
        self.cut = False  # the current head began in an earlier read: its line is scanned
        self.spaces = 0  # spaces so far on a scanned line
        self.bad = False  # the scanned line has extra spaces
        self.lost = False  # a chunk-size line over _LINE_LIMIT: no more checks
        self.last3 = b""  # the last bytes before `data` of a head cut across reads
        self.walk_at = _UNKNOWN  # the next chunk-size or trailer line of a chunked body
        self.walk_trailers = False  # past the last chunk
        self.walk_stash = b""  # the start of a chunk-size or trailer line cut across reads

    def feed(self, data: bytes) -> None:
        """`data` goes to llhttp next (called before it does)."""
        self.data = data
        if self.walk_at != _UNKNOWN:
            self._walk()

    def read_done(self, in_head: bool) -> None:
        """llhttp took all of the data; `in_head`: it ended inside a request head."""
        data = self.data
        if in_head:  # (rare) a head cut across reads: what this read had of it
            self._head_goes_on()
            self.prev_cr = data[-1:] == b"\r"
        self.fed += len(data)
        self.data = b""

    def rewind(self, unread: int) -> None:
        """llhttp stopped `unread` bytes before the end of the data (after an upgrade
        request's head); they are fed again later."""
        self.data = self.data[: len(self.data) - unread]
        self.read_done(False)

    def partial_line(self, limit: int) -> bytes:
        """What the data being fed holds of the current message's request line (at most
        `limit` bytes, up to its CRLF): for the log of a request refused before llhttp gave
        its target. Empty when the line began in an earlier read (its bytes are gone)."""
        if self.lost or self.next < self.fed or self.next > self.fed + len(self.data):
            return b""
        s = self._line_start()
        end = self.data.find(b"\r\n", s, s + limit)
        return self.data[s : end if end >= 0 else s + limit]

    def _line_start(self) -> int:
        """Where the current message's request line starts in the data: at `next`, after the
        CR/LF bytes llhttp skips (called in the read where the message began)."""
        data = self.data
        s = self.next - self.fed
        if s < 0:
            s = 0  # the CR/LF bytes before it were at the end of an earlier read
        n = len(data)
        while s < n and (data[s] == _CR or data[s] == _LF):
            s += 1
        return s

    def _bad_line(self, method_and_target: int) -> bool:
        """Whether the current request line has extra spaces; `method_and_target`: their
        length. A single-spaced `M T HTTP/1.1` line ends with its CRLF exactly that far from
        its start (the common case: no scan of the line)."""
        data = self.data
        if self.cut:
            self.cut = False
            if self.line_end == _UNKNOWN:
                self._line_goes_on(0)
            return self.bad
        s = self.next - self.fed
        if s < 0 or data[s : s + 1] in _CRLF_BYTES:
            s = self._line_start()
        end = s + method_and_target + 10
        if data.startswith(b"\r\n", end):
            self.line_end = self.fed + end
            return False
        end = data.find(b"\r\n", s)  # longer (extra spaces) or shorter (HTTP/0.9: 505 later)
        self.line_end = self.fed + end
        return data.count(b" ", s, end) > 2

    def _head_goes_on(self) -> None:
        if not self.cut:
            self.cut = True
            self.last3 = b""
            self.line_end = _UNKNOWN
            self.spaces = 0
            self._line_goes_on(self._line_start())
        elif self.line_end == _UNKNOWN:
            self._line_goes_on(0)
        self.last3 = (self.last3 + self.data)[-3:]

    def _line_goes_on(self, s: int) -> None:
        """Scan the current data from `s` for the rest of a request line cut across reads."""
        data = self.data
        if s == 0 and self.prev_cr and data[:1] == b"\n":
            self.line_end = self.fed - 1
        else:
            end = data.find(b"\r\n", s)
            if end == -1:
                self.spaces += data.count(b" ", s)
                return
            self.spaces += data.count(b" ", s, end)
            self.line_end = self.fed + end
        self.bad = self.spaces > 2

    def head_done(
        self, method_and_target: int, plan: RequestPlan | None, fields: list[Header], size: int
    ) -> bool:
        """llhttp completed the head of the current message: whether its request line has
        extra spaces. `method_and_target`: their length; `plan`: its plan, None when the proxy
        answers it itself and `fields` tell its framing; `size`: the sum of len(name) +
        len(value) + 4 over the fields."""
        if self.lost:
            return False
        bad = self._bad_line(method_and_target)
        # The empty line is the first CRLFCRLF from the line's CR on, and at least this far:
        # each field line has its name, a colon, its value and a CRLF (llhttp gives neither
        # the spaces before a value nor, perhaps, those after it).
        low = self.line_end + size - len(fields)
        data = self.data
        rel = low - self.fed
        if rel >= 0:
            head_end = self.fed + data.find(b"\r\n\r\n", rel) + 4
        else:  # (rare) the head began in an earlier read: its empty line may be cut up
            tail = self.last3
            base = self.fed - len(tail)
            head_end = base + (tail + data).find(b"\r\n\r\n", max(low - base, 0)) + 4
        self.last3 = b""
        if plan is not None:
            chunked, length = plan.body == BODY_CHUNKED, plan.length
        else:
            chunked, length = _framing(fields)
        if chunked:
            self.next = _UNKNOWN
            self.walk_at = head_end
            self.walk_trailers = False
            self.walk_stash = b""
            self._walk()
        else:
            self.next = head_end + length
        return bad

    def _walk(self) -> None:
        """Skip chunks as far as the data goes; at the end of the body, set `next`."""
        stash = self.walk_stash
        if stash:
            buf = stash + self.data
            base = self.fed - len(stash)
        else:
            buf = self.data
            base = self.fed
        at = self.walk_at - base
        n = len(buf)
        while at < n:
            end = buf.find(b"\r\n", at)
            if end == -1:
                if n - at > _LINE_LIMIT:
                    self.lost = True
                    self.walk_at = _UNKNOWN
                    return
                self.walk_stash = buf[at:]
                self.walk_at = base + at
                return
            if self.walk_trailers:
                if end == at:  # the empty line after the trailers: the message ends here
                    self.next = base + end + 2
                    self.walk_at = _UNKNOWN
                    self.walk_stash = b""
                    return
                at = end + 2
                continue
            try:
                size = int(buf[at:end].partition(b";")[0], 16)
            except ValueError:  # llhttp refuses it too, and the connection ends
                self.lost = True
                self.walk_at = _UNKNOWN
                return
            if size == 0:
                self.walk_trailers = True
                at = end + 2
            else:
                at = end + 2 + size + 2  # the size line, the data, its CRLF
        self.walk_at = base + at
        self.walk_stash = b""


def _framing(fields: list[Header]) -> tuple[bool, int]:
    """(chunked, length) of a request llhttp accepted but the proxy answers itself: with a
    Transfer-Encoding llhttp reads it as chunked (it refuses any other), else Content-Length."""
    length = 0
    for name, value in fields:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True, 0
        if lname == b"content-length":
            length = int(value.split(b",")[0])
    return False, length
