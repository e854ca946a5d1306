"""Where things are in a TOML source: a small scanner that maps key paths to line numbers.

TOML parsers return plain values without positions, so the loader runs this scanner over the
(already validated) source text to point its messages at the right line. A key path is a tuple
like ("hosts", 1, "locations", 0, "upstream"): table and key names, with the index of each
array-of-tables (or array) element.

Recorded lines:
- every table header: ``[server]``, ``[[hosts]]`` (each occurrence is the next index),
  ``[[hosts.locations]]`` (indexed within the current host), ``[hosts.timeouts]``;
- every ``key = value`` line (bare, quoted and dotted keys), including keys inside inline tables;
- every element of an array, at the line where the element starts.

Lines inside multi-line strings, arrays and inline tables are never mistaken for keys.
The scanner never raises: on text it does not understand it skips ahead, and lookups
fall back to the nearest recorded enclosing path (or 0).
"""

from __future__ import annotations

import string

from charon.config.syntax import toml

KeyPath = tuple[str | int, ...]

_BARE_KEY_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_SCALAR_END = frozenset(",]}\n\r#")


class KeyLines:
    """The line of every table header, key and array element found in a TOML text."""

    def __init__(self, text: str) -> None:
        self._lines: dict[KeyPath, int] = {}
        _Scanner(text, self._lines).scan()

    def line_of(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest recorded parent; 0 if nothing is known."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return 0

    def exact(self, path: KeyPath) -> int | None:
        """The line recorded for exactly `path`, if any."""
        return self._lines.get(path)


class _Scanner:
    def __init__(self, text: str, lines: dict[KeyPath, int]) -> None:
        self.text = text
        self.pos = 0
        self.line = 1
        self.lines = lines
        self.arrays: dict[KeyPath, int] = {}  # array-of-tables path -> index of its last element

    # -- low level -------------------------------------------------------------------------

    def peek(self, offset: int = 0) -> str:
        index = self.pos + offset
        return self.text[index] if index < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def advance(self, count: int = 1) -> None:
        end = min(self.pos + count, len(self.text))
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def skip_spaces(self) -> None:
        while self.peek() in (" ", "\t"):
            self.advance()

    def skip_comment(self) -> None:
        while not self.at_end() and self.peek() != "\n":
            self.advance()

    def skip_blank(self) -> None:
        """Spaces, newlines and comments."""
        while not self.at_end():
            char = self.peek()
            if char in (" ", "\t", "\r", "\n"):
                self.advance()
            elif char == "#":
                self.skip_comment()
            else:
                return

    # -- statements ------------------------------------------------------------------------

    def scan(self) -> None:
        table: KeyPath = ()
        while True:
            self.skip_blank()
            if self.at_end():
                return
            start = self.pos
            if self.peek() == "[":
                table = self.header()
            else:
                self.key_value(table)
            if self.pos == start:  # not understood: never loop forever
                self.skip_comment()

    def header(self) -> KeyPath:
        line = self.line
        is_array = self.peek(1) == "["
        self.advance(2 if is_array else 1)
        self.skip_spaces()
        parts = self.read_key()
        path = self.resolve(parts, is_array)
        for end in range(1, len(path)):
            self.lines.setdefault(path[:end], line)  # implicitly defined super-tables
        self.lines[path] = line
        self.skip_comment()  # the closing brackets and any comment
        return path

    def resolve(self, parts: list[str], is_array: bool) -> KeyPath:
        """The key path of a table header: array-of-tables names get their current index."""
        path: KeyPath = ()
        for number, part in enumerate(parts):
            path += (part,)
            if is_array and number == len(parts) - 1:
                self.arrays[path] = self.arrays.get(path, -1) + 1
                path += (self.arrays[path],)
            elif path in self.arrays:
                path += (self.arrays[path],)
        return path

    def key_value(self, table: KeyPath) -> None:
        line = self.line
        parts = self.read_key()
        if not parts:
            return
        self.record(table, parts, line)
        self.skip_spaces()
        if self.peek() != "=":
            return
        self.advance()
        self.skip_spaces()
        self.value(table + tuple(parts))

    def record(self, table: KeyPath, parts: list[str], line: int) -> None:
        for end in range(1, len(parts) + 1):
            self.lines.setdefault(table + tuple(parts[:end]), line)

    # -- keys ------------------------------------------------------------------------------

    def read_key(self) -> list[str]:
        """A possibly dotted key; stops before '=' or ']' (the position is left after the key)."""
        parts: list[str] = []
        while True:
            self.skip_spaces()
            part = self.read_key_part()
            if part is None:
                return parts
            parts.append(part)
            self.skip_spaces()
            if self.peek() != ".":
                return parts
            self.advance()

    def read_key_part(self) -> str | None:
        char = self.peek()
        if char in ('"', "'"):
            start = self.pos
            self.skip_string()
            return _unquote(self.text[start : self.pos])
        start = self.pos
        while self.peek() and self.peek() in _BARE_KEY_CHARS:
            self.advance()
        return self.text[start : self.pos] if self.pos > start else None

    # -- values ----------------------------------------------------------------------------

    def value(self, path: KeyPath) -> None:
        char = self.peek()
        if char in ('"', "'"):
            self.skip_string()
        elif char == "[":
            self.array(path)
        elif char == "{":
            self.inline_table(path)
        else:
            while not self.at_end() and self.peek() not in _SCALAR_END:
                self.advance()

    def array(self, path: KeyPath) -> None:
        self.advance()  # "["
        index = 0
        while True:
            self.skip_blank()
            if self.at_end() or self.peek() == "]":
                self.advance()
                return
            start = self.pos
            if self.peek() != ",":
                self.lines.setdefault(path + (index,), self.line)
                self.value(path + (index,))
                index += 1
            self.skip_blank()
            if self.peek() == ",":
                self.advance()
            if self.pos == start:
                self.advance()

    def inline_table(self, path: KeyPath) -> None:
        self.advance()  # "{"
        while True:
            self.skip_blank()
            if self.at_end() or self.peek() == "}":
                self.advance()
                return
            start = self.pos
            self.key_value(path)
            self.skip_blank()
            if self.peek() == ",":
                self.advance()
            if self.pos == start:
                self.advance()

    def skip_string(self) -> None:
        quote = self.peek()
        if self.text.startswith(quote * 3, self.pos):
            self.skip_multiline_string(quote)
            return
        self.advance()
        while not self.at_end() and self.peek() not in (quote, "\n"):
            self.advance(2 if quote == '"' and self.peek() == "\\" else 1)
        if self.peek() == quote:
            self.advance()

    def skip_multiline_string(self, quote: str) -> None:
        self.advance(3)
        while not self.at_end():
            if quote == '"' and self.peek() == "\\":
                self.advance(2)
            elif self.text.startswith(quote * 3, self.pos):
                run = 3
                while run < 5 and self.peek(run) == quote:  # up to two quotes may end the content
                    run += 1
                self.advance(run)
                return
            else:
                self.advance()


def _unquote(quoted: str) -> str:
    """The name of a quoted key: literal keys as-is, basic keys with escapes resolved."""
    if quoted.startswith("'"):
        return quoted[1:-1]
    try:
        return str(toml.loads(f"k = {quoted}")["k"])
    except toml.TOMLDecodeError:
        return quoted[1:-1]
