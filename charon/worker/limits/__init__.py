"""Limits shared by all workers (issue 14): rate limits, connection and WebSocket counts, kept
in one memfd table the supervisor makes before forking (table.py)."""
