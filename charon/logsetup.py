"""Charon's own log lines on stderr (journald keeps them): text by default, JSON on request.

Text:  2026-11-25T03:20:01.123Z supervisor[812] INFO reloaded: 2 workers on 127.0.0.1:8080
JSON:  {"time": "2026-11-25T03:20:01.123Z", "level": "INFO", "process": "supervisor", "pid": 812,
        "logger": "charon.supervisor", "message": "reloaded: ..."}
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

FORMATS = ("text", "json")


def _timestamp(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_timestamp(record)} {self.process}[{os.getpid()}] {record.levelname} "
            f"{record.getMessage()}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _timestamp(record),
            "level": record.levelname,
            "process": self.process,
            "pid": os.getpid(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup(process: str, log_format: str = "text", level: int = logging.INFO) -> None:
    """Send every `charon.*` log line to stderr in `log_format` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter(process) if log_format == "json" else TextFormatter(process)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
