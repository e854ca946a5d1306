"""The machinery the loader validates tables with: `ConfigError`, and `Table`, one TOML table
with its key path, so every message names the file, the line and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Literal, TypeVar

from charon.config import values
from charon.config.lines import KeyLines, KeyPath
from charon.config.model import ListenAddress

T = TypeVar("T")


class ConfigError(Exception):
    """A config problem, with where it is: `str(err)` is "PATH:LINE: message"."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line  # 0 if unknown
        self.message = message
        super().__init__(path, line, message)  # args match __init__: picklable

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.message}"


@dataclasses.dataclass(frozen=True)
class Source:
    path: str
    lines: KeyLines
    # False: certificate and CA files are not read (a worker re-reading a config the
    # supervisor has checked; a file changed since must not stop it from starting).
    check_files: bool = True


class Table:
    """One TOML table under validation: its raw data, its key path and its name for messages."""

    def __init__(self, source: Source, path: KeyPath, data: dict[str, Any]) -> None:
        self.source = source
        self.path = path
        self.data = data

    @property
    def name(self) -> str:
        dotted = ".".join(str(part) for part in self.path if isinstance(part, str))
        return f"[[{dotted}]]" if self.path and isinstance(self.path[-1], int) else f"[{dotted}]"

    @property
    def line(self) -> int:
        """The line of the table's header (or of the key that defines it)."""
        return self.source.lines.line_of(self.path)

    def resolve(self, name: str) -> Path:
        """A file named in the config: relative names are relative to the config file's
        directory (the working directory for an embedded config, "<default>")."""
        path = Path(name).expanduser()
        if self.source.path.startswith("<"):
            return Path.cwd() / path
        return Path(self.source.path).resolve().parent / path

    def label(self, key: str) -> str:
        return f"{self.name} {key}" if self.path else key

    def error_at(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.source.path, self.source.lines.line_of(path), message)

    def error(self, key: str, detail: str) -> ConfigError:
        """An error about the value of `key`, reported at its line."""
        return self.error_at((*self.path, key), f"{self.label(key)}: {detail}")

    def check_keys(self, allowed: Collection[str]) -> None:
        for key, value in self.data.items():
            if key not in allowed:
                raise self.error_at((*self.path, key), self._unknown(key, value, allowed))

    def _unknown(self, key: str, value: Any, allowed: Collection[str]) -> str:
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.7)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if self.path:
            return f"unknown key '{key}' in {self.name}{hint}"
        if isinstance(value, dict):
            return f"unknown table [{key}]{hint}"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return f"unknown table [[{key}]]{hint}"
        return f"unknown key '{key}' at the top level{hint}"

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        if key not in self.data:
            return default
        return self.parse(key, parse)

    def require(self, key: str, parse: Callable[[Any], T]) -> T:
        if key not in self.data:
            raise self.error_at(self.path, f"missing required key '{key}' in {self.name}")
        return self.parse(key, parse)

    def parse(self, key: str, parse: Callable[[Any], T]) -> T:
        try:
            return parse(self.data[key])
        except ValueError as err:
            raise self.error(key, str(err)) from None

    def elements(self, key: str, items: list[Any], parse: Callable[[Any], T]) -> list[T]:
        """Parses each array element; an error is reported at the element's line."""
        parsed = []
        for index, item in enumerate(items):
            try:
                parsed.append(parse(item))
            except ValueError as err:
                raise self.error_at((*self.path, key, index), f"{self.label(key)}: {err}") from None
        return parsed

    def table_or_false(self, key: str, example: str) -> dict[str, Any] | Literal[False] | None:
        """An optional table a location may also turn off: its data, False (`key = false`), or
        None (not set: inherited); anything else is an error showing `example`."""
        raw = self.data.get(key)
        if raw is None or isinstance(raw, dict):
            return raw
        if raw is False:
            return False
        raise self.error(
            key, f"expected a table like {example} or false, got {values.describe(raw)}"
        )

    def table(self, key: str) -> Table:
        """A sub-table (or inline table); an empty one when absent."""
        data = self.data.get(key, {})
        if not isinstance(data, dict):
            raise self.error(key, f"expected a table, got {values.describe(data)}")
        return Table(self.source, (*self.path, key), data)

    def tables(self, key: str) -> list[Table]:
        """An array of tables ([[key]]); empty when absent."""
        items = self.data.get(key, [])
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            sub = Table(self.source, (*self.path, key, 0), {})
            got = "an array of other values" if isinstance(items, list) else values.describe(items)
            raise self.error(key, f"expected {sub.name} tables, got {got}")
        return [Table(self.source, (*self.path, key, i), item) for i, item in enumerate(items)]


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {values.describe(value)}")
    return value


def array_of(what: str) -> Callable[[Any], list[Any]]:
    return lambda value: values.string_list(value, what)


def address_list(table: Table, key: str) -> tuple[ListenAddress, ...]:
    """`key` as "IP:PORT" or an array of them (possibly empty); an address listed twice is an
    error at its second line."""
    raw = table.data[key]
    items = [raw] if isinstance(raw, str) else table.parse(key, array_of('"IP:PORT" strings'))
    addresses = table.elements(key, items, values.listen_address)
    for index, address in enumerate(addresses):
        if address in addresses[:index]:
            raise table.error_at(
                (*table.path, key, index), f"{table.label(key)}: {address} is listed twice"
            )
    return tuple(addresses)


class InlineTable(Table):
    """The inline table of `key` in `parent` (or its element `index` when `key` holds an array
    of them): named "[[hosts]] rate_limit" or "[[hosts]] rate_limit[1]" in messages."""

    def __init__(
        self, parent: Table, key: str, data: dict[str, Any], index: int | None = None
    ) -> None:
        path = (*parent.path, key) if index is None else (*parent.path, key, index)
        super().__init__(parent.source, path, data)
        self._name = parent.label(key) if index is None else f"{parent.label(key)}[{index}]"

    @property
    def name(self) -> str:
        return self._name
