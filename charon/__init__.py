"""Charon: a reverse proxy for HTTP and WebSocket."""

__version__ = "0.1.0"
