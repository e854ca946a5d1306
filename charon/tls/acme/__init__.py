"""ACME (RFC 8555) for `tls = "auto"` hosts: one client in the supervisor (client.py) driven
by a per-host schedule (schedule.py); workers only read what it writes under the state
directory (charon/tls/paths.py, files written by store.py and challenges.py)."""
