"""Fixtures: real Charon supervisors and real backends, all on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Backend  # noqa: E402


@pytest.fixture
def backend_factory() -> Iterator:  # type: ignore[type-arg]
    started: list[Backend] = []

    def start(script: str, *args: str) -> Backend:
        backend = Backend(script, *args)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()
