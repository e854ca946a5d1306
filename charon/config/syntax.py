"""TOML syntax errors that point at the cause. The parser reports where it gave up: for an
unclosed array or inline table that is the next statement or the end of the file, and for a
key set twice it is the second value, without naming the key. A small scan of the text up to
that point finds the line that opened the array or string, and the key that was set twice."""

from __future__ import annotations

import ast
import dataclasses
import re
import sys

if sys.version_info >= (3, 15):
    import tomllib as toml
else:  # TOML 1.1 (inline tables over several lines, used by the config syntax) is in
    import tomli as toml  # tomllib from Python 3.15 on; tomli has it since 2.4

_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")
# A line tomllib stopped at that starts a new statement: a table header or `key =`.
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_KEY = re.compile(rf"({_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*)[ \t]*=")
_STATEMENT = re.compile(r"""\s*(\[|[A-Za-z0-9_\-"'][A-Za-z0-9_\-"'. ]*=)""")


@dataclasses.dataclass
class _Item:
    """A statement (`key = value`) or a table header, where it starts."""

    offset: int
    line: int
    table: int  # index of the header it belongs to (-1: the root table)
    key: str  # dotted, spaces and quotes removed; a header's own name


@dataclasses.dataclass
class _Scan:
    headers: list[_Item] = dataclasses.field(default_factory=list)
    statements: list[_Item] = dataclasses.field(default_factory=list)
    brackets: list[tuple[str, int, str]] = dataclasses.field(default_factory=list)  # [ or {
    open_string: int = 0  # the line of a string still open at the end


def describe(err: toml.TOMLDecodeError, text: str) -> tuple[int, str]:
    """The line to report and the message (without the "invalid TOML: " prefix)."""
    message, line, column = _parts(err, text)
    offset = _offset(text, line, column)
    scan = _scan(text, offset)
    at_end = offset >= len(text)
    if scan.open_string and at_end:
        return scan.open_string, f"{message}: the string opened on this line is never closed"
    next_statement = not at_end and _STATEMENT.match(_line_text(text, line)) is not None
    # Brackets opened on the line the parser stopped at are a header read as a value.
    unclosed = [b for b in scan.brackets if b[1] < line or at_end]
    if unclosed and (at_end or next_statement):
        bracket, opened, key = unclosed[-1]
        gave_up = "the end of the file" if at_end else f"line {line}"
        what, closing = ("array", "]") if bracket == "[" else ("inline table", "}")
        detail = "" if message == f"Unclosed {what}" else f": {message}"
        return opened, (f"Unclosed {what}: the '{bracket}' of '{key}' on this line has no "
                        f"'{closing}' (the parser stopped at {gave_up}{detail})")
    if message.startswith("Cannot overwrite a value"):
        return _overwritten(scan, offset, line, message)
    declared = re.match(r"Cannot declare (\(.*\)) twice", message)
    if declared:
        return line, _declared_twice(scan, declared[1], line, message)
    return line, message


def _parts(err: toml.TOMLDecodeError, text: str) -> tuple[str, int, int]:
    """message, line, column; tomllib before Python 3.14 has only the formatted message."""
    formatted = str(err)
    match = _POSITION.search(formatted)
    message = formatted[: match.start()] if match else formatted
    if match and match[1]:
        return message, int(match[1]), int(match[2])
    return message, text.count("\n") + 1, len(text) - text.rfind("\n")


def _offset(text: str, line: int, column: int) -> int:
    start = 0
    for _ in range(line - 1):
        newline = text.find("\n", start)
        if newline < 0:
            return len(text)
        start = newline + 1
    return min(start + column - 1, len(text))


def _line_text(text: str, line: int) -> str:
    lines = text.split("\n")
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _scan(text: str, end: int) -> _Scan:
    """Headers, statements and open brackets in text[:end]: strings and comments skipped, a
    '[' at the start of a statement outside any value is a table header (TOML's own rule)."""
    scan = _Scan()
    pos, line, statement_start = 0, 1, True
    key = ""
    while pos < end:
        char = text[pos]
        if char == "\n":
            line += 1
            statement_start = not scan.brackets
            pos += 1
        elif char in " \t\r":
            pos += 1
        elif char == "#":
            newline = text.find("\n", pos)
            pos = end if newline < 0 else newline
        elif statement_start and char == "[":
            newline = text.find("\n", pos)
            header = text[pos : len(text) if newline < 0 else newline].split("#")[0]
            name = _normalise(header.strip().strip("[]"))
            scan.headers.append(_Item(pos, line, len(scan.headers) - 1, name))
            pos = end if newline < 0 else newline
        elif statement_start:
            match = _KEY.match(text, pos)
            key = _normalise(match[1]) if match else ""
            scan.statements.append(_Item(pos, line, len(scan.headers) - 1, key))
            statement_start = False
            pos = match.end() if match else pos + 1
        elif char in "\"'":
            string_line = line
            pos, line, closed = _skip_string(text, pos, line)
            if not closed:
                scan.open_string = string_line
        elif char in "[{":
            scan.brackets.append((char, line, _full_key(scan, key)))
            pos += 1
        elif char in "]}":
            if scan.brackets:
                scan.brackets.pop()
            pos += 1
        else:
            pos += 1
    return scan


def _skip_string(text: str, pos: int, line: int) -> tuple[int, int, bool]:
    """Past the string at pos: (position, line, closed)."""
    quote = text[pos]
    if text.startswith(quote * 3, pos):
        index = pos + 3
        while index < len(text):
            if quote == '"' and text[index] == "\\":
                index += 2
            elif text.startswith(quote * 3, index):
                run = 3
                while run < 5 and text.startswith(quote, index + run):
                    run += 1  # up to two quotes may end the content
                end = index + run
                return end, line + text.count("\n", pos, end), True
            else:
                index += 1
        return len(text), line + text.count("\n", pos), False
    index = pos + 1
    while index < len(text) and text[index] not in (quote, "\n"):
        index += 2 if quote == '"' and text[index] == "\\" else 1
    if index < len(text) and text[index] == quote:
        return index + 1, line, True
    return index, line, False


def _normalise(key: str) -> str:
    """A dotted key or header name as written, without quotes and the spaces around dots."""
    return ".".join(part.strip("\"'") for part in re.findall(_KEY_PART, key))


def _full_key(scan: _Scan, key: str) -> str:
    table = scan.headers[-1].key if scan.headers else ""
    return f"{table}.{key}" if table and key else key or table


def _overwritten(scan: _Scan, offset: int, line: int, message: str) -> tuple[int, str]:
    items = [s for s in scan.statements if s.offset < offset]
    if not items:
        return line, message
    last = items[-1]
    table = scan.headers[last.table].key if last.table >= 0 else ""
    name = f"{table}.{last.key}" if table else last.key
    first = next(
        (s.line for s in items[:-1] if s.table == last.table and s.key == last.key), None
    )
    where = f" (first set on line {first})" if first else ""
    return last.line, f"{message}: '{name}' is set twice{where}"


def _declared_twice(scan: _Scan, parts: str, line: int, message: str) -> str:
    try:
        name = ".".join(str(p) for p in ast.literal_eval(parts))
    except (ValueError, SyntaxError):
        return message
    first = next((h.line for h in scan.headers if h.key == name and h.line < line), None)
    return f"{message} (first on line {first})" if first else message
